"""The decode settings a checkpoint runs with by default, measured when it is made.

int8 activations (`LeanDecoder(int8_activations=True)`: each decode step rounds the activations
of affine layers to int8 per block of 32 and multiplies in integers, the arithmetic of llama.cpp's
Q4_0 x Q8_0 dot) are the faster decode path wherever the kernel table has the row (1.9x on
SmolLM2 int4 at 2 threads), but they add their own rounding. Whether that rounding matters
depends on the checkpoint: measured against the float model, teacher-forced one token at a time,
it cost +2 % KL on an int4 g32 checkpoint and +8 % on an int4 g128 one. So the choice is made per
checkpoint, when the float model is still at hand:

1. before quantizing, `reference_steps` runs the float model's lean decoder over ``TOKENS``
   tokens of the bundled evaluation text and keeps each step's log-probabilities;
2. after quantizing, `choose` runs the quantized model's decode path both ways (float and int8
   activations) over the same tokens and takes int8 activations when their step KL to the float
   model is within ``TOLERANCE`` (5 %) of the float-activation path's, or adds at most
   ``ABS_TOLERANCE`` (0.01 nats per token) to it. The second rule is for near-lossless
   checkpoints: int8 weights per channel on SmolLM2 measured 0.0040 with float activations and
   0.0096 with int8 ones (top-1 97.3 vs 95.3 %), a cost 5 % of so small a KL would refuse although
   it is the rounding llama.cpp's Q8_0 path always applies, and the one that decodes 2.2x faster;
3. the result is kept in the checkpoint's record (``decode``), and `lowbit generate` / `bench`
   start from it (``--int8-activations`` / ``--float-activations`` override it).

A model without any int8-activation row (float, NF4, codebooks, ...) records nothing: its decode
path has no such choice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TOLERANCE = 0.05  # int8 activations when their step KL <= (1 + TOLERANCE) x the float path's
ABS_TOLERANCE = 0.01  # ... or <= the float path's + ABS_TOLERANCE (nats per token)
TOKENS = 128      # teacher-forced steps of the evaluation text


def measurement_ids(tokenizer, n: int = TOKENS) -> Tensor:
    """The first ``n`` ids of the bundled evaluation text (BOS first when the tokenizer adds one)."""
    from lowbit.data.texts import default_bos_id, eval_tokens, load_text

    ids = eval_tokens(tokenizer, load_text("evaluation"))[:n]
    bos = default_bos_id(tokenizer)
    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids[:n - 1]])
    return ids


def decodable(model: nn.Module) -> bool:
    """Whether the lean decoder runs ``model`` (a family lowbit knows)."""
    from lowbit.errors import LowbitError
    from lowbit.models.families import family_of

    try:
        family_of(model)
    except LowbitError:
        return False
    return True


def decoder_steps(dec, ids: Tensor) -> Tensor:
    """Log-probabilities [T, vocab] of lean decoder ``dec`` (reset first) fed ``ids`` one token
    at a time (teacher forcing)."""
    dec.reset()
    out = []
    with torch.inference_mode():
        for t in range(len(ids)):
            out.append(torch.log_softmax(dec.forward(ids[t:t + 1]).float(), -1))
    return torch.stack(out)


def _steps(model: nn.Module, ids: Tensor, int8_activations: bool = False) -> Tensor:
    """`decoder_steps` of a new lean decoder over ``model``."""
    from lowbit.runtime.decoder import LeanDecoder

    return decoder_steps(LeanDecoder(model, max_len=len(ids), int8_activations=int8_activations), ids)


def reference_steps(model: nn.Module, ids: Tensor) -> Tensor:
    """The float model's step log-probabilities (step 1 above)."""
    return _steps(model, ids)


def step_kl(ref: Tensor, lp: Tensor) -> tuple[float, float]:
    """(mean KL(ref || lp) per step, top-1 agreement) of two [T, vocab] log-probability tables."""
    kl = (ref.exp() * (ref - lp)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == lp.argmax(-1)).float().mean())


def has_int8_rows(model: nn.Module) -> bool:
    """Whether int8 activations change any layer of ``model`` (an opt-in int8 row takes it)."""
    from lowbit import kernels
    from lowbit.nn.linear import QuantizedLinear

    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            k = kernels.select(mod.weight_format, "int8", "cpu")
            if k is not None and not k.default:
                return True
    return False


def choose(model: nn.Module, ids: Tensor, ref: Tensor, tolerance: float = TOLERANCE,
           absolute: float = ABS_TOLERANCE) -> dict | None:
    """Step 2 above: the record's ``decode`` entry, or None when there is nothing to choose."""
    if not has_int8_rows(model):
        return None
    kl_f, top_f = step_kl(ref, _steps(model, ids, False))
    kl_8, top_8 = step_kl(ref, _steps(model, ids, True))
    take = kl_8 <= (1 + tolerance) * kl_f or kl_8 - kl_f <= absolute
    return {"int8_activations": bool(take), "tolerance": tolerance, "abs_tolerance": absolute,
            "tokens": int(len(ids)), "step_kl_float": kl_f, "step_kl_int8": kl_8,
            "top1_float": top_f, "top1_int8": top_8}


def resolve(record: dict | None, forced: bool | None) -> tuple[bool, str]:
    """(int8 activations?, why) for a model with ``record``: ``forced`` (a flag) wins, then the
    record's measured choice; float activations otherwise."""
    if forced is not None:
        return forced, "asked for"
    d = (record or {}).get("decode")
    if not isinstance(d, dict) or not isinstance(d.get("int8_activations"), bool):
        return False, "no measured choice in the checkpoint"
    try:
        why = (f"measured when it was made: step KL to the float model {float(d['step_kl_int8']):.4g} with int8 "
               f"activations vs {float(d['step_kl_float']):.4g} with float ones over {int(d['tokens'])} tokens "
               f"(tolerance {100 * float(d['tolerance']):.0f} %"
               + (f" or +{float(d['abs_tolerance']):.3g}" if d.get("abs_tolerance") else "") + ")")
    except (KeyError, TypeError, ValueError):
        why = "the checkpoint's recorded choice"
    return d["int8_activations"], why
