"""Shared pieces of the pruning methods (magnitude, Wanda, SparseGPT): settings, masks, results.

Masks are boolean tensors shaped like the weight, **True where the weight is pruned** (set to 0).
Which weights go is decided by a score (|W| for magnitude, |W|·‖X_j‖₂ for Wanda, w²/[H⁻¹]²_jj for
SparseGPT): the lowest scores are pruned.

Two kinds of sparsity:

* **unstructured** — a fraction ``sparsity`` in [0, 1) of the weights of a comparison set (the
  whole layer, one output row, or one SparseGPT block) is pruned: exactly
  ``k = floor(sparsity · n)`` of its n weights (a 1e-9 slack absorbs float noise such as
  0.3 · 10 = 2.9999…). Ties are broken by position (a stable sort: the earlier weight goes
  first), so the count is always exact, even for constant scores.
* **N:M** (``pattern="2:4"``) — along the input dimension, every group of M consecutive columns
  of a row (columns [0, M), [M, 2M), …) keeps exactly **N** weights and prunes M − N:
  "2:4" = 2 of every 4 kept (50 %), "4:8" = 4 of every 8 kept (50 %), "1:4" = 1 of 4 kept (75 %).
  This is the convention of NVIDIA's sparse tensor cores. The layer's in_features must be a
  multiple of M. A pattern overrides ``sparsity``.

Pruned layers stay ordinary dense ``nn.Linear`` modules holding zeros; `lowbit.nn.replace.dense_linear` builds one
and `layer_info` records what was achieved. `lowbit.algorithms.sparse_storage` turns them into
compressed N:M or CSR weights run by the native sparse kernels (``lowbit prune --storage``).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError


# -- settings --------------------------------------------------------------------------------------
def check_sparsity(sparsity, who: str) -> float:
    """A sparsity in [0, 1) as a float, or a one-line LowbitError naming ``who``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0 <= sparsity < 1:
        raise LowbitError(f"{who} sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern, who: str) -> tuple[int, int] | None:
    """``"N:M"`` -> (N, M) with 1 <= N < M (N kept of every M); None -> None."""
    if pattern is None:
        return None
    m = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if m is None:
        raise LowbitError(f"{who} pattern must be 'N:M' (N kept of every M consecutive inputs, e.g. '2:4'), "
                          f"got {pattern!r}")
    n, M = int(m.group(1)), int(m.group(2))
    if not 1 <= n < M:
        raise LowbitError(f"{who} pattern {pattern!r} needs 1 <= N < M (N of every M weights are kept)")
    return n, M


def prune_count(n: int, sparsity: float) -> int:
    """How many of n weights an unstructured ``sparsity`` prunes: floor(sparsity · n)."""
    return min(n, int(math.floor(sparsity * n + 1e-9)))


# -- masks -----------------------------------------------------------------------------------------
def lowest_k_mask(score: Tensor, k: int, dim: int | None = None) -> Tensor:
    """True at the k lowest scores: over the whole tensor (dim=None) or along ``dim`` (k per
    slice). Ties: the earlier position is pruned first (stable sort)."""
    if dim is None:
        flat = score.reshape(-1)
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=score.device)
        if k > 0:
            mask[torch.sort(flat, stable=True).indices[:k]] = True
        return mask.reshape(score.shape)
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)
        mask.scatter_(dim, idx, True)
    return mask


def unstructured_mask(score: Tensor, sparsity: float, per_row: bool = False) -> Tensor:
    """Prune mask with exactly floor(sparsity · n) weights pruned over the whole tensor, or in
    every row (``per_row``: n = columns)."""
    if per_row:
        return lowest_k_mask(score, prune_count(score.shape[1], sparsity), dim=1)
    return lowest_k_mask(score, prune_count(score.numel(), sparsity))


def check_nm_columns(cols: int, nm: tuple[int, int], who: str) -> None:
    if cols % nm[1]:
        raise LowbitError(f"{who}: {cols} input columns are not a multiple of M={nm[1]} for pattern "
                          f"{nm[0]}:{nm[1]}")


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Prune mask of an N:M pattern: in every group of m consecutive columns of every row the
    m − n lowest scores are pruned (n kept). score [rows, cols], cols a multiple of m."""
    rows, cols = score.shape
    if cols % m:
        raise LowbitError(f"{cols} columns are not a multiple of M={m} for pattern {n}:{m}")
    groups = score.reshape(rows, cols // m, m)                             # [rows, cols/m, m]
    return lowest_k_mask(groups, m - n, dim=2).reshape(rows, cols)


def prune_mask(score: Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> Tensor:
    """The mask for either kind of sparsity (a pattern wins over ``sparsity``)."""
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, per_row=per_row)


# -- results ---------------------------------------------------------------------------------------
def sparsity_of(W: Tensor) -> float:
    """Fraction of exact zeros."""
    return float((W == 0).sum()) / max(1, W.numel())


def hessian_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64: the output error on calibration inputs that SparseGPT
    minimises (H = 2/n Σ x xᵀ)."""
    D = W.detach().double() - W_hat.detach().double()                     # [out, in]
    return float(((D @ H.detach().double().to(D.device)) * D).sum())


def layer_info(W: Tensor) -> dict:
    """Per-layer record: achieved sparsity (exact zeros) and the number of weights."""
    return {"sparsity": round(sparsity_of(W), 6), "weights": int(W.numel())}


def with_sparsity(record: dict, layers: dict[str, dict]) -> dict:
    """A Method.describe() record plus the achieved sparsity: overall (weighted by layer size,
    None before any layer is pruned) and per layer."""
    n = sum(v["weights"] for v in layers.values())
    zeros = sum(v["sparsity"] * v["weights"] for v in layers.values())
    record["sparsity"] = round(zeros / n, 6) if n else None
    record["layers"] = {k: dict(v) for k, v in layers.items()}
    return record
