"""Sparse kernels vs dense fp32 on this CPU, side by side in one run.

    python bench/sparse_kernels.py [--threads N] [--markdown] [--quick]

For each weight shape (SmolLM2-135M's linear layers and 4096 × 4096) and batch size (1, 16):
dense fp32 ``F.linear`` on the pruned weight vs the native 2:4 kernel (50 % sparse, "sparse-nm")
vs the native CSR kernel ("sparse-csr") at 50, 70, 80 and 90 % unstructured sparsity. Each cell is
the median time of one call (µs) over repeats and, in parentheses, dense time / kernel time
(> 1: the sparse kernel is faster). A second table gives bits per dense weight of each storage.
All kernels are checked against the dense result before they are timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowbit.algorithms.pruning import nm_mask, unstructured_mask
from lowbit.formats.sparse_csr import CSRWeight
from lowbit.formats.sparse_nm import SparseNMWeight
from lowbit.kernels.sparse import csr_linear_native, native_available, native_lib, nm_linear_native

SHAPES = [  # (name, out, in)
    ("q/o_proj 576x576", 576, 576),
    ("k/v_proj 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("4096x4096", 4096, 4096),
]
SPARSITIES = (0.5, 0.7, 0.8, 0.9)


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


def check(y, ref, what):
    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err < 1e-5:
        raise SystemExit(f"{what}: kernel disagrees with dense (relative error {err:.2e})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=None, help="comma-separated thread counts for torch and the kernels, "
                                                     "each measured in this run (default: torch's)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 q/o and 4096x4096 only")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if not native_available():
        print("the native sparse library is not built (pip install -e .); nothing to compare", file=sys.stderr)
        return 1
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [SHAPES[0], SHAPES[-1]] if args.quick else SHAPES
    g = torch.Generator().manual_seed(0)
    t_start = time.perf_counter()

    header = ["shape", "threads", "batch", "dense µs", "2:4 (50%)"] + [f"CSR {int(100 * s)}%" for s in SPARSITIES]
    rows = []
    sizes = []
    for name, out_f, in_f in shapes:
        W = torch.randn(out_f, in_f, generator=g)
        W24 = W.masked_fill(nm_mask(W.abs(), 2, 4), 0.0)
        f24 = SparseNMWeight.from_dense(W24, 2, 4)
        csr = {}
        for s in SPARSITIES:
            Ws = W.masked_fill(unstructured_mask(W.abs(), s), 0.0)
            csr[s] = (Ws, CSRWeight.from_dense(Ws))
        sizes.append([name, "32.00", f"{f24.bits_per_weight:.2f}"] + [f"{csr[s][1].bits_per_weight:.2f}" for s in SPARSITIES])
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for B in batches:
                x = torch.randn(B, in_f, generator=g)
                check(nm_linear_native(x, f24), F.linear(x, W24), f"2:4 {name} batch {B}")
                for s in SPARSITIES:
                    check(csr_linear_native(x, csr[s][1]), F.linear(x, csr[s][0]), f"CSR {s} {name} batch {B}")
                # dense timed on the 50 % unstructured weight (dense cost does not depend on zeros)
                Wd = csr[0.5][0]
                t_dense = timeit(lambda: F.linear(x, Wd), args.min_time, args.repeats)
                t24 = timeit(lambda: nm_linear_native(x, f24, threads=threads), args.min_time, args.repeats)
                cells = [name, str(threads), str(B), f"{1e6 * t_dense:.1f}", f"{1e6 * t24:.1f} ({t_dense / t24:.2f}x)"]
                for s in SPARSITIES:
                    f = csr[s][1]
                    t = timeit(lambda: csr_linear_native(x, f, threads=threads), args.min_time, args.repeats)
                    cells.append(f"{1e6 * t:.1f} ({t_dense / t:.2f}x)")
                rows.append(cells)
                print("  " + " | ".join(cells), file=sys.stderr, flush=True)

    def table(hdr, body):
        if args.markdown:
            out = ["| " + " | ".join(hdr) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|"]
            out += ["| " + " | ".join(r) + " |" for r in body]
            return "\n".join(out)
        w = [max(len(str(r[i])) for r in [hdr] + body) for i in range(len(hdr))]
        return "\n".join("  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r))
                         for r in [hdr] + body)

    print(f"time per call in µs (dense time / kernel time); threads {','.join(map(str, thread_counts))}, "
          f"path {native_lib().isa()}; torch {torch.__version__}\n")
    print(table(header, rows))
    print("\nbits per dense weight (values, indices, row pointers)\n")
    print(table(["shape", "dense fp32", "2:4", *[f"CSR {int(100 * s)}%" for s in SPARSITIES]], sizes))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
