"""Dynamic-range int8 for ordinary networks: :func:`quantize_dynamic` replaces every nn.Linear
(with the ``dynamic-int8`` method's QuantizedLinear) and nn.Conv2d (with :class:`DynamicInt8Conv2d`)
of any model.

DynamicInt8Conv2d is a drop-in for nn.Conv2d (groups = 1, zero padding) with dynamic int8 compute.
The weight [C_out, C_in, kh, kw] is flattened to [C_out, C_in·kh·kw] and stored as a
`DynamicInt8Weight` (int8 codes, one scale per output channel); the forward pass is im2col
(``F.unfold``) followed by the dynamic int8 matmul, so each output pixel's receptive field is one
activation row with its own scale ("token" granularity) — or one scale for the whole input
("tensor"). See `lowbit.kernels.dynamic_int8.conv2d`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.algorithms.dynamic_int8 import DynamicInt8, DynamicInt8Config
from lowbit.core.grid import check_finite
from lowbit.errors import LowbitError
from lowbit.formats.dynamic_int8 import DynamicInt8Weight
from lowbit.kernels import dynamic_int8 as kdyn
from lowbit.nn.replace import replacement


class DynamicInt8Conv2d(nn.Module):
    def __init__(self, weight_format: DynamicInt8Weight, bias: Tensor | None, in_channels: int,
                 kernel_size: tuple[int, int], stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
        super().__init__()
        kh, kw = kernel_size
        if weight_format.shape[1] != in_channels * kh * kw:
            raise LowbitError(f"weight has {weight_format.shape[1]} columns, expected {in_channels}·{kh}·{kw}")
        self.in_channels, self.out_channels = in_channels, weight_format.shape[0]
        self.kernel_size, self.stride = (kh, kw), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.activations = weight_format.activations
        self.register_buffer("qweight", weight_format.qweight)
        self.register_buffer("wscale", weight_format.wscale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float(), requires_grad=False)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, activations: str = "token") -> "DynamicInt8Conv2d":
        if conv.groups != 1:
            raise LowbitError(f"dynamic int8 conv supports groups=1 only, got groups={conv.groups}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise LowbitError(f"dynamic int8 conv needs explicit zero padding, "
                              f"got {conv.padding!r}/{conv.padding_mode}")
        W = conv.weight.detach().float().reshape(conv.out_channels, -1)
        fmt = DynamicInt8Weight.quantize(W, activations)
        return cls(fmt, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    @property
    def weight_format(self) -> DynamicInt8Weight:
        return DynamicInt8Weight(qweight=self.qweight, wscale=self.wscale, shape=tuple(self.qweight.shape),
                                 activations=self.activations)

    def forward(self, x: Tensor) -> Tensor:
        return kdyn.conv2d(x, self.weight_format, self.bias, self.kernel_size, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, activations={self.activations}")


def quantize_dynamic(model: nn.Module, activations: str = "token") -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of any model with its dynamic int8 twin, in place
    (for ordinary networks such as CNNs; `lowbit.api.quantize` covers the Linear layers of LLMs
    and encoders). Returns the model."""
    meth = DynamicInt8(DynamicInt8Config(activations))
    targets = [(n, m) for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Conv2d):  # (groups=1) the CNN's own int8 convolution
            check_finite(mod.weight, name)
            with torch.no_grad():
                new = DynamicInt8Conv2d.from_float(mod, activations)
        else:
            new = replacement(mod, meth.apply(name, mod))
        setattr(parent, child, new)
    return model
