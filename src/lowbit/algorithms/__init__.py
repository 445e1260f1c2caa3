"""Quantization and pruning algorithms, one file each. Importing this package imports every
module in it, and each registers its method by name (``@register_method``)."""

import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")


def get_method(name: str) -> type:
    """The method registered as ``name`` (a one-line error naming the known ones)."""
    from lowbit.core.registry import lookup

    return lookup("method", name)


def available_methods() -> list[str]:
    from lowbit.core.registry import available

    return available("method")
