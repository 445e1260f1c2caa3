"""Quantization schemes as first-class values.

A `QuantScheme` says how real numbers map to integers: how many bits, symmetric or asymmetric,
full or restricted integer range, and over which slices one scale is shared (the whole tensor,
one output channel, or a group of `group_size` consecutive input columns within one row).

Integer ranges (b = bits):

=============  ===========================  ===========================
               full range                   restricted range
=============  ===========================  ===========================
symmetric      [-2^(b-1), 2^(b-1) - 1]      [-(2^(b-1) - 1), 2^(b-1) - 1]
asymmetric     [0, 2^b - 1]                 [0, 2^b - 2]
=============  ===========================  ===========================

Restricted range drops one level so that the grid is symmetric about its middle (int8: -127..127,
which keeps -x exactly representable whenever x is).

Asymmetric zero-points are integers by default (``zero_point="int"``): the range is widened to
include 0, which the grid then represents exactly. ``zero_point="float"`` keeps a real-valued
zero-point instead (the grid spans exactly [min, max]; 0 is generally *not* on it) — the
convention of llama.cpp's Q4_1 (``x = d*q + m``) and of HQQ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from lowbit.errors import LowbitError

Granularity = Literal["tensor", "channel", "group"]

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    restricted_range: bool = False
    scale_dtype: Literal["float16", "float32"] = "float16"
    zero_point: Literal["int", "float"] = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise LowbitError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise LowbitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group":
            if self.group_size is None or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise LowbitError(f"group size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.scale_dtype not in ("float16", "float32"):
            raise LowbitError(f"scale_dtype must be float16 or float32, got {self.scale_dtype!r}")
        if self.zero_point not in ("int", "float"):
            raise LowbitError(f"zero_point must be int or float, got {self.zero_point!r}")
        if self.symmetric and self.zero_point != "int":
            object.__setattr__(self, "zero_point", "int")

    # -- integer grid -------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if self.symmetric:
            return -(2 ** (self.bits - 1)) + (1 if self.restricted_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1 - (1 if self.restricted_range else 0)

    @property
    def code_offset(self) -> int:
        """Added to a (possibly negative) integer q to get the unsigned code that is bit-packed."""
        return 2 ** (self.bits - 1) if self.symmetric else 0

    # -- naming -------------------------------------------------------------------------------
    def short_name(self) -> str:
        """Compact human label, e.g. ``int4-g128-asym`` or ``int8-channel``."""
        gran = {"tensor": "tensor", "channel": "channel"}.get(self.granularity, f"g{self.group_size}")
        parts = [f"int{self.bits}", gran]
        if not self.symmetric:
            parts.append("asym" if self.zero_point == "int" else "asym-fz")
        if self.restricted_range:
            parts.append("restricted")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        keys = ("bits", "symmetric", "granularity", "group_size", "restricted_range", "scale_dtype", "zero_point")
        known = {k: d[k] for k in keys if k in d}
        return cls(**known)


def scheme_from_args(bits: int, group_size: int | None, asym: bool = False, restricted: bool = False,
                     per_tensor: bool = False, float_zero: bool = False) -> QuantScheme:
    """Build a scheme from CLI-style arguments: ``group_size`` None or -1 means per-channel;
    ``float_zero`` implies asymmetric with a real-valued zero-point."""
    common = dict(bits=bits, symmetric=not (asym or float_zero), restricted_range=restricted,
                  zero_point="float" if float_zero else "int")
    if per_tensor:
        return QuantScheme(granularity="tensor", group_size=None, **common)
    if group_size is None or group_size == -1:
        return QuantScheme(granularity="channel", group_size=None, **common)
    if group_size <= 0:
        raise LowbitError(f"group size must be a positive integer (or -1 for per-channel), got {group_size}")
    return QuantScheme(granularity="group", group_size=group_size, **common)
