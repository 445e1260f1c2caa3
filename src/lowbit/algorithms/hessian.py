"""Shared pieces of the Hessian-based solvers (GPTQ, SparseGPT, AQLM, QuIP#, GPTQ onto a GGUF
type's grid): the input checks, the column order, the inverse Hessian's Cholesky factor, the
column loop of GPTQ's Algorithm 1 for any rounding rule, and the output error tr(D H Dᵀ).

Notation as in `lowbit.algorithms.gptq` (whose module docstring derives the algorithm): W [out, in]
weights, H [in, in] = 2/n Σ x xᵀ over calibration inputs, Hinv the upper Cholesky factor of
(H + λI)⁻¹ (its rows are the eq. 3 rows of H_F⁻¹).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.core.grid import all_finite, check_finite
from lowbit.errors import LowbitError


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of tiny dependent vector ops; on a CPU, waking threads for
    each costs more than it saves (measured 15x slower with 2 threads on a busy 2-core machine),
    so the solve runs on one thread and restores the setting afterwards."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def inverse_hessian_factor(H: Tensor, damp: float, who: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), computed in H's own
    storage and returned (the caller's H is U afterwards): each LAPACK step makes one temporary
    copy, so an [in, in] matrix exists at most twice (an 8B down projection's H is 0.8 GB).
    Factored on one thread: LAPACK's factorizations give other bits on other thread counts, and a
    torchrun process (one thread) must solve exactly as a multi-threaded single process does.
    Shared by GPTQ and SparseGPT."""
    lam = damp * torch.diagonal(H).mean()
    H.diagonal().add_(lam)
    bad = torch.zeros((), dtype=torch.int32, device=H.device)
    with _one_cpu_thread(H.device):
        torch.linalg.cholesky_ex(H, out=(H, bad))            # L in the lower triangle
        if bad.item() == 0:
            H.tril_()                                        # exactly L (the upper half held H)
            torch.cholesky_inverse(H, out=H)                 # (H + λI)⁻¹
            torch.linalg.cholesky_ex(H, upper=True, out=(H, bad))
    if bad.item() != 0:
        raise LowbitError(f"{who} Hessian is not positive definite after dampening (damp={damp}); increase damp")
    return H, float(lam)


@torch.no_grad()
def check_solver_inputs(W: Tensor, H: Tensor, who: str) -> None:
    """One-line errors for a weight/Hessian pair a Hessian-based solver cannot take."""
    if W.dim() != 2:
        raise LowbitError(f"{who} expects a 2-D weight, got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise LowbitError(f"{who} Hessian has shape {tuple(H.shape)}, expected ({cols}, {cols}) "
                          f"for weight {tuple(W.shape)}")
    check_finite(W, "W")
    if not all_finite(H):
        raise LowbitError(f"{who} Hessian has NaN/Inf values")


