"""Read a GGUF file into torch: metadata and every tensor dequantized to float32.

    read_gguf(path) -> (metadata, {name: tensor})
    read_metadata(path) -> metadata

Safe on hostile input: `lowbit.models.gguf_check.scan_gguf` first walks the header checking
every count and length against the bytes that remain and that every tensor's data lies inside
the file; only then are values and tensor bytes read. Whatever the bytes say, a bad file ends in a
one-line `LowbitError`, and memory stays bounded by the file size (a dequantized tensor is at
most ~19x its stored bytes, TQ1_0's ratio).

Tensors come back in GGUF's naming and row order (``attn_q`` / ``attn_k`` of llama models in
llama.cpp's rotary layout; `lowbit.export.gguf.unpermute_qk` undoes it), shaped as torch
expects: a GGUF shape [ne0, ne1] (ne0 contiguous) is a tensor [ne1, ne0].
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.models.gguf_check import _ARRAY, _MAX_NESTING, _SCALARS, _STRING, _Cursor, scan_gguf

# ggml type id -> lowbit block type name
GGML_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
                   11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 30: "BF16", 34: "TQ1_0",
                   35: "TQ2_0"}
VALUE_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
                    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}


class _FullCursor(_Cursor):
    """A cursor that keeps arrays whole (counts were already checked against the file)."""

    def typed_value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what), VALUE_TYPE_NAMES[vtype]
        if vtype == _STRING:
            return self.string(what), "STRING"
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise self.fail(f"{what} nests arrays too deeply")
            itype = self.unpack("I", f"item type of {what}")
            if itype in _SCALARS:
                code = _SCALARS[itype]
                isize = struct.calcsize(code)
                n = self.count(f"length of {what}", isize)
                items = list(struct.unpack_from(f"{self.e}{n}{code}", self.buf, self.pos))
                self.pos += n * isize
                return items, f"ARRAY:{VALUE_TYPE_NAMES[itype]}"
            if itype == _STRING:
                n = self.count(f"length of {what}", 8)
                return [self.string(f"{what}[{i}]") for i in range(n)], "ARRAY:STRING"
            if itype == _ARRAY:
                n = self.count(f"length of {what}", 12)
                return [self.typed_value(_ARRAY, f"{what}[{i}]", depth + 1)[0] for i in range(n)], "ARRAY:ARRAY"
            raise self.fail(f"{what} has unknown item type {itype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


def read_metadata(path: str | os.PathLike, *, with_types: bool = False):
    """Every key/value of a GGUF file (arrays whole); with ``with_types`` also {key: type name}
    ("UINT32", "STRING", "ARRAY:INT32", ...)."""
    import mmap

    path = Path(path).expanduser()
    if not path.is_file():
        raise LowbitError(f"GGUF file not found: {path}")
    layout = scan_gguf(path)  # validates every count and length first
    md, types = {}, {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            raise LowbitError(f"{path} is a big-endian GGUF file; lowbit reads little-endian files only")
        c = _FullCursor(buf, layout.file_size, path, "<")
        c.pos = 24
        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.unpack("I", f"type of {key}")
            md[key], types[key] = c.typed_value(vtype, key)
    return (md, types) if with_types else md


def dequantize_bytes(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes of one tensor -> float32 tensor of the torch ``shape`` (rows last-dim contiguous)."""
    if type_name == "F32":
        x = np.ascontiguousarray(raw).view("<f4").astype(np.float32)
    else:
        from lowbit.export import gguf_imatrix

        x = gguf_imatrix.dequantize(raw, type_name)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(shape))


def read_gguf(path: str | os.PathLike, *, names: list[str] | None = None):
    """(metadata, {name: float32 tensor}) of a GGUF file; ``names`` limits which tensors are read."""
    path = Path(path).expanduser()
    md = read_metadata(path)
    layout = scan_gguf(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for t in layout.tensors:
            if names is not None and t.name not in names:
                continue
            tname = GGML_TYPE_NAMES.get(t.ggml_type)
            if tname is None:
                raise LowbitError(f"GGUF file {path}: tensor {t.name} has ggml type {t.ggml_type}, "
                                  f"which lowbit cannot dequantize (supported: {', '.join(GGML_TYPE_NAMES.values())})")
            f.seek(t.offset)
            raw = np.frombuffer(f.read(t.n_bytes), dtype=np.uint8)
            if raw.size != t.n_bytes:
                raise LowbitError(f"truncated GGUF file {path}: tensor {t.name} is cut short")
            shape = tuple(int(s) for s in reversed(t.shape))
            if t.n_bytes == 0 or 0 in shape:
                out[t.name] = torch.zeros(shape, dtype=torch.float32)
                continue
            out[t.name] = dequantize_bytes(raw, tname, shape)
    return md, out
