"""One small registry for everything that is chosen by name: methods, weight formats, kernels.

Names are what users type (``--method rtn``) and what saved checkpoints record, so they are
stable strings; the values are classes. Registering twice under one name is a bug and raises.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from lowbit.errors import LowbitError

T = TypeVar("T")

_REGISTRIES: dict[str, dict[str, type]] = {"method": {}, "format": {}}


def _register(kind: str, name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        table = _REGISTRIES[kind]
        if name in table and table[name] is not cls:
            raise RuntimeError(f"{kind} {name!r} registered twice")
        table[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def register_method(name: str):
    return _register("method", name)


def register_format(name: str):
    return _register("format", name)


def _lookup(kind: str, name: str) -> type:
    _load_builtins()
    table = _REGISTRIES[kind]
    if name not in table:
        raise LowbitError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
    return table[name]


def get_method(name: str) -> type:
    return _lookup("method", name)


def get_format(name: str) -> type:
    return _lookup("format", name)


def available(kind: str) -> list[str]:
    _load_builtins()
    return sorted(_REGISTRIES[kind])


def _load_builtins() -> None:
    # Importing the packages registers their members.
    import lowbit.algorithms  # noqa: F401
    import lowbit.formats  # noqa: F401
