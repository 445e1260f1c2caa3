"""Int8Weight: the weight of LLM.int8() — int8 codes with one absmax scale per output row.

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", §3.1
(vector-wise quantization) and §3.2 (mixed-precision decomposition). For Y = X Wᵀ with
W [out, in] (nn.Linear layout), the paper's "one scale per column of W_f16" (it writes X W with
W [in, out]) is one scale per *output row* of our W:

    s_w[r]   = max_c |W[r, c]|                                   (absmax of output row r)
    q_w[r,c] = round(W[r, c] · 127 / s_w[r])  ∈ [-127, 127]      (round half to even)
    Ŵ[r, c]  = q_w[r, c] · (s_w[r] / 127)                        (the dequantized weight)

The same absmax rule quantizes the activations, one scale per token row (`absmax_quantize_rows`,
used by `lowbit.kernels.int8`). An all-zero row gets s = 0 and codes 0.

Stored tensors:

* ``qweight``  int8    [out, in]  the codes q_w
* ``absmax``   float32 [out]      s_w (bitsandbytes' "SCB"), kept in float32 as bitsandbytes does

The outlier ``threshold`` (|x| ≥ threshold marks a feature dimension as an outlier at run time)
is a setting of the matmul, not of the codes; it travels in ``meta()`` so that a reloaded
checkpoint runs the same decomposition. Storage: 8 bits per weight + 32 bits per output row.

Outlier columns of W are *not* kept in higher precision: the kernel multiplies them as Ŵ (the
dequantized int8 columns), as bitsandbytes' Linear8bitLt does for int8 weights
(``has_fp16_weights=False``). Keeping the original columns would need the whole float weight,
because the outlier dimensions are only known per batch (+16 bits/weight for fp16, i.e. 3× the
memory); the paper's inference setting keeps fp16 weights and quantizes them on the fly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

Q_MAX = 127  # symmetric restricted int8 range [-127, 127]


def absmax_quantize_rows(M: Tensor) -> tuple[Tensor, Tensor]:
    """Vector-wise absmax quantization of a 2-D float tensor, one scale per row (paper eq. 1):
    s = max_c |M[r, c]|, q = round(M · (127 / s)). Returns (q as float32 holding integers in
    [-127, 127], s float32 [rows]). Rows that are all zero get s = 0 and q = 0."""
    M = M.float()
    s = M.abs().amax(dim=1)
    # a true float32 division 127 / s: `Q_MAX / tensor` would be computed as 127 · (1 / s), which
    # rounds differently for some s and flips a code exactly at a rounding tie
    inv = torch.full_like(s, Q_MAX) / torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(M * inv.unsqueeze(1)), s


def validate_threshold(threshold) -> float:
    """The outlier threshold as a float >= 0 (``inf`` disables the decomposition)."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise LowbitError(f"outlier threshold must be a number >= 0, got {threshold!r}") from None
    if math.isnan(t) or t < 0:
        raise LowbitError(f"outlier threshold must be a number >= 0 (inf disables outliers), got {threshold!r}")
    return t


class Int8Weight(WeightFormat, name="llm-int8"):
    qweight: Tensor = tensor(torch.int8, lambda w: tuple(w.shape))
    absmax: Tensor = tensor(torch.float32, lambda w: (w.shape[0],), finite=True)
    shape: tuple[int, int] = shape_param()
    threshold: float = param(6.0, decode=validate_threshold, check=validate_threshold)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def quantize(cls, W: Tensor, threshold: float = 6.0) -> "Int8Weight":
        """Row-wise absmax int8 codes for a 2-D float weight W [out, in]."""
        if W.dim() != 2:
            raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise LowbitError("weight has NaN/Inf values; refusing to quantize it")
        q, s = absmax_quantize_rows(W.detach())
        return cls(qweight=q.to(torch.int8), absmax=s.contiguous(), shape=(int(W.shape[0]), int(W.shape[1])),
                   threshold=validate_threshold(threshold))

    # -- reading ----------------------------------------------------------------------------
    def scales(self) -> Tensor:
        """s_w / 127 per output row (float32 [out]): Ŵ = q_w · scales."""
        return self.absmax.float() / Q_MAX

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ = q_w · (s_w / 127), float32 arithmetic."""
        W = self.qweight.float().mul_(self.scales().unsqueeze(1))
        return W if dtype == torch.float32 else W.to(dtype)

    def check(self) -> None:
        if self.qweight.numel() and int(self.qweight.min()) < -Q_MAX:
            raise LowbitError("llm-int8 qweight holds -128, outside the int8 range [-127, 127] of LLM.int8()")
        if (self.absmax < 0).any():
            raise LowbitError("llm-int8 absmax has negative values")
