"""lowbit's LLM weight-quantization methods side by side with the peer packages, on one model.

    PYTHONPATH=<peer dirs> python bench/llm_peers.py [--max-tokens 16384] [--samples 32]
                [--seq-len 512] [--pairs gptq,awq,hqq,nf4] [--model smollm2-135m] [--markdown]

Pairs (same settings for both sides; peers are optional, see requirements-peers.txt):

* GPTQ W4 g64 asymmetric (integer zero-points), act-order with static groups, damp 0.01,
  block 128  vs  llmcompressor ``GPTQModifier`` (group 64: llmcompressor refuses group 128 on
  SmolLM2's 576-wide layers).
* AWQ W4 g64 asymmetric  vs  llmcompressor ``AWQModifier`` + ``QuantizationModifier``
  (each with its own defaults otherwise: lowbit searches per-group clipping, llmcompressor
  searches duo scaling on the whole module's output and does not clip).
* HQQ W4 g64 and g128, float zero-points  vs  the hqq package's ``Quantizer.quantize``
  (axis 1, its proximal optimizer; scale and zero stored as fp16, as ``HQQLinear`` keeps them).
  hqq groups the flattened tensor, so at g128 on 576-wide rows its groups straddle rows while
  lowbit's last group of each row is 64 wide.
* NF4 with double quantization  vs  bitsandbytes ``quantize_4bit`` (its dequantized weights are
  checked to be byte-identical to lowbit's, layer by layer).

Both sides calibrate on the very same samples (``lowbit.data.texts.calibration_samples``, seed 0,
the ones ``lowbit.api.quantize`` draws). Every peer result is dequantized into the float weights
of a fresh copy of the model (norms too, which AWQ rescales), and all variants are evaluated in
lockstep by lowbit's evaluator (same windows, same protocol). Time: the quantization call only
(model loading excluded); "time lowbit/peer" is lowbit's time / the peer's. "ppl lowbit/peer"
is exp(mean per-token NLL difference) on the same tokens, with two standard errors estimated from
the 511-token windows' mean differences (`lowbit.eval.quality.paired_ppl_ratio`): a ratio whose
interval contains 1 is a tie within the evaluation's noise.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.core.scheme import QuantScheme
from lowbit.eval.quality import PplProtocol, paired_ppl_ratio
from lowbit.eval.report import format_table
from lowbit.eval.compare import COLUMNS as EVAL_COLUMNS
from lowbit.eval.compare import EvalSettings, compare
from lowbit.models.families import block_prefix, find_blocks, linear_layers


def _bench_module(name: str):
    """A sibling bench script as a module (not via sys.path: bench/kernels.py would shadow the
    `kernels` package that bitsandbytes probes for)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


share_untouched = _bench_module("llm_methods").share_untouched


def _scheme(bits: int, group: int, zero: str) -> QuantScheme:
    return QuantScheme(bits=bits, symmetric=False, granularity="group", group_size=group, zero_point=zero)


