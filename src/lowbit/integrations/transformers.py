"""Load lowbit checkpoints with Hugging Face transformers: ``AutoModelForCausalLM.from_pretrained``.

    import lowbit                                   # registers the "lowbit" quantizer (lazily)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-int4")   # lowbit's modules and kernels

gives the same model as ``lowbit.api.load("out/smollm2-int4").model``: the same QuantizedLinear
modules built from the same stored tensors, float32 elsewhere, hence the same logits bit for bit.
Sharded checkpoints (``model.safetensors.index.json``) load the same way: transformers resolves
the shards, the quantizer reads the tensor headers of all of them.

How a load goes (transformers calls the quantizer at fixed points of ``from_pretrained``):

1. the checkpoint's config.json names ``quant_method: "lowbit"`` (`lowbit.integrations.hf_config`);
   transformers builds `LowbitConfig` and `LowbitHfQuantizer` from the tables lowbit registered in;
2. ``update_attn_implementation`` removes the guard field that makes a transformers without lowbit
   refuse the checkpoint, just before the weight files are looked up; ``update_dtype`` settles
   float32 (lowbit's modules and its own loader compute in float32);
3. before the weights load, every module named in ``lowbit.json`` is replaced by a placeholder
   that holds, on the meta device, exactly the tensors the checkpoint stores for it (names,
   shapes and dtypes read from the safetensors headers, no data), so transformers loads the
   packed tensors as they are — no float weight of a quantized layer is ever allocated. A file
   whose tensors do not match the model (missing or unexpected names) is refused here, as
   lowbit's own loader refuses it;
4. after loading, each placeholder becomes ``QuantizedLinear.from_meta(meta, tensors, bias)``
   (which validates the tensors) over the loaded tensors, without copying them.

The quantizer only loads: quantizing a float model through transformers
(``from_pretrained(float_model, quantization_config=LowbitConfig())``) is refused — quantize with
lowbit (``lowbit quantize`` / ``lowbit.api.quantize``). A loaded model cannot be re-saved with
``save_pretrained``; the checkpoint directory already is the saved form.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.errors import LowbitError
from lowbit.integrations.hf_config import GUARD_KEY, QUANT_METHOD, RECORD

logger = logging.getLogger(__name__)

# safetensors' dtype codes -> torch dtypes (the types lowbit checkpoints store)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LowbitConfig(QuantizationConfigMixin):
    """``quantization_config`` of a lowbit checkpoint: the lowbit version that wrote it, the
    method, and the name of the record file holding each quantized module's format."""

    def __init__(self, version: str | None = None, method: str | None = None, record: str = RECORD, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.version = version
        self.method = method
        self.record = record
        for k, v in kwargs.items():  # fields written by other lowbit versions: kept, not needed
            setattr(self, k, v)


class _Placeholder(nn.Module):
    """Stands in for one quantized layer while transformers loads the checkpoint: it declares,
    on the meta device, the tensors stored for the layer so that transformers loads them into it.
    Replaced by a QuantizedLinear after loading; never run."""

    def __init__(self, name: str, meta: dict, stored: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        self.layer_name = name
        self.layer_meta = meta
        self.bias = None
        for k, (shape, dtype) in stored.items():
            t = torch.empty(shape, dtype=dtype, device="meta")
            if k == "bias":
                self.bias = nn.Parameter(t, requires_grad=False)
            else:
                self.register_buffer(k, t)

    def forward(self, *args, **kwargs):
        raise LowbitError(f"{self.layer_name} was not loaded (the lowbit quantizer did not finish)")


def _stored_tensors(files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} over all weight files, from their headers only."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    code = sl.get_dtype()
                    if code not in _DTYPES:
                        raise LowbitError(f"{f}: tensor {k} has dtype {code}, which lowbit checkpoints do not use")
                    out[k] = (tuple(sl.get_shape()), _DTYPES[code])
        except LowbitError:
            raise
        except Exception as e:  # SafetensorError, OSError: the file is unusable
            raise LowbitError(f"corrupt or truncated safetensors file {f}: {str(e).splitlines()[0]}") from None
    return out


def _read_record(model, files: list[str], name: str) -> tuple[dict, str]:
    """lowbit.json beside the weight files (a local checkpoint) or fetched like them (the Hub)."""
    from lowbit.checkpoint import read_record

    where = Path(files[0]).parent
    if not (where / name).is_file():
        from transformers.utils import cached_file

        found = cached_file(model.config.name_or_path, name, _raise_exceptions_for_missing_entries=False)
        if found is None:
            raise LowbitError(f"{model.config.name_or_path} has quant_method 'lowbit' but no {name} "
                              "(the record of its quantized modules)")
        where = Path(found).parent
    return read_record(where), str(where)


class LowbitHfQuantizer(HfQuantizer):
    """transformers' side of loading a lowbit checkpoint (see the module docstring)."""

    requires_calibration = True  # loads pre-quantized checkpoints only

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.record: dict | None = None
        self.path: str | None = None

    def update_attn_implementation(self, config):
        # transformers looks the weight files up right after this call: drop the guard that makes
        # a transformers without lowbit refuse the checkpoint (lowbit.integrations.hf_config)
        for sub in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            if GUARD_KEY in sub.__dict__:
                delattr(sub, GUARD_KEY)
        return config

    def update_dtype(self, dtype):
        if dtype is not None and dtype != torch.float32:
            logger.info("lowbit checkpoints load in float32 (lowbit's modules compute in float32), not %s", dtype)
        return torch.float32

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise LowbitError("the lowbit quantizer loads lowbit checkpoint directories (no weight files were given)")
        rec, self.path = _read_record(model, checkpoint_files, getattr(self.quantization_config, "record", RECORD))
        self.record = rec
        from lowbit.checkpoint import verify_files

        verify_files(self.path, rec)  # a damaged file is an error here too, as in lowbit's own loader
        stored = _stored_tensors(checkpoint_files)
        for name, meta in rec["modules"].items():
            prefix = name + "."
            own = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
            bad = next((k for k in own if "." in k), None)
            if bad is not None:
                raise LowbitError(f"checkpoint {self.path}: tensor {prefix}{bad} is not a tensor of layer {name}")
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name) if parent_name else model
                getattr(parent, child)
            except AttributeError:
                raise LowbitError(f"checkpoint {self.path}: module {name} does not exist in {type(model).__name__} "
                                  "(a lowbit checkpoint is a causal LM: load it with AutoModelForCausalLM)") from None
            setattr(parent, child, _Placeholder(name, meta, own))
        # a quantized output layer no longer shares the embedding's weight: nothing to tie to it
        replaced = tuple(n + "." for n in rec["modules"])
        tied = getattr(model, "all_tied_weights_keys", None)
        if tied:
            model.all_tied_weights_keys = {t: s for t, s in tied.items() if not t.startswith(replaced)}
        # the same rule as lowbit's own loader: every tensor of the model comes from the file
        # (the output layer may be tied to the embedding) and the file holds nothing else
        expected = set(model.state_dict().keys())
        unexpected = sorted(set(stored) - expected)
        if unexpected:
            raise LowbitError(f"checkpoint {self.path} has unexpected tensors, e.g. {unexpected[0]}")
        missing = expected - set(stored)
        if rec.get("tied_word_embeddings"):
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            head_name = next((n for n, m in model.named_modules() if m is head), None)
            missing.discard(f"{head_name}.weight")
        if missing:
            raise LowbitError(f"checkpoint {self.path} lacks tensors, e.g. {sorted(missing)[0]}")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from lowbit.core.grid import all_finite
        from lowbit.nn import module_from_meta

        for name, ph in [(n, m) for n, m in model.named_modules() if isinstance(m, _Placeholder)]:
            tensors = dict(ph.named_buffers(recurse=False))
            left = next((k for k, t in tensors.items() if t.is_meta), None)
            if left is not None or (ph.bias is not None and ph.bias.is_meta):
                raise LowbitError(f"checkpoint {self.path}: module {name} lacks tensor {left or 'bias'}")
            bias = None if ph.bias is None else ph.bias.detach()
            try:
                qmod = module_from_meta(ph.layer_meta, tensors, bias)
            except KeyError as e:
                raise LowbitError(f"checkpoint {self.path}: module {name} lacks tensor {e}") from None
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, qmod)
        for k, p in model.named_parameters():
            if p.is_floating_point() and not all_finite(p.detach()):
                raise LowbitError(f"checkpoint {self.path}: tensor {k} has NaN/Inf values")
        model.eval()
        return model

    def is_serializable(self, **kwargs) -> bool:
        return False  # the checkpoint directory is the saved form; lowbit.api.save writes new ones

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Put LowbitConfig and LowbitHfQuantizer into transformers' tables (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


__all__ = ["LowbitConfig", "LowbitHfQuantizer", "register"]
