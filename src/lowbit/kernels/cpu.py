"""Fast CPU kernels for packed weights with float32 activations: affine (2- to 8-bit, grouped or
per-channel, symmetric or with integer / float zero-points), NF4 and ternary.

Why plain C + OpenMP loaded with ctypes (``csrc/cpu_linear.c``):

* The work is a weight-streaming GEMV: at batch 1 every packed byte is read once, so the kernel
  must unpack in registers and never materialise a float copy of the weight. Nothing in torch
  does that for these layouts with fp32 activations (torch's int4 CPU kernel runs at 0.04x fp32
  here), and a torch.compile'd "unpack then matmul" still writes the float weight.
* Plain C needs only a C compiler at install (no torch headers, no Python C API, no build-time
  torch), runs under any torch version, and dispatches on the CPU at run time (AVX-512 /
  AVX2+FMA+F16C / portable C) with per-function target attributes, so one build fits every x86-64
  CPU. numba would add a core dependency and a JIT warm-up per process.
* The cost of crossing into C through ctypes is small next to the kernels. Measured here
  (`bench/kernels.py` prints it): a C function that does nothing costs ~1.9 us when called
  with the kernel's 20 scalar arguments and ~0.7 us with the weight's fields in a C struct
  built once per weight and cached (what the kernels do); the whole Python kernel function on a
  tiny layer costs ~6 us, against ~3.7 us for torch's own nn.Linear of the same size and
  10-60 us for a SmolLM2 layer's kernel at batch 1. (torch.compile and numba were not tried:
  the first writes the float weight, the second would be a new core dependency.)
* OpenMP shares torch's runtime (torch ships ``libgomp.so.1``, which the dynamic linker reuses
  for this library), so the kernels use torch's thread pool: no second set of spinning threads.
  The thread count follows ``torch.get_num_threads()``; calls with under 48 KiB of weights run on
  one thread (a parallel region costs a few microseconds to start; the threshold is not tuned).

Dispatch: batch rows <= ``FUSED_MAX_ROWS`` run the fused kernel (each block of codes unpacked
once in registers and multiplied with up to 8 activation rows, two weight rows at a time).
Larger batches (long prefills) dequantize the whole weight once in C and call the float GEMM,
whose blocking wins once the product is compute bound. Measured (one thread, int4 g128,
1536 x 576; `bench/kernels.py --crossover` prints the table): on an AVX-512 Xeon fused 0.87 ms
vs dequantize + GEMM 1.03 ms at 32 rows, 1.73 vs 1.42 ms at 64, 3.43 vs 2.14 ms at 128; on an
AVX2-only EPYC (half the float GEMM throughput) the two met near 512 rows. The switch stays at
256 nevertheless: it also decides the rounding of every calibration forward through quantized
layers (GPTQ, AWQ, SparseGPT feed each block the previous quantized block's outputs), and moving
it changes their checkpoints' bytes (tests/test_golden.py). With int8 activations
(`lowbit.kernels.a8`) prompts run that kernel's own int8 GEMM instead.

Every function returns ``NotImplemented`` for what it does not handle, and the reference path
(`lowbit.kernels.reference.linear`) runs then: non-CPU tensors, activations that are not
float32, autograd through x, NF4 rows that straddle blocks
(in_features odd or not a multiple of the block size), a missing native library, or
``LOWBIT_NATIVE=0``.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels import _native, register_kernel

FUSED_MAX_ROWS = 256  # batch rows up to which the fused kernel runs (above: dequantize + GEMM)

_vp, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class AffineWeightC(ctypes.Structure):
    """Mirror of ``lb_affine_weight`` in csrc/lb_common.h: the C view of an affine (or ternary)
    weight that the ``*_linear_w`` entry points read."""
    _fields_ = [("qw", _vp), ("scales", _vp), ("qz", _vp), ("fz", _vp),
                ("K", _i64), ("N", _i64), ("row_bytes", _i64), ("s_stride", _i64), ("G", _i64),
                ("n_groups", _i64), ("qz_stride", _i64),
                ("bits", ctypes.c_int32), ("scales_f16", ctypes.c_int32), ("fz_f16", ctypes.c_int32),
                ("zconst", _f32)]


class NF4WeightC(ctypes.Structure):
    """Mirror of ``lb_nf4_weight`` in csrc/cpu_linear.c: the C view of an NF4 weight."""
    _fields_ = [("qw", _vp), ("absmax", _vp), ("nested", _vp), ("dyn", _vp), ("lut", _vp),
                ("K", _i64), ("N", _i64), ("dqbs", _i64), ("bs", _i64), ("absmax_u8", ctypes.c_int32),
                ("offset", _f32)]


_W_ENTRY = [_vp, _vp, _i64, _vp, _vp, _i32]  # (weight struct, x, rows, bias, y, threads): every *_linear_w
_FUNCTIONS = {
    "lb_affine_linear_w": (_W_ENTRY, _i32),
    "lb_noop_w": (_W_ENTRY, _i32),
    "lb_affine_dequant_w": ([_vp, _vp, _i32], _i32),
    "lb_noop": ([_vp, _i64, _i64, _i64, _vp, _i64, _i32, _vp, _i32, _i64, _i64, _i64, _vp, _i64, _vp, _i32, _f32,
                 _vp, _vp, _i32], _i32),
    "lb_nf4_linear_w": (_W_ENTRY, _i32),
    "lb_nf4_linear": ([_vp, _i64, _i64, _i64, _vp, _vp, _i32, _vp, _i64, _f32, _i64, _vp, _vp, _vp, _vp, _i32], _i32),
    "lb_cpu_linear_set_min_parallel_bytes": ([_i64], None),
}


def library():
    """The loaded ``_c_cpu_linear`` `lowbit.kernels._native.NativeLibrary`, or None (not built,
    or ``LOWBIT_NATIVE=0``)."""
    return _native.library("cpu_linear", _FUNCTIONS)


def available() -> bool:
    return library() is not None


def _prepare_x(x: Tensor, in_f: int):
    """x as a contiguous float32 [M, in] CPU tensor, or None when the fast path does not apply."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != in_f:
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None
    X = x.reshape(-1, in_f)
    return X if X.is_contiguous() else X.contiguous()


