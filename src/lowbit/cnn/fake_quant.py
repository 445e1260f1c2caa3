"""The float simulation of an integer network: an ``nn.Sequential`` with observed, fake-quantized
activations and weights, for post-training calibration (:mod:`lowbit.cnn.ptq`) and
quantization-aware training (:mod:`lowbit.cnn.qat`). The quantize-dequantize itself, with its
straight-through gradient, is :func:`lowbit.core.ste.fake_quantize`.

* :class:`FakeQuantAct` — an activation quantizer that owns an observer; while ``observing`` it
  feeds every batch to the observer (during calibration and all through QAT, so the range keeps
  following the activations); while ``quantizing`` it fake-quantizes with the observer's current
  qparams (the same :func:`~lowbit.core.static_qparams.act_qparams` the integer model will use).
* :class:`FakeQuantConv2d` / :class:`FakeQuantLinear` — the float layer with its weight
  fake-quantized per output channel (symmetric, min-max of the current weight, plain STE), the bias
  fake-quantized to the int32 grid s_x * s_w, an optional fused ReLU and the output quantizer.
* :class:`FakeQuantSequential` — input quantizer + those layers (+ pooling / flatten), built from
  an ``nn.Sequential`` by :func:`lowbit.cnn.ptq.prepare`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.core.static_qparams import ActQParams, act_qparams_from_observer
from lowbit.core.ste import fake_quantize, fake_quantize_weight


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
