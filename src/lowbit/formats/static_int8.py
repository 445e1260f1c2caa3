"""StaticInt8Weight: a W8A8 linear with a static (calibrated) activation scale, for LLMs.

Stored tensors:

* ``qweight``   int8    [out, in]  symmetric per-output-channel codes (z_w = 0)
* ``w_scale``   float32 [out]      s_w
* ``act_qparams`` float32 [2]      (s_x, z_x) of the input activation, fixed at calibration
* ``smooth``    float32 [in]       optional SmoothQuant factors: x is divided by them before
                                   quantization and W was multiplied by them before quantization
                                   (x / s) (W s)ᵀ = x Wᵀ

The forward pass is the integer pipeline of :mod:`lowbit.kernels.static_int8`: q_x = clamp(round(
x / s / s_x) + z_x), exact int32 accumulation of (q_x - z_x) q_w plus the int32 bias
round(b / (s_x s_w)), and the accumulators scaled back to float32, acc * (s_x * s_w[o]).
With symmetric restricted activations and weights (all codes in [-127, 127], z_x = 0) the int32
products come from the native AVX2 int8 GEMM (``lowbit.kernels.dynamic_int8.native_gemm``) when
it is built; otherwise from the exact torch paths of :mod:`lowbit.kernels.static_int8`.
Storage: 8 bits per weight + 32 bits per output row (+ 32 bits per input column if smoothed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.core.registry import register_format
from lowbit.errors import LowbitError
from lowbit.formats.base import StoredSize


@register_format("static-int8")
@dataclass
class StaticInt8Weight(StoredSize):
    qweight: Tensor
    w_scale: Tensor
    act_qparams: Tensor
    shape: tuple[int, int]
    act_qmin: int = -128
    act_qmax: int = 127
    smooth: Tensor | None = None
    observer: str = "minmax"
    matmul: str = "auto"
    w_min: int = -128  # smallest weight code the scheme allows (-127: restricted range)

    tensor_names = ("qweight", "w_scale", "act_qparams", "smooth")

    @property
    def s_x(self) -> float:
        return float(self.act_qparams[0])

    @property
    def z_x(self) -> int:
        return int(self.act_qparams[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The effective float weight (smoothing undone): q_w * s_w / smooth."""
        W = self.qweight.float() * self.w_scale.float()[:, None]
        if self.smooth is not None:
            W = W / self.smooth.float()[None, :]
        return W.to(dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        from lowbit.kernels.static_int8 import quantize_activation

        X = x.float()
        if self.smooth is not None:
            X = X / self.smooth.float()
        return quantize_activation(X, self.s_x, self.z_x, self.act_qmin, self.act_qmax)

    def accumulators(self, x: Tensor, bias: Tensor | None = None, method: str | None = None) -> Tensor:
        """The int32 accumulators (int64 tensor) for float input x [..., in]."""
        from lowbit.kernels.static_int8 import int_linear_acc, quantize_bias

        qx = self.quantize_input(x)
        bq = quantize_bias(bias, self.s_x, self.w_scale)
        method = method or self.matmul
        if method in ("auto", "native") and self.native_ok():
            from lowbit.kernels.dynamic_int8 import native_gemm

            acc = native_gemm(qx.reshape(-1, self.shape[1]), self.qweight).long() + bq
            return acc.reshape(*x.shape[:-1], self.shape[0])
        if method == "native":
            raise LowbitError("the native int8 GEMM needs symmetric restricted activations and weights, and the built kernel")
        return int_linear_acc(qx, self.z_x, self.qweight, bq, method)

    def native_ok(self) -> bool:
        """The native int8 x int8 -> int32 GEMM applies: codes in [-127, 127] on both sides and z_x = 0."""
        if self.w_min < -127 or self.act_qmin < -127 or self.z_x != 0:
            return False
        try:
            from lowbit.kernels.dynamic_int8 import native_lib
        except ImportError:  # pragma: no cover
            return False
        return native_lib() is not None

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.shape[1]:
            raise LowbitError(f"input has {x.shape[-1]} features, the static-int8 layer expects {self.shape[1]}")
        acc = self.accumulators(x, bias)
        y = acc.float() * (torch.tensor(self.s_x, dtype=torch.float32) * self.w_scale.float())
        return y.to(x.dtype)

    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "w_scale": self.w_scale, "act_qparams": self.act_qparams}
        if self.smooth is not None:
            out["smooth"] = self.smooth
        return out

    def meta(self) -> dict:
        return {"format": "static-int8", "shape": list(self.shape), "act_qmin": self.act_qmin,
                "act_qmax": self.act_qmax, "observer": self.observer, "w_min": self.w_min}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "StaticInt8Weight":
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        w = cls(qweight=tensors["qweight"], w_scale=tensors["w_scale"], act_qparams=tensors["act_qparams"],
                shape=shape, act_qmin=int(meta["act_qmin"]), act_qmax=int(meta["act_qmax"]),
                smooth=tensors.get("smooth"), observer=meta.get("observer", "?"), w_min=int(meta.get("w_min", -128)))
        if tuple(w.qweight.shape) != shape or w.qweight.dtype != torch.int8:
            raise LowbitError(f"qweight has shape {tuple(w.qweight.shape)}/{w.qweight.dtype}, expected {shape}/int8")
        if tuple(w.w_scale.shape) != (shape[0],) or tuple(w.act_qparams.shape) != (2,):
            raise LowbitError("static-int8 scales have the wrong shape")
        return w
