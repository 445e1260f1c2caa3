"""Magnitude pruning: zero the weights of smallest |W|, layer by layer. No data needed.

The baseline every pruning method is measured against (Han et al. 2015; Zhu & Gupta 2017 for
LLM-sized models). The comparison set is the whole layer: unstructured ``sparsity`` prunes exactly
floor(sparsity · out · in) weights of each layer (rows may end up unequally sparse); an N:M
``pattern`` keeps the N largest |W| of every M consecutive inputs of each row (see `pruning`).

Not built here: *global* magnitude pruning (one threshold over all layers of the model) needs a
model-level pass that sees every layer's |W| before pruning any; a per-layer `Method` cannot do it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.algorithms.pruning import (check_nm_columns, check_sparsity, layer_info, parse_pattern,
                                       prune_mask, pruned_linear, with_sparsity)
from lowbit.core.primitives import check_finite
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5       # fraction of each layer's weights set to zero
    pattern: str | None = None  # "N:M" (N kept of every M inputs), overrides sparsity

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "magnitude")
        parse_pattern(self.pattern, "magnitude")


@torch.no_grad()
def magnitude_prune(W: Tensor, cfg: MagnitudeConfig) -> tuple[Tensor, Tensor]:
    """Pure solver: W [out, in] -> (pruned W, mask [out, in], True = pruned). Score |W_ij|."""
    if W.dim() != 2:
        raise LowbitError(f"magnitude pruning expects a 2-D weight, got shape {tuple(W.shape)}")
    nm = parse_pattern(cfg.pattern, "magnitude")
    if nm is not None:
        check_nm_columns(W.shape[1], nm, "magnitude")
    mask = prune_mask(W.detach().abs(), cfg.sparsity, nm, per_row=False)
    return W.detach().masked_fill(mask, 0.0), mask


@register_method("magnitude")
class Magnitude(Method):
    config_cls = MagnitudeConfig
    needs_calibration = False

    def __init__(self, config: MagnitudeConfig):
        super().__init__(config)
        self.layers: dict[str, dict] = {}   # layer -> {"sparsity": achieved, "weights": n}

    def apply(self, layer_name: str, module: nn.Linear) -> nn.Module:
        check_finite(module.weight, layer_name)
        if self.config.pattern is not None:
            check_nm_columns(module.in_features, parse_pattern(self.config.pattern, "magnitude"), layer_name)
        W, _ = magnitude_prune(module.weight, self.config)
        self.layers[layer_name] = layer_info(W)
        return pruned_linear(module, W)

    def describe(self) -> dict:
        return with_sparsity(super().describe(), self.layers)
