"""Post-training static quantization of an ordinary network (an ``nn.Sequential`` of Conv2d /
Linear / ReLU / BatchNorm2d / MaxPool2d / Flatten / Dropout) to an integer-only network.

:func:`quantize_static` = :func:`prepare` (fold BatchNorm into the conv, fuse conv/linear + ReLU,
put a :class:`~lowbit.cnn.fake_quant.FakeQuantAct` with its own observer at the input and after
every conv/linear) -> :func:`calibrate` (~200 representative samples through the float model,
observers watching) -> :func:`convert` (an :class:`~lowbit.cnn.integer.IntegerSequential`: int8
in, int8 weights, int32 accumulation, int32 bias, fixed-point requantization, int8 out; see
:mod:`lowbit.kernels.static_int8`). The same ``convert`` turns a QAT-trained model
(:mod:`lowbit.cnn.qat`) into integers; ``FakeQuantSequential.freeze()`` gives the float
simulation of the very same quantizers.

Settings are the static-int8 method's :class:`~lowbit.algorithms.static_int8.StaticInt8Config`:
``bits`` and ``restricted_range`` apply to weights and activations alike; weights are always
symmetric (per output channel unless the scheme is per-tensor); ``symmetric`` chooses symmetric
or asymmetric (zero-point) *activations*; ``observer`` picks each activation's range.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.algorithms.static_int8 import StaticInt8Config
from lowbit.cnn.fake_quant import FakeQuantAct, FakeQuantConv2d, FakeQuantLinear, FakeQuantSequential, _FakeQuantAffine
from lowbit.cnn.integer import (
    DequantizeOutput,
    IntegerConv2d,
    IntegerLinear,
    IntegerMaxPool2d,
    IntegerReLU,
    IntegerSequential,
    QuantizeInput,
)
from lowbit.core.static_qparams import quantize_weight
from lowbit.errors import LowbitError


def _act_quantizer(cfg: StaticInt8Config, observer) -> FakeQuantAct:
    """An activation quantizer watching ``observer``, on the config's activation grid."""
    s = cfg.scheme
    return FakeQuantAct(observer, s.bits, s.symmetric, s.restricted_range)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with the (eval-mode) BatchNorm folded in: W' = W g / sqrt(v + eps), b' = (b - m) g /
    sqrt(v + eps) + beta."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out.weight.copy_(conv.weight * f.reshape(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        out.bias.copy_((b - bn.running_mean) * f + bn.bias)
    return out


def prepare(model: nn.Sequential, cfg: StaticInt8Config, observer_factory=None) -> FakeQuantSequential:
    """Fold, fuse and instrument ``model`` (a copy of its float layers is shared, not copied).

    ``observer_factory`` (default: the config's observer) makes one observer per activation."""
    if not isinstance(model, nn.Sequential):
        raise LowbitError(f"static int8 conversion takes an nn.Sequential, got {type(model).__name__}")
    make = observer_factory or cfg.make_observer
    mods = [m for m in model if not isinstance(m, (nn.Dropout, nn.Identity))]
    layers: list[nn.Module] = []
    s = cfg.scheme
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise LowbitError("static int8: grouped / depthwise convolutions are not supported")
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                raise LowbitError(f"static int8: conv padding_mode {m.padding_mode!r} is not supported")
            j = i + 1
            if isinstance(m, nn.Conv2d) and j < len(mods) and isinstance(mods[j], nn.BatchNorm2d):
                m = fold_batchnorm(m, mods[j])
                j += 1
            relu = j < len(mods) and isinstance(mods[j], nn.ReLU)
            j += int(relu)
            cls = FakeQuantConv2d if isinstance(m, nn.Conv2d) else FakeQuantLinear
            layers.append(cls(m, _act_quantizer(cfg, make()), relu, s.bits, s.restricted_range, cfg.per_channel))
            i = j
            continue
        if isinstance(m, nn.MaxPool2d):
            if m.dilation not in (1, (1, 1)) or m.ceil_mode:
                raise LowbitError("static int8: MaxPool2d with dilation or ceil_mode is not supported")
        elif not isinstance(m, (nn.Flatten, nn.ReLU)):
            raise LowbitError(f"static int8: layer type {type(m).__name__} is not supported "
                              "(Conv2d, Linear, BatchNorm2d after Conv2d, ReLU, MaxPool2d, Flatten, Dropout)")
        layers.append(m)
        i += 1
    return FakeQuantSequential(_act_quantizer(cfg, make()), layers)


@torch.no_grad()
def calibrate(fq: FakeQuantSequential, data: Tensor, batch_size: int = 64) -> FakeQuantSequential:
    """Run ``data`` through the float model with every observer watching, then freeze the
    qparams (the model then simulates the integer network in float)."""
    if not isinstance(data, Tensor) or data.numel() == 0:
        raise LowbitError("calibration data must be a non-empty tensor")
    fq.eval().set_mode(observing=True, quantizing=False)
    for k in range(0, data.shape[0], batch_size):
        fq(data[k:k + batch_size].float())
    return fq.freeze()


def convert(fq: FakeQuantSequential) -> IntegerSequential:
    """The integer-only network of a calibrated (or QAT-trained) fake-quant model."""
    in_aq = fq.input_fq.qparams()
    mods: list[nn.Module] = [QuantizeInput(in_aq)]
    for m in fq.layers:
        if isinstance(m, _FakeQuantAffine):
            out_aq = m.out_fq.qparams()
            qw, s_w = quantize_weight(m.layer.weight, m.w_bits, m.restricted, m.per_channel)
            bias = None if m.layer.bias is None else m.layer.bias.detach()
            if isinstance(m, FakeQuantConv2d):
                c = m.layer
                mods.append(IntegerConv2d(qw, s_w, bias, in_aq, out_aq, m.relu, c.stride, c.padding, c.dilation,
                                          weight_bits=m.w_bits))
            else:
                mods.append(IntegerLinear(qw, s_w, bias, in_aq, out_aq, m.relu, weight_bits=m.w_bits))
            in_aq = out_aq
        elif isinstance(m, nn.MaxPool2d):
            mods.append(IntegerMaxPool2d(m.kernel_size, m.stride, m.padding))
        elif isinstance(m, nn.ReLU):
            mods.append(IntegerReLU(in_aq.zero))
        elif isinstance(m, nn.Flatten):
            mods.append(nn.Flatten(m.start_dim, m.end_dim))
        else:  # pragma: no cover - prepare() admits nothing else
            raise LowbitError(f"cannot convert {type(m).__name__}")
    mods.append(DequantizeOutput(in_aq))
    return IntegerSequential(*mods)


def quantize_static(model: nn.Sequential, calibration_data: Tensor, cfg: StaticInt8Config | None = None,
                    ) -> tuple[IntegerSequential, FakeQuantSequential]:
    """Post-training static quantization of a float ``nn.Sequential``: (integer model, its float
    simulation)."""
    cfg = cfg or StaticInt8Config()
    fq = calibrate(prepare(model.eval(), cfg), calibration_data)
    return convert(fq), fq
