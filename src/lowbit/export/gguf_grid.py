"""The grid a GGUF block type defines once its scales are fixed, and GPTQ onto that grid.

    block_grid(raw, t)      -> a, b float32 [rows, n], L float32 [levels]   dequantize == a * L[k] + b
    codes_of(raw, t)        -> k int64 [rows, n]                            the level index of every value
    with_codes(raw, t, k)   -> raw with those codes, every scale byte unchanged
    gptq_onto(W, H, t)      -> (raw, info)                                  GPTQ's codes on t's own scales

The grid. Every block type lowbit writes stores, per sub-block, one or two scale fields and, per
value, an integer code. Once the scale fields are fixed, the values a block can hold are an
affine image of one level table: value = a · L[k] + b, with a and b constant over a sub-block and
k the stored code's index in L. Per type (d, dmin: the block's float16 scales; sc, m, s: its
quantized sub-block scales and mins):

=========  ===========================  ===================  ============  ==========================
type       a (per sub-block)            b                    L             sub-block
=========  ===========================  ===================  ============  ==========================
Q8_0       d                            0                    -128..127     32
Q4_0       d                            0                    -8..7         32
Q5_0       d                            0                    -16..15       32
Q4_1       d                            m                    0..15         32
Q5_1       d                            m                    0..31         32
Q2_K       d · sc[j]                    -(dmin · m[j])       0..3          16
Q3_K       d · (s[j] - 32)              0                    -4..3         16
Q4_K       d · sc[j]                    -(dmin · m[j])       0..15         32
Q5_K       d · sc[j]                    -(dmin · m[j])       0..31         32
Q6_K       d · sc[j]                    0                    -32..31       16
IQ4_NL     d                            0                    its table     32
TQ1_0/2_0  d                            0                    -1..1         256
=========  ===========================  ===================  ============  ==========================

a and b are the very float32 products the reader (`gguf_quants.dequantize`) forms, so a · L[k] + b
is its value bit for bit (a product, then one add of b; b = 0 adds nothing, -(dmin · m) is the
reader's subtraction). L is sorted; k = stored code - the code of L[0] (only Q8_0 stores signed
codes: k = q + 128).

GPTQ onto a fixed grid. GPTQ (Frantar et al. 2022, Alg. 1; `lowbit.algorithms.gptq`) rounds one
input column at a time and pushes each column's error onto the columns not yet rounded. On a GGUF
type the scales are part of the bytes: `gptq_onto` first fixes them by encoding W with the type's
own quantizer (weighted by the importance matrix, diag H unless one is given: llama.cpp's imatrix
is the mean x² per input column, diag H = 2 · that, and only ratios matter), then runs GPTQ with
"round w to the nearest level of its own element's grid" as the rounding rule, and writes the
codes into the encoder's blocks. The grid never changes during the solve, so act_order (columns
by descending diag H) needs nothing more. GGUF rows are output channels and blocks run along the
input dimension: the orientation of GPTQ's W [out, in] and H [in, in].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from lowbit.algorithms.hessian import (
    check_solver_inputs,
    column_order,
    gptq_columns,
    hessian_error,
    permuted_inverse_factor,
)
from lowbit.errors import LowbitError
from lowbit.export import gguf_imatrix, gguf_quants
from lowbit.export.gguf import encode_tensor
from lowbit.export.gguf_imatrix import IQ4_NL_VALUES
from lowbit.export.gguf_quants import _f16_from


@dataclass(frozen=True)
class _Grid:
    levels: np.ndarray   # L, sorted float32
    code0: int           # the stored code of L[0]
    sub: int             # values per sub-block (a and b are constant over one)
    scales: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # blocks -> a, b [nb, n_sub] (b None: 0)


def _range(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=np.float32)


def _d(raw):
    return _f16_from(raw[:, 0:2]), None


def _d_m(raw):
    return _f16_from(raw[:, 0:2]), _f16_from(raw[:, 2:4])


def _k4(raw):
    dl, ml = gguf_quants._k4_scales(raw)
    return dl, -ml


def _q2_k(raw):
    dl, ml = gguf_quants._q2_k_scales(raw)
    return dl, -ml


GRIDS: dict[str, _Grid] = {
    "Q8_0": _Grid(_range(-128, 127), -128, 32, _d),
    "Q4_0": _Grid(_range(-8, 7), 0, 32, _d),
    "Q5_0": _Grid(_range(-16, 15), 0, 32, _d),
    "Q4_1": _Grid(_range(0, 15), 0, 32, _d_m),
    "Q5_1": _Grid(_range(0, 31), 0, 32, _d_m),
    "Q2_K": _Grid(_range(0, 3), 0, 16, _q2_k),
    "Q3_K": _Grid(_range(-4, 3), 0, 16, lambda raw: (gguf_quants._q3_k_scales(raw), None)),
    "Q4_K": _Grid(_range(0, 15), 0, 32, _k4),
    "Q5_K": _Grid(_range(0, 31), 0, 32, _k4),
    "Q6_K": _Grid(_range(-32, 31), 0, 16, lambda raw: (gguf_quants._q6_k_scales(raw), None)),
    "IQ4_NL": _Grid(IQ4_NL_VALUES.astype(np.float32), 0, 32, _d),
    "TQ2_0": _Grid(_range(-1, 1), 0, 256, lambda raw: (_f16_from(raw[:, 64:66]), None)),
    "TQ1_0": _Grid(_range(-1, 1), 0, 256, lambda raw: (_f16_from(raw[:, 52:54]), None)),
}
SUPPORTED = tuple(GRIDS)


def _grid(gtype: str) -> _Grid:
    if gtype not in GRIDS:
        raise LowbitError(f"GGUF type {gtype} has no fixed grid lowbit can solve on; one of {', '.join(SUPPORTED)}")
    return GRIDS[gtype]


def _rows(raw: np.ndarray, gtype: str) -> tuple[np.ndarray, int, int]:
    """raw as uint8 [rows, bytes] of whole blocks; (raw, block size, bytes per block)."""
    raw = np.asarray(raw)
    bs, bpb = gguf_quants.layout(gtype)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % bpb:
        raise LowbitError(f"{gtype}: expected uint8 blocks [rows, bytes] in whole blocks of {bpb}, "
                          f"got {raw.dtype} {raw.shape}")
    return np.ascontiguousarray(raw), bs, bpb


def sub_block_grid(raw: np.ndarray, gtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(a, b, L, sub): `block_grid` with one a and one b per sub-block of ``sub`` values,
    float32 [rows, n / sub]."""
    g = _grid(gtype)
    raw, bs, bpb = _rows(raw, gtype)
    rows = raw.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN scales in foreign bytes
        a, b = g.scales(raw.reshape(-1, bpb))
    a = np.asarray(a, np.float32).reshape(rows, -1)
    b = np.zeros_like(a) if b is None else np.asarray(b, np.float32).reshape(rows, -1)
    return a, b, g.levels.copy(), g.sub


