"""The module that takes a linear layer's place once a method has solved it.

`Method.apply` returns what it computed, never a module: a :class:`~lowbit.formats.base.WeightFormat`
(a quantized, possibly sparse, weight) or a dense ``Tensor`` (a pruned weight that stays float).
The calibration runner turns that into the replacement module with :func:`replacement`, the one
place that knows which module holds which result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.formats.base import WeightFormat
from lowbit.nn.linear import QuantizedLinear


def dense_linear(module: nn.Linear, W: Tensor) -> nn.Linear:
    """A new dense nn.Linear with weight W (e.g. zeros where pruned) and the module's bias, on the
    module's device and in its dtype."""
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(W.to(lin.weight.dtype))
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    lin.requires_grad_(module.weight.requires_grad)
    return lin


def replacement(module: nn.Linear, result: WeightFormat | Tensor) -> nn.Module:
    """The module replacing ``module`` for a method's result: a QuantizedLinear over a weight format
    (keeping the module's bias), or a dense nn.Linear over a float weight."""
    if isinstance(result, WeightFormat):
        return QuantizedLinear(result, module.bias)
    if isinstance(result, Tensor):
        if tuple(result.shape) != tuple(module.weight.shape):
            raise ValueError(f"a method returned a weight of shape {tuple(result.shape)} for a layer of shape "
                             f"{tuple(module.weight.shape)}")
        return dense_linear(module, result)
    raise TypeError(f"Method.apply must return a WeightFormat or a Tensor, not {type(result).__name__}")
