"""Dynamic-range int8 matmul: y = x Wᵀ + b with int8 × int8 → int32 products.

For X [M, K] (the input's token rows) and a `DynamicInt8Weight` (codes q_w, scales s_w per
output row):

    amax[m] = max_k |X[m, k]|            per token  (activations="token", the default)
    amax[m] = max_{m,k} |X[m, k]|        per tensor (activations="tensor")
    q_x     = round(X · (127 / amax))   ∈ [-127, 127]   (round half to even; amax 0 -> codes 0)
    s_x     = amax / 127
    acc     = q_x · q_wᵀ                 exact integer sums (int32)
    Y       = (float(acc) · s_x[m]) · s_w[n]  (+ b[n])  float32, in this order

Two implementations of the same arithmetic:

* the reference (plain torch, any device): q_x from `absmax_quantize_rows` (LLM.int8()'s
  vector-wise rule) and acc from `lowbit.kernels.int8.exact_int_matmul` — the int8 codes are
  multiplied with the fp32 GEMM in chunks small enough that every partial sum is an exact integer,
  so acc is the exact integer sum rounded once to float32, i.e. float(int32 acc);
* the native kernel (``csrc/int8_gemm.c``, OpenMP; AVX-512 VNNI where the CPU has it, else AVX2,
  else scalar C, chosen at run time; ``native_lib().isa_capped(...)`` lowers it): quantizes the
  activations, multiplies in int8 → int32 (vpdpbusd, or the AVX2 maddubs/madd sign trick) and
  rescales, in one fused call.

They agree bit for bit (tests check the int32 accumulators and the float outputs). The native
kernel runs for float32 CPU inputs when the library is built and ``LOWBIT_NATIVE`` is not 0.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.dynamic_int8 import DynamicInt8Weight, check_activations
from lowbit.formats.int8 import Q_MAX, absmax_quantize_rows
from lowbit.kernels import _native, register_kernel
from lowbit.kernels.int8 import exact_int_matmul

MAX_K = 133000  # 127² · K < 2³¹: the int32 accumulator cannot overflow
_ERRORS = {1: "input activations contain NaN/Inf; cannot choose an int8 scale",
           2: f"more than {MAX_K} input features overflow the int32 accumulator",
           3: "out of memory in the int8 kernel",
           4: "int8 operand holds -128, outside the symmetric range [-127, 127]"}
_i64, _vp, _ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_FUNCTIONS = {"lb_int8_quantize": ([_vp, _i64, _i64, _ci, _vp, _vp, _ci], _ci),
              "lb_int8_gemm": ([_vp, _vp, _i64, _i64, _i64, _vp, _ci], _ci),
              "lb_int8_dynamic_linear": ([_vp, _i64, _i64, _vp, _vp, _vp, _i64, _ci, _vp, _ci], _ci)}


def native_lib():
    """The loaded ``_c_int8_gemm`` `lowbit.kernels._native.NativeLibrary`, or None (not built, or
    LOWBIT_NATIVE=0). Its paths: "scalar", "avx2", "avx512vnni" (`NativeLibrary.set_isa`)."""
    return _native.library("int8_gemm", _FUNCTIONS)


def _check(rc: int) -> None:
    if rc:
        raise LowbitError(_ERRORS.get(rc, f"int8 kernel failed (code {rc})"))


# -- reference (plain torch) -------------------------------------------------------------------
def quantize_activations(X: Tensor, activations: str = "token") -> tuple[Tensor, Tensor]:
    """(q_x as float32 holding integers in [-127, 127], s_x = amax / 127 float32 [M])."""
    check_activations(activations)
    X = X.float()
    if not torch.isfinite(X).all():
        raise LowbitError(_ERRORS[1])
    if activations == "token":
        q, amax = absmax_quantize_rows(X)
    else:
        a = X.abs().amax() if X.numel() else X.new_zeros(())
        q = torch.round(X * (torch.full_like(a, Q_MAX) / torch.where(a > 0, a, torch.ones_like(a))))
        amax = a.expand(X.shape[0])
    return q, amax / Q_MAX


def reference_linear(X: Tensor, w: DynamicInt8Weight, bias: Tensor | None = None) -> Tensor:
    """Y [M, N] float32 for X [M, K], plain torch (exact integer accumulation)."""
    q, sx = quantize_activations(X, w.activations)
    acc = exact_int_matmul(q, w.qweight.float())  # float(int32 acc), exact sums rounded once
    y = acc.mul_(sx.unsqueeze(1)).mul_(w.wscale.float().unsqueeze(0))
    return y if bias is None else y + bias.float()


# -- native ---------------------------------------------------------------------------------------
def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def native_quantize(X: Tensor, activations: str = "token") -> tuple[Tensor, Tensor]:
    """The C activation quantizer: (q_x int8 [M, K], s_x float32 [M])."""
    lib = native_lib()
    if lib is None:
        raise LowbitError("the native int8 kernel is not available")
    X = X.detach().float().contiguous()
    M, K = X.shape
    q = torch.empty(M, K, dtype=torch.int8)
    s = torch.empty(M, dtype=torch.float32)
    _check(lib.lb_int8_quantize(_ptr(X), M, K, int(check_activations(activations) == "tensor"), _ptr(q), _ptr(s),
                                torch.get_num_threads()))
    return q, s


def native_gemm(A: Tensor, B: Tensor) -> Tensor:
    """C = A · Bᵀ in int32 for int8 A [M, K], B [N, K] (codes in [-127, 127])."""
    lib = native_lib()
    if lib is None:
        raise LowbitError("the native int8 kernel is not available")
    if A.dtype != torch.int8 or B.dtype != torch.int8 or A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise LowbitError(f"expected int8 [M, K] and [N, K], got {A.dtype}{tuple(A.shape)} "
                          f"and {B.dtype}{tuple(B.shape)}")
    A, B = A.contiguous(), B.contiguous()
    C = torch.empty(A.shape[0], B.shape[0], dtype=torch.int32)
    _check(lib.lb_int8_gemm(_ptr(A), _ptr(B), A.shape[0], B.shape[0], A.shape[1], _ptr(C), torch.get_num_threads()))
    return C


def native_linear(X: Tensor, w: DynamicInt8Weight, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Y [M, N] float32 for float32 CPU X [M, K], one fused C call. ``out``, if given, is written."""
    lib = native_lib()
    if lib is None:
        raise LowbitError("the native int8 kernel is not available")
    M, K = X.shape
    N = w.shape[0]
    X = X.contiguous()
    qw, ws = w.qweight.contiguous(), w.wscale.contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    Y = torch.empty(M, N, dtype=torch.float32) if out is None else out
    _check(lib.lb_int8_dynamic_linear(_ptr(X), M, K, _ptr(qw), _ptr(ws), _ptr(b), N, int(w.activations == "tensor"),
                                      _ptr(Y), torch.get_num_threads()))
    return Y


