"""Round-to-nearest (RTN) weight-only quantization.

The baseline every other method is measured against: for each slice (tensor / output channel /
group of input columns) pick the scale from the slice's range (absmax, or min/max with an integer
zero-point) and round each weight to the nearest grid point. No data needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.formats.affine import AffineWeight
from lowbit.formats.base import WeightFormat


@dataclass(frozen=True)
class RTNConfig:
    scheme: QuantScheme = field(default_factory=QuantScheme)


def rtn_quantize(W: Tensor, cfg: RTNConfig) -> AffineWeight:
    """Pure solver: W [out, in] -> packed AffineWeight, nearest grid point per weight."""
    return AffineWeight.quantize_rtn(W.detach().float(), cfg.scheme)


@register_method("rtn")
class RTN(Method):
    config_cls = RTNConfig
    needs_calibration = False

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        with torch.no_grad():
            fmt = rtn_quantize(module.weight, self.config)
        return fmt
