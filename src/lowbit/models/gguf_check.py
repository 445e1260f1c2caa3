"""Structural validation of a GGUF file, safe on hostile input.

Why not just ``gguf.GGUFReader``? The reader trusts the counts in the header: one flipped byte in
an array length makes it build a Python list of ~10^18 indices (MemoryError, or the OOM killer),
and transformers, handed a corrupted ``block_count``, would build a model with billions of layers.
This module walks the header itself, checking every count against the bytes that remain before
believing it, so it needs O(header) time and memory whatever the bytes say. Only after it passes
do we let ``GGUFReader`` and transformers near the file.

Layout (little-endian; GGUF v2/v3):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv    x { string key | u32 value_type | value }
    n_tensors x { string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset }
    padding to `general.alignment` (default 32) | tensor data (each at data_start + offset)
where string = u64 length + UTF-8 bytes and array = u32 item_type + u64 count + items.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4
# GGUF value types -> struct code (fixed-size scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# arrays we keep whole in the summary (everything else is summarised by its length)
_KEEP_ARRAY_ITEMS = 64


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous (input) dimension
    ggml_type: int
    offset: int  # absolute file offset of the first byte
    n_bytes: int


@dataclass
class GGUFLayout:
    version: int
    kv: dict = field(default_factory=dict)  # key -> scalar / str / short list / ("array", length)
    tensors: list[TensorEntry] = field(default_factory=list)
    data_start: int = 0
    file_size: int = 0


class _Cursor:
    def __init__(self, buf, size: int, path: Path, endian: str = "<"):
        self.buf, self.size, self.pos, self.path, self.e = buf, size, 0, path, endian

    def fail(self, what: str) -> LowbitError:
        return LowbitError(f"corrupt or truncated GGUF file {self.path}: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")

    def unpack(self, code: str, what: str):
        n = struct.calcsize(code)
        self.need(n, what)
        (v,) = struct.unpack_from(self.e + code, self.buf, self.pos)
        self.pos += n
        return v

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.unpack("Q", what)
        # every item needs at least min_item_bytes, so a count the file cannot hold is corrupt
        if n * max(min_item_bytes, 1) > self.size - self.pos:
            raise self.fail(f"{what} = {n} does not fit in the file")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", 1)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.count(f"length of {what}", 1)
        self.pos += n

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise self.fail(f"{what} nests arrays too deeply")
            itype = self.unpack("I", f"item type of {what}")
            if itype in _SCALARS:
                isize = struct.calcsize(_SCALARS[itype])
                n = self.count(f"length of {what}", isize)
                if n <= _KEEP_ARRAY_ITEMS:
                    items = list(struct.unpack_from(f"{self.e}{n}{_SCALARS[itype]}", self.buf, self.pos))
                    self.pos += n * isize
                    return items
                self.pos += n * isize
                return ("array", n)
            if itype == _STRING:
                n = self.count(f"length of {what}", 8)
                if n <= _KEEP_ARRAY_ITEMS:
                    return [self.string(f"{what}[{i}]") for i in range(n)]
                for i in range(n):
                    self.skip_string(f"{what}[{i}]")
                return ("array", n)
            if itype == _ARRAY:
                n = self.count(f"length of {what}", 12)
                for i in range(n):
                    self.value(_ARRAY, f"{what}[{i}]", depth + 1)
                return ("array", n)
            raise self.fail(f"{what} has unknown item type {itype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


def scan_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Walk the header and tensor table of a GGUF file; LowbitError on anything inconsistent.

    Checks: magic, version, every count/length against the remaining bytes, tensor ranks and
    types, alignment, and that every tensor's data lies wholly inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise LowbitError(f"corrupt or truncated GGUF file {path}: only {size} bytes")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise LowbitError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        endian = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in _VERSIONS and struct.unpack_from(">I", buf, 4)[0] in _VERSIONS:
            endian = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in _VERSIONS:
            raise LowbitError(f"unsupported GGUF version {version} in {path} (supported: 2, 3)")
        c = _Cursor(buf, size, path, endian)
        c.pos = 8
        n_tensors = c.count("tensor count", 8 + 4 + 8 + 4 + 8)  # shortest tensor info
        n_kv = c.count("metadata count", 8 + 4 + 1)  # shortest key/value
        layout = GGUFLayout(version=version, file_size=size)
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.unpack("I", f"type of {key}")
            layout.kv[key] = c.value(vtype, key)
        raw = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            n_dims = c.unpack("I", f"rank of tensor {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise c.fail(f"tensor {name} has rank {n_dims}")
            shape = tuple(c.unpack("Q", f"shape of tensor {name}") for _ in range(n_dims))
            gtype = c.unpack("I", f"type of tensor {name}")
            offset = c.unpack("Q", f"offset of tensor {name}")
            raw.append((name, shape, gtype, offset))
        alignment = layout.kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise c.fail(f"general.alignment = {alignment!r} is not a power of two")
        data_start = -(-c.pos // alignment) * alignment
        layout.data_start = data_start
        for name, shape, gtype, offset in raw:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
            except (ValueError, KeyError):
                raise c.fail(f"tensor {name} has unknown ggml type {gtype}") from None
            n_elems = math.prod(shape)
            if shape[0] % block:
                raise c.fail(f"tensor {name} row length {shape[0]} is not a multiple of its block size {block}")
            n_bytes = n_elems // block * type_size
            if offset % alignment:
                raise c.fail(f"tensor {name} starts at data offset {offset}, not a multiple of the alignment {alignment}")
            start = data_start + offset
            if start + n_bytes > size:
                raise LowbitError(
                    f"truncated GGUF file {path}: tensor {name} needs bytes up to {start + n_bytes} "
                    f"but the file has {size}"
                )
            layout.tensors.append(TensorEntry(name, shape, gtype, start, n_bytes))
    if len({t.name for t in layout.tensors}) != len(layout.tensors):
        raise LowbitError(f"corrupt GGUF file {path}: duplicate tensor names")
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in layout.tensors if t.n_bytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise LowbitError(f"corrupt GGUF file {path}: the data of tensors {a} and {b} overlap")
    return layout


def check_hyperparameters(layout: GGUFLayout, path) -> None:
    """The model shape the metadata claims must match the tensors actually stored.

    transformers builds the model from the metadata before it reads a tensor, so a corrupted
    ``block_count`` or ``embedding_length`` would otherwise allocate a model of arbitrary size."""
    arch = layout.kv.get("general.architecture")
    if not isinstance(arch, str):
        raise LowbitError(f"GGUF file {path} has no general.architecture")
    shapes = {t.name: t.shape for t in layout.tensors}

    def fail(msg: str) -> LowbitError:
        return LowbitError(f"inconsistent GGUF file {path}: {msg}")

    blocks = {int(n.split(".")[1]) for n in shapes if n.startswith("blk.") and n.split(".")[1].isdigit()}
    n_blocks = layout.kv.get(f"{arch}.block_count")
    if n_blocks is not None and (n_blocks != len(blocks) or blocks != set(range(len(blocks)))):
        raise fail(f"{arch}.block_count = {n_blocks} but tensors exist for {len(blocks)} blocks")
    emb = shapes.get("token_embd.weight")
    if emb is None or len(emb) != 2:
        raise fail("no 2-D token_embd.weight tensor")
    hidden, vocab = emb
    d = layout.kv.get(f"{arch}.embedding_length")
    if d is not None and d != hidden:
        raise fail(f"{arch}.embedding_length = {d} but token_embd.weight has width {hidden}")
    v = layout.kv.get(f"{arch}.vocab_size")
    if v is not None and v != vocab:
        raise fail(f"{arch}.vocab_size = {v} but token_embd.weight has {vocab} rows")
    tokens = layout.kv.get("tokenizer.ggml.tokens")
    n_tokens = tokens[1] if isinstance(tokens, tuple) else len(tokens) if isinstance(tokens, list) else None
    if n_tokens is not None and n_tokens != vocab:
        raise fail(f"the tokenizer has {n_tokens} tokens but token_embd.weight has {vocab} rows")
    ff = layout.kv.get(f"{arch}.feed_forward_length")
    up = shapes.get("blk.0.ffn_up.weight")
    if isinstance(ff, int) and up is not None and up[-1] != ff:
        raise fail(f"{arch}.feed_forward_length = {ff} but blk.0.ffn_up.weight has {up[-1]} rows")
    q = shapes.get("blk.0.attn_q.weight")
    heads = layout.kv.get(f"{arch}.attention.head_count")
    kv_heads = layout.kv.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(heads, int) and q is not None:
        if not 1 <= heads <= q[-1] or q[-1] % heads:
            raise fail(f"{arch}.attention.head_count = {heads} does not divide attn_q's {q[-1]} rows")
        if isinstance(kv_heads, int) and (not 1 <= kv_heads <= heads or heads % kv_heads):
            raise fail(f"{arch}.attention.head_count_kv = {kv_heads} does not divide head_count {heads}")
    for key in ("key_length", "value_length"):
        v = layout.kv.get(f"{arch}.attention.{key}")
        if isinstance(v, int) and q is not None and not 1 <= v <= q[-1]:
            raise fail(f"{arch}.attention.{key} = {v} is out of range")


# -- integrity: a digest of the whole file in its own header -----------------------------------------
# A GGUF file has no checksum, so a flipped byte in a tensor's data loads silently. The files lowbit
# writes carry one: the key below holds the sha256 of the whole file as written with the value's
# 64 bytes set to PLACEHOLDER, stamped in place once the rest is written. Readers that do not know
# the key ignore it (llama.cpp does); lowbit checks it on load (off with --no-verify).
DIGEST_KEY = "lowbit.file_sha256"
PLACEHOLDER = b"0" * 64
# written apart from the digest (with the general.* keys): a file holding it was written with a
# digest, so damage to the digest key's own name cannot turn the check off unnoticed
VERSION_KEY = "lowbit.version"


def _digest_marker() -> bytes:
    key = DIGEST_KEY.encode()
    return struct.pack("<Q", len(key)) + key + struct.pack("<IQ", _STRING, len(PLACEHOLDER))


def _file_sha256(path: Path, at: int) -> str:
    """sha256 of the file with the 64 bytes at ``at`` read as PLACEHOLDER."""
    import hashlib

    h = hashlib.sha256()
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            lo, hi = max(at - pos, 0), min(at + len(PLACEHOLDER) - pos, len(chunk))
            if lo < hi:
                chunk = chunk[:lo] + PLACEHOLDER[lo + pos - at:hi + pos - at] + chunk[hi:]
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


def _digest_offset(path: Path, header_end: int) -> int | None:
    """Where the digest's value lies (in the header, before ``header_end``), or None."""
    with open(path, "rb") as f:
        head = f.read(header_end)
    i = head.find(_digest_marker())
    return None if i < 0 else i + len(_digest_marker())


