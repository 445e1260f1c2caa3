"""Magnitude pruning: zero the weights of smallest |W|, layer by layer. No data needed.

The baseline every pruning method is measured against (Han et al. 2015; Zhu & Gupta 2017 for
LLM-sized models). The comparison set is the whole layer: unstructured ``sparsity`` prunes exactly
floor(sparsity · out · in) weights of each layer (rows may end up unequally sparse); an N:M
``pattern`` keeps the N largest |W| of every M consecutive inputs of each row (see `pruning`).

``scope="global"`` (``--option scope=global``) prunes with *one* threshold over all the linear
layers the method is applied to: exactly floor(sparsity · Σ n_layer) weights of the smallest |W|
of the whole model go, so layers end up unequally sparse (ties at the threshold: earlier layer,
then earlier position, first). The walk over the model calls `Magnitude.prepare_model` first,
which computes every layer's mask before any layer is replaced (`global_magnitude_masks`). A
pattern is local by definition and cannot be global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.algorithms.pruning import (check_nm_columns, check_sparsity, layer_info, parse_pattern,
                                       prune_count, prune_mask, with_sparsity)
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5       # fraction of each layer's weights set to zero
    pattern: str | None = None  # "N:M" (N kept of every M inputs), overrides sparsity
    scope: str = "layer"        # "layer": each layer loses `sparsity`; "global": one threshold over all

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "magnitude")
        parse_pattern(self.pattern, "magnitude")
        if self.scope not in ("layer", "global"):
            raise LowbitError(f"magnitude scope must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and self.pattern is not None:
            raise LowbitError("magnitude scope=global prunes unstructured; an N:M pattern is per layer")


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


@torch.no_grad()
def global_magnitude_masks(weights: list[Tensor], sparsity: float) -> list[Tensor]:
    """One threshold over several weights: masks (True = pruned) removing exactly
    floor(sparsity · Σ numel) entries of smallest |W| overall. Ties at the threshold go in order
    (earlier tensor, then earlier flat position), like the stable sort of `lowest_k_mask`."""
    sparsity = check_sparsity(sparsity, "magnitude")
    for W in weights:
        check_finite(W, "global magnitude input")
    total = sum(W.numel() for W in weights)
    k = prune_count(total, sparsity)
    if k == 0:
        return [torch.zeros(W.shape, dtype=torch.bool, device=W.device) for W in weights]
    scores = torch.cat([W.detach().abs().reshape(-1).float().cpu() for W in weights])   # [Σ n]
    t = torch.kthvalue(scores, k).values                                                # k-th smallest |W|
    need = k - int((scores < t).sum())                                                  # ties at t to prune
    del scores
    masks = []
    for W in weights:
        a = W.detach().abs().float()
        mask = a < t.to(a.device)
        if need > 0:
            eq = (a == t.to(a.device)).reshape(-1)
            take = torch.nonzero(eq).flatten()[:need]
            mask.view(-1)[take] = True
            need -= take.numel()
        masks.append(mask)
    return masks


def model_linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The (name, linear) pairs `apply_data_free` visits, in its order and with its names."""
    from lowbit.models.families import FAMILIES, block_linears

    if getattr(getattr(model, "config", None), "model_type", None) not in FAMILIES:
        return [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    return list(block_linears(model).items())


@register_method("magnitude")
class Magnitude(Method):
    config_cls = MagnitudeConfig
    needs_calibration = False
    layer_records = ("layers",)

    def __init__(self, config: MagnitudeConfig):
        super().__init__(config)
        self.layers: dict[str, dict] = {}   # layer -> {"sparsity": achieved, "weights": n}

    def prepare_model(self, model: nn.Module) -> None:
        """Global scope: every layer's mask from one threshold, before any layer is replaced."""
        if self.config.scope != "global":
            return
        layers = model_linear_layers(model)
        for name, lin in layers:
            check_finite(lin.weight, name)
        masks = global_magnitude_masks([lin.weight for _, lin in layers], self.config.sparsity)
        self._global = {name: m for (name, _), m in zip(layers, masks)}

    def apply(self, layer_name: str, module: nn.Linear) -> Tensor:
        check_finite(module.weight, layer_name)
        if self.config.scope == "global":
            mask = getattr(self, "_global", {}).pop(layer_name, None)
            if mask is None:
                raise LowbitError(f"global magnitude pruning has no mask for {layer_name}: it needs the whole "
                                  "model first (apply it with apply_data_free / lowbit prune)")
            W = module.weight.detach().masked_fill(mask, 0.0)
            self.layers[layer_name] = layer_info(W)
            return W
        if self.config.pattern is not None:
            check_nm_columns(module.in_features, parse_pattern(self.config.pattern, "magnitude"), layer_name)
        W, _ = magnitude_prune(module.weight, self.config)
        self.layers[layer_name] = layer_info(W)
        return W

    def describe(self) -> dict:
        return with_sparsity(super().describe(), self.layers)
