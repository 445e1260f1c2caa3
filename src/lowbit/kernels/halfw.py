"""Matmul for 16-bit float weights (format "half": float16 or bfloat16).

``compute="fp32"`` (default): float32 arithmetic on the exactly widened weight.
  * up to ``FUSED_MAX_ROWS`` activation rows (decode): the native kernel (``csrc/half_linear.c``,
    AVX2+FMA+F16C) widens the 16-bit weight in registers and accumulates in float32, so it reads
    half the bytes of an fp32 matmul and never writes a float32 copy of the weight;
  * more rows (prefill), or no native kernel: the reference — widen the weight once per call,
    then the float32 GEMM (compute bound there, so the widening is a small extra cost).
``compute="native"``: the activations are cast to the weight's type and the matmul runs in it
(torch); the result is returned in the activations' dtype. Faster only where the CPU has 16-bit
float dot-product units (e.g. AVX512-BF16 at large batch), and less accurate (activations and
outputs are rounded to 16 bits).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.floatw import FloatWeight
from lowbit.kernels import _native, register_kernel

FUSED_MAX_ROWS = 8
_i64, _vp, _ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_FUNCTIONS = {"lb_half_linear": ([_vp, _i64, _i64, _vp, _i64, _vp, _vp, _ci, _ci], _ci)}


def native_lib():
    """The loaded ``_c_half_linear`` library, or None (not built, LOWBIT_NATIVE=0, or no AVX2 path:
    the CPU lacks AVX2+FMA+F16C, or the library was capped to "scalar")."""
    lib = _native.library("half_linear", _FUNCTIONS)
    return lib if lib is not None and lib.isa() != "scalar" else None


def fused_linear(X: Tensor, w: FloatWeight, bias: Tensor | None = None) -> Tensor:
    """Y [M, N] float32 for float32 CPU X [M, K], the weight widened in registers (native kernel)."""
    lib = native_lib()
    if lib is None:
        raise LowbitError("the native half-precision kernel is not available on this CPU/build")
    X = X.contiguous()
    W = w.weight16.contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    M, K = X.shape
    N = W.shape[0]
    Y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.lb_half_linear(X.data_ptr(), M, K, W.data_ptr(), N, None if b is None else b.data_ptr(),
                                Y.data_ptr(), int(W.dtype == torch.bfloat16), torch.get_num_threads())
    if rc:
        raise LowbitError(f"half-precision kernel failed (code {rc})")
    return Y


@register_kernel("half", "float", "any")
def linear(x: Tensor, w: FloatWeight, bias: Tensor | None = None):
    if x.shape[-1] != w.shape[1]:
        raise LowbitError(f"input has {x.shape[-1]} features, the layer expects {w.shape[1]}")
    if w.compute == "native":
        dt = w.weight16.dtype
        y = F.linear(x.to(dt), w.weight16, None if bias is None else bias.to(dt))
        return y.to(x.dtype)
    lead = x.shape[:-1]
    X = x.reshape(-1, w.shape[1])
    if (X.shape[0] == 0 or X.shape[0] > FUSED_MAX_ROWS or x.dtype != torch.float32 or x.requires_grad
            or x.device.type != "cpu" or w.weight16.device.type != "cpu" or native_lib() is None):
        return NotImplemented  # the reference: widen once, float32 GEMM
    return fused_linear(X, w, bias).reshape(*lead, w.shape[0])
