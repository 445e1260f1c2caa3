"""Codebook kernels (E8P / QuIP#, AQLM) vs lowbit's int4 kernel and fp32, side by side in one run.

    python -P bench/codebook.py [--threads 1] [--markdown] [--quick]

Per layer shape of SmolLM2-135M (576x576, 1536x576, 576x1536) and of a 1B model (2048x2048,
8192x2048, 2048x8192) at one activation row (decode), the time of one call of: fp32
``F.linear`` (torch), lowbit's int4 g128 affine kernel (csrc/cpu_linear.c), and the codebook
library's kernels (csrc/codebook.c): E8P 2-bit and 4-bit (E8P + E8P residual), AQLM 2x8 and 1x16
(groups of 8: 2 bits per weight each). Three opt-in rows with int8 arithmetic (not the float
product) are timed beside them: lowbit's W4A8 ``affine-a8`` (int4 g128 weights, int8 activations),
``e8p-a8`` (E8P 2-bit weights, the transformed activation in int8, AVX-512 VNNI + VBMI) and
``aqlm-lut8`` (AQLM 2x8 through int8 lookup tables, AVX-512 VBMI byte permutes); they are
checked against the float reference within their own bounds (1 % / 1 % / 2.5 %). Weights are random codes (the kernels' speed does not
depend on how the codes were found); every kernel is checked against the reference before it is
timed. Each cell: median µs per call, then int4 time / its time and fp32 time / its time (> 1:
faster than int4 / fp32). A second table gives bytes per weight read and the GB/s they stream.

Every column of a row is measured in the same minute; the machine may be shared, so the ratios
are the robust numbers (the instruction set, threads and load average are printed with them).
One thread by default: on a machine whose cores are shared with other jobs, a two-thread call
waits at its barrier for whichever thread the scheduler paused (milliseconds, not microseconds);
``--threads 1,2`` measures both where the cores are free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowbit.core.scheme import QuantScheme
from lowbit.formats.affine import AffineWeight
from lowbit.formats.aqlm import AQLMWeight
from lowbit.formats.e8p import E8PWeight
from lowbit.kernels import a8, codebook, cpu, reference

SHAPES = [  # (name, out, in)
    ("135M q/o 576x576", 576, 576),
    ("135M gate/up 1536x576", 1536, 576),
    ("135M down 576x1536", 576, 1536),
    ("1B q/o 2048x2048", 2048, 2048),
    ("1B gate/up 8192x2048", 8192, 2048),
    ("1B down 2048x8192", 2048, 8192),
]
VARIANTS = ("fp32", "int4-g128", "int4-a8", "e8p-2bit", "e8p-2bit-a8", "e8p-4bit", "aqlm-2x8", "aqlm-2x8-lut8",
            "aqlm-1x16")
# the int8 rows' distance from the float product
TOLERANCE = {"int4-a8": 1e-2, "e8p-2bit-a8": 1e-2, "aqlm-2x8-lut8": 2.5e-2}


def timeit(fn, min_time: float, repeats: int) -> float:
    """Median seconds per call: each repeat runs enough calls to last about min_time."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_time / one))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n)
    return statistics.median(runs)


