"""Ternary (BitNet b1.58) weight quantization, post-training and data-free.

Ma et al. 2024, "The Era of 1-bit LLMs", eq. (1)-(3): scale the weight by its absmean and round
every value to the nearest of {-1, 0, +1}:

    gamma = mean(|W|)                               over the tensor (or over each output row)
    W~    = RoundClip(W / (gamma + eps), -1, 1)      RoundClip(x, a, b) = max(a, min(b, round(x)))
    W_hat = gamma * W~

(the paper writes gamma + eps in the denominator; eps only guards an all-zero slice.)

BitNet trains with this quantizer in the loop (quantization-aware from scratch); applied after
training to a model that was not, it destroys the model — on SmolLM2-135M perplexity goes from
~37 to the tens of thousands. It is here for the storage format and its fast kernel (a 2-bit
GEMV), and as the baseline such models are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core import grid
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError
from lowbit.formats.ternary import GRANULARITIES, TernaryWeight, ternary_grid
from lowbit.formats.base import WeightFormat


@dataclass(frozen=True)
class TernaryConfig:
    granularity: str = "tensor"  # "tensor" (the paper) or "channel" (one gamma per output row)
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"ternary granularity must be tensor or channel, got {self.granularity!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise LowbitError(f"ternary eps must be a positive number, got {self.eps!r}")


def ternary_quantize(W: Tensor, cfg: TernaryConfig) -> TernaryWeight:
    """Pure solver: W [out, in] -> packed TernaryWeight (eq. 1-3 of the b1.58 paper)."""
    if W.dim() != 2 or W.numel() == 0:
        raise LowbitError(f"ternary quantization needs a non-empty 2-D weight, got shape {tuple(W.shape)}")
    check_finite(W, "given to ternary_quantize")
    W = W.detach().float()
    if cfg.granularity == "tensor":
        gamma = W.abs().mean().reshape(1)                    # [1]
    else:
        gamma = W.abs().mean(dim=1)                          # [out]
    # RoundClip(W / (gamma + eps), -1, 1): the symmetric restricted 2-bit grid with scale gamma + eps
    Wt = grid.quantize(W, (gamma + cfg.eps).reshape(-1, 1), None, ternary_grid(cfg.granularity))
    return TernaryWeight.from_ternary(Wt.to(torch.int8), gamma, cfg.granularity)


@register_method("ternary")
class Ternary(Method):
    config_cls = TernaryConfig
    needs_calibration = False

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        with torch.no_grad():
            fmt = ternary_quantize(module.weight, self.config)
        return fmt
