"""Deliberately naive GPTQ/OBQ, straight from the paper, in float64, for tests.

No blocking, no Cholesky: the inverse Hessian of the not-yet-quantized columns F is kept
explicitly and, after quantizing column q, updated by Gaussian elimination of row/column q
(Frantar et al. 2022, eq. 3); the remaining weights get the OBS update (eq. 2):

    δ_F      = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}
    H_{-q}⁻¹ = H⁻¹ - H⁻¹_{:,q} H⁻¹_{q,:} / [H⁻¹]_qq

Conventions shared with lowbit's solver (so that the two can be compared exactly): dead inputs
(diag H = 0) have their weights zeroed and diag set to 1; λ = damp · mean(diag H); act_order
visits columns by descending diag H (stable sort); static qparams come from the (dead-zeroed)
original weights; dynamic group qparams from the current weights of the group's columns when its
first column is reached; scale/zero-point choice and rounding are lowbit's grid (`qparams_from_range`,
`round_to_grid`).
"""

from __future__ import annotations

import torch

from lowbit.core.grid import qparams_from_range, round_to_grid
from lowbit.core.scheme import QuantScheme


def _group_columns(cols: int, scheme: QuantScheme) -> list[list[int]]:
    """Original columns of each group of a row (one group for per-channel / per-tensor)."""
    if scheme.granularity != "group":
        return [list(range(cols))]
    g = scheme.group_size
    return [list(range(a, min(a + g, cols))) for a in range(0, cols, g)]


def _qparams(Wcols: torch.Tensor, scheme: QuantScheme, per_tensor: bool):
    """Scale and zero-point for the given columns [out, k]: one per row, or one for all rows."""
    if per_tensor:
        lo, hi = Wcols.min().reshape(1), Wcols.max().reshape(1)
    else:
        lo, hi = Wcols.min(dim=1).values, Wcols.max(dim=1).values
    s, z = qparams_from_range(lo, hi, scheme)
    return s.double(), (None if z is None else z.double())


def gptq_naive(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, damp: float = 0.01,
               act_order: bool = False, static_groups: bool = True):
    """Returns (q int64 [out, in], scale [out, n_groups] or [1, 1], zero same shape or None,
    dequantized Q [out, in]), all float64 apart from q."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    for c in range(cols):
        if H[c, c] == 0:
            H[c, c] = 1.0
            W[:, c] = 0.0
    order = list(range(cols))
    if act_order:
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)

    groups = _group_columns(cols, scheme)
    group_of = {c: gi for gi, cs in enumerate(groups) for c in cs}
    per_tensor = scheme.granularity == "tensor"
    n_q = 1 if per_tensor else rows
    scale = torch.zeros(n_q, len(groups), dtype=torch.float64)
    zero = None if scheme.symmetric else torch.zeros(n_q, len(groups), dtype=torch.float64)
    static = scheme.granularity != "group" or static_groups
    if static:
        for gi, cs in enumerate(groups):
            s, z = _qparams(W[:, cs], scheme, per_tensor)
            scale[:, gi] = s
            if zero is not None:
                zero[:, gi] = z

    q_all = torch.zeros(rows, cols, dtype=torch.int64)
    Q = torch.zeros(rows, cols, dtype=torch.float64)
    remaining = list(range(cols))
    for c in order:
        gi = group_of[c]
        if not static and c == groups[gi][0]:
            s, z = _qparams(W[:, groups[gi]], scheme, per_tensor)
            scale[:, gi] = s
            if zero is not None:
                zero[:, gi] = z
        q, wq = round_to_grid(W[:, c], scale[:, gi], None if zero is None else zero[:, gi], scheme)
        q_all[:, c] = q.long()
        Q[:, c] = wq
        remaining.remove(c)
        # eq. 2: spread the error of column c over the remaining columns F
        e = (W[:, c] - wq) / Hinv[c, c]
        W[:, remaining] -= torch.outer(e, Hinv[c, remaining])
        W[:, c] = wq
        # eq. 3: Gaussian elimination of row/column c from the inverse Hessian
        Hinv = Hinv - torch.outer(Hinv[:, c], Hinv[c, :]) / Hinv[c, c]
    return q_all, scale, zero, Q
