"""Loads lowbit's native kernel libraries (built from ``csrc/<name>.c`` by setup.py) with ctypes.

`load(name)` returns the `ctypes.CDLL`, or None when the library was not built (no compiler at
install time), cannot be loaded, or ``LOWBIT_NATIVE=0`` is set; callers then use the reference
path. Set ``LOWBIT_NATIVE=0`` to compare against the reference or to rule the native code out.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.machinery
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def enabled() -> bool:
    return os.environ.get("LOWBIT_NATIVE", "1").lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _load_cached(name: str):
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in glob.glob(os.path.join(_HERE, f"_c_{name}{suffix}")):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def load(name: str):
    return _load_cached(name) if enabled() else None


def path_of(name: str) -> str | None:
    """The library file, for messages (None when not built)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = glob.glob(os.path.join(_HERE, f"_c_{name}{suffix}"))
        if hits:
            return hits[0]
    return None
