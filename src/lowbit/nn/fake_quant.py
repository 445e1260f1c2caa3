"""Fake quantization (quantize-dequantize in float) with a straight-through estimator, for
simulating a static integer network and for quantization-aware training (QAT).

* :func:`fake_quantize` — ``s * (clamp(round(x / s) + z, qmin, qmax) - z)``; its gradient is the
  clipped straight-through estimator: ``dL/dx = dL/dy`` where ``round(x / s) + z`` lies inside
  [qmin, qmax] and 0 where x is clipped (the rounding itself is treated as the identity).
* :class:`FakeQuantAct` — an activation quantizer that owns an observer; while ``observing`` it
  feeds every batch to the observer (during calibration and all through QAT, so the range keeps
  following the activations); while ``quantizing`` it fake-quantizes with the observer's current
  qparams (the same :func:`~lowbit.nn.static_int8.act_qparams` the integer model will use).
* :class:`FakeQuantConv2d` / :class:`FakeQuantLinear` — the float layer with its weight
  fake-quantized per output channel (symmetric, min-max of the current weight, plain STE), the bias
  fake-quantized to the int32 grid s_x * s_w, an optional fused ReLU and the output quantizer.
* :class:`FakeQuantSequential` — input quantizer + those layers (+ pooling / flatten), built from
  an ``nn.Sequential`` by :func:`lowbit.algorithms.static_int8.prepare`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.nn.static_int8 import ActQParams, act_qparams_from_observer, weight_scheme


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
    the same scales :func:`lowbit.nn.static_int8.quantize_weight` uses; returns (W_fq, scales [out]).
    The gradient is the plain STE: the scale follows the weights (absmax), so no weight is ever
    outside the range except the half step a full-range grid cuts off its positive end, and that
    channel maximum must keep its gradient."""
    from lowbit.core.grid import choose_qparams

    scheme = weight_scheme(bits, restricted, per_channel)
    s, _ = choose_qparams(W.detach().float().reshape(W.shape[0], -1), scheme)
    s = s.reshape(-1).expand(W.shape[0]) if not per_channel else s.reshape(-1)
    shape = (-1,) + (1,) * (W.dim() - 1)
    return fake_quantize(W, s.reshape(shape).to(W.dtype), 0.0, scheme.qmin, scheme.qmax, clipped_ste=False), s


class FakeQuantAct(nn.Module):
    def __init__(self, observer, bits: int = 8, symmetric: bool = False, restricted: bool = False):
        super().__init__()
        self.observer = observer
        self.bits, self.symmetric, self.restricted = bits, symmetric, restricted
        self.observing = True
        self.quantizing = False
        self._frozen: ActQParams | None = None

    def qparams(self) -> ActQParams:
        if self._frozen is not None:
            return self._frozen
        return act_qparams_from_observer(self.observer, self.bits, self.symmetric, self.restricted)

    def freeze(self) -> None:
        """Stop observing and fix the qparams (a histogram search then runs only once)."""
        self.observing = False
        self._frozen = act_qparams_from_observer(self.observer, self.bits, self.symmetric, self.restricted)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observer.update(x)
        if not self.quantizing:
            return x
        a = self.qparams()
        return fake_quantize(x, a.scale, float(a.zero), a.qmin, a.qmax)

    def extra_repr(self) -> str:
        return f"observer={self.observer.name}, bits={self.bits}, symmetric={self.symmetric}"


class _FakeQuantAffine(nn.Module):
    def __init__(self, layer: nn.Module, out_fq: FakeQuantAct, relu: bool, w_bits: int, restricted: bool,
                 per_channel: bool = True):
        super().__init__()
        self.layer, self.out_fq, self.relu = layer, out_fq, bool(relu)
        self.w_bits, self.restricted, self.per_channel = w_bits, restricted, per_channel
        self.quantizing = False

    def _op(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, in_aq: ActQParams | None = None) -> Tensor:
        W, b = self.layer.weight, self.layer.bias
        if self.quantizing:
            W, s_w = fake_quantize_weight(W, self.w_bits, self.restricted, self.per_channel)
            if b is not None and in_aq is not None:  # the int32 bias grid s_x * s_w (never clipped)
                sb = (in_aq.scale * s_w).to(b.dtype)
                b = fake_quantize(b, sb, 0.0, -(2**31), 2**31 - 1)
        y = self._op(x, W, b)
        if self.relu:
            y = F.relu(y)
        return self.out_fq(y)


class FakeQuantLinear(_FakeQuantAffine):
    def _op(self, x, W, b):
        return F.linear(x, W, b)


class FakeQuantConv2d(_FakeQuantAffine):
    def _op(self, x, W, b):
        c = self.layer
        return F.conv2d(x, W, b, c.stride, c.padding, c.dilation, c.groups)


class FakeQuantSequential(nn.Module):
    """input quantizer, then layers: fake-quant conv/linear (each with its output quantizer),
    max-pooling, flatten, a standalone ReLU. Mode switches apply to every quantizer."""

    def __init__(self, input_fq: FakeQuantAct, layers: list[nn.Module]):
        super().__init__()
        self.input_fq = input_fq
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_fq(x)
        aq = self.input_fq.qparams() if self.input_fq.quantizing else None
        for m in self.layers:
            if isinstance(m, _FakeQuantAffine):
                x = m(x, aq)
                aq = m.out_fq.qparams() if m.out_fq.quantizing else None
            else:
                x = m(x)
        return x

    def quantizers(self) -> list[FakeQuantAct]:
        return [self.input_fq] + [m.out_fq for m in self.layers if isinstance(m, _FakeQuantAffine)]

    def set_mode(self, observing: bool, quantizing: bool) -> "FakeQuantSequential":
        for q in self.quantizers():
            q.observing, q.quantizing = observing, quantizing
            if observing:
                q._frozen = None
        for m in self.layers:
            if isinstance(m, _FakeQuantAffine):
                m.quantizing = quantizing
        return self

    def freeze(self) -> "FakeQuantSequential":
        """Fix every activation's qparams from its observer and stop observing (fake-quant on)."""
        for q in self.quantizers():
            q.freeze()
            q.quantizing = True
        for m in self.layers:
            if isinstance(m, _FakeQuantAffine):
                m.quantizing = True
        return self
