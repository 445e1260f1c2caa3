"""SparseGPT: massive language models can be accurately pruned in one shot (Frantar & Alistarh, 2023).

Pruning as sparse reconstruction of each linear layer y = W x on calibration inputs:

    argmin_{Ŵ with mask M}  ||W X - Ŵ X||²_F  ∝  tr((W - Ŵ) H (W - Ŵ)ᵀ),   H = 2/n Σ_k x_k x_kᵀ

solved approximately with Optimal Brain Surgeon (OBS) updates. Removing (or changing) weight c of
a row w, the optimal compensation of the not-yet-processed weights F and its cost are

    δ_F = -(w_c - ŵ_c) / [H_F⁻¹]_cc · (H_F⁻¹)_{:,c}          ε_c = (w_c - ŵ_c)² / [H_F⁻¹]_cc    (OBS)

SparseGPT (paper §3, Algorithm 1) processes the columns left to right in one fixed order for all
rows, so — as in GPTQ — the successive inverses H_F⁻¹ are shared by all rows and their needed
rows are the rows of the upper Cholesky factor U of H⁻¹ ([H_F⁻¹]_cc = U_cc²). Then:

* **adaptive mask selection** (§3.3): the mask of each block of ``block_size`` (= Bs) columns is
  chosen just before the block is processed, from the *current* (already compensated) weights,
  pruning the lowest OBS errors w_c² / U_cc² (the paper's w²/[H⁻¹]²_cc with H⁻¹ the Cholesky
  factor): exactly floor(sparsity · rows · Bs) weights of the block;
* **N:M** (§3.4): for every group of M consecutive columns, when its first column is reached, the
  M − N lowest w_c² / U_cc² of each row's group are pruned (N kept; ``block_size`` must be a
  multiple of M so that no group straddles two blocks);
* **lazy batch updates**: within a block the OBS update is applied column by column, to the rest of
  the matrix once per block with one matrix product (as GPTQ);
* **joint quantization** (§3.5, ``quantize=True``): every weight that is kept is also rounded to the
  ``scheme`` grid in the same pass, and its rounding error compensated like a pruning error. The
  grid's qparams are chosen once from the original weights (as GPTQ's ``static_groups``); pruned
  weights take the code of 0, which the grid must represent exactly (``zero_point="int"``).

Shared with lowbit's GPTQ (imported from `gptq`): the Hessian accumulation of the method class
and the one-thread column loop; the rounding is `lowbit.core.grid.round_to_grid`, as GPTQ's. Dead
inputs (diag H = 0) have their weights zeroed and diag H set to 1; dampening λ = damp · mean(diag H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.gptq import GPTQ
from lowbit.algorithms.hessian import _one_cpu_thread, check_solver_inputs, inverse_hessian_factor
from lowbit.algorithms.pruning import (check_nm_columns, check_sparsity, hessian_error, layer_info, lowest_k_mask,
                                       nm_mask, parse_pattern, prune_count, sparsity_of,
                                       with_sparsity)
from lowbit.core.grid import check_finite, choose_qparams, group_layout, round_to_grid
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.base import WeightFormat


@dataclass(frozen=True)
class SparseGPTConfig:
    sparsity: float = 0.5         # fraction of each block's weights set to zero
    pattern: str | None = None    # "N:M" (N kept of every M inputs), overrides sparsity
    block_size: int = 128         # Bs: columns per mask selection and per lazy batch update
    damp: float = 0.01            # λ = damp · mean(diag H)
    quantize: bool = False        # also quantize the kept weights on `scheme` (joint, §3.5)
    scheme: QuantScheme = field(default_factory=QuantScheme)  # only with quantize=True (else the default)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "SparseGPT")
        nm = parse_pattern(self.pattern, "SparseGPT")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise LowbitError(f"SparseGPT block_size must be a positive integer, got {self.block_size!r}")
        if nm is not None and self.block_size % nm[1]:
            raise LowbitError(f"SparseGPT block_size {self.block_size} must be a multiple of M={nm[1]} "
                              f"for pattern {self.pattern}")
        if (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float))
                or not math.isfinite(self.damp) or self.damp <= 0):
            raise LowbitError(f"SparseGPT damp must be a finite number > 0, got {self.damp!r}")
        if not isinstance(self.quantize, bool):
            raise LowbitError(f"SparseGPT quantize must be true or false, got {self.quantize!r}")
        if not isinstance(self.scheme, QuantScheme):
            raise LowbitError(f"SparseGPT scheme must be a QuantScheme, got {type(self.scheme).__name__}")
        if not self.quantize and self.scheme != QuantScheme():
            raise LowbitError(f"SparseGPT uses a scheme ({self.scheme.short_name()}) only with quantize=True "
                              "(joint pruning + quantization); set quantize=true or leave the scheme at its default")
        if self.quantize and self.scheme.zero_point == "float":
            raise LowbitError("SparseGPT joint quantization needs a grid that holds 0 exactly "
                              "(zero_point='float' does not); use an integer zero-point")


@dataclass
class SparseGPTResult:
    W: Tensor                     # [out, in] the pruned (and, jointly, quantized) weights, float
    mask: Tensor                  # [out, in] bool, True = pruned by the mask selection
    weight: AffineWeight | None   # the packed grid (quantize=True), else None
    info: dict                    # error, sparsity, dead_columns, lambda


@torch.no_grad()
def sparsegpt_prune(W: Tensor, H: Tensor, cfg: SparseGPTConfig, *,
                    dtype: torch.dtype = torch.float32) -> SparseGPTResult:
    """Pure solver (paper Algorithm 1). W [out, in] weights, H [in, in] = 2/n Σ x xᵀ.

    ``info["error"]`` = tr((W - Ŵ) H (W - Ŵ)ᵀ) with the H given. ``dtype``: precision of the
    solve (float64 for tests)."""
    check_solver_inputs(W, H, "SparseGPT")
    rows, cols = W.shape
    nm = parse_pattern(cfg.pattern, "SparseGPT")
    if nm is not None:
        check_nm_columns(cols, nm, "SparseGPT")
    W_in, H_in = W, H
    W = W.detach().to(dtype).clone()                              # [out, in]
    H = H.detach().to(device=W.device, dtype=dtype).clone()       # [in, in]

    dead = torch.diagonal(H) == 0                                 # inputs never active
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scheme = cfg.scheme
    if cfg.quantize:                                              # static grid, original weights
        scale, zero = choose_qparams(W, scheme)                   # [out, n_groups] ([1, 1] per-tensor)
        scale = scale.to(W)
        zero = None if zero is None else zero.to(W)
        _, g = group_layout((rows, cols), scheme)
        group_of = [j // g if scheme.granularity == "group" else 0 for j in range(cols)]
        Qint = torch.empty(rows, cols, dtype=torch.int32, device=W.device)

    Hinv, lam = inverse_hessian_factor(H, cfg.damp, "SparseGPT")  # U [in, in], [H_F⁻¹]_cc = U_cc²
    del H
    Q = torch.zeros_like(W)                                       # [out, in] result
    M = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    B = cfg.block_size
    with _one_cpu_thread(W.device):
        for i1 in range(0, cols, B):
            i2 = min(i1 + B, cols)
            W1 = W[:, i1:i2].clone()               # [out, b] this block, updated eagerly
            Err1 = torch.zeros_like(W1)            # [out, b] scaled errors (w - ŵ) / U_cc
            Hinv1 = Hinv[i1:i2, i1:i2]             # [b, b]
            d = torch.diagonal(Hinv1)              # [b]   U_cc
            M1 = M[:, i1:i2]                       # [out, b] view: this block's mask
            if nm is None:                         # adaptive mask selection over the block
                M1 |= lowest_k_mask(W1 ** 2 / d[None, :] ** 2, prune_count(W1.numel(), cfg.sparsity))
            for i in range(i2 - i1):
                j = i1 + i
                if nm is not None and i % nm[1] == 0:   # N:M: choose this group's mask now
                    sl = slice(i, i + nm[1])
                    M1[:, sl] = nm_mask(W1[:, sl] ** 2 / d[None, sl] ** 2, *nm)
                w = W1[:, i]                                               # [out]
                q = w.masked_fill(M1[:, i], 0.0)                           # prune
                if cfg.quantize:                                           # and round the rest
                    qi, q = round_to_grid(q, scale[:, group_of[j]],
                                           None if zero is None else zero[:, group_of[j]], scheme)
                    Qint[:, j] = qi.to(torch.int32)
                Q[:, j] = q
                err = (w - q) / d[i]                                       # OBS, scaled error
                W1[:, i + 1:] -= err[:, None] * Hinv1[i, i + 1:][None, :]  # OBS update in the block
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                           # lazy batch update
            del W1, Err1

    fmt = AffineWeight.from_integers(Qint, scale, zero, scheme) if cfg.quantize else None
    W_hat = fmt.dequantize() if fmt is not None else Q
    info = {"error": hessian_error(W_in, W_hat, H_in), "sparsity": sparsity_of(W_hat),
            "dead_columns": int(dead.sum()), "lambda": lam}
    return SparseGPTResult(W=W_hat, mask=M, weight=fmt, info=info)


@register_method("sparsegpt")
class SparseGPT(GPTQ):
    """Accumulates Σ x xᵀ and the token count per layer exactly as GPTQ does (inherited `observe`
    and `statistics`); prunes with `sparsegpt_prune`."""

    config_cls = SparseGPTConfig
    needs_calibration = True
    layer_records = ("errors", "layers")

    def __init__(self, config: SparseGPTConfig):
        super().__init__(config)
        self.layers: dict[str, dict] = {}   # layer -> {"sparsity", "weights", "error"}

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat | Tensor:
        check_finite(module.weight, layer_name)
        H = self.take_hessian(layer_name, "SparseGPT")                         # H = 2/n Σ x xᵀ
        nm = parse_pattern(self.config.pattern, "SparseGPT")
        if nm is not None:
            check_nm_columns(module.in_features, nm, layer_name)
        res = sparsegpt_prune(module.weight, H, self.config)
        self.errors[layer_name] = res.info["error"]
        self.layers[layer_name] = {**layer_info(res.W), "error": res.info["error"]}
        if res.weight is not None:
            return res.weight
        return res.W

    def describe(self) -> dict:
        d = super().describe()
        if not self.config.quantize:
            d["config"]["scheme"] = None
        return with_sparsity(d, self.layers)
