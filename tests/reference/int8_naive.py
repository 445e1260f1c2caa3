"""Deliberately naive LLM.int8() (Dettmers et al. 2022, eq. 1 and eq. 7), element by element, for tests.

Integer products and sums are Python ints (exact, no accumulator width). The float32 steps that
lowbit specifies — the quantization q = round(x · (127 / absmax)) (half to even) and the
dequantization acc · (s_x / 127) · (s_w / 127) — are done one operation at a time with numpy
float32 scalars, each correctly rounded, so that the int8 part can be compared bit for bit. The
float part over the outlier dims X[:, O] · Ŵ[:, O]ᵀ is summed in float64 (Python floats).
"""

from __future__ import annotations

import numpy as np
import torch

f32 = np.float32


def quantize_row(row: list[float]) -> tuple[list[int], np.float32]:
    """Eq. 1 for one row: s = max |x|, q = round(x · (127 / s)); an all-zero row -> s = 0, q = 0."""
    s = f32(0.0)
    for v in row:
        s = max(s, abs(f32(v)))
    inv = f32(127) / (s if s > 0 else f32(1.0))
    return [int(np.rint(f32(v) * inv)) for v in row], s


def quantize_weight(W: torch.Tensor) -> tuple[list[list[int]], list[np.float32]]:
    """Row-wise (per output row) codes and absmax of W [out, in]."""
    rows = [quantize_row(r) for r in W.tolist()]
    return [q for q, _ in rows], [s for _, s in rows]


def dequantize_weight(q: list[list[int]], s: list[np.float32]) -> list[list[np.float32]]:
    return [[f32(c) * (s[r] / f32(127)) for c in q[r]] for r in range(len(q))]


def llm_int8(X: torch.Tensor, q_w: list[list[int]], s_w: list[np.float32], threshold: float):
    """Returns (O, Y_int8 float32 [N, out], Y_outlier float64 [N, out]) for X [N, in]."""
    Xl = X.tolist()
    N, K, M = len(Xl), len(Xl[0]), len(q_w)
    O = [j for j in range(K) if max(abs(Xl[n][j]) for n in range(N)) >= threshold]
    outlier = set(O)
    # int8 part over the dims not in O: zero the outlier columns, quantize each token row
    Xi = [[0.0 if j in outlier else Xl[n][j] for j in range(K)] for n in range(N)]
    q_x, s_x = zip(*(quantize_row(r) for r in Xi))
    Y_int = torch.zeros(N, M, dtype=torch.float32)
    for n in range(N):
        for r in range(M):
            acc = 0
            for j in range(K):
                acc += q_x[n][j] * q_w[r][j]
            Y_int[n, r] = float(f32(acc) * (s_x[n] / f32(127)) * (s_w[r] / f32(127)))
    # float part over O, with the dequantized weight columns
    W_hat = dequantize_weight(q_w, s_w)
    Y_out = torch.zeros(N, M, dtype=torch.float64)
    for n in range(N):
        for r in range(M):
            Y_out[n, r] = sum(float(Xl[n][j]) * float(W_hat[r][j]) for j in O)
    return O, Y_int, Y_out
