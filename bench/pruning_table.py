"""Pruning methods side by side on one model: lowbit's magnitude, Wanda and SparseGPT at 50 %
unstructured and 2:4, and llmcompressor's SparseGPT and Wanda at the same settings when it imports.

    [PYTHONPATH=<llmcompressor peer dir>] python bench/pruning_table.py [--max-tokens 4096]
        [--samples 32] [--seq-len 512] [--no-peers] [--markdown]

Both sides calibrate on the very same samples (``lowbit.data.texts.calibration_samples``, seed 0,
the ones ``lowbit.api.quantize`` draws) and use the same solver settings (SparseGPT: block 128,
dampening 0.01 of mean diag H; Wanda: ‖X_j‖₂ per input, per-output comparison). Every linear
layer of every block is pruned; embeddings, norms and lm_head are kept. A peer's pruned weights
are copied into a fresh float copy of the model. Variants are evaluated by lowbit's evaluator in
two lockstep groups (50 % and 2:4, each with the original as its baseline, on the same held-out
windows) to keep memory low. Time: the pruning call only (model loading excluded).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from lowbit import api
from lowbit.algorithms.base import make_method
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.cli import quiet_transformers
from lowbit.eval.quality import PplProtocol
from lowbit.eval.report import format_table
from lowbit.eval.compare import EvalSettings, compare

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from llm_methods import share_untouched  # noqa: E402
from llm_peers import _calib_loader, block_linears, float_copy_with  # noqa: E402

SETTINGS = {"50%": dict(sparsity=0.5), "2:4": dict(pattern="2:4")}
METHODS = ("magnitude", "wanda", "sparsegpt")
PEER_METHODS = ("sparsegpt", "wanda")
COLS = [("variant", "variant", None), ("sparsity", "zeros %", ".2f"), ("ppl", "ppl", ".3f"), ("dppl", "Δppl", "+.3f"),
        ("kl", "KL mean", ".5f"), ("kl_p99", "KL p99", ".4f"), ("top1", "top-1 %", ".2f"), ("qtime", "prune s", ".1f")]


def have_llmcompressor() -> bool:
    try:
        import llmcompressor  # noqa: F401
        return True
    except Exception as e:  # a broken peer install must not stop the lowbit rows
        print(f"llmcompressor not importable ({type(e).__name__}: {e}); lowbit rows only", file=sys.stderr)
        return False


def peer_prune(spec, method: str, setting: str, samples: torch.Tensor):
    """llmcompressor's modifier on a fresh copy; returns (block linear weights by name, seconds)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    kw = dict(sparsity=0.5, mask_structure="2:4" if setting == "2:4" else "0:0", ignore=["re:.*lm_head"])
    if method == "sparsegpt":
        recipe = [SparseGPTModifier(block_size=128, dampening_frac=0.01, **kw)]
    else:
        recipe = [WandaPruningModifier(**kw)]
    m = api.load(spec)
    t0 = time.perf_counter()
    oneshot(model=m.model, dataset=_calib_loader(samples), recipe=recipe, num_calibration_samples=samples.shape[0],
            max_seq_length=samples.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    params = {f"{n}.weight": lin.weight.detach().clone() for n, lin in block_linears(m.model).items()}
    del m
    gc.collect()
    return params, seconds


def achieved(model) -> float:
    ws = [lin.weight for lin in block_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512, help="context of the perplexity protocol")
    ap.add_argument("--settings", default="50%,2:4")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    peers = not args.no_peers and have_llmcompressor()
    t_start = time.perf_counter()
    base = api.load(args.model)
    from lowbit.data.texts import calibration_samples, load_text

    samples = calibration_samples(base.tokenizer, n_samples=args.samples, seq_len=args.seq_len,
                                  text=load_text("calibration"), seed=0)
    rows = []
    settings = EvalSettings(protocol=PplProtocol(args.ctx, args.max_tokens), latency=False)
    for setting in args.settings.split(","):
        variants = {"original": base}
        times = {}
        for method in METHODS:
            m = api.load(args.model)
            meth = make_method(method, **SETTINGS[setting])
            t0 = time.perf_counter()   # the same samples api.quantize would draw; tokenizing excluded
            if meth.needs_calibration:
                run_sequential(m.model, meth, samples, progress=False)
            else:
                apply_data_free(m.model, meth, progress=False)
            share_untouched(base.model, m.model)
            name = f"lowbit {method} {setting}"
            variants[name], times[name] = m, time.perf_counter() - t0
            print(f"{name}: {times[name]:.1f} s", file=sys.stderr, flush=True)
        if peers:
            for method in PEER_METHODS:
                params, seconds = peer_prune(args.model, method, setting, samples)
                m = float_copy_with(args.model, params)
                del params
                share_untouched(base.model, m.model)
                name = f"llmcompressor {method} {setting}"
                variants[name], times[name] = m, seconds
                print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        got = compare(variants, "original", settings)
        for r in got:
            if r["variant"] == "original" and rows:
                continue
            r["sparsity"] = 100 * achieved(variants[r["variant"]].model)
            r["qtime"] = times.get(r["variant"])
            rows.append(r)
        del variants
        gc.collect()
        print(format_table(rows, COLS), file=sys.stderr, flush=True)   # the rows so far
    print(format_table(rows, COLS, markdown=args.markdown))
    print(f"\n{base.name}: {rows[0]['n_tokens']} held-out tokens, ctx {args.ctx}, {args.samples} calibration samples x "
          f"{args.seq_len} tokens (same for both sides); llmcompressor {'included' if peers else 'not available'}; "
          f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
