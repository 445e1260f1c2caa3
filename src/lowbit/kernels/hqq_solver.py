"""The native HQQ zero-point iteration (``csrc/hqq.c``): every group runs all its updates while it
sits in the cache, instead of twenty passes over the whole weight per update in PyTorch.

`lowbit.algorithms.hqq` uses it on CPU when the library is built (``LOWBIT_NATIVE=0`` forces the
PyTorch loop, which stays the reference). Both functions take the weight grouped as HQQ holds it,
``Wg [rows, n, g]`` float32, with a ragged last group of ``last_len`` real values per row.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels import _native

_i64, _vp, _ci, _cf = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_FUNCTIONS = {
    "lb_hqq_iterate": ([_vp, _i64, _i64, _i64, _i64, _vp, _vp, _cf, _cf, _cf, _cf, _cf, _ci, _vp, _vp, _vp, _ci], _ci),
    "lb_hqq_evaluate": ([_vp, _i64, _i64, _i64, _i64, _vp, _vp, _cf, _cf, _cf, _vp, _vp, _vp, _ci], _ci),
}
_ERRORS = {1: "bad arguments", 2: "out of memory"}


def native_lib():
    """The loaded ``_c_hqq`` library, or None (not built, or ``LOWBIT_NATIVE=0``)."""
    return _native.library("hqq", _FUNCTIONS)


def _lib():
    lib = native_lib()
    if lib is None:
        raise LowbitError("the native hqq kernel is not available (not built, or LOWBIT_NATIVE=0)")
    return lib


def _check(Wg: Tensor, *per_group: Tensor) -> tuple[int, int, int]:
    if Wg.dtype != torch.float32 or Wg.dim() != 3 or Wg.device.type != "cpu" or not Wg.is_contiguous():
        raise LowbitError("hqq kernel: the grouped weight must be a contiguous float32 CPU tensor [rows, n, g]")
    R, n, g = Wg.shape
    for t in per_group:
        if t.dtype != torch.float32 or tuple(t.shape) != (R, n) or not t.is_contiguous():
            raise LowbitError(f"hqq kernel: scales and zero-points must be contiguous float32 [{R}, {n}]")
    return R, n, g


def _call(fn, *args) -> None:
    rc = fn(*args)
    if rc:
        raise LowbitError(f"hqq kernel failed: {_ERRORS.get(rc, f'code {rc}')}")


def iterate(Wg: Tensor, s: Tensor, z0: Tensor, last_len: int, qmin: float, qmax: float, p: float,
            beta: float, kappa: float, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """All ``iters`` zero-point updates of every group from z0 (scale s fixed): (z, squared error,
    l_p error), each [iters + 1, rows, n] float32, index t = iterate t (0: the start)."""
    lib = _lib()
    R, n, g = _check(Wg, s, z0)
    out = torch.empty(3, iters + 1, R, n, dtype=torch.float32)
    _call(lib.lb_hqq_iterate, Wg.data_ptr(), R * n, g, n, int(last_len), s.data_ptr(), z0.data_ptr(),
          float(qmin), float(qmax), float(p), float(beta), float(kappa), int(iters),
          out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), torch.get_num_threads())
    return out[0], out[1], out[2]


def evaluate(Wg: Tensor, s: Tensor, z: Tensor, last_len: int, qmin: float, qmax: float,
             p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(codes [rows, n, g] uint8, squared error [rows, n], l_p error [rows, n]) of scale s and
    zero-point z; the padding of ragged groups gets code 0. Codes must fit 0..255."""
    lib = _lib()
    R, n, g = _check(Wg, s, z)
    codes = torch.empty(R, n, g, dtype=torch.uint8)
    err = torch.empty(2, R, n, dtype=torch.float32)
    _call(lib.lb_hqq_evaluate, Wg.data_ptr(), R * n, g, n, int(last_len), s.data_ptr(), z.data_ptr(),
          float(qmin), float(qmax), float(p), codes.data_ptr(), err[0].data_ptr(), err[1].data_ptr(),
          torch.get_num_threads())
    return codes, err[0], err[1]
