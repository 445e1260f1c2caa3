"""Fast CPU kernels vs fp32 F.linear and vs the reference path, per layer and end to end.

    python bench/kernels.py [--threads N] [--markdown] [--quick]
                                                         [--no-e2e] [--crossover]

Per layer (SmolLM2-135M's shapes and a 4096 x 4096) at batch 1 and 8, all measured side by side
in one run: fp32 ``F.linear``; for each weight variant the reference path (dequantize, then
F.linear) and lowbit's fast kernel. ``hot`` repeats one layer (its weights stay in cache: the
small layers fit in L2, everything here fits the 32 MiB L3); ``cold`` cycles through enough
copies of the layer (> 128 MiB) that every call streams its weights from memory, as a decode
step over a whole model does. GB/s = bytes of stored weights (codes + scales + zero-points) /
time; "% ceil" is GB/s against the ~27 GB/s two-thread read bandwidth of shared/ASSETS.md.

Times are medians of repeated blocks (wall clock). The machine may be shared: ratios are the
robust numbers, since every column of a row is measured in the same minute.

End to end: SmolLM2-135M quantized with lowbit.api.quantize, one forward of a single token
(``model(ids)``, no KV cache) with the fast kernels and with ``LOWBIT_NATIVE=0`` (reference),
and the fp32 model. The fp32 tied output layer (49152 x 576, 113 MB) is in every variant.

``--crossover`` times the fused kernel against dequantize-then-GEMM over batch sizes (the
choice of ``lowbit.kernels.cpu.FUSED_MAX_ROWS``); ``--overhead`` is always printed: the ctypes
call of a C function that does nothing, and the whole Python wrapper on a tiny layer.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.algorithms.nf4 import NF4Config, nf4_quantize
from lowbit.algorithms.ternary import TernaryConfig, ternary_quantize
from lowbit.core.scheme import QuantScheme
from lowbit.formats.affine import AffineWeight
from lowbit.kernels import cpu, reference

CEILING_GBS = 27.0
CLOCK = time.perf_counter  # --cpu-time: time.thread_time (this thread's CPU time, with --threads 1)
LAYERS = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096)]
VARIANTS = {
    "int4-g32": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=4, group_size=32)),
    "int4-g32-asym": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=4, symmetric=False, group_size=32)),
    "int4-g128": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=4, group_size=128)),
    "int4-g128-asym": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=4, symmetric=False, group_size=128)),
    "int8-channel": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=8, granularity="channel", group_size=None)),
    "nf4": lambda W: nf4_quantize(W, NF4Config()),
    "ternary": lambda W: ternary_quantize(W, TernaryConfig()),
}
COLD_BYTES = 128 << 20


def timeit(fn, min_block=0.02, repeats=7) -> float:
    """Median over `repeats` blocks of the mean time per call (each block >= min_block s)."""
    fn()
    n = 1
    while True:
        t0 = CLOCK()
        for _ in range(n):
            fn()
        el = CLOCK() - t0
        if el >= min_block:
            break
        n *= 2
    times = [el / n]
    for _ in range(repeats - 1):
        t0 = CLOCK()
        for _ in range(n):
            fn()
        times.append((CLOCK() - t0) / n)
    return statistics.median(times)


def cycling(fns):
    """One callable that calls the next of fns each time (for cold-cache timing)."""
    it = [0]

    def call():
        i = it[0]
        fns[i]()
        it[0] = i + 1 if i + 1 < len(fns) else 0

    return call


def stored_bytes(w) -> int:
    return w.nbytes


def fmt_row(cells, widths, markdown):
    if markdown:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def print_table(header, rows, markdown):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(fmt_row(header, widths, markdown))
    if markdown:
        print("| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |")
    for r in rows:
        print(fmt_row(r, widths, markdown))


def layer_table(args):
    torch.manual_seed(0)
    header = ["layer", "batch", "variant", "bits/w", "ref us", "hot us", "cold us", "x fp32", "x ref", "GB/s",
              "% ceil"]
    rows = []
    layers = LAYERS[:2] if args.quick else LAYERS
    for N, K in layers:
        W = torch.randn(N, K) * 0.02
        fp_copies = [W.clone() for _ in range(max(2, -(-COLD_BYTES // (N * K * 4))))]
        for M in (1, 8):
            x = torch.randn(M, K)
            with torch.no_grad():
                t_fp = timeit(lambda: F.linear(x, W))
                t_fp_cold = timeit(cycling([(lambda Wc=Wc: F.linear(x, Wc)) for Wc in fp_copies]))
            gbs = N * K * 4 / t_fp_cold / 1e9
            rows.append([f"{N}x{K}", M, "fp32", "32.00", "-", f"{t_fp * 1e6:.1f}", f"{t_fp_cold * 1e6:.1f}", "1.00",
                         "-", f"{gbs:.1f}", f"{100 * gbs / CEILING_GBS:.0f}"])
            for name, make in VARIANTS.items():
                w = make(W)
                nb = stored_bytes(w)
                fast = kernels.select(w).linear  # the format's row of the kernel table
                if fast(x, w) is NotImplemented:
                    rows.append([f"{N}x{K}", M, name, f"{w.bits_per_weight:.2f}", "-", "n/a", "-", "-", "-", "-", "-"])
                    continue
                copies = [w] + [type(w)(**{**w.__dict__, **{k: t.clone() for k, t in w.tensors().items()}})
                                for _ in range(max(1, COLD_BYTES // nb) - 1)]
                with torch.no_grad():
                    t_ref = timeit(lambda: reference.linear(x, w))
                    t_hot = timeit(lambda: fast(x, w))
                    t_cold = timeit(cycling([(lambda wc=wc: fast(x, wc)) for wc in copies]))
                gbs = nb / t_cold / 1e9
                rows.append([f"{N}x{K}", M, name, f"{w.bits_per_weight:.2f}", f"{t_ref * 1e6:.1f}",
                             f"{t_hot * 1e6:.1f}", f"{t_cold * 1e6:.1f}", f"{t_fp_cold / t_cold:.2f}",
                             f"{t_ref / t_hot:.1f}", f"{gbs:.1f}", f"{100 * gbs / CEILING_GBS:.0f}"])
                del copies
            print(f"  measured {N}x{K} batch {M}", file=sys.stderr)
    print_table(header, rows, args.markdown)
    print("\nx fp32 = fp32 cold / fast cold; x ref = reference hot / fast hot; GB/s and % ceil from cold "
          f"(ceiling {CEILING_GBS:g} GB/s is the two-thread read bandwidth).")


def overhead():
    lib = cpu.library()
    w = AffineWeight.quantize_rtn(torch.randn(8, 64), QuantScheme(bits=4, group_size=32))
    x = torch.randn(1, 64)
    y = torch.empty(1, 8)
    st = cpu.affine_weight_struct(w)
    p = [getattr(st, f) for f in ("qw", "row_bytes", "bits", "scales", "scales_f16", "s_stride", "G", "n_groups", "qz",
                                  "qz_stride", "fz", "fz_f16", "zconst")]  # the struct's fields as 13 arguments
    noop20 = timeit(lambda: lib.lb_noop(x.data_ptr(), 1, 64, 8, *p, None, y.data_ptr(), 1))
    noop6 = timeit(lambda: lib.lb_noop_w(ctypes.addressof(st), x.data_ptr(), 1, None, y.data_ptr(), 1))
    real = timeit(lambda: lib.lb_affine_linear_w(ctypes.addressof(st), x.data_ptr(), 1, None, y.data_ptr(), 1))
    wrap = timeit(lambda: cpu.affine_linear(x, w))
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        tl = timeit(lambda: lin(x))
    print(f"per-call overhead (8x64 int4 layer, batch 1): ctypes no-op call with 20 args {noop20 * 1e6:.2f} us, "
          f"with the cached weight struct (6 args) {noop6 * 1e6:.2f} us; the C kernel called directly "
          f"{real * 1e6:.2f} us; the whole Python kernel function {wrap * 1e6:.2f} us "
          f"(torch nn.Linear of the same size: {tl * 1e6:.2f} us)")


def crossover(args):
    torch.manual_seed(0)
    lib = cpu.library()
    print("\nfused kernel vs dequantize-in-C + F.linear, int4-g128-asym (us per call)")
    header = ["layer", "batch", "fused us", "dequant+gemm us", "fused/gemm"]
    rows = []
    for N, K in ((576, 576), (1536, 576), (576, 1536)):
        W = torch.randn(N, K) * 0.02
        w = AffineWeight.quantize_rtn(W, QuantScheme(bits=4, symmetric=False, group_size=128))
        st = cpu.affine_weight_struct(w)
        for M in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            x = torch.randn(M, K)
            y = torch.empty(M, N)
            nt = torch.get_num_threads()
            tf = timeit(lambda: lib.lb_affine_linear_w(ctypes.addressof(st), x.data_ptr(), M, None, y.data_ptr(), nt))
            tg = timeit(lambda: F.linear(x, cpu._affine_dequant(lib, w, st)))
            rows.append([f"{N}x{K}", M, f"{tf * 1e6:.1f}", f"{tg * 1e6:.1f}", f"{tf / tg:.2f}"])
    print_table(header, rows, args.markdown)


def e2e(args):
    from lowbit import api
    from lowbit.cli import quiet_transformers
    from lowbit.core.scheme import scheme_from_args

    quiet_transformers()
    ids = torch.tensor([[1]])
    variants = [("fp32", None, None, {}),
                ("rtn int4-g128-asym", "rtn", scheme_from_args(bits=4, group_size=128, asym=True), {}),
                ("rtn int4-g32", "rtn", scheme_from_args(bits=4, group_size=32), {}),
                ("rtn int8-channel", "rtn", scheme_from_args(bits=8, group_size=None), {}),
                ("nf4", "nf4", None, {}),
                ("ternary", "ternary", None, {})]
    header = ["model", "linears MB", "fast ms", "reference ms", "x reference", "x fp32"]
    rows = []
    t_fp32 = None
    for label, method, scheme, opts in variants:
        m = api.load(args.model)
        if method is not None:
            api.quantize(m, method, scheme, progress=False, **opts)
        model = m.model
        lin_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "layers." in n) + sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
        with torch.no_grad():
            model(ids)
            t_fast = timeit(lambda: model(ids), min_block=0.1, repeats=5)
            os.environ["LOWBIT_NATIVE"] = "0"
            try:
                t_ref = timeit(lambda: model(ids), min_block=0.1, repeats=5) if method is not None else t_fast
            finally:
                del os.environ["LOWBIT_NATIVE"]
        if t_fp32 is None:
            t_fp32 = t_fast
        rows.append([label, f"{lin_bytes / 1e6:.1f}", f"{t_fast * 1e3:.2f}", f"{t_ref * 1e3:.2f}",
                     f"{t_ref / t_fast:.2f}", f"{t_fp32 / t_fast:.2f}"])
        print(f"  measured {label}", file=sys.stderr)
        del m, model
    print("\nSmolLM2-135M, one token through model(ids) (no KV cache), ms per forward")
    print_table(header, rows, args.markdown)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two layers only")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--crossover", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its CPU time (time.thread_time): kernel efficiency that a "
                         "busy shared machine does not distort (wall-clock ratios need an idle machine)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.thread_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu.available():
        print("native kernels not built (or LOWBIT_NATIVE=0): nothing to measure", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    lib = cpu.library()
    print(f"threads {torch.get_num_threads()}, kernel ISA {lib.isa()} (CPU supports {lib.isa_max()}), "
          f"torch {torch.__version__}, clock {'thread CPU time' if args.cpu_time else 'wall'}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    overhead()
    print()
    layer_table(args)
    if args.crossover:
        crossover(args)
    if not args.no_e2e:
        e2e(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
