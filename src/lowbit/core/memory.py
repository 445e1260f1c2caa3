"""The C allocator's share of a run's memory: what glibc keeps after tensors are freed.

A streamed run allocates and frees the same few large tensors block after block (a batch's
activations, a layer's weights, a Hessian). glibc serves allocations below its mmap threshold
from the heap and keeps freed heap memory for reuse; by default that threshold *rises* to the
size of every large block freed (up to 32 MB), so after the first block most tensors come from
the heap, fragment it, and the process grows (measured on the Llama-3.2-1B shape with GPTQ: the
heap at 0.6-0.85 GB, the peak 2.1-2.25 GiB; with a fixed threshold the heap stays at 0.2-0.3 GB
and the peak at 1.75 GiB, same time, same bits).

* `fixed_mmap_threshold()`: every allocation of 4 MiB or more gets its own mapping, returned to
  the system when freed (``mallopt(M_MMAP_THRESHOLD)``; this also turns the rising threshold
  off). Process-wide, set once by the runners; a no-op outside glibc.
* `release_free_memory()`: hand free heap pages back (``malloc_trim``), after each block.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 4 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_libc = None
_fixed = False


def _c():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
        except OSError:
            _libc = False
    return _libc


def fixed_mmap_threshold() -> bool:
    """Allocations of MMAP_THRESHOLD bytes or more are mapped on their own and unmapped when
    freed; True when the C library took the setting."""
    global _fixed
    if _fixed:
        return True
    libc = _c()
    fn = getattr(libc, "mallopt", None) if libc else None
    if fn is None:
        return False
    _fixed = bool(fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(fn(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD))
    return _fixed


def release_free_memory() -> None:
    """Hand memory freed by the C allocator back to the system (glibc's malloc_trim).

    A block's tensors are freed once it is written, but glibc keeps freed heap memory for
    reuse; trimming after each block keeps the resident size at what is really held. A no-op
    where the C library has no malloc_trim."""
    libc = _c()
    fn = getattr(libc, "malloc_trim", None) if libc else None
    if fn is not None:
        fn(0)
