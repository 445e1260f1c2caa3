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

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.core.registry import register_format
from lowbit.errors import LowbitError
from lowbit.formats.base import StoredSize
from lowbit.formats.int8 import Q_MAX, absmax_quantize_rows

ACTIVATION_GRANULARITIES = ("token", "tensor")


def check_activations(activations: str) -> str:
    if activations not in ACTIVATION_GRANULARITIES:
        raise LowbitError(f"activation scales must be per 'token' or per 'tensor', got {activations!r}")
    return activations


@register_format("dynamic-int8")
@dataclass
class DynamicInt8Weight(StoredSize):
    qweight: Tensor
    wscale: Tensor
    shape: tuple[int, int]
    activations: str = "token"

    tensor_names = ("qweight", "wscale")

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

    # -- storage ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "wscale": self.wscale}

    def meta(self) -> dict:
        return {"format": "dynamic-int8", "shape": list(self.shape), "activations": self.activations}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "DynamicInt8Weight":
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        w = cls(qweight=tensors["qweight"], wscale=tensors["wscale"], shape=shape,
                activations=check_activations(meta.get("activations", "token")))
        w.validate()
        return w

    def validate(self) -> None:
        rows, cols = self.shape
        if tuple(self.qweight.shape) != (rows, cols) or self.qweight.dtype != torch.int8:
            raise LowbitError(f"qweight has shape {tuple(self.qweight.shape)}/{self.qweight.dtype}, "
                              f"expected {(rows, cols)}/int8")
        if self.qweight.numel() and int(self.qweight.min()) < -Q_MAX:
            raise LowbitError("qweight holds -128, outside the symmetric int8 range [-127, 127]")
        if tuple(self.wscale.shape) != (rows,) or self.wscale.dtype != torch.float32:
            raise LowbitError(f"wscale has shape {tuple(self.wscale.shape)}/{self.wscale.dtype}, "
                              f"expected {(rows,)}/float32")
        if not torch.isfinite(self.wscale).all() or (self.wscale < 0).any():
            raise LowbitError("wscale contains NaN/Inf or negative values")
