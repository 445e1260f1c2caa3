"""Static int8 (W8A8) linear vs fp32: time per call at batch 1 and batch 512, side by side.

    python bench/static_int8_speed.py [--markdown] [--repeats 20]

Shapes: a 4096x4096 linear and SmolLM2's 576->1536 (gate/up) and 1536->576 (down). Paths: fp32
F.linear; static int8 with asymmetric activations (exact int32 through chunked fp32 GEMMs, the
portable torch path); static int8 symmetric restricted (int32 products from the native AVX2 int8
GEMM when built). Every static call includes quantizing the input, the int32 bias and scaling the
accumulators back to float. Median of ``--repeats`` calls on the same weight (hot caches),
torch's thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowbit.algorithms.static_int8 import quantize_linears_static
from lowbit.core.scheme import QuantScheme
from lowbit.eval.report import format_table
from lowbit.kernels import static_int8

SHAPES = [(4096, 4096), (576, 1536), (1536, 576)]


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    sym = QuantScheme(bits=8, symmetric=True, granularity="channel", restricted_range=True, scale_dtype="float32")
    for k, n in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False)
        calib = torch.randn(64, k)
        layers = {}
        for name, opts in (("static asym (torch exact)", {}), ("static sym-restricted (native)", {"scheme": sym})):
            seq = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
            seq[0].weight.data.copy_(lin.weight.data)
            quantize_linears_static(seq, lambda m: m(calib), observer="minmax", **opts)
            layers[name] = seq[0]
        for batch in (1, 512):
            x = torch.randn(batch, k)
            with torch.inference_mode():
                t32 = _time(lambda: F.linear(x, lin.weight), args.repeats)
                row = {"shape": f"{k}->{n}", "batch": batch, "fp32_ms": 1e3 * t32}
                for name, mod in layers.items():
                    row[name] = t32 / _time(lambda: mod(x), args.repeats)
                native = static_int8.native_ok(layers["static sym-restricted (native)"].weight_format)
            rows.append(row)
    cols = [("shape", "linear"), ("batch", "batch"), ("fp32_ms", "fp32 ms", ".3f"),
            ("static asym (torch exact)", "static asym (torch) × fp32", ".2f"),
            ("static sym-restricted (native)", "static sym-restr (native) × fp32", ".2f")]
    print(format_table(rows, cols, markdown=args.markdown))
    print(f"\n{torch.get_num_threads()} threads; native int8 GEMM used: {native}; ratios > 1 are faster than fp32",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