def weights(out_f: int, in_f: int, g: torch.Generator) -> dict:
    """Each variant's weight object (fp32: the float tensor) and the bytes a call reads of it."""
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    cb = lambda: torch.randint(0, 65536, (out_f, in_f // 8), generator=g)  # noqa: E731
    int4 = AffineWeight.quantize_rtn(W, QuantScheme(bits=4, group_size=128))
    e2 = E8PWeight.from_codes(cb(), 0.01, (out_f, in_f), seed=1)
    e4 = E8PWeight.from_codes(cb(), [0.01, 0.003], (out_f, in_f), seed=1, bits=4, residual=cb())
    a28 = AQLMWeight.from_codes(torch.randint(0, 256, (out_f, in_f // 8, 2), generator=g),
                                torch.randn(2, 256, 8, generator=g) * 0.01, torch.rand(out_f, generator=g), (out_f, in_f))
    a116 = AQLMWeight.from_codes(torch.randint(0, 65536, (out_f, in_f // 8, 1), generator=g),
                                 torch.randn(1, 65536, 8, generator=g) * 0.01, torch.rand(out_f, generator=g),
                                 (out_f, in_f))
    nbytes = lambda w: sum(t.numel() * t.element_size() for t in w.tensors().values())  # noqa: E731
    return {"fp32": (W, W.numel() * 4), "int4-g128": (int4, nbytes(int4)), "int4-a8": (int4, nbytes(int4)),
            "e8p-2bit": (e2, nbytes(e2)), "e8p-2bit-a8": (e2, nbytes(e2)),
            "e8p-4bit": (e4, nbytes(e4)), "aqlm-2x8": (a28, nbytes(a28)),
            "aqlm-2x8-lut8": (a28, nbytes(a28)), "aqlm-1x16": (a116, nbytes(a116))}


def kernel(variant: str, w):
    if variant == "fp32":
        return lambda x: F.linear(x, w)
    fn = {"int4-g128": cpu.affine_linear, "int4-a8": a8.affine_a8_linear, "e8p-2bit": codebook.e8p_linear_cpu,
          "e8p-2bit-a8": codebook.e8p_a8_linear, "e8p-4bit": codebook.e8p_linear_cpu,
          "aqlm-2x8": codebook.aqlm_linear_cpu, "aqlm-2x8-lut8": codebook.aqlm_lut8_linear, "aqlm-1x16": codebook.aqlm_linear_cpu}[variant]
    return lambda x: fn(x, w)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1", help="comma-separated thread counts, each measured in this run")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="576x576 and 2048x2048 only")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if codebook.library() is None or not cpu.available() or not a8.available():
        print("the native kernels are not built (pip install -e .); nothing to compare", file=sys.stderr)
        return 1
    thread_counts = [int(t) for t in args.threads.split(",")]
    shapes = [SHAPES[0], SHAPES[3]] if args.quick else SHAPES
    g = torch.Generator().manual_seed(0)
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    header = ["shape", "threads", *[v if v == "fp32" else f"{v} (vs int4, vs fp32)" for v in VARIANTS]]
    rows, traffic = [], []
    for name, out_f, in_f in shapes:
        ws = weights(out_f, in_f, g)
        x = torch.randn(1, in_f, generator=g)
        for v, (w, _) in ws.items():  # every kernel against its reference before timing
            if v != "fp32":
                y, r = kernel(v, w)(x), reference.linear(x, w)
                err = float((y - r).norm() / r.norm())
                if not err < TOLERANCE.get(v, 1e-5):
                    raise SystemExit(f"{v} {name}: kernel disagrees with the reference (relative error {err:.2e})")
        for threads in thread_counts:
            torch.set_num_threads(threads)
            t = {v: timeit(lambda f=kernel(v, w): f(x), args.min_time, args.repeats) for v, (w, _) in ws.items()}
            cells = [name, str(threads), f"{1e6 * t['fp32']:.1f}"]
            for v in VARIANTS[1:]:
                cells.append(f"{1e6 * t[v]:.1f} ({t['int4-g128'] / t[v]:.2f}x, {t['fp32'] / t[v]:.2f}x)")
            rows.append(cells)
            traffic.append([name, str(threads)] + [f"{ws[v][1] / (out_f * in_f):.3f} B, {ws[v][1] / t[v] / 1e9:.1f} GB/s"
                                                   for v in VARIANTS])
            print("  " + " | ".join(cells), file=sys.stderr, flush=True)

    def table(hdr, body):
        if args.markdown:
            out = ["| " + " | ".join(hdr) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|"]
            out += ["| " + " | ".join(r) + " |" for r in body]
            return "\n".join(out)
        wd = [max(len(str(r[i])) for r in [hdr] + body) for i in range(len(hdr))]
        return "\n".join("  ".join(str(c).rjust(wd[i]) if i else str(c).ljust(wd[i]) for i, c in enumerate(r))
                         for r in [hdr] + body)

    print(f"one activation row (decode); time per call in µs (int4 time / time, fp32 time / time: > 1 is faster); "
          f"paths: codebook {codebook.library().isa()}, int4 {cpu.library().isa()}, int4-a8 {a8.library().isa()}; "
          f"threads {args.threads}; "
          f"{os.cpu_count()} cores, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end; "
          f"torch {torch.__version__}\n")
    print(table(header, rows))
    print("\nbytes of stored weight per weight (codes, scales, codebooks, sign vectors) and the rate a call "
          "streams them\n")
    print(table(["shape", "threads", *VARIANTS], traffic))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
