"""Importance-weighted GGUF block quantizers (llama.cpp's ``quantize_*`` with ``quant_weights``),
and the IQ4_NL type that llama.cpp falls back to for Q2_K / Q3_K rows not divisible by 256.

    quantize(x, "Q4_K", imatrix)   float32 [rows, n], imatrix [n] -> bytes as gguf_quants.quantize
    quantize(x, "IQ4_NL", None)    IQ4_NL as llama.cpp's quantizer writes it (with its scale search)

The math. An importance matrix gives, per input column j of a linear layer, w_j = E[x_j²] over
calibration activations: the output error of a weight perturbation δW is E‖δW·x‖² ≈ Σ_ij δW_ij² w_j
(cross terms dropped), so each weight's squared rounding error should count with its column's
w_j. llama.cpp folds in the weight itself too: the per-value search weight is

    q_ij = w_j · sqrt(σ² + W_ij²)        σ² = mean of W² over the (super-)block or row

and replaces the reference quantizers' heuristic weights (|W|, W², mean|W| + |W|) by q:
* per sub-block scale (and min) searches — ``make_qx_quants`` (symmetric: candidate scales around
  nmax/max, keep the one maximising (Σ q x l)² / Σ q l², i.e. the weighted least-squares scale) and
  ``make_qkx3_quants`` (asymmetric: 37 candidate grids, each refit by weighted least squares for
  (scale, min), keep the least weighted squared error);
* the K-quants' second level — sub-block scales and mins are themselves quantized to 4/6 bits by
  ``make_qp_quants`` (positive codes, 9 candidate super-scales, then coordinate descent on the
  codes), weighted by each sub-block's total weight Σ q, so sub-blocks that matter more get the
  more accurate scales;
* then every value is re-rounded with its final stored scale.
Q6_K uses w_j alone (no σ² term), as llama.cpp does. Q8_0 and the ternary types ignore the matrix.

Every step is written in float32 with llama.cpp's evaluation order (left-to-right sums, ``nearest_int``
rounding halves to even), vectorised over blocks like `lowbit.export.gguf_quants`: the bytes are
identical to llama.cpp's ``ggml_quantize_chunk`` with the same weights (tests/test_gguf_export.py
compares them where llama-cpp-python is installed), and IQ4_NL's also without weights.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.export import gguf_quants as G
from lowbit.export.gguf_quants import (
    GROUP_MAX_EPS,
    QK_K,
    _f16_bytes,
    _f16_from,
    _first_absmax,
    _make_qkx2_quants,
    _nearest_int,
    _nibbles_k,
    _pack_2bit,
    _pack_nibbles,
    _pack_scales_k4,
    _pack_scales_q3,
    _seq_sum,
)

_F = np.float32

IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_IQ4_VF = IQ4_NL_VALUES.astype(np.float32)

WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


def supports(t: str) -> bool:
    return t in WEIGHTED


def quantize(x: np.ndarray, t: str, imatrix: np.ndarray | None) -> np.ndarray:
    """float32 [rows, n] -> uint8 [rows, n / block * bytes] of type ``t`` weighted by ``imatrix`` [n]
    (None: IQ4_NL only, unweighted as llama.cpp)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise LowbitError(f"{t}: expected a 2-D [rows, n] array, got shape {x.shape}")
    rows, n = x.shape
    bs, bpb = G.layout(t)
    if n % bs:
        raise LowbitError(f"{t}: row length {n} is not a multiple of the block size {bs}")
    if not np.isfinite(x).all():
        raise LowbitError(f"{t}: input has NaN/Inf values; refusing to quantize it")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != n:
            raise LowbitError(f"{t}: importance matrix has {imatrix.shape[0]} values for rows of {n}")
        if not np.isfinite(imatrix).all() or (imatrix < 0).any():
            raise LowbitError(f"{t}: importance matrix has negative or non-finite values")
    if t not in _QUANTIZERS or (imatrix is None and t != "IQ4_NL"):
        return G.quantize(x, t)  # Q8_0, F16, ternary: llama.cpp ignores the importance matrix
    if rows == 0:
        return np.zeros((0, n // bs * bpb), np.uint8)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out = _QUANTIZERS[t](x, imatrix)
    return out.reshape(rows, n // bs * bpb)


def _check(t: str, *v: np.ndarray) -> None:
    for a in v:
        if not np.isfinite(np.asarray(a, np.float32).astype(np.float16)).all():
            raise LowbitError(f"{t}: values too large for the format's float16 scale")


# -- building blocks ----------------------------------------------------------------------------
def _make_qkx3_quants(x, w, nmax):
    """make_qkx3_quants(n, nmax, x, w, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=false):
    the same search as make_qkx2_quants (shared code) on a finer grid. (scale, the_min, L)."""
    return _make_qkx2_quants(x, w, nmax, -0.9, 0.05, 36, False)


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights=w) on rows [B, n] of non-negative values:
    codes L in 0..nmax for x ~ scale * L. 9 candidate scales around nmax/max by weighted squared
    error, then up to 5 passes of coordinate descent on the codes maximising (Σ w x L)² / Σ w L².
    Returns (scale [B], L int32 [B, n])."""
    mx = np.maximum(x.max(axis=-1), _F(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)
    iscale = _F(nmax) / mx
    L0 = _nearest_int(iscale[:, None] * x) & 0xFF  # stored in uint8_t: wraps
    scale = _F(1) / iscale
    diff = x - scale[:, None] * L0.astype(np.float32)
    best = _seq_sum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_F(0.1) * _F(step) + _F(nmax)) / mx
        scale_is = _F(1) / iscale_is
        l = np.minimum(nmax, _nearest_int(iscale_is[:, None] * x))
        diff = x - scale_is[:, None] * l.astype(np.float32)
        mse = _seq_sum(w * diff * diff)
        take = mse < best
        best = np.where(take, mse, best)
        iscale = np.where(take, iscale_is, iscale)
    L = np.minimum(nmax, _nearest_int(iscale[:, None] * x)) & 0xFF
    Lf = L.astype(np.float32)
    sumlx = _seq_sum(w * x * Lf)
    suml2 = _seq_sum(w * Lf * Lf)
    for _ in range(5):  # a pass that changes nothing leaves the state as it was (C exits early)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i].astype(np.float32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, _nearest_int(np.where(ok, xi * sl2 / np.where(ok, slx, _F(1)), _F(0))))
            nl = new_l.astype(np.float32)
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            take = ok & (new_l != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new_l & 0xFF, L[:, i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F(1)), _F(0)).astype(np.float32)
    return np.where(zero, _F(0), scale), np.where(zero[:, None], 0, L)


def _search_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """q = w_j * sqrt(σ² + x²) for blocks x [..., n] with σ² broadcast [..., 1]."""
    return (qw * np.sqrt(sigma2 + x * x)).astype(np.float32)


# -- K-quants ------------------------------------------------------------------------------------
def _superblocks(x, imatrix):
    nb = x.size // QK_K
    return x.reshape(nb, QK_K), np.broadcast_to(imatrix.reshape(1, -1, QK_K), (x.shape[0], x.shape[1] // QK_K, QK_K)).reshape(nb, QK_K)


def _k4(x, imatrix, nmax, name):
    xs, qw = _superblocks(x, imatrix)
    nb = xs.shape[0]
    sigma2 = (_F(2) * _seq_sum(xs * xs) / _F(QK_K))[:, None]
    weights = _search_weights(xs, qw, sigma2).reshape(nb * 8, 32)
    xb = xs.reshape(nb * 8, 32)
    sw = _seq_sum(weights).reshape(nb, 8)
    scales, mins, L = _make_qkx3_quants(xb, weights, nmax)
    d_block, Ls = _make_qp_quants(scales.reshape(nb, 8), 63, sw)
    m_block, Lm = _make_qp_quants(mins.reshape(nb, 8), 63, sw)
    _check(name, d_block, m_block)
    d = d_block[:, None]
    dmin = m_block[:, None]
    dq = _f16_from(_f16_bytes(d)) * Ls.astype(np.float32)
    mq = _f16_from(_f16_bytes(dmin)) * Lm.astype(np.float32)
    l = np.clip(_nearest_int((xs.reshape(nb, 8, 32) + mq[:, :, None]) / dq[:, :, None]), 0, nmax)
    L = np.where((dq != 0)[:, :, None], l, L.reshape(nb, 8, 32)).reshape(nb, 256)
    return d, dmin, _pack_scales_k4(Ls, Lm), L


def _q4_k(x, imatrix):
    d, dmin, scales, L = _k4(x, imatrix, 15, "Q4_K")
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _nibbles_k(L)], axis=-1)


def _q5_k(x, imatrix):
    d, dmin, scales, L = _k4(x, imatrix, 31, "Q5_K")
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, G._pack_q5_k(L)], axis=-1)


def _q2_k(x, imatrix):
    xs, qw = _superblocks(x, imatrix)
    nb = xs.shape[0]
    sigma2 = (_seq_sum(xs * xs) / _F(QK_K))[:, None]
    weights = _search_weights(xs, qw, sigma2).reshape(nb * 16, 16)
    xb = xs.reshape(nb * 16, 16)
    sw = _seq_sum(weights).reshape(nb, 16)
    scales, mins, L = _make_qkx3_quants(xb, weights, 3)
    dm, Ls = _make_qp_quants(scales.reshape(nb, 16), 15, sw)
    mm, Lm = _make_qp_quants(mins.reshape(nb, 16), 15, sw)
    _check("Q2_K", dm, mm)
    sc = (Ls | (Lm << 4)) & 0xFF
    d = dm[:, None]
    dmin = mm[:, None]
    dq = _f16_from(_f16_bytes(d)) * (sc & 0xF).astype(np.float32)
    mq = _f16_from(_f16_bytes(dmin)) * (sc >> 4).astype(np.float32)
    l = np.clip(_nearest_int((xs.reshape(nb, 16, 16) + mq[:, :, None]) / dq[:, :, None]), 0, 3)
    L = np.where((dq != 0)[:, :, None], l, L.reshape(nb, 16, 16)).reshape(nb, 256)
    return np.concatenate([sc.astype(np.uint8), _pack_2bit(L), _f16_bytes(d), _f16_bytes(dmin)], axis=-1)


def _q3_k(x, imatrix):
    xs, qw = _superblocks(x, imatrix)
    nb = xs.shape[0]
    sigma2 = (_F(2) * _seq_sum(xs * xs) / _F(QK_K))[:, None]
    weights = _search_weights(xs, qw, sigma2).reshape(nb * 16, 16)
    xb = xs.reshape(nb * 16, 16)
    sw = _seq_sum(weights).reshape(nb, 16)
    scales, L = G._make_qx_quants(xb, 4, weights)
    d_block, Ls = G._make_qx_quants(scales.reshape(nb, 16), 32, sw)
    _check("Q3_K", d_block)
    d = d_block[:, None]
    sc = _pack_scales_q3(Ls)
    dq = _f16_from(_f16_bytes(d)) * (Ls - 32).astype(np.float32)
    new = np.clip(_nearest_int(xs.reshape(nb, 16, 16) / dq[:, :, None]), -4, 3) + 4
    L = np.where((dq != 0)[:, :, None], new, L.reshape(nb, 16, 16)).reshape(nb, 256)
    return np.concatenate([G._pack_q3_k(L), sc, _f16_bytes(d)], axis=-1)


def _q6_k(x, imatrix):
    xs, qw = _superblocks(x, imatrix)
    nb = xs.shape[0]
    scales, L = G._make_qx_quants(xs.reshape(nb * 16, 16), 32, np.ascontiguousarray(qw).reshape(nb * 16, 16))
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    max_scale, max_abs = _first_absmax(scales)
    empty = max_abs < GROUP_MAX_EPS
    iscale = _F(-128) / np.where(empty, _F(1), max_scale)
    d = (_F(1) / iscale)[:, None]
    _check("Q6_K", np.where(empty[:, None], _F(0), d))
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales))
    dq = _f16_from(_f16_bytes(d)) * sc.astype(np.float32)
    l = np.clip(_nearest_int(xs.reshape(nb, 16, 16) / dq[:, :, None]), -32, 31) + 32
    L = np.where((dq != 0)[:, :, None], l, L).reshape(nb, 256)
    out = np.concatenate([G._pack_q6_k(L), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=-1)
    out[empty] = 0
    return out


# -- legacy 32-wide types: σ² is the mean of x² over the whole row -----------------------------
def _legacy_weights(x, imatrix):
    rows, n = x.shape
    sigma2 = (_seq_sum(x * x) / _F(n))[:, None, None]
    xb = x.reshape(rows, n // 32, 32)
    w = _search_weights(xb, imatrix.reshape(1, n // 32, 32), sigma2)
    return xb.reshape(-1, 32), w.reshape(-1, 32)


def _q4_0(x, imatrix):
    xb, w = _legacy_weights(x, imatrix)
    d, L = G._make_qx_quants(xb, 8, w)
    _check("Q4_0", d)
    return np.concatenate([_f16_bytes(d[:, None]), _pack_nibbles(L.astype(np.uint8))], axis=-1)


def _q5_0(x, imatrix):
    xb, w = _legacy_weights(x, imatrix)
    d, L = G._make_qx_quants(xb, 16, w)
    _check("Q5_0", d)
    return np.concatenate([_f16_bytes(d[:, None]), G._pack_5bit(L)], axis=-1)


def _q4_1(x, imatrix):
    xb, w = _legacy_weights(x, imatrix)
    d, the_min, L = _make_qkx3_quants(xb, w, 15)
    m = -the_min
    _check("Q4_1", d, m)
    return np.concatenate([_f16_bytes(d[:, None]), _f16_bytes(m[:, None]), _pack_nibbles(L.astype(np.uint8))], axis=-1)


def _q5_1(x, imatrix):
    xb, w = _legacy_weights(x, imatrix)
    d, the_min, L = _make_qkx3_quants(xb, w, 31)
    m = -the_min
    _check("Q5_1", d, m)
    return np.concatenate([_f16_bytes(d[:, None]), _f16_bytes(m[:, None]), G._pack_5bit(L)], axis=-1)


# -- IQ4_NL: 32 values, f16 scale, 4-bit indices into a fixed non-uniform table ---------------
def _best_index(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, v): index of the nearest table value (ties to the upper
    one unless strictly nearer below), computed as C does in float32."""
    mu = np.clip(np.searchsorted(_IQ4_VF, v, side="right"), 1, 15)
    lower = (v - _IQ4_VF[mu - 1]) < (_IQ4_VF[mu] - v)
    idx = np.where(lower, mu - 1, mu)
    idx = np.where(v <= _IQ4_VF[0], 0, idx)
    return np.where(v >= _IQ4_VF[15], 15, idx).astype(np.uint8)


def _iq4_nl(x, imatrix):
    """quantize_iq4_nl (block 32, ntry 7): scale search over d = max / (v0 + t), t in -7..7, by
    weighted least squares; weights x² (or imatrix · sqrt(σ² + x²))."""
    rows, n = x.shape
    xb = x.reshape(-1, 32)
    if imatrix is None:
        w = xb * xb
    else:
        sigma2 = (_seq_sum(xb * xb) * (_F(2) / _F(32)))[:, None]
        qw = np.broadcast_to(imatrix.reshape(1, n // 32, 32), (rows, n // 32, 32)).reshape(-1, 32)
        w = _search_weights(xb, qw, sigma2)
    mx, amax = _first_absmax(xb)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)

    def fit(idv):
        q = _IQ4_VF[_best_index(idv[:, None] * xb)]
        return _seq_sum(w * q * xb), _seq_sum(w * q * q)

    d0 = -mx / _F(-127)
    sumqx, sumq2 = fit(_F(1) / d0)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, _F(1)), _F(0)).astype(np.float32)
    best = d * sumqx
    for t in range(-7, 8):
        sumqx, sumq2 = fit(_F(t - 127) / mx)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(take, sumqx / np.where(sumq2 > 0, sumq2, _F(1)), d)
        best = np.where(take, d * sumqx, best)
    d = np.where(zero, _F(0), d).astype(np.float32)
    _check("IQ4_NL", d)
    idv = np.where(d != 0, _F(1) / np.where(d != 0, d, _F(1)), _F(0))
    L = _best_index(idv[:, None] * xb)
    return np.concatenate([_f16_bytes(d[:, None]), _pack_nibbles(L)], axis=-1)


def dequantize(raw: np.ndarray, t: str) -> np.ndarray:
    """Dequantize uint8 [..., bytes] of any block type lowbit writes (`gguf_quants.dequantize`'s
    types and IQ4_NL) to float32."""
    return dequantize_iq4_nl(raw) if t == "IQ4_NL" else G.dequantize(raw, t)


def dequantize_iq4_nl(raw: np.ndarray) -> np.ndarray:
    """IQ4_NL bytes [..., k * 18] -> float32 [..., k * 32]: x = d * table[index]."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] % 18:
        raise LowbitError("IQ4_NL: expected uint8 bytes in whole blocks of 18")
    b = np.ascontiguousarray(raw).reshape(-1, 18)
    d = _f16_from(b[:, 0:2])
    idx = np.concatenate([b[:, 2:] & 0xF, b[:, 2:] >> 4], axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        out = d * _IQ4_VF[idx]
    return out.astype(np.float32).reshape(*raw.shape[:-1], raw.shape[-1] // 18 * 32)


_QUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k, "Q3_K": _q3_k,
               "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl}
