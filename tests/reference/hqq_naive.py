"""Deliberately naive HQQ, straight from the paper, one group at a time, for tests.

Badri & Shaji 2023: for each group (a 1-D slice of one row sharing s and z), with s fixed at the
min/max scale and z starting from the min/max zero-point, repeat

    W_q = clamp(round(W/s + z))                        quantize
    W_r = s (W_q − z)                                  dequantize
    W_e = sign(W − W_r) relu(|W − W_r| − |W − W_r|^(p−1) / β)      shrink_lp
    z   = mean(W_q − (W − W_e)/s)                      closed-form zero-point
    β   = κ β

Conventions shared with lowbit's solver (so the two can be compared): the iteration runs in
float32 (s from min/max and every z unrounded); the chosen iterate's s and z are rounded to their
storage dtype once at the end (lowbit's `grid.round_scale` / `grid.stored`; a group whose stored
RTN grid, `grid.qparams_from_range`, scores better keeps that), and the codes computed for those
with the grid's rounding; all iterates z_0 … z_T are scored with the selection
criterion — ``select="l2"``: Σ(W − W_r)², ``"lp"``: Σ|W − W_r|^p — and each group keeps its best;
with early stopping the loop ends once the sum over *all* groups of the current iterate's score
fails to decrease. The objectives returned are always the lp ones (the paper's φ). Loops in Python over iterations and groups; no
padding, no masks.
"""

from __future__ import annotations

import torch

from lowbit.core.grid import qparams_from_range, round_scale, round_to_grid, stored
from lowbit.core.scheme import QuantScheme


def _groups(W: torch.Tensor, scheme: QuantScheme) -> list[list[torch.Tensor]]:
    """groups[r][j]: the 1-D entries of group j of row r (per-tensor: one group of everything)."""
    if scheme.granularity == "tensor":
        return [[W.reshape(-1)]]
    rows, cols = W.shape
    g = scheme.group_size if scheme.granularity == "group" else cols
    return [[W[r, a:a + g] for a in range(0, cols, g)] for r in range(rows)]


def hqq_naive(W: torch.Tensor, scheme: QuantScheme, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
              iters: int = 20, early_stop: bool = True, select: str = "l2"):
    """Returns (q [out, in] int32, scale [R, n], zero [R, n], objectives per iterate)."""
    W = W.float()
    qmin, qmax = scheme.qmin, scheme.qmax
    groups = _groups(W, scheme)
    R, n = len(groups), len(groups[0])
    s = torch.zeros(R, n)
    z = torch.zeros(R, n)
    for r in range(R):
        for j in range(n):
            w = groups[r][j]
            s[r, j] = (w.max() - w.min()) / (qmax - qmin)
            z[r, j] = qmin - w.min() / s[r, j]

    def score(w, sj, zj):
        W_q, W_r = round_to_grid(w, sj, zj, scheme)
        d = (w - W_r).double()
        lp, l2 = float(d.abs().pow(p).sum()), float((d * d).sum())
        return W_q, W_r, lp, (l2 if select == "l2" else lp)

    best_z = z.clone()
    start = [[score(groups[r][j], s[r, j], z[r, j]) for j in range(n)] for r in range(R)]
    best = [[c[3] for c in row] for row in start]
    objectives = [sum(c[2] for row in start for c in row)]
    totals = [sum(map(sum, best))]
    for _ in range(iters):
        total = lp_total = 0.0
        for r in range(R):
            for j in range(n):
                w, sj = groups[r][j], s[r, j]
                W_q, W_r, _, _ = score(w, sj, z[r, j])
                x = w - W_r
                W_e = torch.sign(x) * torch.relu(x.abs() - x.abs().pow(p - 1) / beta)
                z[r, j] = torch.mean(W_q - (w - W_e) / sj)
                _, _, lp, e = score(w, sj, z[r, j])
                total += e
                lp_total += lp
                if e < best[r][j]:
                    best[r][j], best_z[r, j] = e, z[r, j]
        beta *= kappa
        objectives.append(lp_total)
        totals.append(total)
        if early_stop and totals[-1] >= totals[-2]:
            break

    s, best_z = round_scale(s, scheme), stored(best_z, scheme)  # rounded once; the codes follow the stored values
    if scheme.scale_dtype == "float16":  # per group, RTN's stored grid where it scores better
        for r in range(R):
            for j in range(n):
                w = groups[r][j]
                s0, z0 = qparams_from_range(w.min(), w.max(), scheme)
                if score(w, s0, z0)[3] < score(w, s[r, j], best_z[r, j])[3]:
                    s[r, j], best_z[r, j] = s0, z0
    q = torch.zeros(W.shape, dtype=torch.int32)
    qflat = q.reshape(-1) if scheme.granularity == "tensor" else None
    for r in range(R):
        for j in range(n):
            w = groups[r][j]
            codes = round_to_grid(w, s[r, j], best_z[r, j], scheme)[0].to(torch.int32)
            if qflat is not None:
                qflat[:] = codes
            else:
                g = scheme.group_size if scheme.granularity == "group" else W.shape[1]
                q[r, j * g:j * g + len(w)] = codes
    return q, s, best_z, objectives
