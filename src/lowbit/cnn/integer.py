"""Integer-only modules of a full-integer static int8 network (ordinary CNNs / MLPs).

Between modules flow int8 tensors of codes; each tensor's real meaning is given by its
:class:`~lowbit.core.static_qparams.ActQParams` (scale, zero-point, integer range), fixed at
calibration (or QAT) time.

* :class:`QuantizeInput`   float -> int8 (the only float-to-integer step, at the input)
* :class:`IntegerLinear`   int8 -> int8: int32 accumulation, int32 bias, fixed-point requantization,
                           optional fused ReLU (all arithmetic in :mod:`lowbit.kernels.static_int8`)
* :class:`IntegerConv2d`   the same for a 2-D convolution (groups = 1)
* :class:`IntegerMaxPool2d` max over int8 codes (monotone, so the scale and zero-point carry over)
* :class:`IntegerReLU`     clamp at the zero-point (a ReLU that could not be fused)
* ``nn.Flatten``           works on int8 tensors as is
* :class:`DequantizeOutput` int8 -> float at the end (s * (q - z))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.core.static_qparams import ActQParams
from lowbit.errors import LowbitError
from lowbit.kernels import static_int8 as K


class QuantizeInput(nn.Module):
    def __init__(self, aq: ActQParams):
        super().__init__()
        self.aq = aq

    def forward(self, x: Tensor) -> Tensor:
        a = self.aq
        return K.quantize_activation(x, a.scale, a.zero, a.qmin, a.qmax)

    def extra_repr(self) -> str:
        return f"{self.aq}"


class DequantizeOutput(nn.Module):
    def __init__(self, aq: ActQParams):
        super().__init__()
        self.aq = aq

    def forward(self, q: Tensor) -> Tensor:
        return K.dequantize_activation(q, self.aq.scale, self.aq.zero)


class _IntegerAffine(nn.Module):
    """Shared by IntegerLinear / IntegerConv2d: codes, int32 bias, per-channel (M0, n)."""

    def __init__(self, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, in_aq: ActQParams,
                 out_aq: ActQParams, relu: bool, weight_bits: int = 8):
        super().__init__()
        self.in_aq, self.out_aq, self.relu = in_aq, out_aq, bool(relu)
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.register_buffer("bias_q", K.quantize_bias(bias, in_aq.scale, w_scale).to(torch.int32))
        M = (in_aq.scale * w_scale.double()) / out_aq.scale  # the real multipliers, float64
        M0, n = K.quantize_multipliers(M)
        self.register_buffer("M0", M0.to(torch.int32))
        self.register_buffer("shift", n.to(torch.int32))
        self.weight_bits = int(weight_bits)
        self.act_min = max(out_aq.qmin, out_aq.zero) if relu else out_aq.qmin
        self.act_max = out_aq.qmax
        self.matmul = "auto"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _requantize(self, acc: Tensor, channel_dim: int) -> Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        return K.requantize(acc, self.M0.long().reshape(shape), self.shift.long().reshape(shape),
                            self.out_aq.zero, self.act_min, self.act_max)

    def _check_input(self, q: Tensor) -> None:
        if q.dtype != torch.int8:
            raise LowbitError(f"{type(self).__name__} expects int8 codes, got {q.dtype}")


class IntegerLinear(_IntegerAffine):
    def accumulators(self, q: Tensor) -> Tensor:
        return K.int_linear_acc(q, self.in_aq.zero, self.qweight, self.bias_q, self.matmul)

    def forward(self, q: Tensor) -> Tensor:
        self._check_input(q)
        return self._requantize(self.accumulators(q), -1)


class IntegerConv2d(_IntegerAffine):
    def __init__(self, qweight, w_scale, bias, in_aq, out_aq, relu, stride=1, padding=0, dilation=1, weight_bits=8):
        super().__init__(qweight, w_scale, bias, in_aq, out_aq, relu, weight_bits)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def accumulators(self, q: Tensor) -> Tensor:
        return K.int_conv2d_acc(q, self.in_aq.zero, self.qweight, self.bias_q, self.stride, self.padding,
                                self.dilation, self.matmul)

    def forward(self, q: Tensor) -> Tensor:
        self._check_input(q)
        return self._requantize(self.accumulators(q), 1)


class IntegerMaxPool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, q: Tensor) -> Tensor:
        # int8 codes are exact in float32; max commutes with the monotone map r = s (q - z)
        return F.max_pool2d(q.float(), self.kernel_size, self.stride, self.padding).to(torch.int8)


class IntegerReLU(nn.Module):
    def __init__(self, zero: int):
        super().__init__()
        self.zero = int(zero)

    def forward(self, q: Tensor) -> Tensor:
        return q.clamp(min=self.zero)


class IntegerSequential(nn.Sequential):
    """QuantizeInput, integer modules ..., DequantizeOutput. ``int_forward`` stops before the last."""

    def int_forward(self, x: Tensor) -> Tensor:
        for m in list(self)[:-1]:
            x = m(x)
        return x

    def stored_bytes(self, packed: bool = True) -> int:
        """Bytes an integer-only runtime needs: weight codes (packed at their bit width, or one
        byte each), int32 biases, int32 multipliers M0 and one-byte shifts per output channel,
        and 8 bytes (scale, zero-point) for the input and the output of the network."""
        n = 0
        for m in self:
            if isinstance(m, _IntegerAffine):
                bits = m.weight_bits if packed else 8
                n += -(-m.qweight.numel() * bits // 8) + m.qweight.shape[0] * (4 + 4 + 1)
        return n + 16
