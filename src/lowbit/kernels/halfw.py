"""Matmul for 16-bit float weights (format "half": float16 or bfloat16).

``compute="fp32"`` widens the weight to float32 per call and runs the float32 GEMM — exactly
the reference path, so this kernel declines (NotImplemented) and the reference runs.
``compute="native"`` casts the activations to the weight's type and runs the matmul in it; the
result is returned in the activations' dtype.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.floatw import FloatWeight
from lowbit.kernels import register_kernel


@register_kernel("half")
def linear(x: Tensor, w: FloatWeight, bias: Tensor | None = None):
    if x.shape[-1] != w.shape[1]:
        raise LowbitError(f"input has {x.shape[-1]} features, the layer expects {w.shape[1]}")
    if w.compute != "native":
        return NotImplemented
    dt = w.weight16.dtype
    y = F.linear(x.to(dt), w.weight16, None if bias is None else bias.to(dt))
    return y.to(x.dtype)
