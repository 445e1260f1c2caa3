"""Open a Hugging Face model directory without reading its weights, and bring one module's
tensors into memory at a time.

    lazy = open_lazy(path)              # reads config.json, the index and every shard's header only
    lazy.model                          # the transformers *ForCausalLM skeleton: parameters on the
                                        #   meta device, buffers (rotary inv_freq, Gemma's embedding
                                        #   scale) real, computed on the CPU as usual
    lazy.tokenizer, lazy.name, lazy.source   # as in LoadedModel; source["dtype"] = the files' dtype
    lazy.dtype                          # torch dtype of the floating weights on disk (bf16, fp16, fp32)
    lazy.materialize(prefix, dtype=None, device="cpu") -> nn.Module
                                        # read every parameter under the module ``prefix`` (e.g.
                                        #   "model.layers.3", "model.embed_tokens", "" = whole model)
                                        #   from its shard (memory-mapped with safetensors' safe_open,
                                        #   mapping dropped before returning), convert it to ``dtype``
                                        #   (None: keep the file's), move it to ``device``, install it
                                        #   in the skeleton; returns the module
    lazy.release(prefix)                # put those parameters back on the meta device (memory freed
                                        #   once no other reference holds them); quantized modules
                                        #   installed under ``prefix`` meanwhile have their buffers
                                        #   moved to meta too
    lazy.read(name, dtype=None) -> Tensor    # one tensor of the files by its state-dict name
    lazy.tensor_names(prefix) -> [name]      # the file tensors the skeleton needs under ``prefix``
    lazy.nbytes(prefix="") -> int            # their bytes on disk

Tied parameters (``lm_head.weight`` = ``model.embed_tokens.weight``) stay tied: materializing or
releasing either module installs the same tensor in both. A tied name absent from the files is
read under the name it is tied to.

Validation happens in ``open_lazy``, before anything large is read: every tensor the skeleton
needs must be listed by the index (or present in the single file) and lie in that file; every
header must be well formed, name only known dtypes, and have byte ranges that match the tensor
shapes and fit the file's length. Each problem is one ``LowbitError`` naming the file and tensor.
NaN/Inf weights are reported when a tensor is materialized.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

INDEX = "model.safetensors.index.json"

# safetensors dtype codes -> torch dtypes (those lowbit can meet in a causal LM's weights)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header against the file's length."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LowbitError(f"corrupt or truncated safetensors file {file}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise LowbitError(f"corrupt or truncated safetensors file {file}: header of {n} bytes "
                                  f"does not fit the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise LowbitError(f"cannot read {file}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"corrupt safetensors file {file}: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise LowbitError(f"corrupt safetensors file {file}: its header is not a JSON object")
    data = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"corrupt safetensors file {file}: bad header entry for tensor {name}") from None
        dtype = DTYPES.get(code)
        if dtype is None:
            raise LowbitError(f"safetensors file {file}: tensor {name} has unsupported dtype {code}")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes:
            raise LowbitError(f"corrupt safetensors file {file}: tensor {name} has byte range [{begin}, {end}) "
                              f"for shape {list(shape)} {code}")
        if end > data:
            raise LowbitError(f"truncated safetensors file {file}: tensor {name} needs {end} data bytes "
                              f"but the file holds {data}")
        out[name] = TensorInfo(file, dtype, shape, nbytes)
    return out


def weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shards of an HF directory and the index's weight map (None without an index)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of file names")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise LowbitError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
        for s in files:
            if Path(s).name != s:
                raise LowbitError(f"{index} names a shard outside the directory: {s}")
            if not (path / s).is_file():
                raise LowbitError(f"{path}: weight shard {s} listed in {INDEX} is missing")
        return [path / s for s in files], weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path} has no *.safetensors weight files")
    return files, None


def files_dtype(path: str | os.PathLike) -> tuple[int, torch.dtype]:
    """(bytes, dtype) of an HF directory's floating tensors: their total size on disk and the
    dtype holding most of those bytes (the model's own dtype), from the headers alone."""
    files, weight_map = weight_files(Path(path))
    by_dtype: Counter = Counter()
    for f in files:
        for k, info in read_header(f).items():
            if info.dtype.is_floating_point and (weight_map is None or weight_map.get(k) == f.name):
                by_dtype[info.dtype] += info.nbytes
    if not by_dtype:
        return 0, torch.float32
    return sum(by_dtype.values()), by_dtype.most_common(1)[0][0]


@dataclass
class LazyModel:
    """An HF model whose parameters stay on disk until ``materialize`` (see the module docstring)."""

    path: Path
    model: Any
    tokenizer: Any
    name: str
    source: dict
    dtype: torch.dtype
    tensors: dict[str, TensorInfo]                      # every tensor of the files, by name
    aliases: dict[str, list[str]] = field(default_factory=dict)  # param name -> all names sharing it
    needed: dict[str, str] = field(default_factory=dict)         # param name -> file tensor name
    first: dict[str, str] = field(default_factory=dict)          # param name -> its group's first name

    # -- reading ----------------------------------------------------------------------------
    def tensor_names(self, prefix: str = "") -> list[str]:
        return [n for n in self.needed if _under(n, prefix)]

    def nbytes(self, prefix: str = "") -> int:
        seen = {self.needed[n] for n in self.tensor_names(prefix)}
        return sum(self.tensors[k].nbytes for k in seen)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by state-dict name (a tied alias reads its source), as a CPU tensor."""
        return self._read_many([name], dtype)[name]

    def _read_many(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            key = self.needed.get(n, n)
            if key not in self.tensors:
                raise LowbitError(f"{self.path}: no tensor {n} in the weight files")
            by_file.setdefault(self.tensors[key].file, []).append(n)
        out = {}
        for file, group in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:  # mapping closed before returning
                    for n in group:
                        t = f.get_tensor(self.needed.get(n, n))
                        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                            t = t.to(dtype)
                        out[n] = t
            except LowbitError:
                raise
            except Exception as e:  # SafetensorError, OSError: the file changed or is unusable
                raise LowbitError(f"corrupt or truncated safetensors file {file}: {_first_line(e)}") from None
        return out

    # -- materialize / release ----------------------------------------------------------------
    def materialize(self, prefix: str = "", dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
        from lowbit.models.loading import _all_finite

        module = self.model.get_submodule(prefix) if prefix else self.model
        names = sorted({self.first[n] for n in self.tensor_names(prefix)})
        loaded = self._read_many(names, dtype)
        for n, t in loaded.items():
            if t.is_floating_point() and not _all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise LowbitError(f"weight {n} in {self.path} has {bad} NaN/Inf values")
            p = nn.Parameter(t.to(device), requires_grad=False)
            for alias in self.aliases[n]:
                _set_tensor(self.model, alias, p)
        return module

    def release(self, prefix: str = "") -> None:
        module = self.model.get_submodule(prefix) if prefix else self.model
        dotted = f"{prefix}." if prefix else ""
        for n, t in list(module.named_parameters(remove_duplicate=False)):
            if t.is_meta:
                continue
            meta = nn.Parameter(t.detach().to("meta"), requires_grad=False)
            full = dotted + n
            for alias in self.aliases.get(self.first.get(full, full), [full]):
                _set_tensor(self.model, alias, meta)
        for mod_name, mod in module.named_modules():
            persistent = set(mod._buffers) - mod._non_persistent_buffers_set
            for b in persistent:
                t = mod._buffers[b]
                if t is not None and not t.is_meta:
                    mod._buffers[b] = t.to("meta")

    def close(self) -> None:
        """Nothing stays open between calls; kept so callers can treat this like a file."""


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _set_tensor(root: nn.Module, name: str, value: nn.Parameter) -> None:
    """Install ``value`` as parameter ``name``, unless that module was replaced meanwhile (a
    quantized module in place of a float one has no such parameter any more)."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = root.get_submodule(mod_name) if mod_name else root
    except AttributeError:
        return
    if attr in mod._parameters:
        mod._parameters[attr] = value


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def build_skeleton(config) -> nn.Module:
    """The *ForCausalLM of ``config`` with parameters on the meta device, real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with torch.device("cpu"), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config leaves meta parameters untied; tie as the config says
    model.eval()
    return model


def open_lazy(path: str | os.PathLike, *, name: str | None = None, source: dict | None = None,
              tokenizer: bool = True) -> LazyModel:
    """Open an HF causal-LM directory lazily (see the module docstring)."""
    from transformers import AutoConfig

    from lowbit.models.families import family_for_type, family_of
    from lowbit.models.loading import _TOKENIZER_FILES, _load_tokenizer, _read_config

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LowbitError(f"model directory not found: {path}")
    cfg = _read_config(path)
    fam = family_for_type(cfg.get("model_type"))  # fail fast, before reading anything else
    files, weight_map = weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for k, info in read_header(f).items():
            if weight_map is not None and weight_map.get(k) != f.name:
                continue  # the index is the table of contents: a tensor it does not list is not used
            tensors.setdefault(k, info)
    if weight_map is not None:
        for k, s in weight_map.items():
            if k not in tensors:
                raise LowbitError(f"{path / s}: tensor {k} listed in {INDEX} is not in that shard")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise LowbitError(f"{path}/config.json cannot be read: {_first_line(e)}") from None
    try:
        model = build_skeleton(config)
    except Exception as e:
        raise LowbitError(f"could not build the {fam.model_type} model of {path}: {_first_line(e)}") from e
    family_of(model)
    aliases: dict[str, list[str]] = {}
    by_id: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(p), n)
        aliases.setdefault(first, []).append(n)
    needed: dict[str, str] = {}
    for first, names in aliases.items():
        key = next((n for n in names if n in tensors), None)
        if key is None:
            where = f"{INDEX}" if weight_map is not None else ", ".join(f.name for f in files)
            raise LowbitError(f"{path}: tensor {first} is missing from {where}")
        for n in names:
            needed[n] = n if n in tensors else key
    floats = Counter()
    for k in set(needed.values()):
        if tensors[k].dtype.is_floating_point:
            floats[tensors[k].dtype] += tensors[k].nbytes
    dtype = floats.most_common(1)[0][0] if floats else torch.float32
    tok = None
    if tokenizer:
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise LowbitError(f"{path} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
        tok = _load_tokenizer(path)
    src = source or {"kind": "hf-dir", "path": str(path), "model_type": fam.model_type}
    src = {**src, "dtype": str(dtype).removeprefix("torch.")}
    first = {n: f for f, names in aliases.items() for n in names}
    return LazyModel(path=path, model=model, tokenizer=tok, name=name or path.name, source=src, dtype=dtype,
                     tensors=tensors, aliases=aliases, needed=needed, first=first)


__all__ = ["INDEX", "LazyModel", "TensorInfo", "build_skeleton", "files_dtype", "open_lazy", "read_header",
           "weight_files"]
