"""BitNet's product (`lowbit.formats.bitnet`): norm, 8-bit absmax activations per token, an integer
product with ternary or binary weight codes, one rescale.

Two rows of the kernel table compute it:

* ("bitnet", "int8", "any"), the reference: the format's own arithmetic in plain torch
  (`BitNetWeight.forward_reference`), on any device;
* ("bitnet", "int8", "cpu"), the native kernel (``csrc/bitnet.c``), for float32 CPU inputs. One C
  call per layer does the whole product: per token the optional RMSNorm, γ, the int8 codes
  (round half to even, as torch.round), then the integer product with the packed codes, and the
  rescale ``float(acc) · ((β·γ) / 127)`` (+ bias). The weight loop has no float arithmetic: the
  stored codes u (2 bits: u = W~ + 1; 1 bit: u = (W~ + 1) / 2) are multiplied as unsigned bytes
  with the int8 activations (AVX-512 VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``/``vpmaddwd``, or
  portable C, chosen at run time; ``library().isa_capped(...)`` lowers it) and the activation sum
  Q = Σ x~ is subtracted once per output (ternary Σ(u−1)x~ = Σux~ − Q, binary Σ(2u−1)x~ =
  2Σux~ − Q). Codes are never unpacked into column order: each token's int8 codes are permuted
  once into the order in which a shifted and masked vector of weight bytes yields its codes, so
  the inner loop is load, shift, mask, dot.

Without the norm the native kernel's output equals the reference bit for bit (every float step is
one float32 operation in the reference's order, and the integer sums are exact). With the norm it
adds the squares in the order torch's CPU sum kernel does, which matches torch in practice, but
that order is torch's internal choice, so the two are held to a tight tolerance there.

The native row's C entry (``lb_bitnet_linear_w``, the ``*_linear_w`` signature of
`lowbit.kernels`) and its weight struct (`bitnet_weight_struct`) let the C decode step
(`lowbit.runtime.native`) run BitNet layers directly. When the native kernel cannot take an input
(not float32, not on the CPU, autograd through x, the library not built, ``LOWBIT_NATIVE=0``) the
native row runs the reference itself: the table's generic fallback (dequantize, then a float
matmul) is not BitNet's product.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.bitnet import BitNetWeight, code_bits
from lowbit.kernels import _native, register_kernel

_vp, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_FUNCTIONS = {"lb_bitnet_linear_w": ([_vp, _vp, _i64, _vp, _vp, ctypes.c_int], ctypes.c_int),
              "lb_bitnet_int_product": ([_vp, _vp, _i64, _vp, ctypes.c_int], ctypes.c_int),
              "lb_bitnet_quantize": ([_vp, _vp, _i64, _vp, _vp], ctypes.c_int),
              "lb_bitnet_set_min_parallel_bytes": ([_i64], None)}
_ERRORS = {2: "bad arguments or out of memory in the bitnet kernel", 3: "bitnet codes must be 1 or 2 bits"}


class BitNetWeightC(ctypes.Structure):
    """Mirror of ``lb_bitnet_weight`` in csrc/bitnet.c: the C view of a `BitNetWeight`."""
    _fields_ = [("qw", _vp), ("scale", _vp), ("norm_weight", _vp), ("K", _i64), ("N", _i64), ("row_bytes", _i64),
                ("bits", _i32), ("norm", _i32), ("norm_eps", _f32)]


def library():
    """The loaded ``_c_bitnet`` `lowbit.kernels._native.NativeLibrary`, or None (not built, or
    ``LOWBIT_NATIVE=0``). Its paths: "scalar", "avx2", "avx512vnni" (`NativeLibrary.set_isa`)."""
    return _native.library("bitnet", _FUNCTIONS)


def available() -> bool:
    return library() is not None


def bitnet_struct(w: BitNetWeight) -> BitNetWeightC | None:
    """The C view of a BitNetWeight, or None when the C code cannot read it in place (tensors off
    the CPU, not contiguous, or of other dtypes)."""
    q, s, g = w.qweight, w.scale, w.norm_weight
    if any(t is not None and (t.device.type != "cpu" or not t.is_contiguous()) for t in (q, s, g)):
        return None
    if q.dtype != torch.uint8 or s.dtype != torch.float32 or (g is not None and g.dtype != torch.float32):
        return None
    N, K = w.shape
    return BitNetWeightC(qw=q.data_ptr(), scale=s.data_ptr(), norm_weight=None if g is None else g.data_ptr(),
                         K=K, N=N, row_bytes=q.shape[-1], bits=code_bits(w.bits), norm=int(bool(w.norm)),
                         norm_eps=float(w.norm_eps))


def bitnet_weight_struct(w: BitNetWeight) -> BitNetWeightC | None:
    """`bitnet_struct`, built once per stored tensors (`lowbit.kernels._native.cached_struct`)."""
    return _native.cached_struct(w, bitnet_struct, (w.bits, w.norm, w.norm_eps))


def _check(rc: int) -> None:
    if rc:
        raise LowbitError(_ERRORS.get(rc, f"bitnet kernel failed (code {rc})"))


def _struct_or_raise(w: BitNetWeight):
    lib = library()
    if lib is None:
        raise LowbitError("the bitnet native library is not built (no C compiler at install?)")
    st = bitnet_weight_struct(w)
    if st is None:
        raise LowbitError("the bitnet kernel cannot read this weight in place (CPU, contiguous tensors only)")
    return lib, st


def native_int_product(q: Tensor, w: BitNetWeight) -> Tensor:
    """W~ q as int32 [M, N] for int8 activation codes q [M, K], computed by the C kernel on its
    current path (for tests: the integer product alone, without quantization or rescale)."""
    lib, st = _struct_or_raise(w)
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] != w.shape[1]:
        raise LowbitError(f"expected int8 codes [M, {w.shape[1]}], got {q.dtype}{tuple(q.shape)}")
    q = q.contiguous()
    acc = torch.empty(q.shape[0], w.shape[0], dtype=torch.int32)
    _check(lib.lb_bitnet_int_product(ctypes.addressof(st), q.data_ptr(), q.shape[0], acc.data_ptr(),
                                     torch.get_num_threads()))
    return acc


def native_quantize(x: Tensor, w: BitNetWeight) -> tuple[Tensor, Tensor]:
    """The C kernel's activation codes (int8 [M, K]) and γ (float32 [M]) for float32 x [M, K],
    after w's norm when it has one (γ is NaN for a token holding a NaN or an infinity)."""
    lib, st = _struct_or_raise(w)
    X = x.detach().to(torch.float32).reshape(-1, w.shape[1]).contiguous()
    q = torch.empty(X.shape[0], w.shape[1], dtype=torch.int8)
    g = torch.empty(X.shape[0], dtype=torch.float32)
    _check(lib.lb_bitnet_quantize(ctypes.addressof(st), X.data_ptr(), X.shape[0], q.data_ptr(), g.data_ptr()))
    return q, g


