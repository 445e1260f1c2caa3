"""BitNet's native kernel (b1.58 and 1-bit) vs the int4 g64 kernels and fp32 F.linear, per layer.

    python -P bench/bitnet_kernels.py [--threads N] [--batch M] [--repeats R] [--markdown]

For SmolLM2-135M's layer shapes (in -> out: 576->576, 576->192, 576->1536, 1536->576) and three
bigger ones (2048->2048, 2048->5632, 5632->2048), all with random weights (random codes for the
BitNet layers), at batch 1 by default, the time per call of

* fp32      ``F.linear`` on the float weight;
* int4      lowbit's int4 affine kernel, symmetric, group 64, float activations (the "affine"
            row, ``lowbit.kernels.cpu``), the weight made by RTN (`AffineWeight.quantize_rtn`);
* int4-a8   the same weight with int8 activations (the opt-in "affine-a8" row, W4A8);
* b1.58     the BitNet kernel with ternary codes (2 bits a weight), no norm;
* 1-bit     the BitNet kernel with binary codes (1 bit a weight), no norm;

each through its Python entry (what a QuantizedLinear runs; the ctypes call is part of it). The
variants of one layer are timed in turns (one block of calls each, repeated), so every ratio
compares numbers measured in the same seconds; each time is the median over the blocks. Weights
stay in cache (one layer called over and over). The table is printed twice: with the kernels'
best instruction set, and with every lowbit library used here capped to AVX2
(`NativeLibrary.isa_capped`), the path of CPUs without AVX-512.

On a machine other work keeps busy, pass ``--threads 1``: a multi-threaded call waits for its
slowest thread, and a thread the scheduler has put aside costs milliseconds, which swamps the
kernels (measured with 2 threads at load average 4.9 on 2 cores: every call ~6 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.core.scheme import QuantScheme
from lowbit.formats.affine import AffineWeight
from lowbit.formats.bitnet import BitNetWeight
from lowbit.kernels import a8, bitnet, cpu

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (2048, 2048), (2048, 5632), (5632, 2048)]  # (in, out)
VARIANTS = ("fp32", "int4", "int4-a8", "b1.58", "1-bit")


def header() -> str:
    from lowbit.runtime import machine

    return (f"CPU: {machine.cpu().name}; instruction set {machine.isa()}; {torch.get_num_threads()} threads; "
            f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}")


def block_time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def side_by_side(fns: dict, repeats: int, min_block: float = 0.01) -> dict:
    """Median seconds per call of each fn, the fns timed in turns (one block each, repeated)."""
    calls = {}
    for k, fn in fns.items():
        fn()
        n = 1
        while block_time(fn, n) * n < min_block:
            n *= 2
        calls[k] = n
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(block_time(fn, calls[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def layer(K: int, N: int, seed: int, batch: int) -> dict:
    """The five variants' callables for one layer shape (checking that the BitNet ones run natively)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(batch, K, generator=g)
    w4 = AffineWeight.quantize_rtn(W, QuantScheme(bits=4, group_size=64))
    int4 = kernels.select(w4, None, "cpu")
    int4a8 = kernels.select(w4, "int8", "cpu")
    assert int4.name == "affine" and int4a8.name == "affine-a8" and int4a8.takes(w4)
    t = torch.randint(0, 3, (N, K), generator=g).float() - 1
    b158 = BitNetWeight.from_codes(t, torch.tensor(0.02), 1.58)
    b1 = BitNetWeight.from_codes(torch.where(t > 0, 1.0, -1.0), torch.tensor(0.02), 1)
    for w in (b158, b1):
        assert kernels.select(w, None, "cpu").name == "bitnet" and bitnet._native_linear(x, w, None) is not None
    return {"fp32": lambda: F.linear(x, W), "int4": lambda: int4.linear(x, w4), "int4-a8": lambda: int4a8.linear(x, w4),
            "b1.58": lambda: bitnet.native_linear(x, b158), "1-bit": lambda: bitnet.native_linear(x, b1)}


def table(batch: int, repeats: int, markdown: bool) -> None:
    head = ["in -> out"] + [f"{v} us" for v in VARIANTS] + ["fp32/b1.58", "int4/b1.58", "a8/b1.58", "fp32/1-bit",
                                                            "int4/1-bit"]
    rows = []
    for i, (K, N) in enumerate(SHAPES):
        t = side_by_side(layer(K, N, i, batch), repeats)
        rows.append([f"{K} -> {N}"] + [f"{t[v] * 1e6:.1f}" for v in VARIANTS]
                    + [f"{t['fp32'] / t['b1.58']:.2f}", f"{t['int4'] / t['b1.58']:.2f}", f"{t['int4-a8'] / t['b1.58']:.2f}",
                       f"{t['fp32'] / t['1-bit']:.2f}", f"{t['int4'] / t['1-bit']:.2f}"])
    widths = [max(len(str(r[c])) for r in [head] + rows) for c in range(len(head))]
    sep, edge = (" | ", ("| ", " |")) if markdown else ("  ", ("", ""))
    print(edge[0] + sep.join(h.rjust(w) for h, w in zip(head, widths)) + edge[1])
    if markdown:
        print("| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |")
    for r in rows:
        print(edge[0] + sep.join(c.rjust(w) for c, w in zip(r, widths)) + edge[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=1, help="activation rows per call (default 1)")
    ap.add_argument("--repeats", type=int, default=9, help="timed blocks per variant (median)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    libs = [bitnet.library(), cpu.library(), a8.library()]
    if any(lib is None for lib in libs):
        raise SystemExit("lowbit's native kernels are not built (python setup.py build_ext --inplace)")
    t0 = time.perf_counter()
    print(header())
    print(f"batch {args.batch}; microseconds per call (median of {args.repeats} blocks, variants in turns); "
          "ratios > 1: the BitNet kernel is faster")
    print(f"\nbest paths (bitnet {libs[0].isa()}, int4 {libs[1].isa()}, int4-a8 {libs[2].isa()}):")
    table(args.batch, args.repeats, args.markdown)
    with libs[0].isa_capped("avx2") as p0, libs[1].isa_capped("avx2") as p1, libs[2].isa_capped("avx2") as p2:
        print(f"\ncapped to AVX2 (bitnet {p0}, int4 {p1}, int4-a8 {p2}):")
        table(args.batch, args.repeats, args.markdown)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
