"""BitNet trained, not rounded: the papers' from-scratch comparison in miniature, and a conversion
of a pretrained model by distillation, side by side in one run.

    python -P bench/bitnet.py [--model smollm2-135m] [--parts scratch,convert] [--out out/bitnet]
                              [--scratch-steps 150] [--convert-steps 40] [--batch-size 8]
                              [--convert-batch-size 4] [--seq-len 256]
                              [--max-tokens 4096] [--markdown]

From scratch (``lowbit bitnet --scratch``): one small llama shape (10 layers, d=256, ffn 768, the
model's tokenizer and vocabulary: ~21M parameters) trained on the bundled calibration text (Pride
and Prejudice, Mansfield Park) with next-token CE, as fp32, BitNet b1.58 and BitNet 1-bit — same
tokens in the same order, same schedule (warmup + cosine, lr 2e-3, weight decay 0.1) — plus b1.58
under the papers' two-stage schedule (learning rate and weight decay). Held-out perplexity on the
bundled evaluation text (Persuasion, Emma) every few steps; a PNG of the curves at equal tokens.

Conversion (``lowbit bitnet MODEL``): today's post-training ternary (``lowbit quantize --method
ternary``: weights rounded, activations float), BitLinear rounding with int8 activations before any
training (``--steps 0``), and b1.58 after distillation from the original (soft KL, cosine and
two-stage schedules); ``lowbit compare`` against the original on held-out text (perplexity, KL,
top-1), and decode speed of lowbit's lean decoder (batch 1, its C step) for the original, an int4
checkpoint (RTN W4 g64) and the b1.58 model.

Every row runs in a process of its own into ``OUT/<row>``; finished rows are recorded in
``OUT/runs.jsonl`` and not made again, so an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_recovery", Path(__file__).with_name("recovery.py"))
recovery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recovery)

SCRATCH = {"scratch-float": ["--bits", "float"], "scratch-b1.58": ["--bits", "1.58"],
           "scratch-b1": ["--bits", "1"], "scratch-b1.58-two-stage": ["--bits", "1.58", "--schedule", "two-stage"]}


def rows(a) -> dict:
    train = ["--batch-size", a.batch_size, "--seq-len", a.seq_len, "--dtype", "float32", "--save-every", 10]
    out = {}
    if "scratch" in a.parts:
        for name, extra in SCRATCH.items():
            out[name] = ["bitnet", a.model, "--scratch", *extra, "--steps", a.scratch_steps, *train, "--lr", a.lr_scratch,
                         "--weight-decay", 0.1, "--eval-windows", 8, "--eval-every", max(5, a.scratch_steps // 10)]
    if "convert" in a.parts:
        conv = ["bitnet", a.model, "--bits", "1.58", "--batch-size", a.convert_batch_size, "--seq-len", a.seq_len,
                "--dtype", "float32", "--save-every", 10, "--eval-windows", 2,
                "--eval-every", max(5, a.convert_steps // 6)]
        out["ternary-ptq"] = ["quantize", a.model, "--method", "ternary"]
        out["rtn-w4g64"] = ["quantize", a.model, "--method", "rtn", "--bits", 4, "--group-size", 64]
        out["bitnet-b1.58-steps0"] = [*conv, "--steps", 0]
        out["bitnet-b1.58-kd"] = [*conv, "--steps", a.convert_steps, "--lr", a.lr_convert]
        out["bitnet-b1.58-kd-two-stage"] = [*conv, "--steps", a.convert_steps, "--lr", a.lr_convert,
                                            "--schedule", "two-stage", "--weight-decay", 0.05]
    return out


def record(path: Path) -> dict:
    for f in ("lowbit.json", "lowbit_train.json"):
        if (path / f).is_file():
            return json.loads((path / f).read_text())
    return {}


def curves(root: Path, names: list[str], a) -> dict:
    """row -> (tokens, held-out ppl) points and (tokens, train loss) points."""
    out = {}
    per_step = a.batch_size * a.seq_len
    for n in names:
        hist = (record(root / n).get("training") or {}).get("history") or []
        ev = [(h["step"] * per_step, h["eval"]["ppl"]) for h in hist if "eval" in h]
        tl = [(h["step"] * per_step, h["loss"]) for h in hist if "loss" in h]
        out[n] = (ev, tl)
    return out


def plot(cv: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, (ev, tl) in cv.items():
        if tl:
            k = max(1, len(tl) // 30)  # a running mean over ~1/30 of the run
            xs = [t for t, _ in tl][k - 1:]
            ys = [sum(v for _, v in tl[i - k + 1:i + 1]) / k for i in range(k - 1, len(tl))]
            ax1.plot(xs, ys, label=n)
        ev = [(t, p) for t, p in ev if t > 0]  # the untrained model (ppl ~ the vocabulary) would flatten the rest
        if ev:
            ax2.plot([t for t, _ in ev], [p for _, p in ev], marker="o", ms=3, label=n)
    ax1.set(xlabel="training tokens", ylabel="train loss (CE, running mean)", title="training loss")
    ax2.set(xlabel="training tokens", ylabel="held-out perplexity", title="held-out perplexity (from the first evaluation)",
            yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def header() -> str:
    import torch

    from lowbit.runtime import machine

    return f"{machine.isa()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parts", default="scratch,convert")
    ap.add_argument("--rows", default="all", help="comma-separated row names (default: every row of --parts)")
    ap.add_argument("--out", default="out/bitnet")
    ap.add_argument("--scratch-steps", type=int, default=150)
    ap.add_argument("--convert-steps", type=int, default=40)
    ap.add_argument("--convert-batch-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-scratch", type=float, default=2e-3)
    ap.add_argument("--lr-convert", type=float, default=5e-4)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    a.parts = [p.strip() for p in a.parts.split(",")]
    table = rows(a)
    names = list(table) if a.rows == "all" else [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(table)}")
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    runs_file = root / "runs.jsonl"
    for name in names:
        if name in recovery.done(runs_file) and (root / name).exists():
            continue
        argv = [str(x) for x in table[name]] + ["-o", str(root / name), "--force"]
        print(f"[bitnet] {name}: lowbit {' '.join(argv)}", file=sys.stderr, flush=True)
        r = recovery.run_row(argv, root / f"{name}.log")
        r.update(row=name, argv=argv)
        with open(runs_file, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[bitnet] {name}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']} MiB", file=sys.stderr, flush=True)

    from lowbit.eval.report import format_table

    runs = recovery.done(runs_file)
    scratch = [n for n in names if n.startswith("scratch-")]
    if scratch:
        cv = curves(root, scratch, a)
        png = root / "scratch-curves.png"
        plot(cv, png, f"from scratch, {a.scratch_steps} steps x {a.batch_size} x {a.seq_len} tokens; {header()}")
        out = []
        for n in scratch:
            ev, tl = cv[n]
            rec = record(root / n)
            k = max(1, len(tl) // 10)
            out.append({"row": n, "tokens": a.scratch_steps * a.batch_size * a.seq_len,
                        "loss": sum(v for _, v in tl[-k:]) / k if tl else None,
                        "ppl": ev[-1][1] if ev else None, "s": runs.get(n, {}).get("seconds"),
                        "params": (rec.get("method") or {}).get("shape")})
        base = next((r for r in out if r["row"] == "scratch-float"), None)
        for r in out:
            r["ratio"] = r["ppl"] / base["ppl"] if base and base["ppl"] and r["ppl"] else None
        print(format_table(out, [("row", "from scratch"), ("tokens", "train tokens", ",d"),
                                 ("loss", "train loss (last 10%)", ".3f"), ("ppl", "held-out ppl", ".1f"),
                                 ("ratio", "ppl / fp32", ".2f"), ("s", "wall s", ".0f")], markdown=a.markdown))
        print(f"curves: {png}")
    conv = [n for n in names if not n.startswith("scratch-")]
    if conv:
        from lowbit.cli import main as lowbit_main
        from lowbit.cli import quiet_transformers

        quiet_transformers()
        res = root / "compare.jsonl"
        if lowbit_main(["compare", *[str(root / n) for n in conv], "--baseline", a.model, "--max-tokens",
                        str(a.max_tokens), "--no-latency", "--results", str(res), "--plot", str(root / "compare.png")]):
            return 1
        q = recovery.quality(res)
        out = [{"row": "original (float32)", "bpw": 32, "ppl": q.get("original", {}).get("ppl")}]
        for n in conv:
            r, qq = runs.get(n, {}), q.get(n, {})
            steps = None
            if "--steps" in r.get("argv", []):
                steps = int(r["argv"][r["argv"].index("--steps") + 1])
            out.append({"row": n, "bpw": qq.get("bpw"), "mb": qq.get("size_mb"), "ppl": qq.get("ppl"),
                        "kl": qq.get("kl"), "top1": qq.get("top1"),
                        "tokens": None if steps is None else steps * a.convert_batch_size * a.seq_len,
                        "s": r.get("seconds")})
        print(format_table(out, [("row", "conversion"), ("bpw", "bits/w", ".3f"), ("mb", "size MB", ".1f"),
                                 ("ppl", "ppl", ".2f"), ("kl", "KL", ".4f"), ("top1", "top-1 %", ".1f"),
                                 ("tokens", "train tokens", ",d"), ("s", "wall s", ".0f")], markdown=a.markdown))
        speed = [n for n in ("rtn-w4g64", "bitnet-b1.58-kd") if n in conv]
        if speed:
            sp = recovery.decode_speed(
                a.model, [root / n for n in speed], a.repeats, a.threads,
                label=lambda p, d: f"{p.name} ({'C step' if d.native_step is not None else 'python: ' + str(d.native_reason)})")
            print("decode tok/s (lean decoder, batch 1, 64 tokens after a 128-token prompt, medians of "
                  f"{a.repeats} interleaved rounds): " + ", ".join(f"{k} {v:.1f}" for k, v in sp.items()))
    print(f"{a.model}; eval: {a.max_tokens} tokens of Persuasion/Emma; {header()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
