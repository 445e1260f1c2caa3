"""Loads lowbit's native kernel libraries (built from ``csrc/<name>.c`` by setup.py) with ctypes.

`library(name, functions)` returns the `NativeLibrary` (its C functions as attributes, with their
argument and result types set), or None when the library was not built (no compiler at install
time), cannot be loaded, or ``LOWBIT_NATIVE=0`` is set; callers then use the reference path. Set
``LOWBIT_NATIVE=0`` to compare against the reference or to rule the native code out.

Instruction sets: every library dispatches on one level, named by `ISAS` (index = the C level of
csrc/lb_common.h, where the only CPU-feature check lives) and read or capped per library with
`NativeLibrary.isa` / `isa_max` / `set_isa` / `isa_capped`. ``LOWBIT_ISA=avx2`` (any name of
`ISAS`) caps every library when it is loaded, e.g. to benchmark a lower path.

`cached_struct` holds the C view of a weight (a ctypes struct a kernel's C entry reads), built
once per stored tensor set.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.machinery
import os
import weakref

from lowbit.errors import LowbitError

_HERE = os.path.dirname(os.path.abspath(__file__))

# The instruction-set levels, lowest first (csrc/lb_common.h LB_ISA_*): scalar = portable C;
# avx2 = AVX2 + FMA + F16C; avx512 = that + AVX-512 F/BW/VL; avx512vnni = that + AVX-512 VNNI;
# avx512vbmi = that + AVX-512 VBMI (byte permutes).
ISAS = ("scalar", "avx2", "avx512", "avx512vnni", "avx512vbmi")


def enabled() -> bool:
    return os.environ.get("LOWBIT_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def isa_level(name: str | None) -> int:
    """The C level of an instruction-set name (-1 for None: no cap)."""
    if name is None:
        return -1
    if name not in ISAS:
        raise LowbitError(f"unknown instruction set {name!r}; expected one of {', '.join(ISAS)}")
    return ISAS.index(name)


class NativeLibrary:
    """One loaded ``csrc/<name>.c`` library: its declared C functions as attributes, and its
    instruction-set level (exported by every library as ``lb_<name>_isa`` / ``_isa_max`` /
    ``_set_isa`` / ``_paths``, lb_common.h's LB_ISA_EXPORTS). ``paths``: the names of the code
    paths it has (whether or not this CPU runs them)."""

    def __init__(self, name: str, cdll: ctypes.CDLL, path: str):
        self.name, self.path, self._cdll = name, path, cdll
        i = ctypes.c_int
        self.declare({f"lb_{name}_isa": ([], i), f"lb_{name}_isa_max": ([], i), f"lb_{name}_set_isa": ([i], i),
                      f"lb_{name}_paths": ([], i)})
        self._isa, self._isa_max, self._set_isa = (getattr(self, f"lb_{name}_{f}") for f in ("isa", "isa_max", "set_isa"))
        mask = getattr(self, f"lb_{name}_paths")()
        self.paths = tuple(n for level, n in enumerate(ISAS) if mask >> level & 1)  # the code paths it has

    def declare(self, functions: dict) -> None:
        """Set argument / result types: {C name: ([argtypes], restype)}; each becomes an attribute."""
        for fname, (args, res) in functions.items():
            fn = getattr(self._cdll, fname)
            fn.argtypes, fn.restype = args, res
            setattr(self, fname, fn)

    def __getattr__(self, fname: str):  # a C function not declared: ctypes' defaults (int result)
        cdll = self.__dict__.get("_cdll")
        if cdll is None or not fname.startswith("lb_"):
            raise AttributeError(fname)
        return getattr(cdll, fname)

    def address(self, fname: str) -> int:
        """Address of C function ``fname`` (for a caller in C, e.g. the decode step's plan)."""
        return ctypes.cast(getattr(self._cdll, fname), ctypes.c_void_p).value

    def isa(self) -> str:
        """The code path in use (a name of `ISAS`)."""
        return ISAS[self._isa()]

    def isa_max(self) -> str:
        """The best code path this library has on this CPU."""
        return ISAS[self._isa_max()]

    def set_isa(self, name: str | None) -> str:
        """Use the best path at most ``name`` (None: the best the CPU has), for tests and benchmarks.
        Returns the path now in use (lower than ``name`` when the CPU or the library lacks it)."""
        return ISAS[self._set_isa(isa_level(name))]

    @contextlib.contextmanager
    def isa_capped(self, name: str | None):
        """``with lib.isa_capped("avx2") as path:`` run at most that path, then restore."""
        before = self.isa()
        try:
            yield self.set_isa(name)
        finally:
            self.set_isa(before)


_LIBS: dict = {}


def path_of(name: str) -> str | None:
    """The library file, for messages (None when not built)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = glob.glob(os.path.join(_HERE, f"_c_{name}{suffix}"))
        if hits:
            return hits[0]
    return None


def library(name: str, functions: dict | None = None) -> NativeLibrary | None:
    """The loaded library ``name`` with ``functions`` declared (see `NativeLibrary.declare`), or
    None (not built, not loadable, or ``LOWBIT_NATIVE=0``)."""
    if not enabled():
        return None
    lib = _LIBS.get(name, False)
    if lib is False:
        lib = None
        path = path_of(name)
        if path is not None:
            try:
                lib = NativeLibrary(name, ctypes.CDLL(path), path)
            except (OSError, AttributeError):  # not loadable, or built from other sources
                lib = None
        if lib is not None:
            if functions:
                lib.declare(functions)
            if os.environ.get("LOWBIT_ISA"):
                lib.set_isa(os.environ["LOWBIT_ISA"])
        _LIBS[name] = lib
    return lib


# -- the C view of a weight ------------------------------------------------------------------------
# A kernel's C entry reads a weight through a ctypes struct of pointers into its tensors. It is
# built once per stored tensor set and cached: a QuantizedLinear hands the kernel a new format
# object whenever its buffers change, but over the same tensors. The entry is keyed by the id of
# the format's first stored tensor (qweight, codes, ...), dropped when that tensor is freed, and
# only used while every tensor it points into
# is still the one it was built from and the non-tensor fields the builder reads (``key``) are
# unchanged. It holds the tensors by weak reference only: the cache must never keep a weight
# alive (a model streamed block by block would otherwise keep every block it ran).
_STRUCTS: dict = {}


def _no_tensor():
    return None


def _weak(t):
    """A weak reference to ``t``; for an absent tensor (None), a callable that returns None."""
    return _no_tensor if t is None else weakref.ref(t)


def cached_struct(w, build, key):
    """``build(w)`` (a ctypes struct, or None when the C code cannot read ``w`` in place), cached
    per stored tensors of ``w`` and ``key``. Keep the returned struct referenced while calling C."""
    q = getattr(w, type(w).tensor_names[0])
    k = id(q)
    e = _STRUCTS.get(k)
    tensors = [getattr(w, n, None) for n in type(w).tensor_names]
    if (e is not None and e[0]() is q and e[1] is build and (e[2] is key or e[2] == key)
            and len(e[3]) == len(tensors) and all(r() is t for r, t in zip(e[3], tensors))):
        return e[4]
    st = build(w)
    if st is None:
        return None
    try:
        ref = weakref.ref(q, lambda _r, k=k, table=_STRUCTS: table.pop(k, None))
        weak = tuple(_weak(t) for t in tensors)
    except TypeError:  # cannot be weakly referenced: a private, uncached struct
        return st
    _STRUCTS[k] = (ref, build, key, weak, st)
    return st
