"""SmolLM2 W8A8 static int8: perplexity and KL to fp32 for each activation observer, with and
without SmoothQuant-style migration of activation outliers into the weights.

    python bench/smollm2_w8a8.py [--model MODEL] [--max-tokens 4096] [--samples 8] [--seq-len 512]
                                 [--variants minmax,percentile,...] [--markdown]

Every linear of every block: int8 weights per output channel (symmetric), one static int8 scale
and zero-point per layer input (asymmetric, from the observer over the calibration tokens), exact
int32 accumulation, output scaled back to float. ``+sq0.5`` rows migrate activation scale into
the weights first (SmoothQuant, alpha 0.5); ``+sqauto`` rows pick alpha per layer from
{0, 0.3, 0.5, ..., 0.9} by the output error of the layer on the calibration tokens; ``+sqauto+clip`` also shrinks the
observer's range by a ratio from {1, 0.9, ..., 0.4}, searched jointly with alpha. The dynamic-int8 row (per-token scales at run time,
no calibration) is included when that method is registered. All variants are evaluated in
lockstep on the same held-out windows (calibration text and held-out text are disjoint).
"""

from __future__ import annotations

import argparse
import sys
import time

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.algorithms import available_methods
from lowbit.eval.quality import PplProtocol
from lowbit.eval.compare import EvalSettings, compare, render

OBSERVERS = ["minmax", "moving-minmax", "percentile", "entropy", "mse"]
DEFAULT = OBSERVERS + ["minmax+sq0.5", "minmax+sqauto", "percentile+sqauto", "mse+sqauto", "minmax+sqauto+clip"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples (default 8 x 512 tokens)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--variants", default=",".join(DEFAULT))
    ap.add_argument("--no-dynamic", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()

    t0 = time.perf_counter()
    variants = {"fp32": api.load(args.model)}
    if not args.no_dynamic and "dynamic-int8" in available_methods():
        m = api.load(args.model)
        api.quantize(m, "dynamic-int8", progress=False)
        variants["dynamic-int8 (per-token)"] = m
    for v in [s for s in args.variants.split(",") if s]:
        obs, _, sq = v.partition("+sq")
        opts = {"observer": obs}
        if sq.startswith("auto"):
            opts["smooth_search"] = True
            opts["clip_search"] = sq == "auto+clip"
        elif sq:
            opts["smooth_alpha"] = float(sq)
        m = api.load(args.model)
        t = time.perf_counter()
        api.quantize(m, "static-int8", n_samples=args.samples, seq_len=args.seq_len, progress=False, **opts)
        print(f"static-int8 {v}: calibrated and converted in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        variants[f"static W8A8 {v}"] = m
    settings = EvalSettings(protocol=PplProtocol(ctx=512, max_tokens=args.max_tokens), latency=False)
    rows = compare(variants, "fp32", settings)
    print(render(rows, markdown=args.markdown))
    print(f"\n{rows[0]['n_tokens']} held-out tokens, ctx 512; calibration {args.samples} x {args.seq_len} tokens; "
          f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
