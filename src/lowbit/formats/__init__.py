"""Packed weight formats. Importing this package imports every module in it, and each format
registers itself by name by subclassing `lowbit.formats.base.WeightFormat`."""

import importlib as _importlib
import pkgutil as _pkgutil

from lowbit.formats.affine import AffineWeight  # noqa: F401
from lowbit.formats.base import WeightFormat  # noqa: F401
from lowbit.formats.int8 import Int8Weight  # noqa: F401
from lowbit.formats.nf4 import NF4Weight  # noqa: F401

for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")


def get_format(name: str) -> type:
    """The weight format registered as ``name`` (a one-line error naming the known ones)."""
    from lowbit.core.registry import lookup

    return lookup("format", name)


def available_formats() -> list[str]:
    from lowbit.core.registry import available

    return available("format")
