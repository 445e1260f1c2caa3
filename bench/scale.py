"""Real LLM sizes on this machine: peak memory and wall time of quantizing and evaluating models
far larger than the RAM an fp32 copy would need.

    python bench/synthetic_model.py llama-3.1-8b      # once: 16 GB of random bf16 weights
    python bench/synthetic_model.py llama-3.2-1b      # once: 2.5 GB
    python bench/scale.py --section 8b --section 1b --section small [--markdown]

Sections (each command runs ``lowbit`` in a fresh process; peak RSS from ``/usr/bin/time -v``, or
getrusage of the child where that tool is missing):

* ``8b``: the Llama-3.1-8B-shaped model (bf16, 16 GB on disk): RTN W4 g128 and HQQ W4 g64 streamed
  block by block (targets: peak RSS <= 3 GB, wall <= 20 min each), then ``lowbit eval
  --max-tokens 2048`` of the RTN result (target: peak RSS <= 8 GB).
* ``1b``: the Llama-3.2-1B-shaped model: GPTQ W4 g128 on 32 x 512 calibration tokens, streamed (targets: peak
  RSS <= 2 GB, wall <= 15 min); then with ``--reproducible`` in one process and under ``torchrun
  --nproc-per-node 2`` (its wall time as a ratio; the two checkpoints must hold the same tensors:
  without ``--reproducible`` they differ in the last bits at this size).
* ``small``: SmolLM2-135M and Gemma-3-270M, every method, the whole model in memory (the path
  lowbit had before streaming) against streamed: peak RSS and wall time of each.

The table names the CPU's instruction set, the thread count and the load average: these numbers
move with the machine and with what else runs on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
SYNTH = ROOT / "out" / "synthetic"

SMALL_METHODS = [  # (label, lowbit quantize arguments)
    ("rtn w4 g128", ["--method", "rtn", "--bits", "4", "--group-size", "128"]),
    ("gptq w4 g128", ["--method", "gptq", "--bits", "4", "--group-size", "128"]),
    ("awq w4 g128", ["--method", "awq", "--bits", "4", "--group-size", "128"]),
    ("hqq w4 g64", ["--method", "hqq", "--bits", "4", "--group-size", "64", "--float-zero"]),
    ("nf4", ["--method", "nf4"]),
    ("llm-int8", ["--method", "llm-int8"]),
    ("w8a16", ["--method", "w8a16"]),
    ("static-int8", ["--method", "static-int8"]),
    ("ternary", ["--method", "ternary"]),
]


def machine() -> str:
    from lowbit.runtime import machine as m

    return f"{m.isa()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"


def run(argv: list[str], launcher: list[str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the largest process, stderr) of one lowbit command."""
    cmd = (launcher or [sys.executable, "-m", "lowbit.cli"]) + argv
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") and not launcher else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run(timer + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m:
        peak = int(m.group(1)) * 1024
    else:  # the largest descendant's peak, valid when it exceeds every earlier child's
        peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024
    return wall, peak, p.stderr


def tensors_digest(path: Path) -> str:
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k).contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def row(what: str, model: str, wall: float, peak: int, rss_limit: float | None = None,
        wall_limit: float | None = None, note: str = "") -> dict:
    ok = (rss_limit is None or peak <= rss_limit * GiB) and (wall_limit is None or wall <= wall_limit * 60)
    target = " / ".join(x for x in [f"<= {rss_limit:g} GB" if rss_limit else "",
                                    f"<= {wall_limit:g} min" if wall_limit else ""] if x)
    return {"model": model, "run": what, "wall s": f"{wall:.0f}", "peak RSS GB": f"{peak / GiB:.2f}",
            "target": target or "-", "met": ("yes" if ok else "NO") if target else "-", "note": note}


def need(path: Path, preset: str) -> Path:
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is missing: run python bench/synthetic_model.py {preset} first")
    return path