@register_kernel("bitnet", "int8", "any")
def linear(x: Tensor, w: BitNetWeight, bias: Tensor | None = None) -> Tensor:
    """y = BitNet's product of x [..., in] (the format's docstring)."""
    return w.forward_reference(x, bias)


def _native_linear(x: Tensor, w: BitNetWeight, bias: Tensor | None):
    """The C kernel's y, or None when it does not take these inputs."""
    lib = library()
    N, K = w.shape
    if lib is None or not isinstance(x, Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" \
            or x.dim() < 1 or x.shape[-1] != K or (x.requires_grad and torch.is_grad_enabled()):
        return None
    b = None
    if bias is not None:
        if bias.device.type != "cpu" or bias.numel() != N or (bias.requires_grad and torch.is_grad_enabled()):
            return None
        b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.detach().float().contiguous()
    st = bitnet_weight_struct(w)
    if st is None:
        return None
    X = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    rc = lib.lb_bitnet_linear_w(ctypes.addressof(st), X.data_ptr(), X.numel() // K, None if b is None else b.data_ptr(),
                                y.data_ptr(), torch.get_num_threads())
    return None if rc else y


@register_kernel("bitnet", "int8", "cpu", library=library, symbol="lb_bitnet_linear_w", struct=bitnet_weight_struct)
def native_linear(x: Tensor, w: BitNetWeight, bias: Tensor | None = None) -> Tensor:
    """y = BitNet's product of x [..., in] by the C kernel; the reference where it does not apply."""
    y = _native_linear(x, w, bias)
    return linear(x, w, bias) if y is None else y
