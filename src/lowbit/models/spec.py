"""A model spec resolved to a model: ``None`` or a builtin name (``lowbit.models.builtin``), a
Hugging Face model directory or a ``.gguf`` file (``lowbit.models.loading``), loaded whole or
opened lazily (``lowbit.models.lazy``).

A directory holding ``lowbit.json`` is a lowbit quantized checkpoint: these functions refuse it
(load it with ``lowbit.checkpoint.load``); callers dispatch on ``is_lowbit_checkpoint(path)`` first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.models import builtin
from lowbit.models.files import files_dtype
from lowbit.models.lazy import open_lazy
from lowbit.models.loading import (
    LOWBIT_CHECKPOINT_MARKER,
    LoadedModel,
    _is_gguf_file,
    is_lowbit_checkpoint,
    load_gguf,
    load_hf_dir,
)


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec`` (builtin name, HF directory or .gguf file); see the module docstring."""
    if spec is None or (isinstance(spec, str) and spec in builtin.BUILTINS):
        return builtin.load_builtin(spec or builtin.DEFAULT_MODEL, dtype=dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LowbitError(
            f"model not found: {spec} is neither an existing path nor a builtin model "
            f"({', '.join(builtin.builtin_models())})"
        )
    if path.is_dir():
        if is_lowbit_checkpoint(path):
            raise LowbitError(
                f"{path} is a lowbit quantized checkpoint ({LOWBIT_CHECKPOINT_MARKER}); "
                "load it with lowbit's checkpoint loader, not load_model"
            )
        return load_hf_dir(path, dtype=dtype)
    if _is_gguf_file(path):
        return load_gguf(path, dtype=dtype)
    raise LowbitError(f"{path} is neither a model directory nor a GGUF file")


def load_model_lazy(spec: str | os.PathLike | None = None):
    """Open ``spec`` (builtin name or HF directory) without reading its weights: a
    ``lowbit.models.lazy.LazyModel`` whose blocks are materialized one at a time."""
    if spec is None or (isinstance(spec, str) and spec in builtin.BUILTINS):
        path, source = builtin.builtin_dir(spec or builtin.DEFAULT_MODEL)
        return open_lazy(path, name=source["name"], source=source)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LowbitError(f"model not found: {spec} is neither an existing path nor a builtin model "
                          f"({', '.join(builtin.builtin_models())})")
    if not path.is_dir():
        raise LowbitError(f"{path} is not a model directory; only Hugging Face safetensors directories can be "
                          "streamed (a GGUF file is dequantized whole)")
    if is_lowbit_checkpoint(path):
        raise LowbitError(f"{path} is a lowbit quantized checkpoint ({LOWBIT_CHECKPOINT_MARKER}); quantize the original model")
    return open_lazy(path)


def spec_path(spec: str | os.PathLike | None) -> Path:
    """Where a model spec's files are: a builtin's cache folder (which may not exist yet), or the
    path given."""
    if spec is None or (isinstance(spec, str) and spec in builtin.BUILTINS):
        return builtin.cache_path(spec or builtin.DEFAULT_MODEL)
    return Path(spec).expanduser()


def weights_on_disk(spec: str | os.PathLike | None) -> tuple[int, torch.dtype] | None:
    """(bytes, dtype) of the floating weights of a builtin or HF directory, from the safetensors
    headers alone; None for anything else (GGUF, missing paths: load_model reports those)."""
    path = spec_path(spec)
    if spec is None or (isinstance(spec, str) and spec in builtin.BUILTINS):
        if not builtin.is_cached(spec or builtin.DEFAULT_MODEL):
            return None
    elif not path.is_dir() or is_lowbit_checkpoint(path):
        return None
    try:
        return files_dtype(path)
    except LowbitError:
        return None