def stamp_digest(path: str | os.PathLike) -> str:
    """Fill in the digest of a GGUF file just written with ``DIGEST_KEY = PLACEHOLDER``."""
    path = Path(path)
    layout = scan_gguf(path)
    at = _digest_offset(path, layout.data_start)
    if at is None:
        raise LowbitError(f"internal: {path} has no {DIGEST_KEY} placeholder to stamp")
    digest = _file_sha256(path, at)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())
    return digest


def verify_digest(path: str | os.PathLike, layout: GGUFLayout) -> None:
    """A GGUF file that carries ``DIGEST_KEY`` matches it (a damaged byte anywhere is an error)."""
    want = layout.kv.get(DIGEST_KEY)
    path = Path(path)
    if want is None and VERSION_KEY in layout.kv:
        raise LowbitError(f"{path} is corrupt: lowbit wrote it with a digest ({DIGEST_KEY}) that is no longer there "
                          "(re-export it, or --no-verify to load it anyway)")
    if want is None:
        return  # not written by lowbit (or before lowbit kept digests): nothing to check against
    at = _digest_offset(path, layout.data_start)
    if not isinstance(want, str) or at is None or _file_sha256(path, at) != want:
        raise LowbitError(f"{path} is corrupt: its bytes differ from the digest recorded when lowbit wrote it "
                          "(re-export it, or --no-verify to load it anyway)")