def _bias_ptr(bias: Tensor | None, out_f: int):
    """(pointer, keep-alive tensor) for a float32 CPU bias, (None, None) without one, or False when
    the bias is unusable by the fast path."""
    if bias is None:
        return None, None
    if bias.device.type != "cpu" or bias.numel() != out_f:
        return False, None
    b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.float().contiguous()
    return b.data_ptr(), b


def _cpu_tensors(*ts) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in ts)


# -- affine ------------------------------------------------------------------------------------
def affine_struct(w) -> AffineWeightC | None:
    """The C view of an AffineWeight, or None when the C code cannot read it in place (bit
    widths outside 2..8, tensors off the CPU or not contiguous, other scale dtypes)."""
    sch = w.scheme
    if not 2 <= sch.bits <= 8:
        return None
    N, K = w.shape
    scales, qz, fz = w.scales, w.qzeros, w.zeros
    if not _cpu_tensors(w.qweight, scales, qz, fz):
        return None
    if scales.dtype not in (torch.float16, torch.float32) or (fz is not None and fz.dtype not in (torch.float16, torch.float32)):
        return None
    gran = sch.granularity
    if gran == "group":
        G = sch.group_size
        n_groups = -(-K // G)
        s_stride = n_groups
    else:
        G, n_groups = K, 1
        s_stride = 0 if gran == "tensor" else 1
    return AffineWeightC(qw=w.qweight.data_ptr(), row_bytes=w.qweight.shape[-1], bits=sch.bits,
                         scales=scales.data_ptr(), scales_f16=int(scales.dtype == torch.float16), s_stride=s_stride,
                         G=G, n_groups=n_groups, qz=None if qz is None else qz.data_ptr(),
                         qz_stride=0 if qz is None or gran == "tensor" else qz.shape[-1],
                         fz=None if fz is None else fz.data_ptr(),
                         fz_f16=int(fz is not None and fz.dtype == torch.float16), zconst=float(sch.code_offset),
                         K=K, N=N)


def affine_weight_struct(w) -> AffineWeightC | None:
    """`affine_struct`, built once per stored tensors (`lowbit.kernels._native.cached_struct`)."""
    return _native.cached_struct(w, affine_struct, w.scheme)


def _affine_dequant(lib, w, st) -> Tensor:
    N, K = w.shape
    W = torch.empty(N, K, dtype=torch.float32)
    rc = lib.lb_affine_dequant_w(ctypes.addressof(st), W.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"lb_affine_dequant_w failed ({rc})")
    return W


def _run_affine(lib, x: Tensor, w, bias, st):
    N, K = w.shape
    if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != K:
        return NotImplemented
    if x.requires_grad and torch.is_grad_enabled():
        return NotImplemented
    if st is None:
        return NotImplemented
    if not x.is_contiguous():
        x = x.contiguous()
    bptr, b = _bias_ptr(bias, N)
    if bptr is False:
        return NotImplemented
    M = x.numel() // K if K else 0
    if M > FUSED_MAX_ROWS:
        return F.linear(x, _affine_dequant(lib, w, st), b)
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    rc = lib.lb_affine_linear_w(ctypes.addressof(st), x.data_ptr(), M, bptr, y.data_ptr(), torch.get_num_threads())
    return NotImplemented if rc else y


@register_kernel("affine", library=library, symbol="lb_affine_linear_w", struct=affine_weight_struct)
def affine_linear(x: Tensor, w, bias: Tensor | None = None):
    lib = library()
    if lib is None:
        return NotImplemented
    return _run_affine(lib, x, w, bias, affine_weight_struct(w))


# -- ternary -----------------------------------------------------------------------------------
def ternary_struct(w) -> AffineWeightC | None:
    """A TernaryWeight as an affine weight for the C functions: 2-bit codes u = t + 1, zero-point
    1, one fp32 scale per row (or one for the tensor), no groups."""
    if not _cpu_tensors(w.qweight, w.scales) or w.scales.dtype != torch.float32:
        return None
    N, K = w.shape
    return AffineWeightC(qw=w.qweight.data_ptr(), row_bytes=w.qweight.shape[-1], bits=2, scales=w.scales.data_ptr(),
                         scales_f16=0, s_stride=1 if w.granularity == "channel" else 0, G=K, n_groups=1, qz=None,
                         qz_stride=0, fz=None, fz_f16=0, zconst=1.0, K=K, N=N)


def ternary_weight_struct(w) -> AffineWeightC | None:
    return _native.cached_struct(w, ternary_struct, w.granularity)


@register_kernel("ternary", library=library, symbol="lb_affine_linear_w", struct=ternary_weight_struct)
def ternary_linear(x: Tensor, w, bias: Tensor | None = None):
    lib = library()
    if lib is None:
        return NotImplemented
    return _run_affine(lib, x, w, bias, ternary_weight_struct(w))


# -- NF4 ---------------------------------------------------------------------------------------
_NF4_CONST: dict = {}


def _nf4_constants():
    if not _NF4_CONST:
        from lowbit.formats.nf4 import DYNAMIC_MAP_8BIT, NF4_CODEBOOK

        _NF4_CONST["lut"] = NF4_CODEBOOK.float().contiguous()
        _NF4_CONST["dyn"] = DYNAMIC_MAP_8BIT.float().contiguous()
    return _NF4_CONST["lut"], _NF4_CONST["dyn"]


def nf4_struct(w) -> NF4WeightC | None:
    """The C view of an NF4Weight, or None when the C code cannot read it in place (rows that
    straddle blocks: in_features odd or not a multiple of the block size; tensors off the CPU or
    not contiguous; other absmax dtypes)."""
    if len(w.shape) != 2:
        return None
    N, K = w.shape
    if K % 2 or K % w.blocksize or not _cpu_tensors(w.qweight, w.absmax, w.nested_absmax, w.offset):
        return None
    lut, dyn = _nf4_constants()
    dq = w.dq_blocksize is not None
    if dq:
        if w.absmax.dtype != torch.uint8 or w.nested_absmax.dtype != torch.float32:
            return None
        nested, off = w.nested_absmax.data_ptr(), float(w.offset)
    else:
        if w.absmax.dtype != torch.float32:
            return None
        nested, off = None, 0.0
    return NF4WeightC(qw=w.qweight.data_ptr(), absmax=w.absmax.data_ptr(), nested=nested, dyn=dyn.data_ptr(),
                      lut=lut.data_ptr(), K=K, N=N, dqbs=w.dq_blocksize or 0, bs=w.blocksize, absmax_u8=int(dq),
                      offset=off)


def nf4_weight_struct(w) -> NF4WeightC | None:
    """`nf4_struct`, built once per stored tensors."""
    return _native.cached_struct(w, nf4_struct, None)


@register_kernel("nf4", library=library, symbol="lb_nf4_linear_w", struct=nf4_weight_struct)
def nf4_linear(x: Tensor, w, bias: Tensor | None = None):
    lib = library()
    if lib is None or len(w.shape) != 2:
        return NotImplemented
    N, K = w.shape
    X = _prepare_x(x, K)
    if X is None:
        return NotImplemented
    M = X.shape[0]
    if M > FUSED_MAX_ROWS:
        return NotImplemented  # the reference (dequantize + GEMM) is the right tool for prefill
    st = nf4_weight_struct(w)
    if st is None:
        return NotImplemented
    bptr, b = _bias_ptr(bias, N)
    if bptr is False:
        return NotImplemented
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    rc = lib.lb_nf4_linear_w(ctypes.addressof(st), X.data_ptr(), M, bptr, y.data_ptr(), torch.get_num_threads())
    return NotImplemented if rc else y
