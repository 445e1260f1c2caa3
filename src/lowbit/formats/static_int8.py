"""StaticInt8Weight: a W8A8 linear with a static (calibrated) activation scale, for LLMs.

Stored tensors:

* ``qweight``   int8    [out, in]  symmetric per-output-channel codes (z_w = 0)
* ``w_scale``   float32 [out]      s_w
* ``act_qparams`` float32 [2]      (s_x, z_x) of the input activation, fixed at calibration
* ``smooth``    float32 [in]       optional SmoothQuant factors: x is divided by them before
                                   quantization and W was multiplied by them before quantization
                                   (x / s) (W s)ᵀ = x Wᵀ

The matmul is the integer pipeline of :mod:`lowbit.kernels.static_int8` (the format's row of the
kernel table): q_x = clamp(round(x / s / s_x) + z_x), exact int32 accumulation of (q_x - z_x) q_w
plus the int32 bias round(b / (s_x s_w)), and the accumulators scaled back to float32,
acc * (s_x * s_w[o]).
Storage: 8 bits per weight + 32 bits per output row (+ 32 bits per input column if smoothed).

Recorded settings: the activation code range ``act_qmin``/``act_qmax``, the smallest weight code
``w_min``, the ``observer`` that chose s_x (informational) and ``matmul``, how the int32 products
are computed ("auto", "int", "float" or "native"; records written before it was saved load as
"auto").
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

MATMULS = ("auto", "int", "float", "native")


def check_matmul(matmul: str) -> str:
    if matmul not in MATMULS:
        raise LowbitError(f"matmul must be {', '.join(MATMULS[:-1])} or {MATMULS[-1]}, got {matmul!r}")
    return matmul


def _check_code(v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not -128 <= v <= 127:
        raise LowbitError(f"must be an int8 code, got {v!r}")


class StaticInt8Weight(WeightFormat, name="static-int8"):
    qweight: Tensor = tensor(torch.int8, lambda w: tuple(w.shape))
    w_scale: Tensor = tensor(torch.float32, lambda w: (w.shape[0],), finite=True)
    act_qparams: Tensor = tensor(torch.float32, lambda w: (2,), finite=True)   # (s_x, z_x)
    shape: tuple[int, int] = shape_param()
    act_qmin: int = param(-128, decode=int, check=_check_code)
    act_qmax: int = param(127, decode=int, check=_check_code)
    smooth: Tensor | None = tensor(torch.float32, lambda w: (w.shape[1],), optional=True, finite=True)
    observer: str = param("minmax")
    matmul: str = param("auto", check=check_matmul)
    w_min: int = param(-128, decode=int, check=_check_code)  # smallest weight code the scheme allows (-127: restricted)

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

    def check(self) -> None:
        if self.act_qmin >= self.act_qmax:
            raise LowbitError(f"static-int8 activation range [{self.act_qmin}, {self.act_qmax}] is empty")
        if not self.act_qmin <= self.z_x <= self.act_qmax or not self.s_x > 0:
            raise LowbitError(f"static-int8 act_qparams (s_x={self.s_x}, z_x={self.z_x}) do not fit "
                              f"[{self.act_qmin}, {self.act_qmax}]")
        if self.qweight.numel() and int(self.qweight.min()) < self.w_min:
            raise LowbitError(f"static-int8 qweight holds codes below w_min={self.w_min}")
