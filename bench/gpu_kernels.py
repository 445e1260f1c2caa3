"""GPU kernels for packed weights (lowbit.kernels.triton_gpu, triton_codebook) against cuBLAS bf16, per layer.

    python bench/gpu_kernels.py [--markdown] [--batches 1 16] [--quick] [--eager] [--variants NF4 "E8P 2-bit" ...]
    python bench/gpu_kernels.py --interpret        # no GPU: tiny shapes, correctness only

Layers of 1-8B models (out x in): 4096x4096 (7-8B attention), 11008x4096 and 4096x11008 (Llama-2-7B
MLP up / down), 14336x4096 (Llama-3-8B MLP up), 8192x8192; batch 1 (decode) and 16. Activations
bfloat16, no bias. For each layer and batch:

* cuBLAS bf16: ``torch.nn.functional.linear`` on the bf16 weight;
* lowbit's Triton kernels reading the packed weight (the "cuda" row of the kernel table for the
  weight's format): W4A16 (int4, groups of 128, symmetric), W8A16 (int8 per channel, symmetric),
  NF4 (blocks of 64, double-quantized absmax), and the 2-bit codebook formats: E8P (QuIP#'s
  lattice codebook, 16 bits per 8 weights; the time includes the input and output Hadamard
  transforms) and AQLM 2x8 and 1x16 (groups of 8, float16 codebooks).

The affine and NF4 weights quantize the layer's random weight (round to nearest). The E8P and
AQLM weights hold random codes (and random codebooks) of the layer's shape, scaled like it:
lowbit's quantizers for them need calibration data and minutes per layer, and the kernels' speed
does not depend on the values. E8P runs only where both widths have a Hadamard factorisation
(11008 has none: its format would store a dense 11008 x 11008 transform); those cells read "n/a".

Every kernel's output is first checked against the reference path (``lowbit.kernels.reference``:
dequantize to bf16, then F.linear; E8P dequantizes a host copy, its decoding table lives on the
CPU): max |y - y_ref| / max |y_ref| must stay under 2e-2 (both round the output to bf16; a
failure is reported and the exit status is 1).

Timing: each call is captured once in a CUDA graph and the graph's replay is timed with
``triton.testing.do_bench`` (median; the L2 cache is flushed before every replay, so weights
stream from HBM as in a decode step over a whole model, and Python's launch overhead is not
counted). ``--eager`` times the plain calls instead (Python overhead included where it is not
hidden behind the flush). "× cuBLAS" is cuBLAS's time / the kernel's time (above 1: faster).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch  # does not import triton: --interpret still sets TRITON_INTERPRET in time

LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]  # (out, in)
TINY_LAYERS = [(96, 256), (64, 576)]  # --interpret (576 = 4 groups of 128 and one of 64)
TOL = 2e-2
VARIANTS = ("W4A16 g128", "W8A16", "NF4", "E8P 2-bit", "AQLM 2x8", "AQLM 1x16")  # the keys of `variants()`


def on_device(w, device):
    """The weight with every stored tensor moved to ``device``."""
    return type(w).from_tensors({n: t.to(device) for n, t in w.tensors().items()}, w.meta())


def random_e8p(W):
    """A 2-bit E8PWeight of random codes of W's shape, scaled like W (None: a width without a
    Hadamard factorisation). Built on the CPU, moved to W's device."""
    from lowbit.core.hadamard import hadamard_factors
    from lowbit.formats.e8p import E8PWeight

    out, n = W.shape
    if hadamard_factors(out) is None or hadamard_factors(n) is None:
        return None
    g = torch.Generator().manual_seed(out * 31 + n)
    codes = torch.randint(0, 65536, (out, n // 8), generator=g)
    return on_device(E8PWeight.from_codes(codes, float(W.std()), (out, n), seed=1), W.device)


def random_aqlm(W, M: int, B: int, g: int = 8):
    """An AQLMWeight of M codebooks of 2^B random vectors (float16) and random codes of W's shape,
    rows scaled like W's."""
    from lowbit.formats.aqlm import AQLMWeight

    out, n = W.shape
    gen = torch.Generator().manual_seed(out * 29 + n + M)
    codes = torch.randint(0, 2**B, (out, n // g, M), generator=gen)
    codebooks = torch.randn(M, 2**B, g, generator=gen) / M**0.5
    w = AQLMWeight.from_codes(codes, codebooks, W.float().std(1).cpu(), (out, n))
    return on_device(w, W.device)


def variants():
    from lowbit.algorithms.nf4 import NF4Config, nf4_quantize
    from lowbit.core.scheme import QuantScheme
    from lowbit.formats.affine import AffineWeight

    return {
        "W4A16 g128": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=4, group_size=128)),
        "W8A16": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=8, granularity="channel", group_size=None)),
        "NF4": lambda W: nf4_quantize(W, NF4Config()),
        "E8P 2-bit": random_e8p,
        "AQLM 2x8": lambda W: random_aqlm(W, 2, 8),
        "AQLM 1x16": lambda W: random_aqlm(W, 1, 16),
    }


def gpu_kernel(w):
    """The Python entry of the kernel table's "cuda" row for w's format."""
    from lowbit import kernels

    return kernels.find(type(w).name, None, "cuda").linear


