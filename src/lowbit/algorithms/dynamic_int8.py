"""Dynamic-range int8 (post-training, no data): int8 weights per output channel, computed once;
activations quantized at run time, per token row (default) or per tensor; the matmul runs in
int8 × int8 → int32 and is rescaled once to float (`lowbit.kernels.dynamic_int8`).

The classic "dynamic quantization" of TensorFlow Lite and PyTorch, written from the formulas
rather than on a deprecated quantization framework. Per-token scales are what keeps small LLMs
usable: a few huge activation features would otherwise set one coarse scale for every token.
Ordinary networks (Linear and Conv2d layers of any model): `lowbit.cnn.dynamic.quantize_dynamic`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.base import Method
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.formats.dynamic_int8 import DynamicInt8Weight, check_activations
from lowbit.formats.base import WeightFormat


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
