"""Kernels: y = x Wᵀ + b for each packed weight format.

`reference.py` holds the plain-PyTorch path that always works (CPU or GPU): dequantize, then an
ordinary float matmul. Fast paths register per format with ``@register_kernel("format-name")``
(one module per kernel family, imported automatically) and are tested against the reference.

A format whose matmul is *defined* differently (LLM.int8()'s outlier decomposition also
quantizes the activations) registers its own kernel the same way. `linear` dispatches on the
weight format's registered name and falls back to the reference. A kernel may return
``NotImplemented`` for inputs it does not handle (a device, dtype or shape); the reference runs then.
"""

from __future__ import annotations

import importlib as _importlib
import pkgutil as _pkgutil

from lowbit.kernels import reference as _reference

FORMAT_KERNELS: dict = {}


def register_kernel(format_name: str):
    def deco(fn):
        if format_name in FORMAT_KERNELS and FORMAT_KERNELS[format_name] is not fn:
            raise RuntimeError(f"kernel for format {format_name!r} registered twice")
        FORMAT_KERNELS[format_name] = fn
        return fn

    return deco


def linear(x, weight_format, bias=None):
    kernel = FORMAT_KERNELS.get(getattr(type(weight_format), "name", None))
    if kernel is not None:
        y = kernel(x, weight_format, bias)
        if y is not NotImplemented:
            return y
    return _reference.linear(x, weight_format, bias)


for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "reference":
        _importlib.import_module(f"{__name__}.{_m.name}")