@register_kernel("dynamic-int8", "int8", "any")
def linear(x: Tensor, w: DynamicInt8Weight, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b for x [..., in]; activation scales per token row of x (or per tensor)."""
    out_f, in_f = w.shape
    if x.shape[-1] != in_f:
        raise LowbitError(f"input has {x.shape[-1]} features, the int8 layer expects {in_f}")
    if in_f > MAX_K:
        raise LowbitError(_ERRORS[2])
    lead = x.shape[:-1]
    X = x.detach().reshape(-1, in_f)
    M = X.shape[0]
    if M == 0:
        return x.new_zeros(*lead, out_f)
    lib = native_lib()
    if (lib is not None and X.dtype == torch.float32 and X.device.type == "cpu" and w.qweight.device.type == "cpu"
            and w.wscale.dtype == torch.float32 and (bias is None or bias.device.type == "cpu")):
        # the fused C call (quantize, int8 GEMM, rescale), inlined here: this runs per layer per token
        X = X if X.is_contiguous() else X.contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        qw, ws = w.qweight.contiguous(), w.wscale.contiguous()  # kept alive across the call
        y = torch.empty(M, out_f, dtype=torch.float32)
        _check(lib.lb_int8_dynamic_linear(X.data_ptr(), M, in_f, qw.data_ptr(), ws.data_ptr(),
                                          None if b is None else b.data_ptr(), out_f,
                                          int(w.activations == "tensor"), y.data_ptr(), torch.get_num_threads()))
    else:
        y = reference_linear(X, w, bias)
    return y.reshape(*lead, out_f).to(x.dtype)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d(x: Tensor, w: DynamicInt8Weight, bias: Tensor | None, kernel_size, stride=1, padding=0,
           dilation=1) -> Tensor:
    """Dynamic int8 Conv2d (groups=1, zero padding) as im2col + the same int8 matmul: each output
    pixel's receptive field [C_in·kh·kw] is one activation row, so per-token scales are per pixel
    (per-tensor: one scale for the whole input). ``w`` is the conv weight flattened to
    [C_out, C_in·kh·kw] (PyTorch's order: channel, then kernel row, then kernel column)."""
    if x.dim() != 4:
        raise LowbitError(f"conv2d expects input [N, C, H, W], got shape {tuple(x.shape)}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    if x.shape[1] * kh * kw != w.shape[1]:
        raise LowbitError(f"input has {x.shape[1]} channels, the int8 conv expects {w.shape[1] // (kh * kw)}")
    n, _, h, wd = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise LowbitError(f"input {h}×{wd} is smaller than the {kh}×{kw} kernel (padding {ph}, {pw})")
    cols = F.unfold(x.detach().float(), (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # [N, CKK, L]
    y = linear(cols.transpose(1, 2), w, bias)  # [N, L, C_out]
    return y.transpose(1, 2).reshape(n, w.shape[0], oh, ow).to(x.dtype)
