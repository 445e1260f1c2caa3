"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter, 2023).

A weight's importance is its magnitude times the norm of the input feature it multiplies,

    S_ij = |W_ij| · ‖X_j‖₂,        ‖X_j‖₂ = sqrt(Σ_k x_kj²) over all calibration tokens k   (eq. 1)

and weights are compared *per output* (within each row of W: every row loses exactly
floor(sparsity · in) weights — the paper's §3 finding that per-output comparison matters for LLMs),
or within each N:M group of a row. No weight update, no Hessian: one pass of activations.

``observe`` accumulates Σ x_j² per input column (each batch's sum in float32, the running total in
float64, so no float64 copy of the activations is made) and the token count; `statistics()`
exposes these sums. Scaling all norms by the
same factor (e.g. dividing by the token count) changes no decision, so the sums are used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.algorithms.pruning import (check_nm_columns, check_sparsity, layer_info, parse_pattern,
                                       prune_mask, with_sparsity)
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class WandaConfig:
    sparsity: float = 0.5       # fraction of each output row's weights set to zero
    pattern: str | None = None  # "N:M" (N kept of every M inputs), overrides sparsity

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "Wanda")
        parse_pattern(self.pattern, "Wanda")


def wanda_score(W: Tensor, sq_norms: Tensor) -> Tensor:
    """S = |W| · ‖X_j‖₂ (eq. 1). W [out, in], sq_norms [in] = Σ_k x_kj² -> S [out, in] (float64)."""
    return W.detach().double().abs() * sq_norms.detach().double().to(W.device).sqrt()[None, :]


@torch.no_grad()
def wanda_prune(W: Tensor, sq_norms: Tensor, cfg: WandaConfig) -> tuple[Tensor, Tensor]:
    """Pure solver: W [out, in], sq_norms [in] -> (pruned W, mask, True = pruned)."""
    if W.dim() != 2:
        raise LowbitError(f"Wanda expects a 2-D weight, got shape {tuple(W.shape)}")
    if tuple(sq_norms.shape) != (W.shape[1],):
        raise LowbitError(f"Wanda activation norms have shape {tuple(sq_norms.shape)}, expected ({W.shape[1]},)")
    if not torch.isfinite(sq_norms).all() or (sq_norms < 0).any():
        raise LowbitError("Wanda activation norms must be finite and >= 0")
    nm = parse_pattern(cfg.pattern, "Wanda")
    if nm is not None:
        check_nm_columns(W.shape[1], nm, "Wanda")
    mask = prune_mask(wanda_score(W, sq_norms), cfg.sparsity, nm, per_row=True)
    return W.detach().masked_fill(mask, 0.0), mask


@register_method("wanda")
class Wanda(Method):
    config_cls = WandaConfig
    needs_calibration = True
    layer_records = ("layers",)

    def __init__(self, config: WandaConfig):
        super().__init__(config)
        self._sq: dict[str, Tensor] = {}      # layer -> Σ x_j²  [in] float64
        self._count: dict[str, Tensor] = {}   # layer -> number of input rows (tokens), int64 [1]
        self.layers: dict[str, dict] = {}     # layer -> {"sparsity": achieved, "weights": n}

    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:
        if x.shape[-1] != module.in_features:
            raise LowbitError(f"{layer_name}: input has {x.shape[-1]} features, layer expects {module.in_features}")
        X = x.detach().reshape(-1, x.shape[-1]).float()                    # [tokens, in]
        if layer_name not in self._sq:
            self._sq[layer_name] = torch.zeros(X.shape[1], dtype=torch.float64, device=x.device)
            self._count[layer_name] = torch.zeros(1, dtype=torch.int64, device=x.device)
        self._sq[layer_name] += (X * X).sum(dim=0).double()   # one float32 batch sum, float64 across batches
        self._count[layer_name] += X.shape[0]

    def statistics(self) -> dict[str, Tensor]:
        out = {}
        for name in self._sq:
            out[f"{name}.sq_norms"] = self._sq[name]
            out[f"{name}.count"] = self._count[name]
        return out

    def apply(self, layer_name: str, module: nn.Linear) -> Tensor:
        check_finite(module.weight, layer_name)
        if layer_name not in self._sq or int(self._count[layer_name].item()) == 0:
            raise LowbitError(f"Wanda saw no calibration inputs for {layer_name}")
        if self.config.pattern is not None:
            check_nm_columns(module.in_features, parse_pattern(self.config.pattern, "Wanda"), layer_name)
        sq = self._sq.pop(layer_name)
        self._count.pop(layer_name)
        W, _ = wanda_prune(module.weight, sq, self.config)
        self.layers[layer_name] = layer_info(W)
        return W

    def describe(self) -> dict:
        return with_sparsity(super().describe(), self.layers)
