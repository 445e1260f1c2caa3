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

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.families import family_for_type, family_of
from lowbit.core.grid import all_finite
from lowbit.models.files import (  # noqa: F401 (INDEX, TensorInfo, read_header, files_dtype, weight_files re-exported)
    INDEX,
    TOKENIZER_FILES,
    TensorInfo,
    files_dtype,
    load_tokenizer,
    read_config,
    read_converted,
    row_slices,
    read_header,
    weight_files,
)


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
    _compact: dict[str, Any] = field(default_factory=dict, repr=False)  # materialize_rows: prefix -> placeholder

    # -- reading ----------------------------------------------------------------------------
    def tensor_names(self, prefix: str = "") -> list[str]:
        return [n for n in self.needed if _under(n, prefix)]

    def nbytes(self, prefix: str = "") -> int:
        seen = {self.needed[n] for n in self.tensor_names(prefix)}
        return sum(self.tensors[k].nbytes for k in seen)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by state-dict name (a tied alias reads its source), as a CPU tensor."""
        return self._read_many([name], dtype)[name]

    def read_parts(self, name: str, max_bytes: int = 64 << 20):
        """(dtype, shape, parts): one tensor as stored, its rows read a slice at a time (each
        part at most ``max_bytes``, or one row; `row_slices`), for copying a large tensor (a 1 GB
        embedding) into a checkpoint without holding it whole."""
        key = self.needed.get(name, name)
        if key not in self.tensors:
            raise LowbitError(f"{self.path}: no tensor {name} in the weight files")
        info = self.tensors[key]

        def parts():
            with _open(info.file) as f:
                for _, t in row_slices(f, key, max_bytes):
                    if t.is_floating_point() and not all_finite(t):
                        raise LowbitError(f"weight {name} in {self.path} has NaN/Inf values")
                    yield t

        return info.dtype, tuple(info.shape), parts()

    def _read_many(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            key = self.needed.get(n, n)
            if key not in self.tensors:
                raise LowbitError(f"{self.path}: no tensor {n} in the weight files")
            by_file.setdefault(self.tensors[key].file, []).append(n)
        out = {}
        for file, group in by_file.items():
            with _open(file) as f:  # mapping closed before returning
                for n in group:
                    out[n] = read_converted(f, self.needed.get(n, n), dtype)
        return out

    # -- materialize / release ----------------------------------------------------------------
    def materialize(self, prefix: str = "", dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
        module = self.model.get_submodule(prefix) if prefix else self.model
        names = sorted({self.first[n] for n in self.tensor_names(prefix)})
        loaded = self._read_many(names, dtype)
        for n, t in loaded.items():
            if t.is_floating_point() and not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise LowbitError(f"weight {n} in {self.path} has {bad} NaN/Inf values")
            p = nn.Parameter(t.to(device), requires_grad=False)
            for alias in self.aliases[n]:
                _set_tensor(self.model, alias, p)
        return module

    def materialize_rows(self, prefix: str, ids: torch.Tensor, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> nn.Module:
        """The embedding at ``prefix`` with only rows ``ids`` (sorted, unique token ids) in memory,
        as a compact table: row ``i`` of its weight is token ``ids[i]``, so the caller feeds it
        ``torch.searchsorted(ids, tokens)``. The rows are read a slice of the stored table at a
        time and converted to ``dtype`` exactly as `materialize` converts them, so the module's
        outputs are the full table's bits; a float32 copy of a 128k-vocabulary table (1-2 GB) is
        never made. Only this module holds the compact weight (a tied output layer stays on
        the meta device); `release` puts the placeholder back."""
        module = self.model.get_submodule(prefix)
        name = f"{prefix}.weight"
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if ids.dim() != 1 or ids.numel() == 0 or bool((ids[1:] <= ids[:-1]).any()):
            raise LowbitError("materialize_rows needs a non-empty sorted 1-D tensor of distinct token ids")
        _, shape, parts = self.read_parts(name)
        if int(ids[0]) < 0 or int(ids[-1]) >= shape[0]:
            raise LowbitError(f"token id {int(ids[-1]) if int(ids[-1]) >= shape[0] else int(ids[0])} is out of "
                              f"range for the embedding of {shape[0]} rows")
        rows, start = [], 0
        for part in parts:
            stop = start + part.shape[0]
            sel = ids[(ids >= start) & (ids < stop)] - start
            if sel.numel():
                rows.append(part[sel].to(dtype) if dtype is not None else part[sel].clone())
            start = stop
        table = torch.cat(rows)
        # padding_idx marks a row for gradients only, and the compact table may be shorter than it
        self._compact[prefix] = (module._parameters["weight"], getattr(module, "padding_idx", None))
        module._parameters["weight"] = nn.Parameter(table.to(device), requires_grad=False)
        if getattr(module, "padding_idx", None) is not None:
            module.padding_idx = None
        return module

    def release(self, prefix: str = "") -> None:
        for p in [p for p in self._compact if _under(p, prefix)]:  # compact tables: the placeholder back
            mod = self.model.get_submodule(p)
            mod._parameters["weight"], pad = self._compact.pop(p)
            if pad is not None:
                mod.padding_idx = pad
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
            clear = getattr(mod, "clear_cache", None)  # e.g. a QuantizedLinear's cached format
            if clear is not None:
                clear()

    def close(self) -> None:
        """Nothing stays open between calls; kept so callers can treat this like a file."""


@contextlib.contextmanager
def _open(file: Path):
    """``safe_open`` of a weight file; any failure inside (SafetensorError, OSError: the file
    changed or is unusable) becomes a one-line LowbitError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"corrupt or truncated safetensors file {file}: {_first_line(e)}") from None


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


    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LowbitError(f"model directory not found: {path}")
    cfg = read_config(path)
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
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise LowbitError(f"{path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
        tok = load_tokenizer(path)
    src = source or {"kind": "hf-dir", "path": str(path), "model_type": fam.model_type}
    src = {**src, "dtype": str(dtype).removeprefix("torch.")}
    first = {n: f for f, names in aliases.items() for n in names}
    return LazyModel(path=path, model=model, tokenizer=tok, name=name or path.name, source=src, dtype=dtype,
                     tensors=tensors, aliases=aliases, needed=needed, first=first)


__all__ = ["INDEX", "LazyModel", "TensorInfo", "build_skeleton", "files_dtype", "open_lazy", "read_header",
           "weight_files"]
