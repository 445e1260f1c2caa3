"""W8A16: weight-only int8, float activations — the cheap baseline beside dynamic/static int8.

Exactly RTN at 8 bits, symmetric, one scale per output channel (the same solver, format and
kernels as ``rtn --bits 8 --per-channel``); only the default scheme differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.algorithms.rtn import RTN
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class W8A16Config:
    scheme: QuantScheme = field(default_factory=lambda: QuantScheme(bits=8, granularity="channel", group_size=None))

    def __post_init__(self):
        if self.scheme.bits != 8:
            raise LowbitError(f"w8a16 stores 8-bit weights; got bits={self.scheme.bits} (use rtn for other widths)")


@register_method("w8a16")
class W8A16(RTN):
    config_cls = W8A16Config
