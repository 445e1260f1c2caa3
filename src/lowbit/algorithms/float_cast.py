"""float16 / bfloat16: store every linear weight in a 16-bit float type (no data, no grid).

The cheapest "quantization": half the bytes of fp32, error ~2⁻¹¹ (fp16) or ~2⁻⁸ (bf16) relative
per weight. How the matmul then runs is the format's ``compute`` setting (`lowbit.formats.floatw`):
by default the weight is widened to float32 per call, because this class of CPU (AVX2, no
AVX512-FP16/BF16 or AMX) computes in 16-bit floats far slower than in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.base import Method
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.formats.floatw import FloatWeight, check_compute
from lowbit.formats.base import WeightFormat


@dataclass(frozen=True)
class FloatCastConfig:
    compute: str = "fp32"  # "fp32": widen the weight per call; "native": matmul in the 16-bit type

    def __post_init__(self):
        check_compute(self.compute)


@register_method("fp16")
class FP16(Method):
    config_cls = FloatCastConfig
    needs_calibration = False
    dtype = "float16"

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        with torch.no_grad():
            fmt = FloatWeight.cast(module.weight.float(), self.dtype, self.config.compute)
        return fmt


@register_method("bf16")
class BF16(FP16):
    dtype = "bfloat16"