def reference_weight(w, dtype):
    """``w.dequantize(dtype)`` on w's device (what ``lowbit.kernels.reference`` multiplies by); E8P
    decodes a host copy (its decoding table lives on the CPU)."""
    if type(w).name == "e8p" and w.codes.device.type != "cpu":
        return on_device(w, "cpu").dequantize(dtype).to(w.codes.device)
    return w.dequantize(dtype)


def rel_err(y, y_ref) -> float:
    return float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max().clamp(min=1e-30))


def timer(eager: bool):
    """fn -> median milliseconds of one call (see the module docstring)."""
    from triton.testing import do_bench

    def time_ms(fn) -> float:
        if eager:
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
        del graph
        return ms

    return time_ms


def run_interpret(batches, names) -> int:
    """Tiny shapes through triton's interpreter on the CPU: every kernel against the reference."""
    from lowbit.kernels import reference

    failed = 0
    print(f"interpreter check (TRITON_INTERPRET=1, CPU tensors, bf16 activations); tolerance {TOL}")
    print("| out x in | batch | " + " | ".join(f"{v} rel err" for v in names) + " |")
    print("|---|--:|" + "--:|" * len(names))
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in TINY_LAYERS:
        W = torch.randn(out_f, in_f, generator=g) * 0.02
        ws = {name: variants()[name](W) for name in names}
        for M in batches:
            x = torch.randn(M, in_f, generator=g).to(torch.bfloat16)
            cells = []
            for name, w in ws.items():
                if w is None:
                    cells.append("n/a")
                    continue
                y = gpu_kernel(w)(x, w)
                if y is NotImplemented:
                    cells.append("not run")
                    failed += 1
                    continue
                e = rel_err(y, reference.linear(x, w))
                failed += e >= TOL
                cells.append(f"{e:.1e}" + ("" if e < TOL else " FAIL"))
            print(f"| {out_f}x{in_f} | {M} | " + " | ".join(cells) + " |")
    print("all kernels match the reference" if not failed else f"{failed} checks FAILED")
    return 1 if failed else 0


def run_gpu(args, names) -> int:
    import torch.nn.functional as F

    import triton

    dev = torch.device("cuda")
    time_ms = timer(args.eager)
    layers = LAYERS[:2] if args.quick else LAYERS
    print(f"GPU: {torch.cuda.get_device_name(dev)} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bf16 activations, no bias | {'eager calls' if args.eager else 'CUDA graph replays'}, L2 flushed, "
          f"median")
    rows, failed = [], 0
    for out_f, in_f in layers:
        g = torch.Generator(device=dev).manual_seed(out_f * 7 + in_f)
        W = torch.randn(out_f, in_f, generator=g, device=dev) * 0.02
        W16 = W.to(torch.bfloat16)
        ws = {name: variants()[name](W) for name in names}
        refs = {}  # name -> the dequantized bf16 weight, made once per layer
        del W
        for M in args.batches:
            x = torch.randn(M, in_f, generator=g, device=dev).to(torch.bfloat16)
            t_ref = time_ms(lambda: F.linear(x, W16))
            cells = [f"{t_ref * 1e3:.1f}"]
            for name in names:
                w = ws[name]
                if w is None:
                    cells += ["n/a", "-"]
                    continue
                fn = gpu_kernel(w)
                y = fn(x, w)
                if y is NotImplemented:
                    cells += ["not run", "-"]
                    failed += 1
                    continue
                if name not in refs:
                    refs[name] = reference_weight(w, torch.bfloat16)
                e = rel_err(y, F.linear(x, refs[name]))
                if e >= TOL:
                    failed += 1
                    cells += [f"FAIL (err {e:.1e})", "-"]
                    continue
                t = time_ms(lambda: fn(x, w))
                cells += [f"{t * 1e3:.1f}", f"{t_ref / t:.2f}"]
            rows.append(f"| {out_f}x{in_f} | {M} | " + " | ".join(cells) + " |")
            if not args.markdown:
                print(rows[-1], flush=True)
        del ws, refs, W16
        torch.cuda.empty_cache()
    head = "| out x in | batch | cuBLAS bf16 µs | " + " | ".join(f"{n} µs | × cuBLAS" for n in names) + " |"
    print()
    print(head)
    print("|---|--:|--:|" + "--:|--:|" * len(names))
    print("\n".join(rows))
    if failed:
        print(f"{failed} kernel results did not match the reference (or did not run)")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true",
                    help="no GPU: run the kernels in triton's interpreter on tiny shapes (correctness only)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--quick", action="store_true", help="the first two layers only")
    ap.add_argument("--eager", action="store_true", help="time plain calls instead of CUDA graph replays")
    ap.add_argument("--markdown", action="store_true", help="print only the final table (no rows as they finish)")
    ap.add_argument("--variants", nargs="+", metavar="NAME", help=f"a subset of: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_kernels: triton is not installed (pip install 'lowbit[gpu]')")
        return 1
    if args.interpret:
        return run_interpret(args.batches, names)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device (torch.cuda.is_available() is False); "
              "run with --interpret to check the kernels on the CPU")
        return 1
    return run_gpu(args, names)


if __name__ == "__main__":
    sys.exit(main())
