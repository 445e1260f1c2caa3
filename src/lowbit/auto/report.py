"""Plots of auto-compression: the bits each tensor got, and KL against size (the frontier)."""

from __future__ import annotations

from pathlib import Path

from lowbit.auto.plan import Plan
from lowbit.eval.report import write_png


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Bits per weight of every tensor in model order, coloured by option family."""
    fig, ax = _figure((max(6.0, 0.05 * len(plan.entries)), 3.2))
    fams = sorted({e.option.split("-")[0].split("+")[-1] for e in plan.entries})
    colors = {f: f"C{i}" for i, f in enumerate(fams)}
    for i, e in enumerate(plan.entries):
        fam = e.option.split("-")[0].split("+")[-1]
        ax.bar(i, e.bits, color=colors[fam], width=1.0)
    for f in fams:
        ax.bar([], [], color=colors[f], label=f)
    ax.set_xlabel("tensor (model order)")
    ax.set_ylabel("bits / weight")
    ax.set_title(f"{plan.target}: {plan.bits_per_weight:.2f} bits/weight, KL {plan.measured_kl:.3g}"
                 if plan.measured_kl is not None else f"{plan.target}: {plan.bits_per_weight:.2f} bits/weight")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return write_png(fig, path, dpi=110)


def plot_frontier(auto: list[tuple[float, float]], uniform: dict[str, list[tuple[float, float]]],
                  path: str | Path, title: str) -> Path:
    """KL (log) against bits per weight: auto's points joined, each uniform method's points."""
    fig, ax = _figure((6.4, 4.2))
    for i, (name, pts) in enumerate(sorted(uniform.items())):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=f"C{i + 1}", ms=4, lw=0.8, label=name)
    pts = sorted(auto)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color="C0", ms=5, lw=1.6, label="auto")
    ax.set_yscale("log")
    ax.set_xlabel("bits / weight")
    ax.set_ylabel("KL to the original (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png(fig, path, dpi=110)
