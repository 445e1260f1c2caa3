"""Deliberately naive SparseGPT (Frantar & Alistarh 2023, Algorithm 1), in float64, for tests.

No Cholesky factor, no lazy batching: the inverse Hessian of the not-yet-processed columns F is
kept explicitly and, after column c is fixed, reduced by Gaussian elimination of row/column c
(OBS, as in GPTQ's eq. 3); the remaining weights get the OBS compensation

    δ_F      = -(w_c - ŵ_c) / [H_F⁻¹]_cc · (H_F⁻¹)_{:,c}
    H_{-c}⁻¹ = H_F⁻¹ - H_F⁻¹_{:,c} H_F⁻¹_{c,:} / [H_F⁻¹]_cc

Mask selection, as the paper's Algorithm 1 defines it, uses the OBS error of pruning weight c,
w_c² / [H_{F_c}⁻¹]_cc with F_c = {c, c+1, …} (the columns not yet processed when c is reached),
computed here by inverting the trailing block of the dampened Hessian for every column:

* unstructured: at the start of every block of ``block_size`` columns, with the current weights,
  the floor(sparsity · rows · block) lowest errors of the block are pruned (ties: earlier position
  in row-major order first);
* N:M: when the first column of a group of M is reached, with the current weights, the M − N
  lowest errors of each row's group are pruned (N kept).

Joint quantization: kept weights are rounded to lowbit's grid (`round_to_grid`) with qparams from
the (dead-zeroed) original weights. Shared conventions: dead inputs (diag H = 0) zeroed with diag set to 1;
λ = damp · mean(diag H).
"""

from __future__ import annotations

import math

import torch

from lowbit.core.grid import choose_qparams, round_to_grid
from lowbit.core.scheme import QuantScheme


def sparsegpt_naive(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01, scheme: QuantScheme | None = None):
    """Returns (Ŵ float64 [out, in], mask bool [out, in] True = pruned)."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    for c in range(cols):
        if H[c, c] == 0:
            H[c, c] = 1.0
            W[:, c] = 0.0
    if scheme is not None:
        scale, zero = choose_qparams(W, scheme)
        scale = scale.double()
        zero = None if zero is None else zero.double()
        g = scheme.group_size if scheme.granularity == "group" else cols
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    # [H_{F_c}⁻¹]_cc for every c: the inverse of the trailing block H[c:, c:]
    d = torch.tensor([torch.linalg.inv(H[c:, c:])[0, 0].item() for c in range(cols)], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)

    mask = torch.zeros(rows, cols, dtype=torch.bool)
    W_hat = torch.zeros(rows, cols, dtype=torch.float64)
    remaining = list(range(cols))
    for c in range(cols):
        if nm is None and c % block_size == 0:
            cs = list(range(c, min(c + block_size, cols)))
            err = W[:, cs] ** 2 / d[cs][None, :]                       # OBS error of each weight
            k = int(math.floor(sparsity * err.numel() + 1e-9))
            vals = err.reshape(-1).tolist()
            order = sorted(range(len(vals)), key=lambda t: (vals[t], t))
            blk = torch.zeros(err.numel(), dtype=torch.bool)
            blk[order[:k]] = True
            mask[:, cs] = blk.reshape(err.shape)
        if nm is not None and c % nm[1] == 0:
            n, m = nm
            cs = list(range(c, c + m))
            err = W[:, cs] ** 2 / d[cs][None, :]
            for r in range(rows):
                vals = err[r].tolist()
                order = sorted(range(m), key=lambda t: (vals[t], t))
                for t in order[:m - n]:
                    mask[r, c + t] = True
        w = W[:, c]
        q = torch.where(mask[:, c], torch.zeros_like(w), w)
        if scheme is not None:
            s = scale[:, c // g] if scale.shape[0] == rows else scale[:, 0].expand(rows)
            z = None if zero is None else zero[:, c // g] if zero.shape[0] == rows else zero[:, 0].expand(rows)
            q = round_to_grid(q, s, z, scheme)[1]
        W_hat[:, c] = q
        remaining.remove(c)
        e = (w - q) / Hinv[c, c]                                        # OBS compensation
        W[:, remaining] -= torch.outer(e, Hinv[c, remaining])
        W[:, c] = q
        Hinv = Hinv - torch.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]  # eliminate column c
    return W_hat, mask
