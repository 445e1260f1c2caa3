"""Affine packed weights times int8-quantized activations (W4A8 / W8A8 / W2A8) on the CPU.

``csrc/affine_a8.c`` quantizes the float32 activation rows to int8 per block of 32 columns
(symmetric, absmax / 127, round half to even) and multiplies the integer weight codes with the
integer activation codes (AVX-512 VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``/``vpmaddwd``, or
portable C), applying the weight scale and zero-point per group and the activation scale per
block. The result is *not* the float-activation product of ``lowbit.kernels.cpu`` (the
activation rounding changes the numerics, ~0.3% relative error on random data), so this module
registers no kernel: callers opt in with :func:`affine_a8_linear`, or take the C function
pointer (:func:`function_address`) and a weight's C struct (:func:`weight_struct`) for a decode
loop written in C.

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

C ABI (for callers holding the pointer): ``int lb_affine_a8_linear_w(const lb_affine_weight* w,
const float* x, int64_t M, const float* bias, float* y, int nthreads)`` with ``lb_affine_weight``
laid out as in csrc/cpu_linear.c (the struct :func:`weight_struct` returns); 0 = done, positive =
not supported (compute another way). It parallelises over output rows with OpenMP (calls with
under 48 KiB of weights run on one thread) and keeps its scratch per thread (grow-only).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels import _native
from lowbit.kernels.cpu import _AffineWeightC, _bias_ptr, _cached_weight, affine_params

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512vnni"}
_ISA_LEVELS = {v: k for k, v in ISA_NAMES.items()}
_vp, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_state: dict = {}


def library():
    """The loaded ``_c_affine_a8`` library with signatures set, or None (not built, or
    ``LOWBIT_NATIVE=0``)."""
    if not _native.enabled():
        return None
    lib = _state.get("lib", False)
    if lib is False:
        lib = _native.load("affine_a8")
        if lib is not None:
            for name, args, res in (("lb_affine_a8_linear_w", [_vp, _vp, _i64, _vp, _vp, _i32], _i32),
                                    ("lb_a8_quantize", [_vp, _i64, _i64, _vp, _vp], _i32),
                                    ("lb_a8_isa", [], _i32), ("lb_a8_isa_max", [], _i32),
                                    ("lb_a8_set_isa", [_i32], _i32),
                                    ("lb_a8_set_min_parallel_bytes", [_i64], None)):
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = res
        _state["lib"] = lib
    return lib


def available() -> bool:
    return library() is not None


def isa() -> str:
    """The path in use: "avx512vnni", "avx2", "scalar" (or "none" without the library)."""
    lib = library()
    return "none" if lib is None else ISA_NAMES[lib.lb_a8_isa()]


def isa_max() -> str:
    lib = library()
    return "none" if lib is None else ISA_NAMES[lib.lb_a8_isa_max()]


def set_isa(name: str | None) -> str:
    """Use at most path ``name`` ("scalar", "avx2", "avx512vnni"; None: the best the CPU has);
    returns the one now in use."""
    lib = library()
    if lib is None:
        return "none"
    return ISA_NAMES[lib.lb_a8_set_isa(-1 if name is None else _ISA_LEVELS[name])]


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
    if lib.lb_a8_quantize(X.data_ptr(), M, K, q.data_ptr(), sx.data_ptr()):
        raise LowbitError(f"in_features must be a positive multiple of 32, got {K}")
    return q, sx


def weight_struct(w):
    """(ctypes struct, address) of the cached C view of AffineWeight ``w`` (the same struct the
    float-activation kernels use), or (None, None) when its tensors cannot be read in place.
    The struct stays valid while ``w``'s tensors live; keep the returned object referenced."""
    p, st = _cached_weight(w, affine_params, w.scheme)
    if p is None:
        return None, None
    if st is None:  # qweight cannot be weakly referenced: a private struct
        st = _struct_from_params(w, p)
    return st, ctypes.addressof(st)


def _struct_from_params(w, p):
    return _AffineWeightC(qw=p[0], row_bytes=p[1], bits=p[2], scales=p[3], scales_f16=p[4], s_stride=p[5], G=p[6],
                          n_groups=p[7], qz=p[8], qz_stride=p[9], fz=p[10], fz_f16=p[11], zconst=p[12],
                          K=w.shape[1], N=w.shape[0])


def supports(w) -> bool:
    """Whether the kernel handles AffineWeight ``w`` (so a caller holding the C pointer can decide
    once, when it builds its plan, instead of checking the return code on every call): bits
    2/4/8, in_features a multiple of 32, group size a multiple of 32 or one group per row, CPU
    tensors the C code can read in place."""
    if not available() or getattr(type(w), "name", None) != "affine":
        return False
    N, K = w.shape
    if K <= 0 or K % 32 or w.scheme.bits not in (2, 4, 8):
        return False
    p = affine_params(w)
    if p is None:
        return False
    G, n_groups = p[6], p[7]
    return n_groups == 1 or G % 32 == 0


def function_address() -> int | None:
    """Address of ``lb_affine_a8_linear_w`` (for a C caller), or None without the library."""
    lib = library()
    return None if lib is None else ctypes.cast(lib.lb_affine_a8_linear_w, ctypes.c_void_p).value


def affine_a8_linear(x: Tensor, w, bias: Tensor | None = None):
    """y = x W^T + bias with x quantized to int8 per block of 32 (see the module docstring), or
    ``NotImplemented`` when this kernel does not handle the inputs."""
    lib = library()
    if lib is None or getattr(type(w), "name", None) != "affine":
        return NotImplemented
    N, K = w.shape
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 1 \
            or x.shape[-1] != K:
        return NotImplemented
    if x.requires_grad and torch.is_grad_enabled():
        return NotImplemented
    if K % 32:
        return NotImplemented
    st, addr = weight_struct(w)
    if st is None:
        return NotImplemented
    bptr, b = _bias_ptr(bias, N)
    if bptr is False:
        return NotImplemented
    X = x if x.is_contiguous() else x.contiguous()
    M = X.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    rc = lib.lb_affine_a8_linear_w(addr, X.data_ptr(), M, bptr, y.data_ptr(), torch.get_num_threads())
    return NotImplemented if rc else y
