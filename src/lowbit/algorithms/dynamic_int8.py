"""Dynamic-range int8 (post-training, no data): int8 weights per output channel, computed once;
activations quantized at run time, per token row (default) or per tensor; the matmul runs in
int8 × int8 → int32 and is rescaled once to float (`lowbit.kernels.dynamic_int8`).

The classic "dynamic quantization" of TensorFlow Lite and PyTorch, written from the formulas
rather than on a deprecated quantization framework. nn.Conv2d layers (groups = 1) become
`DynamicInt8Conv2d` (im2col + the same int8 matmul): `quantize_dynamic(model)` converts the
Linear and Conv2d layers of any network. Per-token scales are what keeps small LLMs
usable: a few huge activation features would otherwise set one coarse scale for every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.base import Method
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.formats.dynamic_int8 import DynamicInt8Weight, check_activations
from lowbit.nn.dynamic_conv import DynamicInt8Conv2d
from lowbit.formats.base import WeightFormat
from lowbit.nn.replace import replacement


@dataclass(frozen=True)
class DynamicInt8Config:
    activations: str = "token"  # "token": one activation scale per token row; "tensor": one per call

    def __post_init__(self):
        check_activations(self.activations)


@register_method("dynamic-int8")
class DynamicInt8(Method):
    config_cls = DynamicInt8Config
    needs_calibration = False

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        with torch.no_grad():
            return DynamicInt8Weight.quantize(module.weight.float(), self.config.activations)


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
