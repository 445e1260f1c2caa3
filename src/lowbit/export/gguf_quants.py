"""GGUF / GGML block quantization types, written for lowbit in plain numpy.

Every type cuts the last axis of a float32 tensor into blocks of ``block_size`` values and
stores each block in ``bytes_per_block`` bytes (the table `BLOCK_LAYOUTS`, the same numbers as
``gguf.GGML_QUANT_SIZES``). All multi-byte fields are little-endian; ``f16`` is IEEE half
precision. Each type is one class with two class methods:

* ``quantize(x)``   float32 [..., n]            -> uint8 [..., n / block_size * bytes_per_block]
* ``dequantize(raw)`` uint8 [..., k * bytes_per_block] -> float32 [..., k * block_size]

and `quantize(x, name)` / `dequantize(raw, name)` dispatch by type name ("Q4_0", ...).

The arithmetic follows llama.cpp's reference quantizers (``quantize_row_*_ref`` in
ggml-quants.c) step by step in float32, so that the bytes are identical to those of the
reference (and of gguf-py, which mirrors it for the types it can quantize). Notation per block:
``x`` the values, ``d`` the scale, ``m`` / ``dmin`` the offset, ``q`` the integer codes.

Rounding: llama.cpp uses C ``roundf`` (halves away from zero) and, in the legacy types,
``(int)(v + 0.5f)`` truncation; both are reproduced exactly (`_round_away`, `np.trunc`).
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError

QK_K = 256  # super-block size of the K-quants and ternary types

# type name -> (block_size, bytes_per_block)
BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q6_K": (256, 210),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q3_K": (256, 110),
    "Q2_K": (256, 84),
    "TQ1_0": (256, 54),
    "TQ2_0": (256, 66),
}


# -- small helpers ------------------------------------------------------------------------------
def _round_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact: no ``+ 0.5`` rounding slip)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``id = d ? 1/d : 0`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [..., 1] -> its IEEE half as 2 little-endian bytes [..., 2]."""
    return v.astype("<f2").view(np.uint8)


