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
``(int)(v + 0.5f)`` truncation; both are reproduced exactly (`_round_away`, `np.trunc`). The
K-quants use ``nearest_int`` (halves to even, `np.rint`).

Status (tests/test_gguf_quants.py): every type's quantized bytes are identical to llama.cpp's
compiled C reference (libggml 0.20.2); for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0, F16 and
BF16 also to ``gguf.quants.quantize`` (gguf-py 0.19 cannot quantize the K-quants), and every
type dequantizes exactly as ``gguf.quants.dequantize``. Bad input (last dimension not a whole
number of blocks, NaN/Inf, values whose scale overflows f16) raises a one-line LowbitError.
One known corner: a Q4_1 / Q5_1 block whose minimum is zero and that holds both +0.0 and -0.0
stores ``m`` as -0.0 here and in gguf-py (numpy's min) but may store +0.0 in C (first one seen);
the dequantized values are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
        if blocks.shape[0] == 0:
            out = np.zeros((0, cls.bytes_per_block), np.uint8)
        else:
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
        if blocks.shape[0] == 0:
            out = np.zeros((0, cls.block_size), np.float32)
        else:
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
        if ((h & 0x7FFF) == 0x7F80).any():  # rounded up to +-Inf
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


def _pack_5bit(q: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 codes [n, 32] (< 32) -> ``qh`` u32 (bit j = bit 4 of q[j]) then ``qs`` [16]."""
    q = q.astype(np.uint8)
    return np.concatenate([_bits_le(q, 4, 4), _pack_nibbles(q & 0x0F)], axis=-1)


def _unpack_5bit(b: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_5bit`: bytes [n, 20] -> codes [n, 32]."""
    return _unpack_nibbles(b[:, 4:]) | (_unbits_le(b[:, :4]) << 4)


class Q4_0(BlockType):
    """Block of 32: ``d`` f16, then ``qs`` [16]: byte j = q[j] | q[j + 16] << 4. x = d * (q - 8).

    d = m / -8 where m is the value of largest magnitude (with its sign), so m maps to q = 0."""

    name = "Q4_0"

    @classmethod
    def _quantize_blocks(cls, x):
        d, q = _absmax_codes(x, 8)
        cls._check_scale(d)
        return cls._pack(d, q)

    @classmethod
    def _pack(cls, d: np.ndarray, q: np.ndarray) -> np.ndarray:
        """d float32 [n, 1], q uint8 [n, 32] in 0..15 -> blocks [n, 18]."""
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
        return np.concatenate([_f16_bytes(d), _pack_5bit(q)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        q = _unpack_5bit(raw[:, 2:22])
        return d * (q.astype(np.float32) - np.float32(16))


class Q5_1(BlockType):
    """Block of 32: ``d`` f16, ``m`` f16, ``qh`` u32, ``qs`` [16] as in Q5_0. x = d * q + m;
    m = min, d = (max - min) / 31."""

    name = "Q5_1"

    @classmethod
    def _quantize_blocks(cls, x):
        d, m, q = _min_max_codes(x, 31)
        cls._check_scale(np.concatenate([d, m], axis=-1))
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_5bit(q)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        d = _f16_from(raw[:, 0:2])
        m = _f16_from(raw[:, 2:4])
        q = _unpack_5bit(raw[:, 4:24])
        return d * q.astype(np.float32) + m


# -- K-quants: super-blocks of 256 --------------------------------------------------------------
# The K-quant reference quantizers (quantize_row_q*_K_ref) search per sub-block scales with
# small iterative fits, then quantize the sub-block scales themselves to 4, 6 or 8 bits under
# one f16 super-scale. Reproducing them bit for bit needs C's float32 evaluation order: every
# sum below is a left-to-right float32 accumulation (`_seq_sum`, not numpy's pairwise sum),
# products are evaluated left to right as written in C, and rounding is llama.cpp's
# ``nearest_int`` (round half to even, `np.rint`). No fused multiply-adds (a build of
# llama.cpp that contracts a*b+c into FMA may differ in the last bit of a search, rarely).

_F = np.float32
GROUP_MAX_EPS = _F(1e-15)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis (C's ``for (...) s += a[i]``)."""
    acc = np.zeros(a.shape[:-1], np.float32)
    for i in range(a.shape[-1]):
        acc = acc + a[..., i]
    return acc


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp ``nearest_int``: round half to even, as int32."""
    return np.rint(v).astype(np.int32)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signed value, magnitude) of the first element of largest magnitude along the last axis."""
    i = np.abs(x).argmax(axis=-1)[..., None]
    v = np.take_along_axis(x, i, axis=-1)[..., 0]
    return v, np.abs(v)


def _make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) on rows x [B, n].

    Symmetric codes l in [-nmax, nmax-1] for 19 candidate scales (nmax + 0.1*is)/max, is in
    -9..9; keeps the one maximising (sum w x l)^2 / sum w l^2 with w = x^2, or the importance
    weights ``w`` [B, n] when given (qw != NULL; a weighted least-squares scale). Returns
    (scale [B], L = l + nmax [B, n] int32)."""
    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)
    if w is None:
        w = x * x

    def codes(iscale):
        return np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(l):
        lf = l.astype(np.float32)
        return _seq_sum(w * x * lf), _seq_sum(w * lf * lf)

    l = codes(_F(-nmax) / mx)
    sumlx, suml2 = sums(l)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
    best = scale * sumlx
    L = l
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F(nmax) + _F(0.1) * _F(step)) / mx
        l = codes(iscale)
        sumlx, suml2 = sums(l)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        L = np.where(better[:, None], l, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, _F(0), scale).astype(np.float32), L


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on rows x [B, n].

    Start from l = nearest_int(-nmax/max * x) in [-nmax, nmax-1], then up to 5 passes of
    coordinate descent: each code in turn is re-chosen given the others' weighted sums
    (w = x^2), kept if it raises (sum w x l)^2 / sum w l^2. Returns (scale, L = l + nmax);
    an all-zero row gives (0, L = 0)."""
    mx, amax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)
    w = x * x
    wx = w * x
    L = np.clip(_nearest_int((_F(-nmax) / mx)[:, None] * x), -nmax, nmax - 1)
    Lf = L.astype(np.float32)
    sumlx = _seq_sum(wx * Lf)
    suml2 = _seq_sum(w * Lf * Lf)
    # A pass that changes nothing leaves the state as it was, so running all 5 passes on every
    # row gives the same result as C's early exit.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            for i in range(x.shape[1]):
                li = L[:, i].astype(np.float32)
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - w[:, i] * li * li
                ok = slx > 0
                new_l = np.clip(_nearest_int(np.where(ok, x[:, i] * sl2 / np.where(ok, slx, _F(1)), 0)),
                                -nmax, nmax - 1)
                nl = new_l.astype(np.float32)
                slx2 = slx + wx[:, i] * nl
                sl22 = sl2 + w[:, i] * nl * nl
                take = ok & (new_l != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new_l, L[:, i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, _F(0), scale), L


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants on rows x [B, n] with weights w: asymmetric codes l in [0, nmax] with
    x ~ scale * l + min (min <= 0). Tries iscale = (rmin + rdelta*is + nmax) / (max - min) for
    is = 0..nstep, each followed by a weighted least-squares fit of (scale, min); keeps the fit
    of least weighted error (|diff| if use_mad else diff^2). Returns (scale, -min, L)."""
    lo = x.min(axis=-1)
    hi = x.max(axis=-1)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    lo = np.minimum(lo, _F(0))
    flat = hi == lo
    rng = np.where(flat, _F(1), hi - lo)

    def err(scale, mn, l):
        diff = scale[:, None] * l.astype(np.float32) + mn[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _seq_sum(w * diff)

    iscale = _F(nmax) / rng
    scale = _F(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = err(scale, lo, L)
    mn = lo
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            # as in C, the running best ``min`` (not the data minimum) sets the next grid
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / np.where(flat, _F(1), hi - mn)
            l = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = l.astype(np.float32)
            sum_l = _seq_sum(w * lf)
            sum_l2 = _seq_sum(w * lf * lf)
            sum_xl = _seq_sum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = err(this_scale, this_min, l)
            take = ok & (cur < best)
            L = np.where(take[:, None], l, L)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    return np.where(flat, _F(0), scale), -mn, L


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Codes [N, 256] (< 4) -> [N, 64]: in each half h of 128, byte 32h + l holds
    L[128h + l + 32k] at bits 2k..2k+1 (k = 0..3)."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    return (q & 3).reshape(-1, 256)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins [N, 8] -> 12 bytes (Q4_K / Q5_K):
    bytes 0-3: scale j (j < 4) in bits 0-5, high 2 bits of scale j+4 in bits 6-7;
    bytes 4-7: min j (j < 4) in bits 0-5, high 2 bits of min j+4 in bits 6-7;
    bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_pack_scales_k4` (get_scale_min_k4): 12 bytes -> (scales, mins) [N, 8]."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def _pack_scales_q3(l: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales [N, 16] -> 12 bytes (Q3_K): bytes 0-7 hold the low 4 bits of
    scale j (j < 8) in bits 0-3 and of scale j+8 in bits 4-7; byte 8 + (j % 4) holds the high 2
    bits of scale j at bits 2*(j // 4)."""
    l = l.astype(np.uint8)
    out = np.empty((l.shape[0], 12), np.uint8)
    out[:, 0:8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(-1, 4, 4)  # [N, j // 4, j % 4]
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def _unpack_scales_q3(s: np.ndarray) -> np.ndarray:
    lo = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=-1)
    hi = (s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [N, j // 4, j % 4]
    return lo | (hi.reshape(-1, 16) << 4)


def _pack_q6_k(L: np.ndarray) -> np.ndarray:
    """Q6_K codes [nb, 256] (< 64) -> ``ql`` [128] then ``qh`` [64] (layout in `Q6_K`)."""
    nb = L.shape[0]
    L = L.astype(np.uint8).reshape(nb, 2, 4, 32)
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64)], axis=-1)


def _unpack_q6_k(b: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_q6_k`: bytes [nb, 192] -> codes [nb, 256] in 0..63."""
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]  # [nb, h, lo/hi nibble, 64]
    lo = (ql & 0xF).reshape(nb, 2, 4, 32)  # quarter k of half h: nibble k // 2 of ql[32*(k % 2) ...]
    qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    return (lo | (qh << 4)).reshape(nb, 256)


class Q6_K(BlockType):
    """Super-block of 256 = 16 sub-blocks of 16. x = d * sc[j] * (q - 32), q in 0..63.

    Bytes: ``ql`` [128] (low 4 bits), ``qh`` [64] (high 2 bits), ``scales`` int8[16], ``d`` f16.
    In each half h of 128 values (ql[64h : 64h+64], qh[32h : 32h+32]), for l < 32:
    ql[l] = lo(q[l]) | lo(q[l+64]) << 4, ql[l+32] = lo(q[l+32]) | lo(q[l+96]) << 4,
    qh[l] = hi(q[l]) | hi(q[l+32]) << 2 | hi(q[l+64]) << 4 | hi(q[l+96]) << 6 (q relative to
    the half). Quantizer: make_qx_quants per sub-block (nmax 32), sub-block scales to int8
    with d = max_scale / -128, then every value re-rounded with its final scale."""

    name = "Q6_K"

    @classmethod
    def _quantize_blocks(cls, x):
        nb = x.shape[0]
        scales, L = _make_qx_quants(x.reshape(-1, 16), 32)
        scales = scales.reshape(nb, 16)
        L = L.reshape(nb, 16, 16)
        max_scale, max_abs = _first_absmax(scales)
        empty = max_abs < GROUP_MAX_EPS
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iscale = _F(-128) / np.where(empty, _F(1), max_scale)
            d = (_F(1) / iscale)[:, None]
            cls._check_scale(np.where(empty[:, None], _F(0), d))
            sc = np.minimum(127, _nearest_int(iscale[:, None] * scales))
            dq = _f16_from(_f16_bytes(d)) * sc.astype(np.float32)  # [nb, 16]
            l = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dq[:, :, None]), -32, 31) + 32
        L = np.where((dq != 0)[:, :, None], l, L).reshape(nb, 256)
        out = np.concatenate([_pack_q6_k(L), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=-1)
        out[empty] = 0
        return out

    @classmethod
    def _dequantize_blocks(cls, raw):
        nb = raw.shape[0]
        q = _unpack_q6_k(raw[:, :192]).reshape(nb, 16, 16).astype(np.int8) - np.int8(32)
        dl = _q6_k_scales(raw)[:, :, None]
        return (dl * q.astype(np.float32)).reshape(nb, 256)


def _q6_k_scales(raw: np.ndarray) -> np.ndarray:
    """Q6_K blocks [nb, 210] -> the scale of each sub-block of 16, d * sc[j] [nb, 16] (float32)."""
    return _f16_from(raw[:, 208:210]) * raw[:, 192:208].view(np.int8).astype(np.float32)


def _qkx_weights(x: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K search weights per 32-value sub-block: w = sqrt(mean x^2) + |x|."""
    av = np.sqrt(_seq_sum(x * x) / _F(32))
    return av[:, None] + np.abs(x)


def _k4_quantize(cls, x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared by Q4_K / Q5_K: (d, dmin, packed scales [nb, 12], codes L [nb, 256] in 0..nmax)."""
    nb = x.shape[0]
    xs = x.reshape(-1, 32)
    scales, mins, L = _make_qkx2_quants(xs, _qkx_weights(xs), nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=-1), _F(0))
    max_min = np.maximum(mins.max(axis=-1), _F(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
        # (uint8_t) nearest_int(...) then MIN(63, .): a negative value wraps before the clamp
        ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d = (max_scale / _F(63))[:, None]
        dmin = (max_min / _F(63))[:, None]
        cls._check_scale(np.concatenate([d, dmin], axis=-1))
        dq = _f16_from(_f16_bytes(d)) * ls.astype(np.float32)  # [nb, 8]
        mq = _f16_from(_f16_bytes(dmin)) * lm.astype(np.float32)
        l = np.clip(_nearest_int((x.reshape(nb, 8, 32) + mq[:, :, None]) / dq[:, :, None]), 0, nmax)
    L = np.where((dq != 0)[:, :, None], l, L).reshape(nb, 256)
    return d, dmin, _pack_scales_k4(ls, lm), L


def _k4_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K blocks -> (d * sc[j], dmin * m[j]) [nb, 8] for the sub-blocks j of 32 (float32)."""
    sc, mn = _unpack_scales_k4(raw[:, 4:16])
    return _f16_from(raw[:, 0:2]) * sc.astype(np.float32), _f16_from(raw[:, 2:4]) * mn.astype(np.float32)


def _k4_dequantize(raw: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = d * sc[j] * q - dmin * m[j] for sub-block j of 32 (Q4_K / Q5_K)."""
    nb = raw.shape[0]
    dl, ml = _k4_scales(raw)
    return (dl[:, :, None] * q.reshape(nb, 8, 32).astype(np.float32) - ml[:, :, None]).reshape(nb, 256)


def _nibbles_k(L: np.ndarray) -> np.ndarray:
    """Codes [nb, 256] -> [nb, 128]: chunk c of 64 values -> bytes 32c..32c+31,
    byte 32c + l = lo(L[64c + l]) | lo(L[64c + 32 + l]) << 4."""
    L = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    return ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)


def _unnibbles_k(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    return (q & 0xF).reshape(-1, 256)


def _pack_q5_k(L: np.ndarray) -> np.ndarray:
    """Q5_K codes [nb, 256] (< 32) -> ``qh`` [32] then ``qs`` [128] (layout in `Q5_K`)."""
    hi = (L.astype(np.uint8) >> 4).reshape(-1, 8, 32)  # [nb, 2c + half, l]
    qh = np.zeros((hi.shape[0], 32), np.uint8)
    for k in range(8):
        qh |= hi[:, k] << k
    return np.concatenate([qh, _nibbles_k(L)], axis=-1)


def _unpack_q5_k(b: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_q5_k`: bytes [nb, 160] -> codes [nb, 256] in 0..31."""
    qh = (b[:, None, :32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [nb, 8, 32]
    return _unnibbles_k(b[:, 32:160]) | (qh.reshape(-1, 256) << 4)


class Q4_K(BlockType):
    """Super-block of 256 = 8 sub-blocks of 32. x = d * sc[j] * q - dmin * m[j], q in 0..15.

    Bytes: ``d`` f16, ``dmin`` f16, ``scales`` [12] (eight 6-bit scales and mins,
    `_pack_scales_k4`), ``qs`` [128] (`_nibbles_k`). Quantizer: make_qkx2_quants per
    sub-block (weights sqrt(mean x^2) + |x|, 21 candidate scales), scales and mins to 6 bits
    under d = max_scale / 63, dmin = max_min / 63, then every value re-rounded."""

    name = "Q4_K"

    @classmethod
    def _quantize_blocks(cls, x):
        d, dmin, scales, L = _k4_quantize(cls, x, 15, -1.0, 20)
        return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _nibbles_k(L)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        return _k4_dequantize(raw, _unnibbles_k(raw[:, 16:144]))


class Q5_K(BlockType):
    """Super-block of 256 = 8 sub-blocks of 32. x = d * sc[j] * q - dmin * m[j], q in 0..31.

    Bytes: ``d`` f16, ``dmin`` f16, ``scales`` [12] as Q4_K, ``qh`` [32], ``qs`` [128]
    (low 4 bits, as Q4_K). Bit 2c of qh[l] is bit 4 of q[64c + l], bit 2c+1 is bit 4 of
    q[64c + 32 + l]. Quantizer as Q4_K with 16 candidate scales (rmin -0.5)."""

    name = "Q5_K"

    @classmethod
    def _quantize_blocks(cls, x):
        d, dmin, scales, L = _k4_quantize(cls, x, 31, -0.5, 15)
        return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _pack_q5_k(L)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        return _k4_dequantize(raw, _unpack_q5_k(raw[:, 16:176]))


def _pack_q3_k(L: np.ndarray) -> np.ndarray:
    """Q3_K codes [nb, 256] (< 8) -> ``hmask`` [32] then ``qs`` [64] (layout in `Q3_K`)."""
    nb = L.shape[0]
    hmask = _bits_le(L.reshape(nb, 8, 32).transpose(0, 2, 1).astype(np.uint8), 2, 1).reshape(nb, 32)
    return np.concatenate([hmask, _pack_2bit(L & 3)], axis=-1)


def _unpack_q3_k(b: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_q3_k`: bytes [nb, 96] -> codes [nb, 256] in 0..7."""
    nb = b.shape[0]
    hbit = _unbits_le(b[:, :32].reshape(nb, 32, 1)).reshape(nb, 32, 8).transpose(0, 2, 1)
    return _unpack_2bit(b[:, 32:96]) | (hbit.reshape(nb, 256) << 2)


def _q3_k_scales(raw: np.ndarray) -> np.ndarray:
    """Q3_K blocks [nb, 110] -> the scale of each sub-block of 16, d * (s[j] - 32) [nb, 16]."""
    s = _unpack_scales_q3(raw[:, 96:108]).astype(np.int8) - np.int8(32)
    return _f16_from(raw[:, 108:110]) * s.astype(np.float32)


class Q3_K(BlockType):
    """Super-block of 256 = 16 sub-blocks of 16. x = d * (s[j] - 32) * (q - 4), q in 0..7.

    Bytes: ``hmask`` [32] (bit 2 of q: value v -> byte v % 32, bit v // 32), ``qs`` [64]
    (low 2 bits, `_pack_2bit`), ``scales`` [12] (sixteen 6-bit s, `_pack_scales_q3`), ``d``
    f16. Quantizer: make_q3_quants per sub-block (nmax 4, coordinate descent), sub-block
    scales to 6 bits under d = max_scale / -32, then every value re-rounded."""

    name = "Q3_K"

    @classmethod
    def _quantize_blocks(cls, x):
        nb = x.shape[0]
        scales, L = _make_q3_quants(x.reshape(-1, 16), 4)
        scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
        max_scale, _ = _first_absmax(scales)
        has = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iscale = _F(-32) / np.where(has, max_scale, _F(1))
            l = np.clip(_nearest_int(iscale[:, None] * scales), -32, 31) + 32
            l = np.where(has[:, None], l, 0)
            d = np.where(has, _F(1) / iscale, _F(0))[:, None]
            cls._check_scale(d)
            sc = _pack_scales_q3(l)
            dq = _f16_from(_f16_bytes(d)) * (l - 32).astype(np.float32)  # [nb, 16]
            new = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dq[:, :, None]), -4, 3) + 4
        L = np.where((dq != 0)[:, :, None], new, L).reshape(nb, 256)
        return np.concatenate([_pack_q3_k(L), sc, _f16_bytes(d)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        nb = raw.shape[0]
        q = _unpack_q3_k(raw[:, :96]).astype(np.int8)
        dl = _q3_k_scales(raw)[:, :, None]
        return (dl * (q - np.int8(4)).reshape(nb, 16, 16).astype(np.float32)).reshape(nb, 256)


class Q2_K(BlockType):
    """Super-block of 256 = 16 sub-blocks of 16. x = d * sc[j] * q - dmin * m[j], q in 0..3.

    Bytes: ``scales`` [16] (byte j = sc[j] | m[j] << 4, 4 bits each), ``qs`` [64]
    (`_pack_2bit`), ``d`` f16, ``dmin`` f16. Quantizer: make_qkx2_quants per sub-block
    (weights |x|, mean absolute error, 16 candidate scales), scales and mins to 4 bits under
    d = max_scale / 15, dmin = max_min / 15, then every value re-rounded."""

    name = "Q2_K"

    @classmethod
    def _quantize_blocks(cls, x):
        nb = x.shape[0]
        xs = x.reshape(-1, 16)
        scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
        max_scale = np.maximum(scales.max(axis=-1), _F(0))[:, None]
        max_min = np.maximum(mins.max(axis=-1), _F(0))[:, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ls = np.where(max_scale > 0, _nearest_int(_F(15) / max_scale * scales), 0) & 0xFF
            lm = np.where(max_min > 0, _nearest_int(_F(15) / max_min * mins), 0)
            sc = (ls | (lm << 4)) & 0xFF  # int assigned to uint8_t: wraps
            d = np.where(max_scale > 0, max_scale / _F(15), _F(0))
            dmin = np.where(max_min > 0, max_min / _F(15), _F(0))
            cls._check_scale(np.concatenate([d, dmin], axis=-1))
            dq = _f16_from(_f16_bytes(d)) * (sc & 0xF).astype(np.float32)
            mq = _f16_from(_f16_bytes(dmin)) * (sc >> 4).astype(np.float32)
            new = np.clip(_nearest_int((x.reshape(nb, 16, 16) + mq[:, :, None]) / dq[:, :, None]), 0, 3)
        L = np.where((dq != 0)[:, :, None], new, L).reshape(nb, 256)
        return np.concatenate([sc.astype(np.uint8), _pack_2bit(L), _f16_bytes(d), _f16_bytes(dmin)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        nb = raw.shape[0]
        dl, ml = _q2_k_scales(raw)
        q = _unpack_2bit(raw[:, 16:80]).reshape(nb, 16, 16).astype(np.float32)
        return (dl[:, :, None] * q - ml[:, :, None]).reshape(nb, 256)


def _q2_k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q2_K blocks [nb, 84] -> (d * sc[j], dmin * m[j]) [nb, 16] for the sub-blocks j of 16."""
    sc = raw[:, :16]
    return (_f16_from(raw[:, 80:82]) * (sc & 0xF).astype(np.float32),
            _f16_from(raw[:, 82:84]) * (sc >> 4).astype(np.float32))


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
        return cls._pack(d, t)

    @classmethod
    def _pack(cls, d: np.ndarray, t: np.ndarray) -> np.ndarray:
        """d float32 [n, 1], t uint8 [n, 256] in {0, 1, 2} -> blocks [n, 66]."""
        return np.concatenate([_pack_2bit(t), _f16_bytes(d)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        t = _unpack_2bit(raw[:, :64])
        return _f16_from(raw[:, 64:66]) * (t.astype(np.float32) - np.float32(1))


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
        return cls._pack(d, t)

    @classmethod
    def _pack(cls, d: np.ndarray, t: np.ndarray) -> np.ndarray:
        """d float32 [n, 1], t uint8 [n, 256] in {0, 1, 2} -> blocks [n, 54]."""
        return np.concatenate([_pack_tq1(t), _f16_bytes(d)], axis=-1)

    @classmethod
    def _dequantize_blocks(cls, raw):
        return _f16_from(raw[:, 52:54]) * (_unpack_tq1(raw[:, :52]).astype(np.float32) - np.float32(1))


def _pack_tq1(t: np.ndarray) -> np.ndarray:
    """TQ1_0 trits [n, 256] -> ``qs`` [48] then ``qh`` [4] (layout in `TQ1_0`)."""
    return np.concatenate([_pack_trits(t[:, :160], 32, 5), _pack_trits(t[:, 160:240], 16, 5),
                           _pack_trits(t[:, 240:], 4, 4)], axis=-1)


def _unpack_tq1(b: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_tq1`: bytes [n, 52] -> trits [n, 256] in 0..2."""
    return np.concatenate([_unpack_trits(b[:, :32], 5), _unpack_trits(b[:, 32:48], 5),
                           _unpack_trits(b[:, 48:52], 4)], axis=-1)


# -- ternary codes written as they are ---------------------------------------------------------
# A weight that already is d * T with T in {-1, 0, 1} and one float16-exact scale d (a BitNet
# layer) is stored without a scale search: every block's scale is d and its codes are T, so the
# block dequantizes to exactly d * T. (The quantizers above would find the same TQ blocks except
# where a block is all zero, but Q4_0's absmax rule maps +d and -d onto different magnitudes.)
TERNARY_EXACT = ("TQ2_0", "TQ1_0", "Q4_0")


def encode_ternary(T: np.ndarray, d: float, name: str) -> np.ndarray:
    """T int [..., n] in {-1, 0, 1}, d a float16-exact scale -> uint8 [..., bytes] of type ``name``
    (TQ2_0 / TQ1_0: t = T + 1; Q4_0: q = T + 8) dequantizing to exactly ``d * T``."""
    if name not in TERNARY_EXACT:
        raise LowbitError(f"ternary codes are written as {', '.join(TERNARY_EXACT)}, not {name}")
    cls = get_type(name)
    T = np.asarray(T)
    if T.ndim == 0 or T.shape[-1] % cls.block_size:
        n = T.shape[-1] if T.ndim else 0
        raise LowbitError(f"{name}: last dimension {n} is not a multiple of the block size {cls.block_size}")
    if T.size and (T.min() < -1 or T.max() > 1):
        raise LowbitError(f"{name}: ternary codes must lie in {{-1, 0, 1}}, found {int(T.min())}..{int(T.max())}")
    d32 = np.float32(d)
    if not np.isfinite(d32) or np.float32(np.float16(d32)) != d32:
        raise LowbitError(f"{name}: the scale {float(d)!r} is not exactly a float16 value; the block scale cannot carry it")
    blocks = T.astype(np.int16).reshape(-1, cls.block_size)
    offset = 8 if name == "Q4_0" else 1
    ds = np.full((blocks.shape[0], 1), d32, np.float32)
    out = cls._pack(ds, (blocks + offset).astype(np.uint8)) if blocks.shape[0] else np.zeros((0, cls.bytes_per_block), np.uint8)
    return out.reshape(*T.shape[:-1], T.shape[-1] // cls.block_size * cls.bytes_per_block)



# -- integer codes written as they are ---------------------------------------------------------
# A weight that already is, per block of 32, d * c with integer codes c and one float16 scale d
# (a lowbit affine checkpoint whose groups are whole blocks: GPTQ, RTN, AWQ, ...) is stored
# without a scale search: each block gets the checkpoint's own d and codes, so it dequantizes to
# exactly d * c. Q4_1 / Q5_1 take unsigned codes u and an offset m: d * u + m.
# type -> (lowest, highest) block code c of the symmetric types (x = d * c, stored as c + offset)
CODE_RANGES: dict[str, tuple[int, int]] = {"Q8_0": (-128, 127), "Q4_0": (-8, 7), "Q5_0": (-16, 15)}
OFFSET_TYPES: dict[str, int] = {"Q4_1": 15, "Q5_1": 31}  # type -> highest unsigned code u
CODES_EXACT = tuple(CODE_RANGES) + tuple(OFFSET_TYPES)


def encode_codes(c: np.ndarray, d: np.ndarray, name: str, m: np.ndarray | None = None) -> np.ndarray:
    """Integer codes c [rows, n] and float16-exact scales d [rows, n / 32] (one per block) ->
    uint8 [rows, bytes] of type ``name`` dequantizing to exactly ``d * c`` (Q8_0: q = c;
    Q4_0: q = c + 8; Q5_0: q = c + 16), or, for Q4_1 / Q5_1, unsigned codes c and float16-exact
    offsets m [rows, n / 32] to ``d * c + m``."""
    if name not in CODES_EXACT:
        raise LowbitError(f"integer codes are written as {', '.join(CODES_EXACT)}, not {name}")
    cls = get_type(name)
    c = np.asarray(c)
    if c.ndim != 2 or c.shape[-1] % cls.block_size:
        raise LowbitError(f"{name}: expected codes [rows, n] with n a multiple of {cls.block_size}, got {c.shape}")
    lo, hi = CODE_RANGES.get(name, (0, OFFSET_TYPES.get(name, 0)))
    if c.size and (int(c.min()) < lo or int(c.max()) > hi):
        raise LowbitError(f"{name}: codes must lie in {lo}..{hi}, found {int(c.min())}..{int(c.max())}")
    nb = c.shape[0] * (c.shape[1] // cls.block_size)

    def scales(v, what):
        v = np.asarray(v, dtype=np.float32).reshape(nb, 1)
        if not np.isfinite(v).all() or not np.array_equal(v.astype(np.float16).astype(np.float32), v):
            raise LowbitError(f"{name}: a block {what} is not exactly a float16 value; the block cannot carry it")
        return v

    ds = scales(d, "scale")
    q = c.astype(np.int16).reshape(nb, cls.block_size)
    if name in OFFSET_TYPES:
        if m is None:
            raise LowbitError(f"{name}: the block offsets m are missing")
        ms = scales(m, "offset")
        u = q.astype(np.uint8)
        parts = [_f16_bytes(ds), _f16_bytes(ms)] + ([_bits_le(u, 4, 4)] if name == "Q5_1" else []) + [_pack_nibbles(u)]
    elif name == "Q8_0":
        parts = [_f16_bytes(ds), q.astype(np.int8).view(np.uint8)]
    else:
        u = (q - lo).astype(np.uint8)
        parts = [_f16_bytes(ds)] + ([_bits_le(u, 4, 4)] if name == "Q5_0" else []) + [_pack_nibbles(u)]
    out = np.concatenate(parts, axis=-1) if nb else np.zeros((0, cls.bytes_per_block), np.uint8)
    return out.reshape(c.shape[0], c.shape[1] // cls.block_size * cls.bytes_per_block)


# -- the codes of a block, apart from its scales -------------------------------------------------
# Every quantized type keeps its integer codes in one contiguous byte span of the block and its
# scales in the rest. `block_codes` reads the codes as the block stores them; `with_block_codes`
# writes new ones into that span and leaves every scale byte as it was (GPTQ onto a type's fixed
# grid, `lowbit.export.gguf_grid`). IQ4_NL (lowbit.export.gguf_imatrix) stores 4-bit indices into
# its table as Q4_0 stores its codes.


@dataclass(frozen=True)
class CodeLayout:
    """Where a type keeps its codes: bytes [start, stop) of each block, the stored codes'
    range lo..hi, and the packing of a block's codes [nb, block_size] into that span and back."""

    start: int
    stop: int
    lo: int
    hi: int
    pack: Callable[[np.ndarray], np.ndarray]
    unpack: Callable[[np.ndarray], np.ndarray]


def _int8_bytes(q: np.ndarray) -> np.ndarray:
    return q.astype(np.int8).view(np.uint8)


def _int8_from(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.int8)


_NIBBLES = dict(lo=0, hi=15, pack=_pack_nibbles, unpack=_unpack_nibbles)
_FIVE = dict(lo=0, hi=31, pack=_pack_5bit, unpack=_unpack_5bit)
CODE_LAYOUTS: dict[str, CodeLayout] = {
    "Q8_0": CodeLayout(2, 34, -128, 127, _int8_bytes, _int8_from),
    "Q4_0": CodeLayout(2, 18, **_NIBBLES),
    "IQ4_NL": CodeLayout(2, 18, **_NIBBLES),
    "Q4_1": CodeLayout(4, 20, **_NIBBLES),
    "Q5_0": CodeLayout(2, 22, **_FIVE),
    "Q5_1": CodeLayout(4, 24, **_FIVE),
    "Q2_K": CodeLayout(16, 80, 0, 3, _pack_2bit, _unpack_2bit),
    "Q3_K": CodeLayout(0, 96, 0, 7, _pack_q3_k, _unpack_q3_k),
    "Q4_K": CodeLayout(16, 144, 0, 15, _nibbles_k, _unnibbles_k),
    "Q5_K": CodeLayout(16, 176, 0, 31, _pack_q5_k, _unpack_q5_k),
    "Q6_K": CodeLayout(0, 192, 0, 63, _pack_q6_k, _unpack_q6_k),
    "TQ2_0": CodeLayout(0, 64, 0, 2, _pack_2bit, _unpack_2bit),
    "TQ1_0": CodeLayout(0, 52, 0, 2, _pack_tq1, _unpack_tq1),
}
IQ4_NL_LAYOUT = (32, 18)  # (block_size, bytes_per_block) of IQ4_NL, which has no class here


def layout(name: str) -> tuple[int, int]:
    """(block_size, bytes_per_block) of a block type, IQ4_NL included; one-line error if unknown."""
    if name == "IQ4_NL":
        return IQ4_NL_LAYOUT
    if name not in BLOCK_LAYOUTS:
        raise LowbitError(f"unknown GGUF block type {name!r}; available: {', '.join(list(BLOCK_LAYOUTS) + ['IQ4_NL'])}")
    return BLOCK_LAYOUTS[name]


def _code_layout(raw: np.ndarray, name: str) -> tuple[CodeLayout, int, int]:
    if name not in CODE_LAYOUTS:
        raise LowbitError(f"{name} has no integer codes to read or replace (types with codes: {', '.join(CODE_LAYOUTS)})")
    bs, bpb = layout(name)
    if raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] % bpb:
        raise LowbitError(f"{name}: expected uint8 bytes in whole blocks of {bpb}, got {raw.dtype} {raw.shape}")
    return CODE_LAYOUTS[name], bs, bpb


def block_codes(raw: np.ndarray, name: str) -> np.ndarray:
    """The integer codes uint8 [..., k * bytes] of type ``name`` store, as int16 [..., k * block_size]
    (Q8_0: -128..127; the others: the unsigned code, e.g. 0..15 for Q4_0, Q4_K and IQ4_NL)."""
    raw = np.asarray(raw)
    c, bs, bpb = _code_layout(raw, name)
    blocks = np.ascontiguousarray(raw).reshape(-1, bpb)
    q = c.unpack(blocks[:, c.start:c.stop]) if blocks.shape[0] else np.zeros((0, bs), np.int16)
    return q.astype(np.int16).reshape(*raw.shape[:-1], raw.shape[-1] // bpb * bs)


def with_block_codes(raw: np.ndarray, name: str, q: np.ndarray) -> np.ndarray:
    """A copy of the blocks ``raw`` with their codes replaced by ``q`` (shaped as `block_codes`
    returns them, in the type's range), every scale byte unchanged."""
    raw = np.asarray(raw)
    c, bs, bpb = _code_layout(raw, name)
    q = np.asarray(q)
    want = (*raw.shape[:-1], raw.shape[-1] // bpb * bs)
    if q.shape != want:
        raise LowbitError(f"{name}: {want} codes expected for blocks {raw.shape}, got {q.shape}")
    if q.size and (int(q.min()) < c.lo or int(q.max()) > c.hi):
        raise LowbitError(f"{name}: codes must lie in {c.lo}..{c.hi}, found {int(q.min())}..{int(q.max())}")
    out = np.ascontiguousarray(raw).reshape(-1, bpb).copy()
    if out.shape[0]:
        out[:, c.start:c.stop] = c.pack(q.reshape(-1, bs).astype(np.int16))
    return out.reshape(raw.shape)


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
