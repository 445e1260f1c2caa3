"""The LLM.int8() matmul, reference path (plain torch, any device).

Dettmers et al. 2022, §3.2, eq. (7) in our layout (X [N, in] tokens × features, W [out, in]):

    O = { j : max_n |X[n, j]| ≥ threshold }                    outlier feature dims, found on the
                                                                fly from this call's activations
    Y = X[:, O] · Ŵ[:, O]ᵀ                                      float part (the few outlier dims)
      + (s_x ⊗ s_w) / 127² ⊙ ( q_x · q_wᵀ )                     int8 part over the other dims ¬O

* q_w, s_w: the stored row-wise int8 codes and absmax of W (`lowbit.formats.int8`); Ŵ = q_w·s_w/127,
  so the outlier columns are multiplied with the *dequantized* int8 weight, as bitsandbytes does
  (`int8_mixed_scaled_mm` dequantizes CB[:, outlier_cols]); no float copy of W is kept.
* q_x, s_x: vector-wise (one absmax per token row, eq. 1) int8 codes of X[:, ¬O], so
  s_x[n] = max_{j ∉ O} |X[n, j]| — the paper's definition. Both halves work on gathered columns
  (X[:, O] and X[:, ¬O], and the matching columns of q_w), so together they cost one GEMM of the
  full size.
  (bitsandbytes zeroes only the outlier *entries* |x| ≥ threshold before taking the row absmax,
  so the sub-threshold values of outlier columns can still set its s_x; ours cannot.)
* Integer accumulation must be exact. torch's int8 GEMM (``torch._int_mm``) runs at ~0.03× fp32
  on this CPU, so `exact_int_matmul` multiplies the integer-valued codes with the fp32 GEMM in
  chunks of at most 1024 input dims: |q| ≤ 127, so every partial sum any summation order can
  form is an integer of magnitude ≤ 127²·1024 = 16,516,096 < 2²⁴ and is represented exactly in
  float32 (FMA included). Chunk results are added in float64 (exact below 2⁵³) and the total is
  rounded once to float32 — the value an int32 accumulator converted to float32 would give.
* Dequantization (float32, this order): Y_int = acc · (s_x / 127) · (s_w / 127).
* threshold = 0 makes every dim an outlier (Y = X·Ŵᵀ in float); threshold = inf none (pure
  vector-wise int8, the paper's "int8 absmax vector-wise" baseline).

The output is Y_int + Y_outlier (+ bias), computed in float32 and returned in x's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.int8 import Q_MAX, Int8Weight, absmax_quantize_rows
from lowbit.kernels import register_kernel

CHUNK = 1024  # input dims per exact fp32 GEMM: 127² · 1024 < 2²⁴


class Int8Parts(NamedTuple):
    outliers: Tensor         # int64 [k]: the outlier feature dims O (ascending)
    y_int8: Tensor | None    # float32 [N, out]: dequantized int8 product over ¬O (None if ¬O is empty)
    y_outlier: Tensor | None  # float32 [N, out]: X[:, O] · Ŵ[:, O]ᵀ (None if O is empty)


def outlier_mask(X: Tensor, threshold: float) -> Tensor:
    """bool [in]: the columns of X [N, in] whose largest magnitude over all rows is ≥ threshold."""
    return X.abs().amax(dim=0) >= threshold


def outlier_dims(X: Tensor, threshold: float) -> Tensor:
    """O as ascending int64 indices."""
    return torch.nonzero(outlier_mask(X, threshold)).flatten()


def exact_int_matmul(A: Tensor, B: Tensor) -> Tensor:
    """A · Bᵀ for float32 A [N, K], B [M, K] holding integers in [-127, 127]: the exact integer
    sums, rounded once to float32 (exact whenever |sum| < 2²⁴, e.g. always for K ≤ 1040)."""
    K = A.shape[1]
    if K <= CHUNK:
        return A @ B.T
    n = math.ceil(K / CHUNK)
    c = math.ceil(K / n)  # n equal chunks of at most CHUNK dims
    acc = None
    for k in range(0, K, c):
        # contiguous copies: the GEMM on strided column slices measured ~2x slower here
        part = A[:, k:k + c].contiguous() @ B[:, k:k + c].contiguous().T  # exact in float32
        acc = part.double() if acc is None else acc.add_(part)  # exact in float64
    return acc.float()


def decompose(X: Tensor, w: Int8Weight) -> Int8Parts:
    """The two halves of eq. (7) for X [N, in] (float32)."""
    N, K = X.shape
    is_outlier = outlier_mask(X, w.threshold)  # [in]
    O = torch.nonzero(is_outlier).flatten()
    sw = w.scales()  # s_w / 127, float32 [out]
    X_rest, Q_rest = X, w.qweight  # the dims ¬O (all of them when O is empty)
    y_out = y_int = None
    if O.numel():
        W_hat_O = w.qweight[:, O].float().mul_(sw.unsqueeze(1))  # Ŵ[:, O], dequantized
        y_out = F.linear(X[:, O], W_hat_O)
        rest = torch.nonzero(~is_outlier).flatten()
        X_rest, Q_rest = X[:, rest], w.qweight[:, rest]
    if X_rest.shape[1]:
        qx, sx = absmax_quantize_rows(X_rest)  # s_x[n] = max_{j ∉ O} |X[n, j]|
        acc = exact_int_matmul(qx, Q_rest.float())
        y_int = acc.mul_((sx / Q_MAX).unsqueeze(1)).mul_(sw.unsqueeze(0))
    return Int8Parts(O, y_int, y_out)


@register_kernel("llm-int8", "int8", "any")
def linear(x: Tensor, w: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """y = LLM.int8(x, W) + b for x [..., in]; the outlier dims are found over all of x's rows."""
    out_f, in_f = w.shape
    if x.shape[-1] != in_f:
        raise LowbitError(f"input has {x.shape[-1]} features, the int8 layer expects {in_f}")
    lead = x.shape[:-1]
    X = x.reshape(-1, in_f).float()
    if X.shape[0] == 0:
        return x.new_zeros(*lead, out_f)
    parts = decompose(X, w)
    if parts.y_int8 is None:
        y = parts.y_outlier
    else:
        y = parts.y_int8 if parts.y_outlier is None else parts.y_int8.add_(parts.y_outlier)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_f).to(x.dtype)
