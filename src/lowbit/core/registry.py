"""One small registry for everything that is chosen by name: methods, weight formats, and method
wrappers (options that wrap any method, e.g. ``lkd_steps``: `lowbit.algorithms.base.make_method`).

Names are what users type (``--method rtn``) and what saved checkpoints record, so they are
stable strings; the values are classes. Registering a second class under one name is a bug and
raises. Methods register with ``@register_method(name)``; formats by subclassing
``lowbit.formats.base.WeightFormat`` with ``name=...``.

core imports nothing above it: the tables are filled by the packages that own the members, and
looked up through them (`lowbit.algorithms.get_method`, `lowbit.formats.get_format`), which
import all their modules first.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from lowbit.errors import LowbitError

T = TypeVar("T")

_REGISTRIES: dict[str, dict[str, type]] = {"method": {}, "format": {}, "wrapper": {}}


def register(kind: str, name: str, cls: type) -> None:
    """Make ``cls`` the ``kind`` called ``name`` (and set ``cls.name``)."""
    table = _REGISTRIES[kind]
    if name in table and table[name] is not cls:
        raise RuntimeError(f"{kind} {name!r} registered twice")
    table[name] = cls
    cls.name = name  # type: ignore[attr-defined]


def register_method(name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        register("method", name, cls)  # type: ignore[arg-type]
        return cls

    return deco


def lookup(kind: str, name: str) -> type:
    """The class registered as ``kind`` ``name``; a one-line error listing the known names."""
    table = _REGISTRIES[kind]
    if name not in table:
        raise LowbitError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
    return table[name]


def available(kind: str) -> list[str]:
    return sorted(_REGISTRIES[kind])
