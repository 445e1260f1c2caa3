"""Load a causal LM for quantization: an HF directory, a GGUF file, or a builtin model.

    load_model(spec=None, dtype=torch.float32) -> LoadedModel(model, tokenizer, name, source)

``spec`` is one of
  * ``None`` or ``"smollm2-135m"``  the embedded default (see ``lowbit.models.builtin``),
  * ``"gemma3-270m"``               the second builtin,
  * a Hugging Face model directory  (config.json + *.safetensors + tokenizer files),
  * a ``.gguf`` file                (llama.cpp format; dequantized to float by transformers).

A directory holding ``lowbit.json`` is a lowbit quantized checkpoint: this module does not load
those; callers dispatch on ``is_lowbit_checkpoint(path)`` first.

Every problem with the input (missing or truncated files, corrupt headers, NaN/Inf weights, an
architecture outside ``FAMILIES``) is raised as a one-line ``LowbitError`` before or instead of
a deep traceback. Files are validated cheaply *before* transformers touches them, so a truncated
file can neither crash the loader nor make it allocate memory for data that is not there.
"""

from __future__ import annotations

import json
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
from lowbit.models.gguf_check import check_hyperparameters, scan_gguf

# Nothing may come from the Hugging Face hub; `local_files_only=True` below is the hard guarantee,
# the environment variable keeps huggingface_hub from trying anyway in code we do not control.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec`` (builtin name, HF directory or .gguf file); see the module docstring."""
    from lowbit.models import builtin

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
    from lowbit.models import builtin
    from lowbit.models.lazy import open_lazy

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


def weights_on_disk(spec: str | os.PathLike | None) -> tuple[int, torch.dtype] | None:
    """(bytes, dtype) of the floating weights of a builtin or HF directory, from the safetensors
    headers alone; None for anything else (GGUF, missing paths: load_model reports those)."""
    from lowbit.models import builtin
    from lowbit.models.lazy import files_dtype

    if spec is None or (isinstance(spec, str) and spec in builtin.BUILTINS):
        name = spec or builtin.DEFAULT_MODEL
        if not builtin.is_cached(name):
            return None
        path = builtin.cache_path(name)
    else:
        path = Path(spec).expanduser()
        if not path.is_dir() or is_lowbit_checkpoint(path):
            return None
    try:
        return files_dtype(path)
    except LowbitError:
        return None


# --------------------------------------------------------------------------------------------
# HF directories
# --------------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LowbitError(f"{path} has no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{cfg_file} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise LowbitError(f"{cfg_file} does not hold a JSON object")
    return cfg


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF directory, checked to exist (sharded or not)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LowbitError(f"{index} is not a valid safetensors index: {_first_line(e)}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise LowbitError(
                f"{path}: {len(missing)} weight shard(s) listed in {index.name} are missing, e.g. {missing[0]}"
            )
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(other)}; only safetensors weights are supported)" if other else ""
        raise LowbitError(f"{path} has no *.safetensors weight files{hint}")
    return files


def _check_safetensors(file: Path) -> int:
    """Validate a safetensors header against the file (size, JSON, offsets); return #tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return len(list(f.keys()))
    except Exception as e:  # SafetensorError, OSError, ...: all mean "this file is unusable"
        raise LowbitError(f"corrupt or truncated safetensors file {file}: {_first_line(e)}") from None


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, name: str | None = None,
                source: dict | None = None) -> LoadedModel:
    """Load a Hugging Face causal-LM directory (config.json + *.safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LowbitError(f"model directory not found: {path}")
    cfg = _read_config(path)
    model_type = cfg.get("model_type")
    fam = family_for_type(model_type)  # fail fast, before reading weights
    for f in _safetensors_files(path):
        _check_safetensors(f)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise LowbitError(f"{path} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    tokenizer = _load_tokenizer(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except Exception as e:  # report whatever transformers hit in one line (the chain keeps the detail)
        raise LowbitError(f"could not load the model in {path}: {_first_line(e)}") from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise LowbitError(f"{path}: {len(missing)} weight(s) missing from the checkpoint, e.g. {sorted(missing)[0]}")
    src = dict(source or {"kind": "hf-dir", "path": str(path), "model_type": fam.model_type})
    src["dtype"] = str(_files_dtype(path)).removeprefix("torch.")
    return _finish(model, tokenizer, name or path.name, src, where=str(path), dtype=dtype)


def _files_dtype(path: Path) -> torch.dtype:
    from lowbit.models.lazy import files_dtype

    return files_dtype(path)[1]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(path: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # tokenizers raises many kinds; all mean "no usable tokenizer"
        where = path / gguf_file if gguf_file else path
        raise LowbitError(f"could not load a tokenizer from {where}: {_first_line(e)}") from None


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
    tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
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
        if p.is_floating_point() and not _all_finite(p):
            bad = int((~torch.isfinite(p)).sum())
            raise LowbitError(f"weight {pname} in {where} has {bad} NaN/Inf values")
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


@torch.no_grad()
def _all_finite(t: torch.Tensor) -> bool:
    """Exact, and ~30x faster than isfinite().all() on this CPU: a sum of finite numbers is finite
    unless it overflows, so only a non-finite sum (NaN/Inf present, or overflow) needs the full check."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."