# (pair, label, lowbit method, lowbit scheme, peer name, bits, group)
PAIRS = {
    "gptq": [("gptq W4 g64", "gptq", _scheme(4, 64, "int"), "llmcompressor", 4, 64)],
    "awq": [("awq W4 g64", "awq", _scheme(4, 64, "int"), "llmcompressor", 4, 64)],
    "hqq": [("hqq W4 g64", "hqq", _scheme(4, 64, "float"), "hqq", 4, 64),
            ("hqq W4 g128", "hqq", _scheme(4, 128, "float"), "hqq", 4, 128)],
    "nf4": [("nf4", "nf4", None, "bitsandbytes", 4, 64)],
}


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every float linear of every decoder block, by fully qualified name."""
    out = {}
    for i, blk in enumerate(find_blocks(model)):
        for name, lin in linear_layers(blk).items():
            out[f"{block_prefix(model, i)}.{name}"] = lin
    return out


def float_copy_with(spec: str | None, params: dict[str, torch.Tensor]) -> api.Model:
    """A fresh float copy of the model with the given parameters (by name) replaced."""
    m = api.load(spec)
    own = dict(m.model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(value)
    return m


# -- peers: each returns (parameters to put into a float copy, seconds, bits per weight) ------------
def _calib_loader(samples: torch.Tensor):
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in samples]
    return torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False)


def peer_llmcompressor(spec, method: str, bits: int, group: int, samples: torch.Tensor):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    m = api.load(spec)
    wargs = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=wargs)}
    if method == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128,
                               dampening_frac=0.01, actorder="static")]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        # llmcompressor 0.14's AWQ pins cached activations to page-locked memory, which a CPU-only
        # torch refuses ("Cannot access accelerator device"); pinning only speeds up host-to-GPU
        # copies, so on a CPU it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():
            IntermediatesCache.pin_memory = lambda self, *a, **k: None
    t0 = time.perf_counter()
    oneshot(model=m.model, dataset=_calib_loader(samples), recipe=recipe,
            num_calibration_samples=samples.shape[0], max_seq_length=samples.shape[1],
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    params = {}
    with torch.no_grad():
        worst = 0.0
        for name, lin in block_linears(m.model).items():
            W = fake_quantize(lin.weight, lin.weight_scale, lin.weight_zero_point, lin.quantization_scheme.weights)
            worst = max(worst, float((W - lin.weight).abs().max()))
            params[f"{name}.weight"] = W.detach().clone()
        for name, p in m.model.named_parameters():  # AWQ rescales norms and producing linears
            if name not in params and "weight_" not in name:
                params[name] = p.detach().clone()
    print(f"  llmcompressor {method}: stored weights vs fake-quantized: max |diff| {worst:.2e}", file=sys.stderr)
    # stored: packed int codes + per-group scale (fp16, as lowbit) + packed integer zero-point
    return params, seconds, bits + (16 + bits) / group


def peer_hqq(spec, bits: int, group: int):
    from hqq.core.quantize import Quantizer

    m = api.load(spec)
    params, seconds = {}, 0.0
    with torch.no_grad():
        for name, lin in block_linears(m.model).items():
            W = lin.weight.detach()
            t0 = time.perf_counter()
            W_q, meta = Quantizer.quantize(W, nbits=bits, group_size=group, axis=1, optimize=True,
                                           bitpack=False, device="cpu", compute_dtype=torch.float32)
            seconds += time.perf_counter() - t0
            scale, zero = meta["scale"].half().float(), meta["zero"].half().float()  # as HQQLinear stores them
            params[f"{name}.weight"] = ((W_q.float() - zero) * scale).reshape(W.shape)
    return params, seconds, bits + 32 / group  # codes + fp16 scale + fp16 zero per group


def peer_bnb(spec, lowbit_nf4: api.Model):
    import bitsandbytes.functional as F

    m = api.load(spec)
    ours = block_linears_quantized(lowbit_nf4.model)
    params, seconds, nbytes, n, same = {}, 0.0, 0, 0, 0
    with torch.no_grad():
        for name, lin in block_linears(m.model).items():
            W = lin.weight.detach()
            t0 = time.perf_counter()
            q, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            seconds += time.perf_counter() - t0
            Wd = F.dequantize_4bit(q, st).reshape(W.shape)
            params[f"{name}.weight"] = Wd
            nbytes += q.numel() + st.absmax.numel() + 4 * st.state2.absmax.numel() + 4
            n += W.numel()
            same += int(torch.equal(Wd, ours[name].weight_format.dequantize()))
    print(f"  NF4: dequantized weights byte-identical to bitsandbytes in {same}/{len(params)} layers",
          file=sys.stderr)
    return params, seconds, 8 * nbytes / n, f"{same}/{len(params)}"


def block_linears_quantized(model: torch.nn.Module) -> dict:
    out = {}
    for i, blk in enumerate(find_blocks(model)):
        for name, mod in blk.named_modules():
            if hasattr(mod, "weight_format"):
                out[f"{block_prefix(model, i)}.{name}"] = mod
    return out


# lowbit's evaluation columns without size and speed (quantization time is this table's speed),
# then the pair comparisons
COLUMNS = [c for c in EVAL_COLUMNS if c[0] not in ("size_mb", "prefill", "decode")] + [
    ("ratio", "time lowbit/peer", ".2f"),
    ("pplratio", "ppl lowbit/peer ± 2se", None),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", default="gptq,awq,hqq,nf4")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    t_start = time.perf_counter()

    base = api.load(args.model)
    from lowbit.data.texts import calibration_samples, load_text

    samples = calibration_samples(base.tokenizer, n_samples=args.samples, seq_len=args.seq_len,
                                  text=load_text("calibration"), seed=0)   # what api.quantize draws
    models = {"original": base}
    extra = {}   # variant -> (bits/w, seconds, ratio) overrides for the peers
    notes = []
    for pair in [p for p in args.pairs.split(",") if p]:
        if pair not in PAIRS:
            print(f"unknown pair {pair!r}; choose from {', '.join(PAIRS)}", file=sys.stderr)
            return 2
        for label, method, scheme, peer, bits, group in PAIRS[pair]:
            m = api.load(args.model)
            api.quantize(m, method, scheme, n_samples=args.samples, seq_len=args.seq_len, progress=False)
            share_untouched(base.model, m.model)
            ours = m.record["quantize_seconds"]
            models[f"{label} lowbit"] = m
            print(f"{label} lowbit: {ours:.1f} s", file=sys.stderr, flush=True)
            try:
                if peer == "llmcompressor":
                    params, secs, bpw = peer_llmcompressor(args.model, method, bits, group, samples)
                elif peer == "hqq":
                    params, secs, bpw = peer_hqq(args.model, bits, group)
                else:
                    params, secs, bpw, same = peer_bnb(args.model, m)
                    notes.append(f"NF4 dequantized weights byte-identical to bitsandbytes: {same} layers")
            except ImportError as e:
                print(f"{label}: peer {peer} not importable ({e}); skipped", file=sys.stderr)
                continue
            pm = float_copy_with(args.model, params)
            del params
            share_untouched(base.model, pm.model)
            name = f"{label} {peer}"
            models[name] = pm
            extra[name] = (bpw, secs, ours / secs)
            print(f"{name}: {secs:.1f} s", file=sys.stderr, flush=True)

    rows = compare(models, "original", EvalSettings(protocol=PplProtocol(512, args.max_tokens), latency=False))
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        if r["variant"] in extra:
            r["bpw"], r["qtime"], r["ratio"] = extra[r["variant"]]
            ours = by_name[r["variant"].rsplit(" ", 1)[0] + " lowbit"]
            ratio, se = paired_ppl_ratio(ours["token_nll"], r["token_nll"], block=511)
            r["pplratio"] = f"{ratio:.4f} ± {2 * se:.4f}"
    print(format_table(rows, COLUMNS, markdown=args.markdown))
    print(f"\n{base.name}: {rows[0]['n_tokens']} held-out tokens, ctx 512; calibration {args.samples} x "
          f"{args.seq_len} tokens (same samples for both sides); {torch.get_num_threads()} threads; "
          f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    for n in notes:
        print(n, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
