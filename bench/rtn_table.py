"""RTN on the embedded default model: quality, size and speed of each scheme, side by side.

    python bench/rtn_table.py [--model MODEL] [--max-tokens 16384] [--markdown]

Every variant is quantized from the same float model and evaluated in lockstep on the same
held-out windows (lowbit's fixed perplexity protocol), so the ratios are measured in one run.
Speed columns: transformers' forward with each quantized layer on the kernel registered for its format
(lowbit's native kernels for 2/4/8 bits; the plain-PyTorch reference for 3 bits).
"""

from __future__ import annotations

import argparse
import sys
import time

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.core.scheme import scheme_from_args
from lowbit.eval.quality import PplProtocol
from lowbit.eval.compare import EvalSettings, compare, render

VARIANTS = [
    ("int8-channel", dict(bits=8, group_size=None)),
    ("int4-g128", dict(bits=4, group_size=128)),
    ("int4-g128-asym", dict(bits=4, group_size=128, asym=True)),
    ("int4-channel", dict(bits=4, group_size=None)),
    ("int3-g128-asym", dict(bits=3, group_size=128, asym=True)),
    ("int2-g64-asym", dict(bits=2, group_size=64, asym=True)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    quiet_transformers()

    t0 = time.perf_counter()
    variants = {"fp32": api.load(args.model)}
    for name, kw in VARIANTS:
        m = api.load(args.model)
        api.quantize(m, "rtn", scheme_from_args(**kw), progress=False)
        variants[f"rtn {name}"] = m
    settings = EvalSettings(protocol=PplProtocol(ctx=512, max_tokens=args.max_tokens),
                            latency=not args.no_latency, device=args.device)
    rows = compare(variants, "fp32", settings)
    print(render(rows, markdown=args.markdown))
    print(f"\n{rows[0]['n_tokens']} held-out tokens, ctx 512; total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
