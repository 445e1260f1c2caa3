"""Peak memory of the block-by-block calibration runner on the default model.

    python bench/runner_memory.py [--samples 32] [--seq-len 512] [--device cpu]

Runs RTN int4 g128 through the sequential runner (the same path data-driven methods take) and
prints the process RSS before/peak, the size of one set of block activations and of the largest
block; on CUDA also the allocator's peak, which is what "one block + activations" bounds.
"""

from __future__ import annotations

import argparse
import sys

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.core.scheme import QuantScheme
from lowbit.eval.report import format_table
from lowbit.eval import size

MiB = 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    quiet_transformers()
    m = api.load(args.model)
    model_mib = size.model_bytes(m.model) / MiB
    rec = api.quantize(m, "rtn", QuantScheme(4, True, "group", 128), n_samples=args.samples, seq_len=args.seq_len,
                       device=args.device, batch_size=args.batch_size, force_runner=True, progress=False)
    r = rec["runner"]
    row = {
        "model": m.name, "device": r["device"], "samples": f"{r['n_samples']}x{r['seq_len']}",
        "fp32 model MiB": model_mib, "largest block MiB": r["largest_block_bytes"] / MiB,
        "activations MiB": r["activation_bytes"] / MiB,
        "RSS start MiB": r["rss_at_start_bytes"] / MiB, "RSS peak MiB": r["peak_rss_bytes"] / MiB,
        "runner extra MiB": (r["peak_rss_bytes"] - r["rss_at_start_bytes"]) / MiB,
        "cuda peak MiB": (r["cuda_peak_bytes"] / MiB) if r["cuda_peak_bytes"] is not None else None,
        "seconds": r["seconds"],
    }
    cols = [(k, k, None if isinstance(v, str) else ".1f") for k, v in row.items()]
    print(format_table([row], cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