def _f16_from(raw: np.ndarray) -> np.ndarray:
    """2 little-endian bytes [..., 2] -> float32 [..., 1]."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [..., 2h] (< 16 after masking) -> bytes [..., h]: byte j = q[j] | q[j + h] << 4."""
    h = q.shape[-1] // 2
    return ((q[..., :h] & 0x0F) | (q[..., h:] << 4)).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_nibbles`: bytes [..., h] -> codes [..., 2h] (low nibbles first)."""
    return np.concatenate([b & 0x0F, b >> 4], axis=-1)


def _bits_le(q: np.ndarray, bit: int, n_bytes: int) -> np.ndarray:
    """Bit ``bit`` of each of the codes [..., 8*n_bytes] as a little-endian bit string:
    code j -> byte j // 8, bit j % 8."""
    return np.packbits(((q >> bit) & 1).astype(np.uint8), axis=-1, bitorder="little").reshape(
        *q.shape[:-1], n_bytes)


def _unbits_le(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=-1, bitorder="little")


class BlockType:
    """One GGML block type. Subclasses set ``name`` and implement the two ``_blocks`` methods
    on 2-D arrays: [n_blocks, block_size] float32 <-> [n_blocks, bytes_per_block] uint8."""

    name: str = ""
    block_size: int = 1
    bytes_per_block: int = 1

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.block_size, cls.bytes_per_block = BLOCK_LAYOUTS[cls.name]

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 0:
            raise LowbitError(f"{cls.name}: expected an array with a last axis, got a scalar")
        n = x.shape[-1]
        if n % cls.block_size:
            raise LowbitError(f"{cls.name}: last dimension {n} is not a multiple of the block size {cls.block_size}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            raise LowbitError(f"{cls.name}: input has {bad} NaN/Inf values; refusing to quantize it")
        blocks = x.reshape(-1, cls.block_size)
        with np.errstate(over="ignore", invalid="ignore"):
            out = cls._quantize_blocks(blocks)
        assert out.dtype == np.uint8 and out.shape == (blocks.shape[0], cls.bytes_per_block)
        return out.reshape(*x.shape[:-1], n // cls.block_size * cls.bytes_per_block)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raise LowbitError(f"{cls.name}: expected uint8 bytes to dequantize, got {raw.dtype}")
        if raw.ndim == 0 or raw.shape[-1] % cls.bytes_per_block:
            nb = raw.shape[-1] if raw.ndim else 0
            raise LowbitError(f"{cls.name}: last dimension {nb} is not a multiple of {cls.bytes_per_block} bytes per block")
        blocks = np.ascontiguousarray(raw).reshape(-1, cls.bytes_per_block)
        with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN scales in foreign bytes
            out = cls._dequantize_blocks(blocks)
        assert out.dtype == np.float32 and out.shape == (blocks.shape[0], cls.block_size)
        return out.reshape(*raw.shape[:-1], raw.shape[-1] // cls.bytes_per_block * cls.block_size)

    @classmethod
    def _check_scale(cls, d: np.ndarray) -> None:
        if not np.isfinite(d.astype(np.float16)).all():
            raise LowbitError(f"{cls.name}: values too large for the format's float16 scale (max {float(np.abs(d).max()):.4g})")

    @classmethod
    def _quantize_blocks(cls, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


# -- plain floats --------------------------------------------------------------------------------
class F16(BlockType):
    """One IEEE half per value (round to nearest even); overflow is refused."""

    name = "F16"

    @classmethod
    def _quantize_blocks(cls, x):
        cls._check_scale(x)
        return _f16_bytes(x)

    @classmethod
    def _dequantize_blocks(cls, raw):
        return _f16_from(raw)


class BF16(BlockType):
    """The upper 16 bits of the float32, rounded to nearest even (ggml_compute_fp32_to_bf16)."""

    name = "BF16"

    @classmethod
    def _quantize_blocks(cls, x):
        u = x.view(np.uint32).astype(np.uint64)
        h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        if (h >= 0xFFFF).any() or ((h & 0x7FFF) == 0x7F80).any():
            raise LowbitError(f"{cls.name}: values too large for bfloat16")
        return h.astype("<u2").view(np.uint8)

    @classmethod
    def _dequantize_blocks(cls, raw):
        u = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return u.view(np.float32)


# -- legacy 32-wide blocks -----------------------------------------------------------------------
class Q8_0(BlockType):
    """Block of 32: ``d`` f16 (bytes 0-1), then ``qs`` int8[32]. x = d * q.

    d = max|x| / 127, q = roundf(x / d) in [-127, 127] (divided by the float32 d, before it is
    rounded to f16)."""

    name = "Q8_0"

    @classmethod
    def _quantize_blocks(cls, x):
        d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
        cls._check_scale(d)
        q = _round_away(x * _inverse(d)).astype(np.int8)
        return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        return raw[:, 2:].view(np.int8).astype(np.float32) * d


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block, with its sign (first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)


def _min_max_codes(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 codes: d = (max - min) / levels, q = (int)((x - min) / d + 0.5)."""
    lo = x.min(axis=-1, keepdims=True)
    hi = x.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(levels)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, levels)
    return d, lo, q


def _absmax_codes(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0 codes: d = max / -half (max signed), q = (int)(x / d + half + 0.5)."""
    d = _signed_max(x) / np.float32(-half)
    q = np.trunc(x * _inverse(d) + np.float32(half + 0.5)).astype(np.uint8).clip(0, 2 * half - 1)
    return d, q


class Q4_0(BlockType):
    """Block of 32: ``d`` f16, then ``qs`` [16]: byte j = q[j] | q[j + 16] << 4. x = d * (q - 8).

    d = m / -8 where m is the value of largest magnitude (with its sign), so m maps to q = 0."""

    name = "Q4_0"

    @classmethod
    def _quantize_blocks(cls, x):
        d, q = _absmax_codes(x, 8)
        cls._check_scale(d)
        return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        q = _unpack_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)


class Q4_1(BlockType):
    """Block of 32: ``d`` f16, ``m`` f16, then ``qs`` [16] as in Q4_0. x = d * q + m.

    m = min, d = (max - min) / 15."""

    name = "Q4_1"

    @classmethod
    def _quantize_blocks(cls, x):
        d, m, q = _min_max_codes(x, 15)
        cls._check_scale(np.concatenate([d, m], axis=-1))
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        m = _f16_from(raw[:, 2:4])
        return d * _unpack_nibbles(raw[:, 4:]).astype(np.float32) + m


class Q5_0(BlockType):
    """Block of 32: ``d`` f16, ``qh`` u32 (bit j = bit 4 of q[j]), ``qs`` [16] (low nibbles, as
    in Q4_0). x = d * (q - 16); d = m / -16 with m the value of largest magnitude."""

    name = "Q5_0"

    @classmethod
    def _quantize_blocks(cls, x):
        d, q = _absmax_codes(x, 16)
        cls._check_scale(d)
        return np.concatenate([_f16_bytes(d), _bits_le(q, 4, 4), _pack_nibbles(q)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        q = _unpack_nibbles(raw[:, 6:]) | (_unbits_le(raw[:, 2:6]) << 4)
        return d * (q.astype(np.float32) - np.float32(16))


class Q5_1(BlockType):
    """Block of 32: ``d`` f16, ``m`` f16, ``qh`` u32, ``qs`` [16] as in Q5_0. x = d * q + m;
    m = min, d = (max - min) / 31."""

    name = "Q5_1"

    @classmethod
    def _quantize_blocks(cls, x):
        d, m, q = _min_max_codes(x, 31)
        cls._check_scale(np.concatenate([d, m], axis=-1))
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), _bits_le(q, 4, 4), _pack_nibbles(q)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        m = _f16_from(raw[:, 2:4])
        q = _unpack_nibbles(raw[:, 8:]) | (_unbits_le(raw[:, 4:8]) << 4)
        return d * q.astype(np.float32) + m


# -- ternary types (values in {-1, 0, 1} times d) ------------------------------------------------
def _ternary_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d = max|x|, t = roundf(x / d) + 1 in {0, 1, 2}."""
    d = np.abs(x).max(axis=-1, keepdims=True)
    t = (_round_away(x * _inverse(d)) + 1).astype(np.uint8)
    return d, t


class TQ2_0(BlockType):
    """Block of 256: ``qs`` [64], then ``d`` f16 (bytes 64-65). x = d * (t - 1), t in {0, 1, 2}.

    2 bits per value: the block is two halves of 128; in half c, byte c*32 + j holds
    t[c*128 + k*32 + j] at bits 2k..2k+1 (k = 0..3)."""

    name = "TQ2_0"

    @classmethod
    def _quantize_blocks(cls, x):
        d, t = _ternary_codes(x)
        cls._check_scale(d)
        t = t.reshape(-1, 2, 4, 32)
        qs = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
        return np.concatenate([qs.reshape(-1, 64), _f16_bytes(d)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        qs = raw[:, :64].reshape(-1, 2, 1, 32)
        t = (qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [n, 2, 4, 32]
        return _f16_from(raw[:, 64:66]) * (t.reshape(-1, 256).astype(np.float32) - np.float32(1))


_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _pack_trits(t: np.ndarray, width: int, n_trits: int) -> np.ndarray:
    """Trits t [n, n_trits*width] -> bytes [n, width]: byte j encodes t[k*width + j] (k = 0..n_trits-1)
    as the base-3 number v = sum_k t[k*width + j] * 3^(4-k) (k = 0 most significant, five trit
    places; a four-trit byte leaves the last place 0), stored as ceil(v * 256 / 243)."""
    t = t.reshape(-1, n_trits, width).astype(np.uint16)
    v = (t * _POW3[:n_trits, None]).sum(axis=1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _unpack_trits(b: np.ndarray, n_trits: int) -> np.ndarray:
    """Inverse of `_pack_trits`: trit k of byte b is ((b * 3^k mod 256) * 3) >> 8."""
    m = (b[:, None, :].astype(np.uint16) * _POW3[::-1][:n_trits, None]) & 0xFF  # [n, k, width]
    return ((m * 3) >> 8).reshape(b.shape[0], -1).astype(np.uint8)


class TQ1_0(BlockType):
    """Block of 256: ``qs`` [48], ``qh`` [4], then ``d`` f16 (bytes 52-53). x = d * (t - 1).

    Five trits per byte (1.6875 bits per value) in a fixed-point base-3 code (`_pack_trits`):
    qs[0:32] holds values 0..159 (byte j: values j, 32+j, 64+j, 96+j, 128+j), qs[32:48] values
    160..239 (byte j: 160+j, 176+j, ... , 224+j), and qh[0:4] the last 16 values, four per byte
    (byte j: 240+j, 244+j, 248+j, 252+j)."""

    name = "TQ1_0"

    @classmethod
    def _quantize_blocks(cls, x):
        d, t = _ternary_codes(x)
        cls._check_scale(d)
        return np.concatenate([_pack_trits(t[:, :160], 32, 5), _pack_trits(t[:, 160:240], 16, 5),
                               _pack_trits(t[:, 240:], 4, 4), _f16_bytes(d)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        t = np.concatenate([_unpack_trits(raw[:, :32], 5), _unpack_trits(raw[:, 32:48], 5),
                            _unpack_trits(raw[:, 48:52], 4)], axis=-1)
        return _f16_from(raw[:, 52:54]) * (t.astype(np.float32) - np.float32(1))


TYPES: dict[str, type[BlockType]] = {}


def _register_all() -> None:
    for cls in BlockType.__subclasses__():
        TYPES[cls.name] = cls


def get_type(name: str) -> type[BlockType]:
    if not TYPES:
        _register_all()
    if name not in TYPES:
        raise LowbitError(f"unknown GGUF block type {name!r}; available: {', '.join(TYPES)}")
    return TYPES[name]


def quantize(x: np.ndarray, name: str) -> np.ndarray:
    """Quantize float32 [..., n] to the GGUF block type ``name``; uint8 [..., bytes]."""
    return get_type(name).quantize(x)


def dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    """Dequantize uint8 [..., bytes] of the GGUF block type ``name`` to float32."""
    return get_type(name).dequantize(raw)
