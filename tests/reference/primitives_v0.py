"""The affine grid exactly as lowbit computed it before `lowbit.core.grid` owned it: the code of
``lowbit/core/primitives.py`` at the commit that recorded tests/data/golden_checkpoints.json,
frozen here as an oracle. tests/test_grid.py holds the grid to it bit for bit; do not "fix" it.

Notation and layout: see `lowbit.core.grid`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

_TINY = 1e-8  # smallest scale we allow; an all-zero slice gets this scale and q = z


def group_layout(shape: tuple[int, int], scheme: QuantScheme) -> tuple[int, int]:
    """(n_groups per row, group length) for a 2-D weight of ``shape`` under ``scheme``."""
    rows, cols = shape
    if scheme.granularity == "group":
        g = int(scheme.group_size)
        return math.ceil(cols / g), g
    return 1, cols


def _grouped(W: Tensor, scheme: QuantScheme) -> Tensor:
    """View W[out, in] as [out, n_groups, g] (zero-padded at the end of each row if needed).

    For per-tensor the result is [1, 1, out*in]."""
    if W.dim() != 2:
        raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if scheme.granularity == "tensor":
        return W.reshape(1, 1, rows * cols)
    n, g = group_layout((rows, cols), scheme)
    pad = n * g - cols
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(rows, n, g)


def _ungrouped(Wg: Tensor, shape: tuple[int, int], scheme: QuantScheme) -> Tensor:
    rows, cols = shape
    if scheme.granularity == "tensor":
        return Wg.reshape(rows, cols)
    return Wg.reshape(rows, -1)[:, :cols]


def _round_scale(s: Tensor, scheme: QuantScheme) -> Tensor:
    """Scales are stored in ``scheme.scale_dtype``; quantize with the stored value so that
    dequantization is exactly consistent with what was chosen."""
    s = s.clamp(min=_TINY)
    if scheme.scale_dtype == "float16":
        s = s.clamp(max=65504.0).to(torch.float16).to(torch.float32)
        s = torch.where(s > 0, s, torch.full_like(s, 2.0**-24))  # fp16 underflow -> smallest subnormal
    return s


def qparams_from_range(lo: Tensor, hi: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Scale (fp32, already rounded to the storage dtype) and integer zero-point (or None if
    symmetric) for slices whose real range is [lo, hi]."""
    lo = lo.float()
    hi = hi.float()
    if scheme.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        s = _round_scale(absmax / ((scheme.qmax - scheme.qmin) / 2), scheme)
        return s, None
    if scheme.zero_point == "float":
        levels = scheme.qmax - scheme.qmin
        # A (near-)constant slice has no range to span: give it the step of a grid that reaches
        # its value from 0 instead, so the zero-point stays small (|z| <= levels) and the value
        # comes back exactly, rather than a vanishing scale with an overflowing zero-point.
        span = torch.maximum(lo.abs(), hi.abs())
        flat = (hi - lo) < span * 2.0**-10
        s = _round_scale(torch.where(flat, span, hi - lo) / levels, scheme)
        z = scheme.qmin - lo / s
        if scheme.scale_dtype == "float16":
            z = z.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)
        return s, z
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    s = _round_scale((hi - lo) / (scheme.qmax - scheme.qmin), scheme)
    z = torch.clamp(torch.round(scheme.qmin - lo / s), scheme.qmin, scheme.qmax)
    return s, z


def choose_qparams(W: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Min/max (asymmetric) or absmax (symmetric) scales for each slice of a 2-D weight.

    Returns scale [rows, n_groups] (per-tensor: [1, 1]) and zero-point of the same shape or None.
    """
    W = W.float()
    Wg = _grouped(W, scheme)
    lo, hi = Wg.amin(dim=-1), Wg.amax(dim=-1)
    if scheme.zero_point == "float" and not scheme.symmetric and scheme.granularity == "group":
        # The zero padding of a short last group must not widen its range ([min, max] as is).
        n, g = group_layout(tuple(W.shape), scheme)
        if n * g != W.shape[1]:
            tail = W[:, (n - 1) * g:]
            lo, hi = lo.clone(), hi.clone()
            lo[:, -1], hi[:, -1] = tail.amin(dim=-1), tail.amax(dim=-1)
    return qparams_from_range(lo, hi, scheme)


def quantize(W: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Integers q (int32, in [qmin, qmax]) for a 2-D weight given per-slice scale/zero."""
    Wg = _grouped(W.float(), scheme)
    if zero is not None and scheme.zero_point == "float":
        q = torch.round(Wg / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    else:
        q = torch.round(Wg / scale.unsqueeze(-1))
        if zero is not None:
            q = q + zero.unsqueeze(-1)
    q = torch.clamp(q, scheme.qmin, scheme.qmax)
    return _ungrouped(q, tuple(W.shape), scheme).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Float32 weight from integers q and per-slice scale/zero."""
    shape = tuple(q.shape)
    qg = _grouped(q.float(), scheme)
    if zero is not None:
        qg = qg - zero.float().unsqueeze(-1)
    return _ungrouped(qg * scale.float().unsqueeze(-1), shape, scheme)


def fake_quantize(W: Tensor, scheme: QuantScheme) -> Tensor:
    """Quantize then dequantize with min/max qparams (round-to-nearest), same dtype as W."""
    s, z = choose_qparams(W, scheme)
    return dequantize(quantize(W, s, z, scheme), s, z, scheme).to(W.dtype)


def check_finite(W: Tensor, name: str) -> None:
    """One-line error for NaN/Inf weights (quantizing them would silently poison the result)."""
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise LowbitError(f"weight {name} has {bad} NaN/Inf values; refusing to quantize it")
