"""Saving and loading quantized models: safetensors + a JSON record, written atomically.

A checkpoint directory holds

* ``model.safetensors`` — every tensor: float parameters of the untouched modules, the packed
  tensors of each quantized module (``<layer>.qweight``, ``<layer>.scales``, ...). Tied tensors
  (e.g. lm_head = embed_tokens) are stored once.
* ``config.json`` and the tokenizer files — the Hugging Face model skeleton.
* ``lowbit.json`` — how the model was made: lowbit version, method and its settings (scheme),
  the base model, the calibration data used, and each quantized module's format and shape.

The directory is assembled under a temporary name beside the target and renamed into place only
when complete (``lowbit.json`` last, everything fsync'ed), so a crash never leaves a directory
that looks like a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.integrations import hf_config
from lowbit.models.loading import LOWBIT_CHECKPOINT_MARKER as RECORD
from lowbit.models.loading import is_lowbit_checkpoint as is_checkpoint  # noqa: F401 (re-exported)
from lowbit.nn.linear import QuantizedLinear

WEIGHTS = "model.safetensors"


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tensors that share storage (tied weights) kept once, contiguous, on CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = t.detach().to("cpu").contiguous()
    return out


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Build a directory under a temporary name beside ``out`` and swap it into place when the
    block completes (fsynced; a previous ``out`` is replaced). If the block raises, the partial
    directory is removed and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, record: dict) -> Path:
    """Write a checkpoint atomically. Refuses to overwrite a non-empty directory that is not a
    lowbit checkpoint (so a typo never destroys unrelated files)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_checkpoint(out):
        raise LowbitError(f"output directory {out} is not empty and is not a lowbit checkpoint; refusing to overwrite it")
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        hf_config.add_to_config_json(tmp / "config.json", record)  # transformers loads it via lowbit
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors = _unique_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "lowbit_version": __version__})
        full = dict(record)
        full["lowbit_version"] = __version__
        full["modules"] = {n: m.meta() for n, m in quantized_modules(model).items()}
        # a quantized output layer (api.quantize(head=...)) no longer shares the embedding's weight
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        full["tied_word_embeddings"] = (bool(getattr(model.config, "tie_word_embeddings", False))
                                        and not isinstance(head, QuantizedLinear))
        (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return out


def read_record(path: str | os.PathLike) -> dict:
    p = Path(path) / RECORD
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{path} is not a lowbit checkpoint (no {RECORD})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{p} is corrupt: {e}") from None
    if not isinstance(rec, dict) or "modules" not in rec or "method" not in rec:
        raise LowbitError(f"{p} is not a valid lowbit record (missing 'method' or 'modules')")
    return rec


def load(path: str | os.PathLike):
    """Load a checkpoint written by `save`: returns (model, tokenizer, record)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    rec = read_record(path)
    wfile = path / WEIGHTS
    if not wfile.is_file():
        raise LowbitError(f"checkpoint {path} has no {WEIGHTS}")
    try:
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LowbitError(f"{wfile} is corrupt or truncated: {str(e).splitlines()[0]}") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise LowbitError(f"{path}/config.json cannot be read: {str(e).splitlines()[0]}") from None
    hf_config.strip(config)  # the model built here is lowbit's, not transformers' quantizer's
    # Parameters start on the meta device (no memory): every one of them is either replaced by a
    # QuantizedLinear built from the file's tensors or assigned the file's own tensor below, so
    # the float model is never materialised (an int4 SmolLM2 checkpoint loads in ~0.4 GB instead
    # of ~1.1 GB). Buffers (rotary frequencies, Gemma's embedding scale) are computed on the CPU
    # as usual: they are not stored in checkpoints.
    from accelerate import init_empty_weights

    with torch.device("cpu"), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, meta in rec["modules"].items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        bias = own.pop("bias", None)
        try:
            qmod = QuantizedLinear.from_meta(meta, own, bias)
        except KeyError as e:
            raise LowbitError(f"checkpoint {path}: module {name} lacks tensor {e}") from None
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise LowbitError(f"checkpoint {path}: module {name} does not exist in {config.model_type}") from None
        setattr(parent, child, qmod)
    want = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    for k, t in tensors.items():  # assign keeps the file's dtype: give each tensor the model's
        if k in want and t.is_floating_point() and t.dtype != want[k]:
            tensors[k] = t.to(want[k])
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    qprefixes = tuple(n + "." for n in rec["modules"])
    missing = [m for m in missing if not m.startswith(qprefixes)]  # loaded into QuantizedLinear above
    if rec.get("tied_word_embeddings"):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if unexpected:
        raise LowbitError(f"checkpoint {path} has unexpected tensors, e.g. {unexpected[0]}")
    if missing:
        raise LowbitError(f"checkpoint {path} lacks tensors, e.g. {missing[0]}")
    left = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if left is not None:
        raise LowbitError(f"checkpoint {path} lacks tensors, e.g. {left}")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowbitError(f"checkpoint {path}: tensor {k} has NaN/Inf values")
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, rec
