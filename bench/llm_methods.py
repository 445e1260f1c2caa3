"""LLM weight-quantization methods side by side: quality, size and quantization time.

    python bench/llm_methods.py [--model smollm2-135m|gemma3-270m] [--max-tokens 16384]
                                [--methods rtn,gptq,awq,hqq] [--samples 32] [--markdown]

For each method (that is registered) and each weight scheme — W4 g128, W3 g128, W4 per-channel,
W2 g64 — plus NF4 and LLM.int8(), quantize the same float model and evaluate every variant in
lockstep on the same held-out windows (lowbit's fixed perplexity protocol). Untouched tensors
(embeddings, norms) of the variants share the original's memory, so many variants fit at once
(Gemma-3-270M, all 19 variants: run with MALLOC_MMAP_THRESHOLD_=262144 so freed float weights go
back to the system; or split the methods over processes with --methods).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.algorithms import available_methods
from lowbit.core.scheme import QuantScheme
from lowbit.eval.quality import PplProtocol
from lowbit.eval.compare import EvalSettings, compare, render
from lowbit.models.families import find_blocks

SCHEMES = {
    "W4 g128": dict(bits=4, granularity="group", group_size=128),
    "W3 g128": dict(bits=3, granularity="group", group_size=128),
    "W4 channel": dict(bits=4, granularity="channel", group_size=None),
    "W2 g64": dict(bits=2, granularity="group", group_size=64),
}
# Each method's own asymmetric flavour (the form it is used in practice); RTN uses integer zeros.
METHOD_ZERO = {"rtn": "int", "gptq": "int", "awq": "int", "hqq": "float"}


def share_untouched(base: torch.nn.Module, variant: torch.nn.Module) -> None:
    """Point the variant's float parameters that equal the original's at the original's tensors."""
    bp = dict(base.named_parameters(remove_duplicate=False))
    for name, p in list(variant.named_parameters(remove_duplicate=False)):  # tied copies too
        q = bp.get(name)
        if q is not None and q.shape == p.shape and torch.equal(q, p):
            mod_name, _, attr = name.rpartition(".")
            setattr(variant.get_submodule(mod_name), attr, q)


def fresh_copy(base: api.Model) -> api.Model:
    """A copy of ``base`` to quantize: the decoder blocks are copied (methods may rewrite them: AWQ
    folds scales into the norms), what lies outside them (embeddings, final norm, buffers,
    tokenizer) is shared with the original. Loading a full copy per variant instead leaves ~300 MB
    of freed-but-held memory behind per Gemma-3-270M variant."""
    in_blocks = {id(t) for blk in find_blocks(base.model) for t in [*blk.parameters(), *blk.buffers()]}
    memo = {id(t): t for t in [*base.model.parameters(), *base.model.buffers()] if id(t) not in in_blocks}
    return dataclasses.replace(base, model=copy.deepcopy(base.model, memo))


def variants(methods: list[str]):
    for method in methods:
        if method in METHOD_ZERO:
            for label, kw in SCHEMES.items():
                scheme = QuantScheme(symmetric=False, zero_point=METHOD_ZERO[method], **kw)
                yield f"{method} {label}", method, scheme
        else:
            yield method, method, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="rtn,gptq,awq,hqq,nf4,llm-int8")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples of 512 tokens")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    quiet_transformers()
    have = set(available_methods())
    methods = [m for m in args.methods.split(",") if m]
    missing = [m for m in methods if m not in have]
    if missing:
        print(f"skipping methods not available in this build: {', '.join(missing)}", file=sys.stderr)
    methods = [m for m in methods if m in have]

    t0 = time.perf_counter()
    base = api.load(args.model)
    out = {"original": base}
    for name, method, scheme in variants(methods):
        m = fresh_copy(base)
        api.quantize(m, method, scheme, n_samples=args.samples, device=args.device, progress=False)
        out[name] = m
        print(f"{name}: {m.record['quantize_seconds']:.1f} s", file=sys.stderr, flush=True)
    rows = compare(out, "original", EvalSettings(protocol=PplProtocol(512, args.max_tokens), latency=False,
                                                  device=args.device))
    print(render(rows, markdown=args.markdown))
    print(f"\n{base.name}: {rows[0]['n_tokens']} held-out tokens, ctx 512, {args.samples} calibration samples "
          f"x 512 tokens; total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