def column_order(H: Tensor, act_order: bool, device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(perm, dead) for H [in, in]: the solve's column order (descending diag H with act_order,
    stable so ties keep their index order; a dead input, diag H = 0, counts as 1) and the dead
    inputs (bool [in]). A dead input never affected the calibration outputs: its weights are
    zeroed before the solve, and `permuted_inverse_factor` makes H invertible there."""
    diag = torch.diagonal(H).to(device=device, dtype=dtype).clone()
    dead = diag == 0
    diag[dead] = 1.0
    perm = (torch.argsort(diag, descending=True, stable=True) if act_order
            else torch.arange(H.shape[0], device=device))
    return perm, dead


def permuted_inverse_factor(H: Tensor, perm: Tensor, dead: Tensor, damp: float, who: str,
                            dtype: torch.dtype) -> tuple[Tensor, float]:
    """`inverse_hessian_factor` of H in the solve's order (a copy in ``dtype`` on perm's device;
    the caller's H is untouched), dead inputs' diagonal set to 1 first. Its rows are the eq. 3
    rows of H_F⁻¹."""
    Hp = H.detach().to(device=perm.device, dtype=dtype)[perm[:, None], perm[None, :]]  # one gather
    Hp.diagonal()[dead[perm]] = 1.0
    return inverse_hessian_factor(Hp, damp, who)


def hessian_error(D: Tensor, H: Tensor) -> float:
    """tr(D H Dᵀ) for D = W - Q [out, in] (in D's dtype): the output error GPTQ minimises."""
    Hd = H.detach().to(device=D.device, dtype=D.dtype)
    return float(((D @ Hd) * D).sum())


@dataclass
class AffineGrid:
    """An affine grid that `gptq_columns` can round onto in its native loop (csrc/gptq.c)
    instead of calling a Python rule per column (`lowbit.kernels.gptq_solver`), with bit-identical results (the same float32
    operations as `lowbit.core.grid.round_to_grid`).

    ``scale`` / ``zero`` [out or 1, n_groups] (zero None: symmetric; ``float_zero``: added before
    rounding, else after), ``group`` (int64 [in]) the group of each position in visiting order,
    codes clamped to [qmin, qmax] and written to ``codes`` (int32 [out, in], visiting order).
    ``begin(j, current)``, when given, is called at every position in ``starts`` before that
    column is rounded (a group whose qparams are fitted to its current weights)."""

    scale: Tensor
    zero: Tensor | None
    float_zero: bool
    group: Tensor
    qmin: float
    qmax: float
    codes: Tensor
    starts: frozenset = frozenset()
    begin: Callable | None = None


def _native_loop(W: Tensor, Hinv: Tensor, grid: AffineGrid | None):
    """The native column-loop library when it can run this solve (float32 CPU tensors in the
    layouts it reads), else None."""
    if grid is None or W.dtype != torch.float32 or W.device.type != "cpu" or not W.is_contiguous() \
            or Hinv.dtype != torch.float32 or Hinv.device.type != "cpu" or Hinv.stride(1) != 1:
        return None
    ts = [grid.scale, grid.group, grid.codes] + ([] if grid.zero is None else [grid.zero])
    if any(t.device.type != "cpu" for t in ts) or grid.scale.dtype != torch.float32 \
            or (grid.zero is not None and (grid.zero.dtype != torch.float32 or grid.zero.shape != grid.scale.shape
                                           or grid.zero.stride() != grid.scale.stride())) \
            or grid.group.dtype != torch.int64 or not grid.group.is_contiguous() \
            or grid.codes.dtype != torch.int32 or not grid.codes.is_contiguous() or grid.codes.shape != W.shape:
        return None
    from lowbit.kernels import gptq_solver

    return gptq_solver.native_lib()


def gptq_columns(W: Tensor, Hinv: Tensor, block_size: int, quantize, grid: AffineGrid | None = None) -> Tensor:
    """Algorithm 1's loop, for any rounding rule: W [out, in] in visiting order (updated in place),
    Hinv [in, in] the upper Cholesky factor of H⁻¹ in that order (`inverse_hessian_factor`).

    Column j (a position in visiting order) is rounded by ``quantize(j, w, current)`` -> ŵ [out],
    with w [out] its weights after the error feedback of the columns before it; ``current(end)``
    gives the current weights of positions j..end-1 (this block's, updated eagerly, and later
    ones with this block's pending updates applied), for a rule that fits a grid to them when a
    group starts. Its error goes to the columns after it (eq. 2), within the block at once and to
    the rest once per block (lazy batch updates). Returns Q [out, in]: every ŵ, in visiting order.

    ``grid``: the same rule as an `AffineGrid`; where the native loop can run it (float32 on the
    CPU), each block's columns are solved in C between the grid's ``starts``, with the very same
    results, and ``quantize`` is not called."""
    rows, cols = W.shape
    Q = torch.empty_like(W)
    B = block_size
    threads = torch.get_num_threads()
    lib = _native_loop(W, Hinv, grid)
    if lib is not None:
        from lowbit.kernels import gptq_solver

        S = grid.scale
        s_rs, s_cs = (0 if S.shape[0] == 1 else S.stride(0)), S.stride(1)
        starts = sorted(grid.starts)
    with _one_cpu_thread(W.device):
        for i1 in range(0, cols, B):
            i2 = min(i1 + B, cols)
            W1 = W[:, i1:i2].clone()     # [out, b] this block's columns, updated eagerly
            Err1 = torch.zeros_like(W1)  # [out, b] scaled errors (w - quant(w)) / [Hinv]_jj
            Hinv1 = Hinv[i1:i2, i1:i2]   # [b, b]

            def current(end: int, i: int, j: int) -> Tensor:
                cur = W1[:, i:min(end, i2) - i1]
                if end > i2:
                    cur = torch.cat([cur, W[:, i2:end] - Err1[:, :i] @ Hinv[i1:j, i2:end]], dim=1)
                return cur

            if lib is not None:
                cuts = [j - i1 for j in starts if i1 < j < i2] + [i2 - i1]
                i = 0
                for cut in cuts:
                    if i1 + i in grid.starts:
                        grid.begin(i1 + i, lambda end, i=i, j=i1 + i: current(end, i, j))
                    gptq_solver.columns(lib, W1, i, cut, Hinv1, Hinv.stride(0), S, grid.zero, s_rs, s_cs,
                                        grid.float_zero, grid.group[i1:], grid.qmin, grid.qmax, Q[:, i1:],
                                        grid.codes[:, i1:], cols, Err1, threads)
                    i = cut
            else:
                for i in range(i2 - i1):
                    j = i1 + i               # position (== original column without act_order)
                    w = W1[:, i]             # [out]
                    w_hat = quantize(j, w, lambda end, i=i, j=j: current(end, i, j))
                    Q[:, j] = w_hat
                    err = (w - w_hat) / Hinv1[i, i]                              # eq. 2, scaled error
                    W1[:, i + 1:] -= err[:, None] * Hinv1[i, i + 1:][None, :]    # eq. 2 in the block
                    Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                             # lazy batch update
            del W1, Err1
    return Q
