"""The integer qparams a static int8 network fixes ahead of time, shared by the LLM W8A8 method
(:mod:`lowbit.algorithms.static_int8`) and the integer pipeline for ordinary networks
(:mod:`lowbit.cnn`).

* :class:`ActQParams` — how an activation's int codes mean real values: r = scale * (q - zero),
  q in [qmin, qmax]; :func:`act_qparams` picks them for a real range (0 always on the grid; an
  asymmetric grid shifted down so its codes fit int8), :func:`act_qparams_from_observer` for the
  range an observer chose.
* :func:`quantize_weight` — symmetric weight codes with one float32 scale per output channel
  (or one per tensor), from the library's grid (:mod:`lowbit.core.grid`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.core.grid import choose_qparams, qparams_from_range, quantize
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ActQParams:
    """How int codes q in [qmin, qmax] mean real values: r = scale * (q - zero)."""

    scale: float
    zero: int
    qmin: int
    qmax: int

    def __post_init__(self):
        if not (self.scale > 0 and self.qmin <= self.zero <= self.qmax):
            raise LowbitError(f"bad activation qparams: scale {self.scale}, zero {self.zero}, range [{self.qmin}, {self.qmax}]")


def act_scheme(bits: int, symmetric: bool, restricted: bool) -> QuantScheme:
    """The per-tensor scheme an observer uses to pick an activation range (float32 scale)."""
    return QuantScheme(bits=bits, symmetric=symmetric, granularity="tensor", group_size=None,
                       restricted_range=restricted, scale_dtype="float32")


def act_qparams(lo: float | Tensor, hi: float | Tensor, bits: int, symmetric: bool, restricted: bool) -> ActQParams:
    """ActQParams for a real range [lo, hi]: the library's ``qparams_from_range`` (0 always on the
    grid); an asymmetric (unsigned) grid is shifted down by 2^(bits-1) so the codes fit int8."""
    scheme = act_scheme(bits, symmetric, restricted)
    s, z = qparams_from_range(torch.as_tensor(lo).float().reshape(()), torch.as_tensor(hi).float().reshape(()), scheme)
    shift = 0 if symmetric else 2 ** (bits - 1)
    zero = 0 if z is None else int(z) - shift
    return ActQParams(float(s), zero, scheme.qmin - shift, scheme.qmax - shift)


def act_qparams_from_observer(obs, bits: int, symmetric: bool, restricted: bool) -> ActQParams:
    lo, hi = obs.range(act_scheme(bits, symmetric, restricted))
    return act_qparams(lo, hi, bits, symmetric, restricted)


def weight_scheme(bits: int, restricted: bool, per_channel: bool = True) -> QuantScheme:
    return QuantScheme(bits=bits, symmetric=True, granularity="channel" if per_channel else "tensor",
                       group_size=None, restricted_range=restricted, scale_dtype="float32")


def quantize_weight(W: Tensor, bits: int, restricted: bool, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric weight codes (int8, W's shape) and one float32 scale per output channel [out]
    (per-tensor: the one scale repeated)."""
    W2 = W.detach().float().reshape(W.shape[0], -1)
    scheme = weight_scheme(bits, restricted, per_channel)
    s, _ = choose_qparams(W2, scheme)
    q = quantize(W2, s, None, scheme)
    s = s.reshape(-1).expand(W.shape[0]).contiguous() if not per_channel else s.reshape(-1)
    return q.reshape(W.shape).to(torch.int8), s.float()
