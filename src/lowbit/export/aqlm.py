"""Export a model quantized with lowbit's AQLM as a checkpoint that transformers loads with the
``aqlm`` package (its AQLM integration), unchanged on disk from what lowbit stores:

    from lowbit import api
    from lowbit.export.aqlm import export_aqlm
    m = api.load()
    api.quantize(m, "aqlm", None)
    export_aqlm(m, "out/smollm2-aqlm-2x8", dtype="float32")
    # transformers + aqlm: AutoModelForCausalLM.from_pretrained("out/smollm2-aqlm-2x8")

The directory holds ``config.json`` (the model config with a ``quantization_config``), one
``model.safetensors``, the tokenizer files, ``generation_config.json`` and ``lowbit_export.json``
(how the model was made; loaders ignore it), assembled under a temporary name and renamed into
place when complete (`lowbit.outputs.atomic_dir`).

Layout (the ``aqlm`` package's ``QuantizedLinear``, which transformers puts in place of every
``nn.Linear`` not listed in ``linear_weights_not_to_quantize``):

* ``<name>.codes`` int8/int16 [out, in / g, M], ``<name>.codebooks`` [M, 2^B, 1, g],
  ``<name>.scales`` [out, 1, 1, 1]: lowbit's `AQLMWeight` tensors as they are (the codebooks and
  scales in ``dtype`` when one is given); ``<name>.bias`` where the layer has one;
* every other tensor of the model as it is (in ``dtype`` when given);
* ``quantization_config = {"quant_method": "aqlm", "in_group_size", "out_group_size",
  "num_codebooks", "nbits_per_codebook", "linear_weights_not_to_quantize"}``: one configuration
  for the whole model, so every quantized layer must share it; the linear layers lowbit left in
  float (the output layer, usually) are listed by module name and by ``<name>.weight`` (newer
  transformers match module names, older ones parameter names).

The ``aqlm`` package's CPU kernel (2x8 codebooks) needs float32 codebooks and activations: load
with ``dtype=torch.float32`` (or export with ``dtype="float32"``); other shapes dequantize.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import _DTYPES, _unwrap, write_export
from lowbit.formats.aqlm import AQLMWeight

QUANT_METHOD = "aqlm"
SETTINGS = ("in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook")


def quantization_config(weights: dict[str, AQLMWeight], other_linears: list[str]) -> dict:
    """The ``quantization_config`` of config.json for these quantized layers (one shared setting)."""
    settings = {tuple(getattr(w, k) for k in SETTINGS): n for n, w in weights.items()}
    if len(settings) != 1:
        shown = "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in zip(SETTINGS, s)) for s, n in settings.items())
        raise LowbitError(f"an AQLM export needs one codebook setting for every layer; this model has several "
                          f"({shown})")
    (only,) = settings
    skip = sorted({x for n in other_linears for x in (n, f"{n}.weight")})
    return {"quant_method": QUANT_METHOD, **dict(zip(SETTINGS, only)), "linear_weights_not_to_quantize": skip}


def export_aqlm(model, out_dir: str | os.PathLike, *, tokenizer=None, record: dict | None = None,
                dtype: str | None = None, force: bool = False) -> Path:
    """Write ``model`` (a lowbit ``api.Model`` or a module whose quantized layers all hold
    `AQLMWeight`s) as a transformers + aqlm checkpoint directory ``out_dir``; return its path.

    dtype: of the codebooks, scales and every float tensor (None keeps each as it is: the
    codebooks and scales as quantized, the rest in the model's dtype). Refuses to replace a
    directory that is not an earlier export or holds other files (``force`` overrides)."""
    from lowbit import checkpoint
    from lowbit.integrations import hf_config

    module, tokenizer, record = _unwrap(model, tokenizer, record)
    if dtype is not None and dtype not in _DTYPES:
        raise LowbitError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    cast = _DTYPES[dtype] if dtype is not None else None
    qmods = checkpoint.quantized_modules(module)
    if not qmods:
        raise LowbitError("model has no quantized layers; quantize it with --method aqlm before exporting")
    other = sorted({type(m.weight_format).name for m in qmods.values()} - {AQLMWeight.name})
    if other:
        raise LowbitError(f"an AQLM export holds AQLM layers only; this model also has {', '.join(other)} layers")
    config = getattr(module, "config", None)
    if config is None:
        raise LowbitError("model has no transformers config; only transformers causal LMs can be exported")

    tensors: dict[str, Tensor] = {}
    for name, mod in qmods.items():
        w = mod.weight_format
        for k, t in w.tensors().items():
            tensors[f"{name}.{k}"] = (t if cast is None or k == "codes" else t.to(cast)).detach().cpu().contiguous()
    prefixes = tuple(n + "." for n in qmods)
    for k, t in checkpoint._unique_state_dict(module).items():
        if k.startswith(prefixes) and not k.endswith(".bias"):
            continue  # the packed buffers, written above
        tensors[k] = t.to(cast) if cast is not None and t.is_floating_point() else t
    other_linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    qconfig = quantization_config({n: m.weight_format for n, m in qmods.items()}, other_linears)

    cfg = copy.deepcopy(config)
    hf_config.strip(cfg)
    if cast is not None:
        cfg.dtype = cast
    rec = {"layout": "aqlm", "dtype": dtype, "record": record, "modules": {n: m.meta() for n, m in qmods.items()}}
    return write_export(out_dir, cfg, qconfig, module, tokenizer, tensors, rec, force=force)