def block_grid(raw: np.ndarray, gtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, L) of the blocks ``raw`` uint8 [rows, bytes] of type ``gtype`` (module table):
    a, b float32 [rows, n] per value, constant over each sub-block; L the sorted float32 levels;
    ``dequantize(raw) == a * L[codes_of(raw)] + b`` bit for bit."""
    a, b, L, sub = sub_block_grid(raw, gtype)
    return np.repeat(a, sub, axis=1), np.repeat(b, sub, axis=1), L


def codes_of(raw: np.ndarray, gtype: str) -> np.ndarray:
    """The level index k (int64 [rows, n]) of every value of the blocks ``raw``: L[k] is its level."""
    g = _grid(gtype)
    raw, _, _ = _rows(raw, gtype)
    return gguf_quants.block_codes(raw, gtype).astype(np.int64) - g.code0


def with_codes(raw: np.ndarray, gtype: str, k: np.ndarray) -> np.ndarray:
    """A copy of the blocks ``raw`` holding the level indices ``k`` [rows, n] (0 <= k < len(L)),
    every scale field byte for byte as it was."""
    g = _grid(gtype)
    raw, _, _ = _rows(raw, gtype)
    k = np.asarray(k)
    if k.size and (int(k.min()) < 0 or int(k.max()) >= len(g.levels)):
        raise LowbitError(f"{gtype}: level indices must lie in 0..{len(g.levels) - 1}, "
                          f"found {int(k.min())}..{int(k.max())}")
    return gguf_quants.with_block_codes(raw, gtype, k.astype(np.int64) + g.code0)


def dequantize(raw: np.ndarray, gtype: str) -> np.ndarray:
    """float32 [rows, n] of the blocks ``raw`` (the reader's values)."""
    return gguf_imatrix.dequantize(raw, gtype)


def nearest_level(w: Tensor, a: Tensor, b: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    """(k, a · L[k] + b) for the level of each element's grid nearest to w: w [...] in any float
    dtype, a, b [...] and L [levels] (sorted) float32; a may be negative or 0 (every level is b:
    k = 0); ties go to the lower index. The index is found in level space ((w - b) / a: an affine
    map, so the nearest level there is the nearest value), then the two neighbouring levels are
    compared by their values as the reader computes them (float32: a · L[k], then + b), returned
    in w's dtype."""
    aw, bw = a.to(w.dtype), b.to(w.dtype)
    t = torch.where(aw == 0, L[0].to(w.dtype), (w - bw) / torch.where(aw == 0, torch.ones_like(aw), aw))
    hi = torch.searchsorted(L.to(w.dtype), t.contiguous()).clamp(1, L.numel() - 1)
    lo = hi - 1
    v_lo = (a * L[lo] + b).to(w.dtype)
    v_hi = (a * L[hi] + b).to(w.dtype)
    take_hi = (w - v_hi).abs() < (w - v_lo).abs()
    return torch.where(take_hi, hi, lo), torch.where(take_hi, v_hi, v_lo)


@torch.no_grad()
def gptq_onto(W: Tensor, H: Tensor, gtype: str, imatrix: np.ndarray | Tensor | None = None, *,
              damp: float = 0.01, block_size: int = 128, act_order: bool = True,
              dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, dict]:
    """GPTQ onto the grid of GGUF type ``gtype`` whose scales its own quantizer chose (module
    docstring). W [out, in] weights, H [in, in] = 2/n Σ x xᵀ, ``imatrix`` [in] the encoder's
    importance weights (default diag H). ``dtype`` is the precision of the solve (float64 for
    tests); the solve runs on W's device.

    Returns the blocks uint8 [out, in / block * bytes] and ``info``: ``error`` = tr((W - Q) H (W - Q)ᵀ)
    of the written blocks, ``rtn_error`` the same for the encoder's own blocks (each value rounded
    to its nearest level by the encoder, no error feedback), ``dead_columns``, ``lambda``."""
    who = f"GPTQ onto {gtype}"
    _grid(gtype)
    check_solver_inputs(W, H, who)
    rows, cols = W.shape
    bs = gguf_quants.layout(gtype)[0]
    if cols % bs:
        raise LowbitError(f"{who}: rows of {cols} are not whole {gtype} blocks of {bs}")
    device = W.device
    W32 = W.detach().float().cpu().numpy()
    if imatrix is None:
        imatrix = torch.diagonal(H).detach().float().clamp(min=0).cpu().numpy()
    elif isinstance(imatrix, Tensor):
        imatrix = imatrix.detach().float().cpu().numpy()

    # (a) the scales: the type's own encoder on W
    raw0 = encode_tensor(W32, gtype, np.asarray(imatrix, dtype=np.float32))
    a, b, L, sub = sub_block_grid(raw0, gtype)                              # [out, in / sub]

    # (b) GPTQ with "nearest level of the element's fixed grid" as the rounding rule
    perm, dead = column_order(H, act_order, device, dtype)
    Wp = W.detach().to(dtype).clone()
    Wp[:, dead] = 0.0
    Wp = Wp[:, perm]                                                        # [out, in] visiting order
    A, B, Lt = (torch.from_numpy(v).to(device) for v in (a, b, L))          # float32 grids
    sub_of = (perm // sub).tolist()                                         # position -> its sub-block
    Hinv, lam = permuted_inverse_factor(H, perm, dead, damp, who, dtype)    # [in, in]
    K = torch.empty(rows, cols, dtype=torch.int16, device=device)           # level indices, visiting order

    def nearest(j: int, w: Tensor, current) -> Tensor:
        s = sub_of[j]
        k, w_hat = nearest_level(w, A[:, s], B[:, s], Lt)
        K[:, j] = k
        return w_hat

    gptq_columns(Wp, Hinv, block_size, nearest)
    del Hinv, Wp
    k = torch.empty_like(K)
    k[:, perm] = K                                                          # back to input order
    del K

    # (c) the codes into the encoder's blocks
    raw = with_codes(raw0, gtype, k.cpu().numpy())
    W64 = W.detach().to(torch.float64)

    def error(blocks):
        return hessian_error(W64 - torch.from_numpy(dequantize(blocks, gtype)).to(device, torch.float64), H)

    info = {"error": error(raw), "rtn_error": error(raw0), "dead_columns": int(dead.sum()), "lambda": float(lam)}
    return raw, info