def section_8b(work: Path, rows: list) -> None:
    model = need(SYNTH / "llama-3.1-8b", "llama-3.1-8b")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / GiB
    name = f"llama-3.1-8b shape ({size:.0f} GB bf16)"
    out = work / "8b-rtn"
    wall, peak, _ = run(["quantize", str(model), "--method", "rtn", "--bits", "4", "--group-size", "128",
                         "--stream", "-o", str(out)])
    rows.append(row("rtn w4 g128, streamed", name, wall, peak, 3, 20)); print(rows[-1], flush=True)
    wall, peak, _ = run(["quantize", str(model), "--method", "hqq", "--bits", "4", "--group-size", "64",
                         "--float-zero", "--stream", "-o", str(work / "8b-hqq")])
    rows.append(row("hqq w4 g64, streamed", name, wall, peak, 3, 20)); print(rows[-1], flush=True)
    shutil.rmtree(work / "8b-hqq", ignore_errors=True)
    wall, peak, _ = run(["eval", str(out), "--max-tokens", "2048", "--no-latency"])
    rows.append(row("eval rtn result, 2048 tokens", name, wall, peak, 8)); print(rows[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)


def section_1b(work: Path, rows: list) -> None:
    model = need(SYNTH / "llama-3.2-1b", "llama-3.2-1b")
    name = "llama-3.2-1b shape (2.5 GB bf16)"
    args = ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "128",
            "--samples", "32", "--seq-len", "512", "--stream"]  # unstreamed it is the whole model in float32
    wall1, peak1, _ = run(args + ["-o", str(work / "1b-1")])
    rows.append(row("gptq w4 g128, 32x512 calib, 1 process", name, wall1, peak1, 2, 15)); print(rows[-1], flush=True)
    shutil.rmtree(work / "1b-1", ignore_errors=True)
    # torchrun against one process, both with --reproducible: at this size a product's bits depend
    # on the thread count (a torchrun process has one thread), which the strict mode removes
    wall2, peak2, _ = run(args + ["--reproducible", "-o", str(work / "1b-r1")])
    rows.append(row("the same, --reproducible, 1 process", name, wall2, peak2,
                    note=f"time {wall2 / wall1:.2f}x of the default"))
    print(rows[-1], flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "lowbit.cli"]
    wall3, peak3, _ = run(args + ["--reproducible", "-o", str(work / "1b-r2")], launcher=torchrun)
    same = tensors_digest(work / "1b-r1") == tensors_digest(work / "1b-r2")
    rows.append(row("the same, --reproducible, torchrun 2 processes", name, wall3, peak3,
                    note=f"time {wall3 / wall2:.2f}x of 1 process; same tensors: {'yes' if same else 'NO'}"))
    print(rows[-1], flush=True)


def section_small(work: Path, rows: list, models: list[str], methods: list[str] | None = None) -> None:
    known = [label for label, _ in SMALL_METHODS]
    for m in methods or []:
        if m not in known:
            raise SystemExit(f"unknown method row {m!r}; one of: {', '.join(known)}")
    for model in models:
        for label, margs in SMALL_METHODS:
            if methods and label not in methods:
                continue
            res = {}
            for mode in ("--no-stream", "--stream"):
                out = work / f"{model}-{label.replace(' ', '-')}{mode}"
                res[mode] = run(["quantize", model, *margs, mode, "-o", str(out)])
                shutil.rmtree(out, ignore_errors=True)
            (w0, p0, _), (w1, p1, _) = res["--no-stream"], res["--stream"]
            rows.append({"model": model, "run": label, "wall s": f"{w0:.0f} -> {w1:.0f}",
                         "peak RSS GB": f"{p0 / GiB:.2f} -> {p1 / GiB:.2f}", "target": "-", "met": "-",
                         "note": "in memory -> streamed"})
            print(rows[-1], flush=True)


def render(rows: list[dict], markdown: bool) -> str:
    cols = ["model", "run", "wall s", "peak RSS GB", "target", "met", "note"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    sep = " | " if markdown else "  "
    lines = [sep.join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append(sep.join("-" * w for w in widths))
    lines += [sep.join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    if markdown:
        lines = [f"| {ln} |" for ln in lines]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", action="append", choices=("8b", "1b", "small"), default=[])
    ap.add_argument("--small-models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--small-methods", default=None,
                    help="comma-separated rows of the small section to run (default all), e.g. 'llm-int8,w8a16'")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    sections = args.section or ["8b", "1b", "small"]
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    t0 = time.perf_counter()
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-scale-", dir=ROOT / "out" if (ROOT / "out").is_dir() else None))
    try:
        if "8b" in sections:
            section_8b(work, rows)
        if "1b" in sections:
            section_1b(work, rows)
        if "small" in sections:
            section_small(work, rows, args.small_models.split(","),
                          args.small_methods.split(",") if args.small_methods else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if rows:
            print(render(rows, args.markdown))
            print(f"\n({machine()}; {threads} threads; {time.perf_counter() - t0:.0f} s for the table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
