"""AWQ as the paper writes it, with activations instead of Gram matrices and loops instead of
batching (Lin et al., 2023, Eq. 4-5; clipping as in the reference code). Slow; for tests only."""

import torch

from lowbit.core.grid import dequantize, fake_quantize, qparams_from_range, quantize
from lowbit.core.scheme import QuantScheme


def scales_naive(X: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = (mean |x| per input channel)^α, floored at 1e-4 of the largest, normalised so that
    sqrt(max·min) = 1."""
    s_x = X.abs().mean(dim=0)
    s_x = torch.clamp(s_x, min=1e-4 * float(s_x.max()))
    s = s_x**alpha
    return s / torch.sqrt(s.max() * s.min())


def search_scales_naive(X: torch.Tensor, Ws: list[torch.Tensor], scheme: QuantScheme, n_grid: int):
    """Eq. 4 literally: L(s) = Σ_W ‖Q(W·diag(s))·(diag(s)⁻¹·X) − W·X‖², α on {0, 1/n, ...}.
    Returns (alpha, s, losses)."""
    losses = []
    for i in range(n_grid):
        alpha = i / n_grid
        s = scales_naive(X, alpha)
        loss = 0.0
        for W in Ws:
            Y = X @ W.T
            Y_hat = (X / s) @ fake_quantize(W * s, scheme).T
            loss += float(((Y_hat - Y) ** 2).sum())
        losses.append(loss)
    best = losses.index(min(losses))
    return best / n_grid, scales_naive(X, best / n_grid), losses


def search_clip_naive(X: torch.Tensor, W: torch.Tensor, scheme: QuantScheme, clip_grid: int, max_shrink: float):
    """For every row r and column group j separately, try range [f·min, f·max] for f = 1, 0.95, ...
    down to max_shrink and keep the f with the smallest ‖X_j·Ŵ[r, j]ᵀ − X_j·W[r, j]ᵀ‖².
    Group layout only (``scheme.granularity == "group"``). Returns f [rows, n_groups]."""
    rows, cols = W.shape
    g = scheme.group_size
    n_groups = -(-cols // g)
    factors = [1.0 - i / clip_grid for i in range(clip_grid + 1) if 1.0 - i / clip_grid >= max_shrink - 1e-9]
    best_f = torch.ones(rows, n_groups)
    for r in range(rows):
        for j in range(n_groups):
            c = slice(j * g, min((j + 1) * g, cols))
            w = W[r:r + 1, c]
            x = X[:, c]
            y = x @ w.T
            lo, hi = w.min(), w.max()
            one = QuantScheme(scheme.bits, scheme.symmetric, "channel", None, scheme.restricted_range,
                              scheme.scale_dtype, scheme.zero_point)
            best = None
            for f in factors:
                s, z = qparams_from_range(lo.reshape(1, 1) * f, hi.reshape(1, 1) * f, one)
                w_hat = dequantize(quantize(w, s, z, one), s, z, one)
                err = float(((x @ w_hat.T - y) ** 2).sum())
                if best is None or err < best:
                    best, best_f[r, j] = err, f
    return best_f
