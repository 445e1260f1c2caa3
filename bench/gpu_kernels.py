"""GPU kernels for packed weights (lowbit.kernels.triton_gpu) against cuBLAS bf16, per layer.

    python bench/gpu_kernels.py [--markdown] [--batches 1 16] [--quick] [--eager]
    python bench/gpu_kernels.py --interpret        # no GPU: tiny shapes, correctness only

Layers of 1-8B models (out x in): 4096x4096 (7-8B attention), 11008x4096 and 4096x11008 (Llama-2-7B
MLP up / down), 14336x4096 (Llama-3-8B MLP up), 8192x8192; batch 1 (decode) and 16. Activations
bfloat16, no bias. For each layer and batch:

* cuBLAS bf16: ``torch.nn.functional.linear`` on the bf16 weight;
* lowbit's Triton kernels reading the packed weight: W4A16 (int4, groups of 128, symmetric),
  W8A16 (int8 per channel, symmetric) and NF4 (blocks of 64, double-quantized absmax).

Every kernel's output is first checked against the reference path (``lowbit.kernels.reference``:
dequantize to bf16, then F.linear): max |y - y_ref| / max |y_ref| must stay under 2e-2 (both round
the output to bf16; a failure is reported and the exit status is 1).

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

LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192)]  # (out, in)
TINY_LAYERS = [(96, 256), (64, 576)]  # --interpret (576 = 4 groups of 128 and one of 64)
TOL = 2e-2


def variants():
    from lowbit.algorithms.nf4 import NF4Config, nf4_quantize
    from lowbit.core.scheme import QuantScheme
    from lowbit.formats.affine import AffineWeight

    return {
        "W4A16 g128": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=4, group_size=128)),
        "W8A16": lambda W: AffineWeight.quantize_rtn(W, QuantScheme(bits=8, granularity="channel", group_size=None)),
        "NF4": lambda W: nf4_quantize(W, NF4Config()),
    }


def rel_err(y, y_ref) -> float:
    return float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max().clamp(min=1e-30))


def timer(eager: bool):
    """fn -> median milliseconds of one call (see the module docstring)."""
    import torch
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


def run_interpret(batches) -> int:
    """Tiny shapes through triton's interpreter on the CPU: every kernel against the reference."""
    import torch

    from lowbit.kernels import reference, triton_gpu

    failed = 0
    print(f"interpreter check (TRITON_INTERPRET=1, CPU tensors, bf16 activations); tolerance {TOL}")
    print("| out x in | batch | " + " | ".join(f"{v} rel err" for v in variants()) + " |")
    print("|---|--:|" + "--:|" * len(variants()))
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in TINY_LAYERS:
        W = torch.randn(out_f, in_f, generator=g) * 0.02
        ws = {name: make(W) for name, make in variants().items()}
        for M in batches:
            x = torch.randn(M, in_f, generator=g).to(torch.bfloat16)
            cells = []
            for name, w in ws.items():
                y = triton_gpu.affine_linear(x, w) if name != "NF4" else triton_gpu.nf4_linear(x, w)
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


def run_gpu(args) -> int:
    import torch
    import torch.nn.functional as F

    import triton
    from lowbit.kernels import reference, triton_gpu

    dev = torch.device("cuda")
    time_ms = timer(args.eager)
    layers = LAYERS[:2] if args.quick else LAYERS
    names = list(variants())
    print(f"GPU: {torch.cuda.get_device_name(dev)} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bf16 activations, no bias | {'eager calls' if args.eager else 'CUDA graph replays'}, L2 flushed, "
          f"median")
    rows, failed = [], 0
    for out_f, in_f in layers:
        g = torch.Generator(device=dev).manual_seed(out_f * 7 + in_f)
        W = torch.randn(out_f, in_f, generator=g, device=dev) * 0.02
        W16 = W.to(torch.bfloat16)
        ws = {name: make(W) for name, make in variants().items()}
        del W
        for M in args.batches:
            x = torch.randn(M, in_f, generator=g, device=dev).to(torch.bfloat16)
            t_ref = time_ms(lambda: F.linear(x, W16))
            cells = [f"{t_ref * 1e3:.1f}"]
            for name in names:
                w = ws[name]
                fn = triton_gpu.nf4_linear if name == "NF4" else triton_gpu.affine_linear
                y = fn(x, w)
                if y is NotImplemented:
                    cells += ["not run", "-"]
                    failed += 1
                    continue
                e = rel_err(y, reference.linear(x, w))
                if e >= TOL:
                    failed += 1
                    cells += [f"FAIL (err {e:.1e})", "-"]
                    continue
                t = time_ms(lambda: fn(x, w))
                cells += [f"{t * 1e3:.1f}", f"{t_ref / t:.2f}"]
            rows.append(f"| {out_f}x{in_f} | {M} | " + " | ".join(cells) + " |")
            if not args.markdown:
                print(rows[-1], flush=True)
        del ws, W16
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
    args = ap.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_kernels: triton is not installed (pip install 'lowbit[gpu]')")
        return 1
    if args.interpret:
        return run_interpret(args.batches)
    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device (torch.cuda.is_available() is False); "
              "run with --interpret to check the kernels on the CPU")
        return 1
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
