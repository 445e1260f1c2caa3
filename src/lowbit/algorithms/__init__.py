"""Quantization and pruning algorithms, one file each. Importing this package imports every
module in it, and each registers its method by name (``@register_method``)."""

import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")
