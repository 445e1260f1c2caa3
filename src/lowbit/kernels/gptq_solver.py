"""The native GPTQ column loop (``csrc/gptq.c``) for affine grids: one call per block segment
instead of a dozen PyTorch operations per column, with the PyTorch loop's own float32 operations
(bit-identical results).

`lowbit.algorithms.hessian.gptq_columns` uses it on CPU when the library is built and the solve
is float32 (``LOWBIT_NATIVE=0`` forces the PyTorch loop, which stays the reference).
"""

from __future__ import annotations

import ctypes

from torch import Tensor

from lowbit.kernels import _native

_vp, _i64, _ci, _cf = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_FUNCTIONS = {"lb_gptq_columns": ([_vp, _i64, _i64, _i64, _i64, _vp, _i64, _vp, _vp, _i64, _i64, _ci, _vp, _cf, _cf,
                                   _vp, _vp, _i64, _vp, _ci], _ci)}


def native_lib():
    """The loaded ``_c_gptq`` library, or None (not built, or ``LOWBIT_NATIVE=0``)."""
    return _native.library("gptq", _FUNCTIONS)


def columns(lib, W1: Tensor, ia: int, ib: int, Hinv1: Tensor, ldh: int, scale: Tensor, zero: Tensor | None,
            s_rs: int, s_cs: int, float_zero: bool, group: Tensor, qmin: float, qmax: float, Q: Tensor,
            codes: Tensor, ldq: int, Err1: Tensor, threads: int) -> None:
    """Columns [ia, ib) of one block (see ``lb_gptq_columns`` in csrc/gptq.c): W1 and Err1 [rows,
    b] contiguous, Hinv1 the block's view of H⁻¹'s factor (row stride ldh), Q / codes views whose
    first column is the block's (row stride ldq), group the block's view of the positions' groups."""
    rows, b = W1.shape
    rc = lib.lb_gptq_columns(W1.data_ptr(), rows, b, ia, ib, Hinv1.data_ptr(), ldh, scale.data_ptr(),
                             None if zero is None else zero.data_ptr(), s_rs, s_cs, int(float_zero),
                             group.data_ptr(), qmin, qmax, Q.data_ptr(), codes.data_ptr(), ldq, Err1.data_ptr(),
                             threads)
    if rc:
        raise RuntimeError(f"lb_gptq_columns failed ({rc})")
