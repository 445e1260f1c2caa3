"""Kernels for the sparse weight formats: y = x Wᵀ + b with W stored N:M-compressed or as CSR.

* ``nm_linear`` / ``csr_linear`` (registered for "sparse-nm" / "sparse-csr") call the native C
  library built from ``csrc/sparse.c`` (OpenMP over output rows, AVX2+FMA chosen at run time,
  scalar otherwise). They handle float32 CPU inputs; anything else (another device or dtype, or a
  build without the library, or ``LOWBIT_NATIVE=0``) returns NotImplemented and the reference runs.
* ``reference_linear``: the plain-torch twin the tests hold them to — scatter the stored entries
  into a dense matrix (the format's ``dequantize``), then ``F.linear``.

Whether sparsity pays on a given CPU is measured by ``bench/sparse_kernels.py``.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.core import packing
from lowbit.errors import LowbitError
from lowbit.formats.sparse_csr import CSRWeight
from lowbit.formats.sparse_nm import SparseNMWeight, index_bits
from lowbit.kernels import _native, register_kernel

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class SparseWeightC(ctypes.Structure):
    """Mirror of ``lb_sparse_weight`` in csrc/sparse.c: the C view of an N:M or CSR weight that
    ``lb_sparse_linear_w`` (the C decode step's entry) reads."""
    _fields_ = [("vals", _P), ("codes", _P), ("col", _P), ("row_ptr", _P),
                ("in_f", _I64), ("out_f", _I64), ("code_row_bytes", _I64),
                ("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("n", ctypes.c_int32), ("m", ctypes.c_int32)]


_FUNCTIONS = {"lb_sparse_linear_w": ([_P, _P, _I64, _P, _P, _INT], _INT),
              "lb_nm_linear": ([_P, _I64, _I64, _P, _P, _I64, _INT, _INT, _INT, _I64, _P, _P, _INT], None),
              "lb_csr_linear": ([_P, _I64, _I64, _P, _P, _INT, _P, _I64, _P, _P, _INT], None)}


def native_lib():
    """The loaded ``_c_sparse`` library, or None. Its paths: "scalar", "avx2" (`NativeLibrary.set_isa`)."""
    return _native.library("sparse", _FUNCTIONS)


def native_available() -> bool:
    return native_lib() is not None


def reference_linear(x: Tensor, w, bias: Tensor | None = None) -> Tensor:
    """Plain torch: the dense matrix the format stores, then F.linear."""
    return F.linear(x, w.dequantize(dtype=x.dtype), None if bias is None else bias.to(x.dtype))


def _prepare(x: Tensor, w, bias: Tensor | None, out: Tensor | None = None):
    """(x as [B, in] contiguous float32, bias or None, output [B, out]) — or None if the native
    path does not handle these inputs. ``out``: a contiguous float32 buffer to write into.
    (Kept lean: at batch 1 a small layer's whole matmul takes tens of microseconds.)"""
    out_f, in_f = w.shape
    if x.shape[-1] != in_f:
        raise LowbitError(f"input has {x.shape[-1]} features, the sparse layer expects {in_f}")
    if x.dtype != torch.float32 or not x.is_cpu or x.requires_grad or not w.values.is_cpu:
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_cpu):
        return None
    X = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, in_f).contiguous()
    if out is None:
        y = torch.empty((X.shape[0], out_f), dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != X.shape[0] * out_f:
        raise LowbitError(f"out must be a contiguous float32 tensor of {X.shape[0] * out_f} elements")
    else:
        y = out.view(X.shape[0], out_f)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return X, bias, y


def _shaped(y: Tensor, x: Tensor, out_f: int) -> Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def nm_linear_native(x: Tensor, w: SparseNMWeight, bias: Tensor | None = None, *, threads: int | None = None,
                     out: Tensor | None = None):
    lib = native_lib()
    prep = None if lib is None else _prepare(x, w, bias, out)
    if prep is None:
        return NotImplemented
    X, b, y = prep
    out_f, in_f = w.shape
    if X.shape[0]:
        vals, codes = w.values.contiguous(), w.indices.contiguous()
        K = in_f // w.m * w.n
        lib.lb_nm_linear(X.data_ptr(), X.shape[0], in_f, vals.data_ptr(), codes.data_ptr(),
                         packing.packed_row_bytes(K, index_bits(w.m)), index_bits(w.m), w.n, w.m, out_f,
                         _ptr(b), y.data_ptr(), threads or torch.get_num_threads())
    return _shaped(y, x, out_f)


def csr_linear_native(x: Tensor, w: CSRWeight, bias: Tensor | None = None, *, threads: int | None = None,
                      out: Tensor | None = None):
    lib = native_lib()
    prep = None if lib is None else _prepare(x, w, bias, out)
    if prep is None:
        return NotImplemented
    X, b, y = prep
    out_f, in_f = w.shape
    if X.shape[0]:
        vals, cols, rp = w.values.contiguous(), w.col_idx.contiguous(), w.row_ptr.contiguous()
        lib.lb_csr_linear(X.data_ptr(), X.shape[0], in_f, vals.data_ptr(), cols.data_ptr(),
                          int(cols.dtype == torch.int32), rp.data_ptr(), out_f, _ptr(b), y.data_ptr(),
                          threads or torch.get_num_threads())
    return _shaped(y, x, out_f)


def _stored(*ts) -> bool:
    return all(t.is_cpu and t.is_contiguous() for t in ts)


def nm_struct(w: SparseNMWeight) -> SparseWeightC | None:
    """The C view of an N:M weight, or None when its tensors are not contiguous CPU tensors."""
    if not _stored(w.values, w.indices):
        return None
    out_f, in_f = w.shape
    bits = index_bits(w.m)
    return SparseWeightC(vals=w.values.data_ptr(), codes=w.indices.data_ptr(), col=None, row_ptr=None, in_f=in_f,
                         out_f=out_f, code_row_bytes=packing.packed_row_bytes(in_f // w.m * w.n, bits), kind=0,
                         bits=bits, n=w.n, m=w.m)


def csr_struct(w: CSRWeight) -> SparseWeightC | None:
    """The C view of a CSR weight, or None when its tensors are not contiguous CPU tensors."""
    if not _stored(w.values, w.col_idx, w.row_ptr):
        return None
    out_f, in_f = w.shape
    return SparseWeightC(vals=w.values.data_ptr(), codes=None, col=w.col_idx.data_ptr(), row_ptr=w.row_ptr.data_ptr(),
                         in_f=in_f, out_f=out_f, code_row_bytes=0, kind=2 if w.col_idx.dtype == torch.int32 else 1,
                         bits=0, n=0, m=0)


def nm_weight_struct(w):
    return _native.cached_struct(w, nm_struct, None)


def csr_weight_struct(w):
    return _native.cached_struct(w, csr_struct, None)


@register_kernel("sparse-nm", "float", "any", library=native_lib, symbol="lb_sparse_linear_w",
                 struct=nm_weight_struct)
def nm_linear(x: Tensor, w: SparseNMWeight, bias: Tensor | None = None):
    return nm_linear_native(x, w, bias)


@register_kernel("sparse-csr", "float", "any", library=native_lib, symbol="lb_sparse_linear_w",
                 struct=csr_weight_struct)
def csr_linear(x: Tensor, w: CSRWeight, bias: Tensor | None = None):
    return csr_linear_native(x, w, bias)
