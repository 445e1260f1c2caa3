"""Fake quantization (quantize-dequantize in float) with a straight-through estimator, shared by
the simulation / QAT of ordinary networks (:mod:`lowbit.cnn`) and the LLM W8A8 method's search
(:mod:`lowbit.algorithms.static_int8`).

* :func:`fake_quantize` — ``s * (clamp(round(x / s) + z, qmin, qmax) - z)``; its gradient is the
  clipped straight-through estimator: ``dL/dx = dL/dy`` where ``round(x / s) + z`` lies inside
  [qmin, qmax] and 0 where x is clipped (the rounding itself is treated as the identity).
* :func:`fake_quantize_weight` — per-output-channel symmetric fake quantization of a weight with
  the scales :func:`lowbit.core.static_qparams.quantize_weight` uses (plain STE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.core.grid import choose_qparams
from lowbit.core.static_qparams import weight_scheme


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, clipped):
        q = torch.round(x / scale) + zero
        if clipped:
            ctx.save_for_backward((q >= qmin) & (q <= qmax))
        ctx.clipped = clipped
        return (q.clamp(qmin, qmax) - zero) * scale

    @staticmethod
    def backward(ctx, g):
        if not ctx.clipped:
            return g, None, None, None, None, None
        (inside,) = ctx.saved_tensors
        return g * inside.to(g.dtype), None, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor | float, zero: Tensor | float, qmin: int, qmax: int,
                  clipped_ste: bool = True) -> Tensor:
    """Quantize-dequantize x (scale / zero broadcast against x). Gradient: the clipped STE (zero
    where x is clipped), or with ``clipped_ste=False`` the plain STE (identity everywhere)."""
    scale = torch.as_tensor(scale, dtype=x.dtype)
    zero = torch.as_tensor(zero, dtype=x.dtype)
    return _FakeQuantSTE.apply(x, scale, zero, qmin, qmax, clipped_ste)


def fake_quantize_weight(W: Tensor, bits: int, restricted: bool, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric fake quantization of a weight (any rank, channel first), with
    the same scales :func:`lowbit.core.static_qparams.quantize_weight` uses; returns (W_fq, scales [out]).
    The gradient is the plain STE: the scale follows the weights (absmax), so no weight is ever
    outside the range except the half step a full-range grid cuts off its positive end, and that
    channel maximum must keep its gradient."""
    scheme = weight_scheme(bits, restricted, per_channel)
    s, _ = choose_qparams(W.detach().float().reshape(W.shape[0], -1), scheme)
    s = s.reshape(-1).expand(W.shape[0]) if not per_channel else s.reshape(-1)
    shape = (-1,) + (1,) * (W.dim() - 1)
    return fake_quantize(W, s.reshape(shape).to(W.dtype), 0.0, scheme.qmin, scheme.qmax, clipped_ste=False), s
