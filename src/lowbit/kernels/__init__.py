"""Kernels: y = x Wᵀ + b for each packed weight format, looked up in one table.

`reference.py` holds the plain-PyTorch path that always works (CPU or GPU): dequantize, then an
ordinary float matmul. Fast paths are rows of the kernel table `KERNELS`, registered with
``@register_kernel(format, activations, device, ...)`` (one module per kernel family, imported
automatically) and tested against the reference. A format whose matmul is *defined* differently
(LLM.int8()'s outlier decomposition, dynamic int8's quantized activations) registers its own row
the same way.

A row (`Kernel`) is keyed by

* ``format``: the weight format's registered name;
* ``activations``: ``"float"`` (x is multiplied as given) or ``"int8"`` (the kernel quantizes x to
  int8 itself: the product changes);
* ``device``: ``"cpu"``, ``"cuda"`` (a tensor's ``device.type``), or ``"any"`` (the row for every
  device without its own),

and holds the Python entry ``linear(x, w, bias)`` (returns ``NotImplemented`` for inputs it does
not handle — a dtype, a shape, a missing native library — and the reference runs then) and, for a
kernel a C caller can run, its C entry (a library and the symbol of an ``int f(const W* w,
const float* x, int64_t M, const float* bias, float* y, int nthreads)`` function) with the struct
builder (w -> the ctypes struct that function reads, or None when it cannot read w in place).

One row per format is the format's own product (``default=True``): the one `linear` runs. Other
rows are opt-in (`select`), e.g. affine weights with int8-quantized activations, which the
decoder offers as ``int8_activations``; their ``supports(w)`` says which weights they take.
Inside ``with prefer("int8"):`` `linear` itself runs the opt-in row where one applies (`runs`:
one activation row always, several only for a row with a batched product, ``prompts=True``),
so that a transformers forward (evaluation, latency) takes the path the decoder takes.
"""

from __future__ import annotations

import contextlib as _contextlib
import contextvars as _contextvars
import importlib as _importlib
import pkgutil as _pkgutil
from dataclasses import dataclass
from typing import Callable

from lowbit.kernels import reference as _reference

ACTIVATIONS = ("float", "int8")
DEVICES = ("cpu", "cuda", "any")


@dataclass(frozen=True)
class Kernel:
    """One row of the kernel table (see the module docstring)."""

    format: str
    activations: str
    device: str
    linear: Callable  # (x, w, bias) -> y, or NotImplemented
    default: bool = True  # the format's own product (else an opt-in)
    name: str = ""  # what reports call it (the format's name unless given)
    library: Callable | None = None  # () -> the C entry's NativeLibrary, or None when not built
    symbol: str | None = None  # the C entry in that library
    struct: Callable | None = None  # w -> the ctypes struct the C entry reads (cached), or None
    supports: Callable | None = None  # w -> whether this row takes w (None: every weight of the format)
    prompts: bool = False  # an opt-in row with a batched product worth running on prompts too

    def c_entry(self) -> int | None:
        """Address of the C entry, or None (no C entry, or its library is not built)."""
        lib = None if self.symbol is None else self.library()
        return None if lib is None else lib.address(self.symbol)

    def takes(self, w) -> bool:
        return self.supports is None or self.supports(w)


KERNELS: dict[tuple[str, str, str], Kernel] = {}
_DEFAULT: dict[str, str] = {}  # format -> the activation type of its own product
_ROUTES: dict = {}  # (format class, device type) -> the default row's Python entry, or None


def register_kernel(format: str, activations: str = "float", device: str = "cpu", *, default: bool = True,
                    name: str | None = None, library: Callable | None = None, symbol: str | None = None,
                    struct: Callable | None = None, supports: Callable | None = None, prompts: bool = False):
    """Decorator: the decorated function is the Python entry of row (format, activations, device)."""
    if activations not in ACTIVATIONS or device not in DEVICES:
        raise RuntimeError(f"kernel for {format!r}: activations must be one of {ACTIVATIONS}, device one of {DEVICES}")
    if (symbol is None) != (struct is None) or (symbol is not None and library is None):
        raise RuntimeError(f"kernel for {format!r}: a C entry needs its library, symbol and struct builder")

    def deco(fn):
        key = (format, activations, device)
        if key in KERNELS and KERNELS[key].linear is not fn:
            raise RuntimeError(f"kernel {key} registered twice")
        if default and _DEFAULT.setdefault(format, activations) != activations:
            raise RuntimeError(f"format {format!r} already has its own product with {_DEFAULT[format]} activations")
        KERNELS[key] = Kernel(format, activations, device, fn, default, name or format, library, symbol, struct,
                              supports, prompts)
        _ROUTES.clear()
        return fn

    return deco


def find(format_name: str | None, activations: str | None = None, device: str = "cpu") -> Kernel | None:
    """The row (format, activations, device), else (format, activations, "any"); ``activations``
    None: the format's own product."""
    acts = _DEFAULT.get(format_name) if activations is None else activations
    return KERNELS.get((format_name, acts, device)) or KERNELS.get((format_name, acts, "any"))


def select(w, activations: str | None = None, device: str = "cpu") -> Kernel | None:
    """The row to run for weight ``w``: the ``activations`` row where there is one that takes
    ``w``, else the format's own product (None: only the reference)."""
    fmt = getattr(type(w), "name", None)
    if activations is not None:
        k = find(fmt, activations, device)
        if k is not None and k.takes(w):
            return k
    return find(fmt, None, device)


_PREFER = _contextvars.ContextVar("lowbit_kernels_prefer", default=None)


@_contextlib.contextmanager
def prefer(activations: str | None):
    """``with prefer("int8"):`` `linear` runs each format's opt-in ``activations`` row where it
    applies (see `runs`), the format's own product elsewhere; ``prefer(None)`` (or "float"): the
    own product, as outside any block."""
    if activations is not None and activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS} or None, got {activations!r}")
    token = _PREFER.set(None if activations == "float" else activations)
    try:
        yield
    finally:
        _PREFER.reset(token)


def runs(k: Kernel, rows: int) -> bool:
    """Whether opt-in row ``k`` is the one to run for ``rows`` activation rows: one row (decode)
    always; several (prompts, evaluation batches) only with its batched product
    (``k.prompts``), else the format's own product is the faster."""
    return rows == 1 or k.prompts


def linear(x, weight_format, bias=None):
    """y = x Wᵀ + b by the format's own kernel for x's device, or the reference (inside
    `prefer`: by the preferred opt-in row where it applies)."""
    want = _PREFER.get()
    if want is not None:
        k = find(getattr(type(weight_format), "name", None), want, x.device.type)
        if k is not None and not k.default and runs(k, x.numel() // max(x.shape[-1], 1)):
            y = k.linear(x, weight_format, bias)
            if y is not NotImplemented:
                return y
    key = (type(weight_format), x.device.type)
    try:
        fn = _ROUTES[key]
    except KeyError:
        k = find(getattr(key[0], "name", None), None, key[1])
        fn = _ROUTES[key] = None if k is None else k.linear
    if fn is not None:
        y = fn(x, weight_format, bias)
        if y is not NotImplemented:
            return y
    return _reference.linear(x, weight_format, bias)


for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "reference":
        _importlib.import_module(f"{__name__}.{_m.name}")
