"""Load a causal LM whole: a Hugging Face directory or a GGUF file.

    load_hf_dir(path, dtype=torch.float32) -> LoadedModel(model, tokenizer, name, source)
    load_gguf(path, dtype=torch.float32)   -> LoadedModel   (llama.cpp format; dequantized to float
                                                             by transformers)
    inspect_gguf(path) -> dict                              (validated summary, nothing loaded)

``lowbit.models.spec.load_model(spec)`` picks the reader for a spec (builtin name, directory, file).
A directory holding ``lowbit.json`` is a lowbit quantized checkpoint: this module does not load
those; callers dispatch on ``is_lowbit_checkpoint(path)`` first.

Every problem with the input (missing or truncated files, corrupt headers, NaN/Inf weights, an
architecture outside ``FAMILIES``) is raised as a one-line ``LowbitError`` before or instead of
a deep traceback. Files are validated cheaply *before* transformers touches them, so a truncated
file can neither crash the loader nor make it allocate memory for data that is not there.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.models.families import (
    SUPPORTED_GGUF_ARCHS,
    family_for_type,
    family_of,
    supported_families,
)
from lowbit.core.grid import all_finite
from lowbit.models.files import (
    TOKENIZER_FILES,
    _first_line,
    check_safetensors,
    files_dtype,
    load_tokenizer,
    read_config,
    safetensors_files,
)
from lowbit.models.gguf_check import check_hyperparameters, scan_gguf, verify_digest

LOWBIT_CHECKPOINT_MARKER = "lowbit.json"


@dataclass
class LoadedModel:
    """A model ready for quantization: eval mode, on CPU, in the requested dtype (float32)."""

    model: Any  # transformers PreTrainedModel (*ForCausalLM)
    tokenizer: Any  # transformers tokenizer
    name: str  # short label for reports, e.g. "smollm2-135m"
    source: dict = field(default_factory=dict)  # JSON-serialisable: kind, path, ...


def is_lowbit_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by lowbit's own save (it holds ``lowbit.json``)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / LOWBIT_CHECKPOINT_MARKER).is_file()


# --------------------------------------------------------------------------------------------
# HF directories
# --------------------------------------------------------------------------------------------


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, name: str | None = None,
                source: dict | None = None) -> LoadedModel:
    """Load a Hugging Face causal-LM directory (config.json + *.safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LowbitError(f"model directory not found: {path}")
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    fam = family_for_type(model_type)  # fail fast, before reading weights
    for f in safetensors_files(path):
        check_safetensors(f)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LowbitError(f"{path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    tokenizer = load_tokenizer(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, output_loading_info=True, use_safetensors=True
        )  # never a pytorch_model.bin lying beside the safetensors (unpickling runs code)
    except Exception as e:  # report whatever transformers hit in one line (the chain keeps the detail)
        raise LowbitError(f"could not load the model in {path}: {_first_line(e)}") from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise LowbitError(f"{path}: {len(missing)} weight(s) missing from the checkpoint, e.g. {sorted(missing)[0]}")
    src = dict(source or {"kind": "hf-dir", "path": str(path), "model_type": fam.model_type})
    src["dtype"] = str(files_dtype(path)[1]).removeprefix("torch.")
    return _finish(model, tokenizer, name or path.name, src, where=str(path), dtype=dtype)


# --------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def inspect_gguf(path: str | os.PathLike) -> dict:
    """Validate a GGUF file without loading it; return a JSON-able summary.

    Two passes: ``gguf_check.scan_gguf`` walks the header checking every count against the bytes
    left (so hostile lengths cannot make anything allocate or loop without bound) and that every
    tensor's data lies inside the file; then ``gguf.GGUFReader`` (memory-mapped) must parse it
    too, with any exception it raises turned into a one-line LowbitError.
    Returns {"architecture", "name", "n_tensors", "tensor_types": {type: count}, "bytes"}.
    """
    return _inspect_gguf(path)[0]


def _inspect_gguf(path: str | os.PathLike):
    import gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise LowbitError(f"GGUF file not found: {path}")
    layout = scan_gguf(path)
    if not layout.tensors:
        raise LowbitError(f"GGUF file {path} holds no tensors")
    try:
        reader = gguf.GGUFReader(str(path), "r")
        tensors = list(reader.tensors)
    except Exception as e:  # ValueError/IndexError/... on bad bytes: all mean "unusable file"
        raise LowbitError(f"corrupt or truncated GGUF file {path}: {_first_line(e)}") from None
    size = path.stat().st_size
    for t in tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.data_offset) < 0 or end > size or t.data.nbytes != int(t.n_bytes):
            raise LowbitError(
                f"truncated GGUF file {path}: tensor {t.name} needs bytes up to {end} but the file has {size}"
            )
    from lowbit.models import files

    if files.VERIFY_FILES:
        verify_digest(path, layout)
    arch = layout.kv.get("general.architecture")
    if not isinstance(arch, str):
        raise LowbitError(f"GGUF file {path} has no general.architecture")
    name = layout.kv.get("general.name")
    types = Counter(t.tensor_type.name for t in tensors)
    summary = {
        "architecture": arch,
        "name": name if isinstance(name, str) else None,
        "n_tensors": len(tensors),
        "tensor_types": dict(sorted(types.items())),
        "bytes": size,
    }
    return summary, layout


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, name: str | None = None,
              source: dict | None = None) -> LoadedModel:
    """Load a llama.cpp GGUF file with transformers, dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser().resolve()
    summary, layout = _inspect_gguf(path)
    arch = summary["architecture"]
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise LowbitError(
            f"unsupported model family {arch!r} (GGUF architecture) in {path}; "
            f"supported: {', '.join(supported_families())}"
        )
    check_hyperparameters(layout, path)
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
        )
    except Exception as e:  # the file passed our checks, so report whatever transformers hit in one line
        raise LowbitError(f"could not load GGUF file {path}: {_first_line(e)}") from e
    strip_gguf_quantizer(model)
    src = {"kind": "gguf", "path": str(path), "model_type": getattr(model.config, "model_type", None), **summary}
    return _finish(model, tokenizer, name or path.stem, source or src, where=str(path), dtype=dtype)


def strip_gguf_quantizer(model) -> None:
    """Forget that the weights came from a GGUF: they are plain float tensors now.

    transformers attaches a GGUF quantizer and ``config.quantization_config`` to models loaded
    with ``gguf_file=``; ``save_pretrained`` would then refuse or record a bogus quantization."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:  # read-only property on some versions
                pass
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None


# --------------------------------------------------------------------------------------------
# common tail
# --------------------------------------------------------------------------------------------


def _finish(model, tokenizer, name: str, source: dict, *, where: str, dtype: torch.dtype) -> LoadedModel:
    family_of(model)  # the class transformers built must be one we know how to walk
    model.eval()
    model.to("cpu")
    for pname, p in model.named_parameters():
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
        if p.is_floating_point() and not all_finite(p):
            bad = int((~torch.isfinite(p)).sum())
            raise LowbitError(f"weight {pname} in {where} has {bad} NaN/Inf values")
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)
