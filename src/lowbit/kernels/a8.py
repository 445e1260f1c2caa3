"""Affine packed weights times int8-quantized activations (W4A8 / W8A8 / W2A8) on the CPU.

``csrc/affine_a8.c`` quantizes the float32 activation rows to int8 per block of 32 columns
(symmetric, absmax / 127, round half to even) and multiplies the integer weight codes with the
integer activation codes (AVX-512 VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``/``vpmaddwd``, or
portable C), applying the weight scale and zero-point per group and the activation scale per
block. The result is *not* the float-activation product of ``lowbit.kernels.cpu`` (the
activation rounding changes the numerics, ~0.3% relative error on random data), so its row in
the kernel table, ("affine", "int8", "cpu"), is an opt-in: `lowbit.kernels.linear` never runs it;
callers choose it with ``lowbit.kernels.select(w, "int8")`` (the decoder's ``int8_activations``),
which also gives the C entry and the weight's C struct for a decode loop written in C.

Exact rule, per activation row m and block b of 32 columns::

    amax = max |x_c| over the block
    amax == 0:  q_c = 0, sx_b = 0
    otherwise:  inv = 127.0f / amax; sx_b = amax / 127.0f          (float32 divisions)
                q_c = clamp(round_half_even(x_c * inv), -127, 127)  (float32 product)
    y[m, r] = bias[r] + sum_g s[r, g] * ( sum_{b in g} sx_b * D_b - z[r, g] * sum_{b in g} sx_b * Q_b )

with D_b = sum_{c in b} u_c q_c and Q_b = sum_{c in b} q_c exact integers (u the stored code,
z the zero-point: packed integer, float, or the code offset for symmetric weights).

Supported: bits 2, 4, 8; in_features a multiple of 32; group size a multiple of 32 (or one
group per row: per-channel / per-tensor); the last group may be shorter. Anything else (and
non-float32 or non-CPU activations, wrong in_features, autograd through x) returns
``NotImplemented``.

Several activation rows (prompts): from 8 rows on the same entry point runs a register-blocked
GEMM (weight panels unpacked and transposed once per call, ``vpdpbusd`` on broadcast activation
codes; see ``csrc/affine_a8.c``) with the same rule, so each row's result is that of a one-row
call to float summation order; ``prompts=True`` in its kernel-table row tells the decoder to run
prompts through it. ``lb_affine_a8_set_gemm_min_rows(n)`` moves the switch (tests).

C ABI (for callers holding the pointer): ``int lb_affine_a8_linear_w(const lb_affine_weight* w,
const float* x, int64_t M, const float* bias, float* y, int nthreads)`` with ``lb_affine_weight``
laid out as in csrc/lb_common.h (`lowbit.kernels.cpu.AffineWeightC`); 0 = done, positive =
not supported (compute another way). It parallelises over output rows with OpenMP (calls with
under 48 KiB of weights run on one thread) and keeps its scratch per thread (grow-only).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels import _native, register_kernel
from lowbit.kernels.cpu import _bias_ptr, affine_struct, affine_weight_struct

_vp, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_FUNCTIONS = {"lb_affine_a8_linear_w": ([_vp, _vp, _i64, _vp, _vp, _i32], _i32),
              "lb_affine_a8_quantize": ([_vp, _i64, _i64, _vp, _vp], _i32),
              "lb_affine_a8_set_min_parallel_bytes": ([_i64], None),
              "lb_affine_a8_set_gemm_min_rows": ([_i64], None)}


def library():
    """The loaded ``_c_affine_a8`` `lowbit.kernels._native.NativeLibrary`, or None (not built, or
    ``LOWBIT_NATIVE=0``). Its paths: "scalar", "avx2", "avx512vnni" (`NativeLibrary.set_isa`)."""
    return _native.library("affine_a8", _FUNCTIONS)


def available() -> bool:
    return library() is not None


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's activation quantization of a float32 [M, K] tensor (K % 32 == 0): int8 codes
    [M, K] and float32 block scales [M, K // 32], computed by the C code (for tests and
    inspection)."""
    lib = library()
    if lib is None:
        raise LowbitError("the affine_a8 native library is not built (no C compiler at install?)")
    if x.dim() < 1 or x.shape[-1] % 32 or x.shape[-1] == 0:
        raise LowbitError(f"in_features must be a positive multiple of 32, got {tuple(x.shape)[-1:]}")
    X = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    M, K = X.shape
    q = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, max(K // 32, 1), dtype=torch.float32)
    if lib.lb_affine_a8_quantize(X.data_ptr(), M, K, q.data_ptr(), sx.data_ptr()):
        raise LowbitError(f"in_features must be a positive multiple of 32, got {K}")
    return q, sx


def supports(w) -> bool:
    """Whether the kernel handles AffineWeight ``w`` (so a caller holding the C pointer can decide
    once, when it builds its plan, instead of checking the return code on every call): bits
    2/4/8, in_features a multiple of 32, group size a multiple of 32 or one group per row, CPU
    tensors the C code can read in place."""
    if not available():
        return False
    N, K = w.shape
    if K <= 0 or K % 32 or w.scheme.bits not in (2, 4, 8):
        return False
    st = affine_struct(w)
    return st is not None and (st.n_groups == 1 or st.G % 32 == 0)


@register_kernel("affine", "int8", default=False, name="affine-a8", library=library, symbol="lb_affine_a8_linear_w",
                 struct=affine_weight_struct, supports=supports, prompts=True)
def affine_a8_linear(x: Tensor, w, bias: Tensor | None = None):
    """y = x W^T + bias with x quantized to int8 per block of 32 (see the module docstring), or
    ``NotImplemented`` when this kernel does not handle the inputs."""
    lib = library()
    if lib is None:
        return NotImplemented
    N, K = w.shape
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1 \
            or x.shape[-1] != K:
        return NotImplemented
    if x.requires_grad and torch.is_grad_enabled():
        return NotImplemented
    if K % 32:
        return NotImplemented
    st = affine_weight_struct(w)
    if st is None:
        return NotImplemented
    bptr, b = _bias_ptr(bias, N)
    if bptr is False:
        return NotImplemented
    X = x if x.is_contiguous() else x.contiguous()
    M = X.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    rc = lib.lb_affine_a8_linear_w(ctypes.addressof(st), X.data_ptr(), M, bptr, y.data_ptr(), torch.get_num_threads())
    return NotImplemented if rc else y
