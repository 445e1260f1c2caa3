"""DynamicInt8Weight: the weight of dynamic-range int8 — int8 codes, one scale per output channel.

Weights are quantized once, offline; activations are quantized on the fly at every call
(`lowbit.kernels.dynamic_int8`), and the matmul runs in int8 × int8 → int32.

    s_w[r]   = max_c |W[r, c]| / 127                           (symmetric, per output row)
    q_w[r,c] = round(W[r, c] · 127 / max_c |W[r, c]|) ∈ [-127, 127]   (round half to even)
    Ŵ[r, c]  = q_w[r, c] · s_w[r]

The restricted range [-127, 127] keeps the grid symmetric and lets the int8 kernel use the
sign trick (|a|·sign(b, a)) without saturating; the rounding rule is LLM.int8()'s vector-wise
absmax (`lowbit.formats.int8.absmax_quantize_rows`), shared rather than repeated.

Stored tensors:

* ``qweight``  int8    [out, in]  the codes q_w
* ``wscale``   float32 [out]      s_w

``activations`` ("token" or "tensor") says how the kernel picks activation scales: one per token
row (default; robust to the few huge activations of LLMs) or one for the whole input tensor.
It travels in ``meta()``. Storage: 8 bits per weight + 32 bits per output row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor
from lowbit.formats.int8 import Q_MAX, absmax_quantize_rows

ACTIVATION_GRANULARITIES = ("token", "tensor")


def check_activations(activations: str) -> str:
    if activations not in ACTIVATION_GRANULARITIES:
        raise LowbitError(f"activation scales must be per 'token' or per 'tensor', got {activations!r}")
    return activations


class DynamicInt8Weight(WeightFormat, name="dynamic-int8"):
    qweight: Tensor = tensor(torch.int8, lambda w: tuple(w.shape))
    wscale: Tensor = tensor(torch.float32, lambda w: (w.shape[0],), finite=True)
    shape: tuple[int, int] = shape_param()
    activations: str = param("token", check=check_activations)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def quantize(cls, W: Tensor, activations: str = "token") -> "DynamicInt8Weight":
        """Per-output-channel symmetric int8 codes for a 2-D float weight W [out, in]."""
        if W.dim() != 2:
            raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise LowbitError("weight has NaN/Inf values; refusing to quantize it")
        q, amax = absmax_quantize_rows(W.detach())
        return cls(qweight=q.to(torch.int8).contiguous(), wscale=(amax / Q_MAX).contiguous(),
                   shape=(int(W.shape[0]), int(W.shape[1])), activations=check_activations(activations))

    # -- reading ----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ = q_w · s_w (float32 arithmetic)."""
        W = self.qweight.float().mul_(self.wscale.float().unsqueeze(1))
        return W if dtype == torch.float32 else W.to(dtype)

    def check(self) -> None:
        if self.qweight.numel() and int(self.qweight.min()) < -Q_MAX:
            raise LowbitError("dynamic-int8 qweight holds -128, outside the symmetric int8 range [-127, 127]")
        if (self.wscale < 0).any():
            raise LowbitError("dynamic-int8 wscale has negative values")
