"""Batch-1 GEMV speed: int8-activation kernel (lowbit.kernels.a8) vs lowbit's float-activation
kernel (lowbit.kernels.cpu) vs fp32 F.linear, on SmolLM2-135M's layer shapes.

    python bench/a8_kernels.py [--threads 1,2] [--batch 1] [--quick] [--markdown]

Layers: the attention / MLP projections (576->576, 576->192, 576->1536, 1536->576) and the
output layer 576->49152. Weights are RTN-quantized random normal matrices (speed does not
depend on the values). Columns, all measured side by side in one run:

* ``fp32``: torch ``F.linear`` on the float weight;
* ``float-act``: ``lowbit.kernels.cpu.affine_linear`` (packed weight x fp32 activations);
* ``a8``: ``lowbit.kernels.a8.affine_a8_linear`` (activations quantized to int8 per block of 32
  on every call, integer dot products);
* ``C`` columns: the same two kernels called through ctypes with prebuilt arguments (what a decode
  loop in C pays), without the Python wrapper;
* hot = the same layer over and over (weights stay in cache: everything but the output layer fits
  the 32 MiB L3, the small layers fit L2); cold = cycling through copies of the layer totalling
  > 96 MiB so that the weights come from memory, as in a decode step over a whole model.

GB/s = stored weight bytes (codes + scales + zero-points; fp32 for F.linear) / time of the C call.
Times are medians of repeated blocks (wall clock); the machine may be shared, so the ratios
(measured in the same minute) are the robust numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import platform

import torch
import torch.nn.functional as F

from lowbit.core.scheme import QuantScheme
from lowbit.formats.affine import AffineWeight
from lowbit.kernels import a8, cpu

LAYERS = [("q/o 576x576", 576, 576), ("k/v 192x576", 192, 576), ("up/gate 1536x576", 1536, 576),
          ("down 576x1536", 576, 1536), ("lm head 49152x576", 49152, 576)]
VARIANTS = {
    "int4-g32": QuantScheme(bits=4, group_size=32),
    "int4-g128": QuantScheme(bits=4, group_size=128),
    "int4-g128-asym": QuantScheme(bits=4, symmetric=False, group_size=128),
    "int8-channel": QuantScheme(bits=8, granularity="channel", group_size=None),
}
HEAD_VARIANTS = ["int8-channel", "int4-g32"]
COLD_BYTES = 96 << 20


def _sibling(name: str):
    """bench/<name>.py as a module (loaded by path: `import kernels` would be ambiguous with the
    `kernels` package some peers probe for)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_kb = _sibling("kernels")  # the timing and table helpers of bench/kernels.py
timeit = functools.partial(_kb.timeit, repeats=5)  # wall clock; median of 5 blocks of >= 20 ms
cycling, print_table = _kb.cycling, _kb.print_table


def copy_weight(w):
    return AffineWeight(qweight=w.qweight.clone(), scales=w.scales.clone(),
                        qzeros=None if w.qzeros is None else w.qzeros.clone(), shape=w.shape, scheme=w.scheme,
                        zeros=None if w.zeros is None else w.zeros.clone())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="int4 variants only, no cold columns")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if not (a8.available() and cpu.available()):
        raise SystemExit("native kernels not built")
    flib, alib = cpu.library(), a8.library()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"a8 path: {alib.isa()}, float-activation path: {flib.isa()}; torch {torch.__version__}; batch {args.batch}")
    header = ["layer", "variant", "thr", "fp32 us", "float-act us", "a8 us", "float-act C us", "a8 C us",
              "a8 x fp32", "a8 x float-act (C)", "a8 GB/s hot", "float-act cold us", "a8 cold us",
              "a8 x float-act cold", "a8 GB/s cold", "fp32 GB/s cold"]
    rows = []
    torch.manual_seed(0)
    for label, N, K in LAYERS:
        W = torch.randn(N, K) * 0.02
        x = torch.randn(args.batch, K)
        y = torch.empty(args.batch, N)
        fp_copies = [W] + [W.clone() for _ in range(max(0, -(-COLD_BYTES // (N * K * 4)) - 1))]
        names = HEAD_VARIANTS if N > 10000 else list(VARIANTS)
        if args.quick:
            names = [n for n in names if n.startswith("int4")][:2]
        for name in names:
            w = AffineWeight.quantize_rtn(W, VARIANTS[name])
            nb = w.nbytes
            ncopy = max(1, -(-COLD_BYTES // nb))
            copies = [w] + [copy_weight(w) for _ in range(ncopy - 1)]
            structs = [(cpu.affine_weight_struct(c), cpu.affine_weight_struct(c)) for c in copies]
            for nt in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(nt)
                fst, ast = ctypes.addressof(structs[0][0]), ctypes.addressof(structs[0][1])
                xp, yp = x.data_ptr(), y.data_ptr()
                with torch.no_grad():
                    t_fp = timeit(lambda: F.linear(x, W))
                    t_fl = timeit(lambda: cpu.affine_linear(x, w))
                    t_a8 = timeit(lambda: a8.affine_a8_linear(x, w))
                    t_flc = timeit(lambda: flib.lb_affine_linear_w(fst, xp, args.batch, None, yp, nt))
                    t_a8c = timeit(lambda: alib.lb_affine_a8_linear_w(ast, xp, args.batch, None, yp, nt))
                    cold = ["-"] * 5
                    if not args.quick:
                        fcalls = [(lambda s=ctypes.addressof(s[0]): flib.lb_affine_linear_w(s, xp, args.batch, None, yp, nt))
                                  for s in structs]
                        acalls = [(lambda s=ctypes.addressof(s[1]): alib.lb_affine_a8_linear_w(s, xp, args.batch, None, yp, nt))
                                  for s in structs]
                        t_flk = timeit(cycling(fcalls))
                        t_a8k = timeit(cycling(acalls))
                        t_fpk = timeit(cycling([(lambda Wc=Wc: F.linear(x, Wc)) for Wc in fp_copies]))
                        cold = [f"{t_flk * 1e6:.1f}", f"{t_a8k * 1e6:.1f}", f"{t_flk / t_a8k:.2f}",
                                f"{nb / t_a8k / 1e9:.1f}", f"{N * K * 4 / t_fpk / 1e9:.1f}"]
                rows.append([label, name, nt, f"{t_fp * 1e6:.1f}", f"{t_fl * 1e6:.1f}", f"{t_a8 * 1e6:.1f}",
                             f"{t_flc * 1e6:.1f}", f"{t_a8c * 1e6:.1f}", f"{t_fp / t_a8:.2f}", f"{t_flc / t_a8c:.2f}",
                             f"{nb / t_a8c / 1e9:.1f}"] + cold)
                print("  ".join(str(c) for c in rows[-1]), flush=True)
            del copies, structs
    print()
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
