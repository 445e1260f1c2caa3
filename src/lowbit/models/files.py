"""An HF model directory's files, read and checked without loading the model: config.json,
the safetensors index and headers (checked against the files' lengths), the tokenizer; and the
checks the eager loader (``loading``) and the lazy one (``lazy``) share.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

# Nothing may come from the Hugging Face hub; `local_files_only=True` in the loaders is the hard
# guarantee, the environment variable keeps huggingface_hub from trying anyway in code we do not control.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LowbitError(f"{path} has no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{cfg_file} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise LowbitError(f"{cfg_file} does not hold a JSON object")
    check_config_values(cfg, cfg_file)
    return cfg


# Sizes a real decoder config stays within (the largest open models are far inside them); a
# value outside is a damaged file, refused before any module is built or tensor allocated.
_CONFIG_INTS = {
    "num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "vocab_size": 1 << 22, "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24,
}


# Whether loaders check recorded digests (a checkpoint's file sha256s, a lowbit GGUF file's own);
# `lowbit ... --no-verify` turns it off for the process.
VERIFY_FILES = True


def check_config_values(cfg: dict, where) -> None:
    """Types and ranges of the config.json fields lowbit builds models from: one line naming the
    field, never a hang (a billion layers), an allocator failure or a silently wrong model (a
    negative rope base, an eps that zeroes every norm)."""
    import math

    def bad(field, value, want):
        return LowbitError(f"{where}: {field} = {str(value)[:60]!r} is not {want}")

    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise bad("model_type", mt, "a string")
    for field, top in _CONFIG_INTS.items():
        v = cfg.get(field)
        if v is None:  # absent: transformers' default (or the tensors' shapes) decide
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise bad(field, v, f"an integer from 1 to {top}")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and (kv > heads or heads % kv):
        raise LowbitError(f"{where}: num_key_value_heads = {kv} must divide num_attention_heads = {heads}")
    for field in ("rms_norm_eps", "layer_norm_eps"):
        v = cfg.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
            raise bad(field, v, "a number between 0 and 1")
    thetas = [("rope_theta", cfg.get("rope_theta"))]
    rp = cfg.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise bad("rope_parameters", rp, "a mapping")
    if isinstance(rp, dict):
        thetas.append(("rope_parameters.rope_theta", rp.get("rope_theta")))
    for field, v in thetas:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise bad(field, v, "a positive number")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise bad("tie_word_embeddings", tie, "true or false")


def safetensors_files(path: Path) -> list[Path]:
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


def check_safetensors(file: Path) -> int:
    """Validate a safetensors header against the file (size, JSON, offsets); return #tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return len(list(f.keys()))
    except Exception as e:  # SafetensorError, OSError, ...: all mean "this file is unusable"
        raise LowbitError(f"corrupt or truncated safetensors file {file}: {_first_line(e)}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # tokenizers raises many kinds; all mean "no usable tokenizer"
        where = path / gguf_file if gguf_file else path
        raise LowbitError(f"could not load a tokenizer from {where}: {_first_line(e)}") from None


@torch.no_grad()
def row_slices(f, name: str, max_bytes: int = 64 << 20):
    """``(first row, tensor)`` pieces of tensor ``name`` of an open safetensors file ``f``
    (``safe_open(..., framework="pt")``), in order: slices of rows of at most ``max_bytes`` each
    (at least one row), or the whole tensor in one piece when it has fewer than 2 dimensions or
    fits in ``max_bytes``."""
    sl = f.get_slice(name)
    shape = list(sl.get_shape())
    src = DTYPES.get(sl.get_dtype())
    row = max(1, math.prod(shape[1:]) * (torch.empty((), dtype=src).element_size() if src else 1))
    if len(shape) < 2 or shape[0] * row <= max_bytes:
        yield 0, f.get_tensor(name)
        return
    step = max(1, max_bytes // row)
    for r in range(0, shape[0], step):
        yield r, sl[r : r + step]


def read_converted(f, name: str, dtype: torch.dtype | None, max_bytes: int = 64 << 20) -> torch.Tensor:
    """Tensor ``name`` of an open safetensors file ``f`` (``safe_open(..., framework="pt")``),
    converted to ``dtype`` when it is a float tensor of another dtype. The conversion runs a slice
    of rows at a time into the result (`row_slices`), so only the result is ever whole in memory
    (a bf16 embedding of 128k rows read as float32 would otherwise also be held as a bf16 copy);
    the values are those of ``get_tensor(name).to(dtype)``."""
    sl = f.get_slice(name)
    src = DTYPES.get(sl.get_dtype())
    if dtype is None or src is None or not src.is_floating_point or src == dtype:
        t = f.get_tensor(name)  # (a dtype this table lacks: converted whole, as torch reads it)
        return t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)
    out = torch.empty(list(sl.get_shape()), dtype=dtype)
    for r, part in row_slices(f, name, max_bytes):
        out[r : r + part.shape[0]] = part
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."


def fingerprint(obj, *, mtimes: bool = True) -> str:
    """Identity of a model for the cache key: a path (file or directory: names, sizes, mtimes,
    the first and last MiB of each file) or an ``nn.Module`` held in memory (its tensors' bytes).
    ``mtimes=False``: the files' contents only (a copy of the model has the same fingerprint)."""
    h = hashlib.sha256()
    if isinstance(obj, nn.Module):
        for name, t in sorted(obj.state_dict(keep_vars=False).items()):
            if t.is_meta:
                raise LowbitError(f"cannot fingerprint {type(obj).__name__}: {name} is not in memory")
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "tensors:" + h.hexdigest()
    path = Path(obj).expanduser().resolve()
    if not path.exists():
        raise LowbitError(f"cannot fingerprint {obj}: no such file or directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns if mtimes else ''}|".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return "files:" + h.hexdigest()
