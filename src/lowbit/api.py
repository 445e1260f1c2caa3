"""The Python API; the CLI is a thin layer over these functions.

    import lowbit
    m = lowbit.api.load()                                   # embedded default (SmolLM2-135M)
    rec = lowbit.api.quantize(m, "rtn", QuantScheme(bits=4, group_size=128))
    lowbit.api.save(m, "out/smollm2-int4", rec)
    q = lowbit.api.load("out/smollm2-int4")                  # bit-identical logits
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit import checkpoint
from lowbit.algorithms.base import make_method
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


@dataclass
class Model:
    """A model lowbit works on: the HF module, its tokenizer, where it came from, and (for a
    quantized checkpoint) the record of how it was made."""

    model: nn.Module
    tokenizer: object
    name: str
    source: dict
    record: dict | None = None
    path: str | None = None
    extra: dict = field(default_factory=dict)


def load(spec: str | None = None) -> Model:
    """Load a builtin model name, a HF directory, a GGUF file, or a lowbit checkpoint directory."""
    from lowbit.models.loading import load_model

    if spec is not None and checkpoint.is_checkpoint(spec):
        model, tok, rec = checkpoint.load(spec)
        import os

        return Model(model=model, tokenizer=tok, name=os.path.basename(os.path.normpath(spec)),
                     source={"kind": "lowbit-checkpoint", "path": str(spec)}, record=rec, path=str(spec))
    lm = load_model(spec)
    return Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)


def base_spec(m: Model) -> str | None:
    """The spec that loads the original (unquantized) model behind ``m``."""
    src = m.record["base_model"] if m.record else m.source
    if src.get("kind") == "builtin":
        return src.get("name")
    return src.get("path")


def quantize(m: Model, method: str = "rtn", scheme: QuantScheme | None = None, *,
             calibration_text: str | None = None, n_samples: int = 32, seq_len: int = 512,
             device: str = "cpu", batch_size: int = 8, force_runner: bool = False,
             progress: bool = True, seed: int = 0, head: str | None = None, **options) -> dict:
    """Quantize ``m.model`` in place; return the record describing what was done.

    Methods that need data are run block by block by the sequential runner on calibration
    samples (bundled calibration text unless ``calibration_text`` names a file); data-free
    methods are applied layer by layer directly (``force_runner`` routes them through the
    runner too, which must give the same result).

    ``head`` ("int8" or "int4") also quantizes the output layer (lm_head) with RTN — int8 per
    output channel, or int4 in asymmetric groups of 32 — untying it from the token embedding,
    which stays float for the lookup. Decoding a small model reads its vocabulary-sized head
    once per token, so this is where most of a 4-bit model's remaining decode time goes.
    """
    if head is not None and head not in HEAD_SCHEMES:
        raise LowbitError(f"head quantization must be one of {', '.join(HEAD_SCHEMES)}, got {head!r}")
    if m.record is not None:
        raise LowbitError(f"{m.name} is already quantized ({m.record['method']['method']}); quantize the original model")
    meth = make_method(method, scheme, **options)
    if device != "cpu" and device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device} requested but CUDA is not available")
    t0 = time.perf_counter()
    calib = None
    runner = None
    if meth.needs_calibration or force_runner:
        from lowbit.data.texts import calibration_samples, load_text

        text_name = calibration_text or "calibration"
        samples = calibration_samples(m.tokenizer, n_samples=n_samples, seq_len=seq_len,
                                      text=load_text(text_name), seed=seed)
        calib = {"text": text_name, "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # scale-out: this process calibrates on its share; the runner all-reduces statistics
            rank, world = dist.get_rank(), dist.get_world_size()
            if samples.shape[0] < world:  # same answer on every rank, so no rank is left waiting
                raise LowbitError(f"{samples.shape[0]} calibration samples cannot be split over {world} processes")
            samples = samples[rank::world]
            calib["world_size"] = world
        runner = run_sequential(m.model, meth, samples, device=device, batch_size=batch_size,
                                progress=progress).to_dict()
    else:
        apply_data_free(m.model, meth, progress=progress)
    if head is not None:
        quantize_head(m.model, HEAD_SCHEMES[head])
    seconds = time.perf_counter() - t0
    rec = {
        "method": meth.describe(),
        "base_model": m.source,
        "calibration": calib,
        "runner": runner,
        "quantize_seconds": round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    if head is not None:
        rec["head"] = {"name": head, "scheme": HEAD_SCHEMES[head].to_dict()}
    m.record = rec
    return rec


HEAD_SCHEMES = {
    "int8": QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None),
    "int4": QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32),
}


def quantize_head(model: nn.Module, scheme: QuantScheme) -> None:
    """Replace the output layer by an RTN-quantized copy (the token embedding keeps its float
    weight, so a tied pair is untied)."""
    from lowbit.formats.affine import AffineWeight
    from lowbit.nn.linear import QuantizedLinear

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out, nn.Linear):
        raise LowbitError(f"{type(model).__name__} has no float nn.Linear output layer to quantize")
    W = out.weight.detach().float()
    if not torch.isfinite(W).all():
        raise LowbitError("the output layer has NaN/Inf weights")
    fmt = AffineWeight.quantize_rtn(W, scheme)
    model.set_output_embeddings(QuantizedLinear(fmt, None if out.bias is None else out.bias.detach()))


def save(m: Model, out_dir: str) -> str:
    if m.record is None:
        raise LowbitError("model is not quantized; nothing to save (quantize it first)")
    return str(checkpoint.save(m.model, m.tokenizer, out_dir, m.record))


def linear_bits(model: nn.Module) -> tuple[float, int, int]:
    """(bits per weight over the model's linear layers, stored bytes, number of weights).

    A quantized (or sparse-stored) layer counts what its format stores; a layer still in float
    (an unquantized model, or the layers a partly sparse model keeps dense) counts its weight.
    For a supported LLM family: the linear layers inside its blocks; for other models: the
    quantized layers."""
    from lowbit.models.families import family_of, find_blocks
    from lowbit.nn.linear import QuantizedLinear

    try:
        family_of(model)
        modules = [m for blk in find_blocks(model) for m in blk.modules()]
    except LowbitError:
        modules = list(checkpoint.quantized_modules(model).values())
    nbytes = n = 0
    for mod in modules:
        if isinstance(mod, QuantizedLinear):
            n += mod.in_features * mod.out_features
            nbytes += mod.weight_format.nbytes
        elif isinstance(mod, nn.Linear):
            n += mod.weight.numel()
            nbytes += mod.weight.numel() * mod.weight.element_size()
    return (8 * nbytes / n if n else float("nan")), nbytes, n


def model_bytes(model: nn.Module) -> int:
    """Bytes of every stored tensor (tied tensors once): what a checkpoint holds."""
    return sum(t.numel() * t.element_size() for t in checkpoint._unique_state_dict(model).values())
