"""Plain-text / Markdown tables and the perplexity-vs-bits plot.

Tables: ``format_table(rows, columns)`` where ``rows`` are dicts and each column is
``(key, header, fmt)``.  ``fmt`` is a format spec (``".3f"``), a callable ``value -> str`` or
``None`` (``str``); a missing key or a ``None`` value prints as ``-``.  A column whose values
are all numbers is right-aligned, otherwise left-aligned.  ``markdown=True`` gives a GitHub
pipe table with the same cells and alignment markers.

Plot: ``plot_ppl_vs_bits(rows, path, title)`` reads each row's ``name``, ``bits`` (bits per
weight) and ``ppl``; rows with a true ``baseline`` key are drawn as a dashed horizontal line
instead of a point; rows sharing a ``group`` value (e.g. a method) are joined by a line in one
colour.  The y axis is logarithmic when the largest perplexity is more than 3x the smallest.
Rows whose perplexity is not finite are listed under the plot instead of drawn.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit import outputs
from lowbit.errors import LowbitError

__all__ = ["format_table", "plot_ppl_vs_bits"]

def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _cell(value: Any, fmt) -> str:
    if value is None:
        return "-"
    if fmt is None:
        return str(value)
    if callable(fmt):
        return str(fmt(value))
    try:
        return format(value, fmt)
    except (ValueError, TypeError) as e:
        raise LowbitError(f"cannot format {value!r} with {fmt!r}: {e}") from None


def format_table(rows: Sequence[dict], columns: Sequence[tuple], markdown: bool = False) -> str:
    """An aligned text table (or a Markdown pipe table) of ``rows`` under ``columns``.

    ``columns``: ``(key, header, fmt)`` tuples (``fmt`` may be omitted).  No trailing newline.
    """
    cols = []
    for col in columns:
        if not isinstance(col, (tuple, list)) or len(col) not in (2, 3):
            raise LowbitError(f"a column is (key, header, fmt) or (key, header), got {col!r}")
        key, header = col[0], str(col[1])
        fmt = col[2] if len(col) == 3 else None
        cols.append((key, header, fmt))
    if not cols:
        raise LowbitError("format_table needs at least one column")

    body = [[_cell(row.get(key), fmt) for key, _, fmt in cols] for row in rows]
    right = []
    for j, (key, _, _) in enumerate(cols):
        present = [row.get(key) for row in rows if row.get(key) is not None]
        right.append(bool(present) and all(_is_number(v) for v in present))
    headers = [h for _, h, _ in cols]

    if markdown:
        def esc(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        headers = [esc(h) for h in headers]
        body = [[esc(c) for c in r] for r in body]
        widths = [max([len(headers[j]), 3] + [len(r[j]) for r in body]) for j in range(len(cols))]

        def line(cells: list[str]) -> str:
            padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
            return "| " + " | ".join(padded) + " |"

        rule = "| " + " | ".join(("-" * (w - 1) + ":") if r else ("-" * w) for w, r in zip(widths, right)) + " |"
        return "\n".join([line(headers), rule] + [line(r) for r in body])

    widths = [max([len(headers[j])] + [len(r[j]) for r in body]) for j in range(len(cols))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in body])


# Label offsets (points) tried in order: right/left of the point, then further up/down.
_LABEL_OFFSETS = [(dx, dy) for dy in (3, -11, 13, -21, 23, -31, 33, -41, 43, -51) for dx in (5, -5)]


def _place_labels(fig, ax, labels) -> None:
    """Annotate each point with its name, avoiding overlaps with other labels and points.

    Greedy: the layout is frozen after one draw, then each label takes the first offset whose
    text box hits no placed label, no marker and stays inside the axes; otherwise the offset
    with the least overlap.  Displaced labels get a thin leader line to their point.
    """
    if not labels:
        return
    fig.canvas.draw()  # settle the layout so display coordinates are final
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = [ax.transData.transform((x, y)) for _, x, y, _ in labels]
    markers = [(u - 4, v - 4, u + 4, v + 4) for u, v in px]
    placed: list[tuple[float, float, float, float]] = []

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(range(len(labels)), key=lambda i: (px[i][1], px[i][0]))
    for i in order:
        name, x, y, color = labels[i]
        best = None
        for k, (dx, dy) in enumerate(_LABEL_OFFSETS):
            ann = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=color,
                              ha="left" if dx > 0 else "right", va="bottom", zorder=4)
            box = ann.get_window_extent(renderer)  # text only: no arrow yet
            bb = (box.x0 - 1, box.y0 - 1, box.x1 + 1, box.y1 + 1)
            cost = sum(overlap(bb, o) for o in placed) + sum(overlap(bb, m) for j, m in enumerate(markers) if j != i)
            outside = bb[0] < frame.x0 or bb[2] > frame.x1 or bb[1] < frame.y0 or bb[3] > frame.y1
            cost += 1e6 if outside else 0.0
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, bb, k)
            else:
                ann.remove()
            if cost == 0:
                break
        if best[3] >= 2:  # displaced: redraw with a thin leader line to the point
            dx, dy = _LABEL_OFFSETS[best[3]]
            best[1].remove()
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=color,
                        ha="left" if dx > 0 else "right", va="bottom", zorder=4,
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7,
                                    "shrinkA": 0, "shrinkB": 4})
        placed.append(best[2])


PNG = b"\x89PNG"


def plot_ppl_vs_bits(
    rows: Sequence[dict],
    path: str | os.PathLike,
    title: str = "Perplexity vs bits per weight",
) -> Path:
    """Write a PNG of perplexity (y) against bits per weight (x); returns the path written.

    Each row: ``name``, ``ppl`` and, unless ``baseline`` is true, ``bits``; optional ``group``.
    The file is written atomically (`lowbit.outputs.atomic_file`); an existing file there that is
    not a PNG image is refused.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if not rows:
        raise LowbitError("plot_ppl_vs_bits needs at least one row")
    points, baselines, skipped = [], [], []
    for row in rows:
        name = str(row.get("name", "?"))
        ppl = row.get("ppl")
        if not _is_number(ppl):
            raise LowbitError(f"row {name!r} has no numeric 'ppl'")
        if not math.isfinite(ppl) or ppl <= 0:
            skipped.append(name)
            continue
        if row.get("baseline"):
            baselines.append((name, float(ppl)))
            continue
        bits = row.get("bits")
        if not _is_number(bits) or not math.isfinite(bits):
            raise LowbitError(f"row {name!r} has no numeric 'bits' (bits per weight); mark a reference row baseline=True")
        points.append((name, float(bits), float(ppl), row.get("group")))
    if not points and not baselines:
        raise LowbitError("nothing to plot: every row has a non-finite perplexity")

    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]

    labels: list[tuple[str, float, float, str]] = []
    groups: dict[Any, list] = {}
    for p in points:
        groups.setdefault(p[3], []).append(p)
    for i, (group, members) in enumerate(groups.items()):
        color = colors[i % len(colors)] if group is not None else "0.25"
        members = sorted(members, key=lambda p: p[1])
        xs = [p[1] for p in members]
        ys = [p[2] for p in members]
        if group is not None and len(members) > 1:
            ax.plot(xs, ys, "-", color=color, alpha=0.6, linewidth=1.2)
        ax.scatter(xs, ys, color=color, s=36, zorder=3, label=str(group) if group is not None else None)
        labels.extend((name, x, y, color) for name, x, y, _ in members)

    for k, (name, ppl) in enumerate(baselines):
        ax.axhline(ppl, color="0.35" if k == 0 else colors[(k + 3) % 10], linestyle="--", linewidth=1.2,
                   label=f"{name} (baseline): {ppl:.3g}")

    all_ppl = [p[2] for p in points] + [b[1] for b in baselines]
    if max(all_ppl) / min(all_ppl) > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("perplexity (log scale, lower is better)")
    else:
        ax.set_ylabel("perplexity (lower is better)")
    if points:
        xs = [p[1] for p in points]
        span = max(xs) - min(xs) or 1.0
        ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.2 * span)  # room for labels on the right
    ax.margins(y=0.12)  # room for labels above the top and below the bottom points
    ax.set_xlabel("bits per weight")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if skipped:
        fig.text(0.01, 0.005, "not shown (non-finite perplexity): " + ", ".join(skipped), fontsize=7, color="0.3")
    _place_labels(fig, ax, labels)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")

    return write_png(fig, path)


def write_png(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write a matplotlib figure as a PNG, atomically; an existing file there that is not a PNG
    image is refused (`lowbit.outputs.check_file`)."""
    target = outputs.check_file(path, PNG)
    with outputs.atomic_file(target) as tmp:
        fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    return target
