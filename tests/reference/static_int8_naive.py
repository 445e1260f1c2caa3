"""Deliberately naive full-integer static int8, written from the formulas with Python ints and
loops (gemmlowp's fixed-point functions, TFLite's QuantizeMultiplier / MultiplyByQuantizedMultiplier).
Small sizes only."""

from __future__ import annotations

import math

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(M: float) -> tuple[int, int]:
    """M = M0 * 2^-31 * 2^-n, M0 = round(frac * 2^31) with M = frac * 2^e, frac in [0.5, 1)."""
    if M == 0:
        return 0, 0
    frac, e = math.frexp(M)
    q = round_half_away(frac * 2**31)
    if q == 2**31:
        q //= 2
        e += 1
    if -e > 62:
        return 0, 0
    return q, -e


def round_half_away(v: float) -> int:
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


def srdhm(a: int, b: int) -> int:
    """SaturatingRoundingDoublingHighMul for int32 a, b."""
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else (1 - (1 << 30))
    num = ab + nudge
    q = abs(num) // (1 << 31)  # C division truncates toward zero
    return q if num >= 0 else -q


def rdbpot(x: int, exponent: int) -> int:
    """RoundingDivideByPOT: x / 2^exponent, to nearest, ties away from zero."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def mbqm(acc: int, M0: int, n: int) -> int:
    """MultiplyByQuantizedMultiplier: a left shift (saturated to int32) when n < 0."""
    left = -n if n < 0 else 0
    right = n if n > 0 else 0
    x = min(max(acc * (1 << left), INT32_MIN), INT32_MAX)
    return rdbpot(srdhm(x, M0), right)


def bias_q(b: float, s_x: float, s_w: float) -> int:
    return min(max(round_half_away(b / (s_x * s_w)), INT32_MIN), INT32_MAX)


def linear(qx, z_x, qw, biases, s_x, s_w, s_y, z_y, qmin, qmax, relu):
    """qx: list of rows of ints; qw: [out][in] ints; biases: float per out (or None); s_w per out.
    Returns (int outputs [N][out], accumulators [N][out])."""
    out_rows, accs = [], []
    for row in qx:
        orow, arow = [], []
        for o, wrow in enumerate(qw):
            acc = bias_q(biases[o], s_x, s_w[o]) if biases is not None else 0
            for k in range(len(row)):
                acc += (row[k] - z_x) * wrow[k]
            assert INT32_MIN <= acc <= INT32_MAX
            M0, n = quantize_multiplier(s_x * s_w[o] / s_y)
            y = z_y + mbqm(acc, M0, n)
            lo = max(qmin, z_y) if relu else qmin
            orow.append(min(max(y, lo), qmax))
            arow.append(acc)
        out_rows.append(orow)
        accs.append(arow)
    return out_rows, accs


def conv2d(qx, z_x, qw, biases, s_x, s_w, s_y, z_y, qmin, qmax, relu, stride=1, padding=0):
    """qx [N][C][H][W] ints, qw [O][C][kh][kw]; zero padding in the real domain (code z_x)."""
    N, C, H, W = len(qx), len(qx[0]), len(qx[0][0]), len(qx[0][0][0])
    O, kh, kw = len(qw), len(qw[0][0]), len(qw[0][0][0])
    Ho = (H + 2 * padding - kh) // stride + 1
    Wo = (W + 2 * padding - kw) // stride + 1
    out = [[[[0] * Wo for _ in range(Ho)] for _ in range(O)] for _ in range(N)]
    for n_ in range(N):
        for o in range(O):
            M0, n = quantize_multiplier(s_x * s_w[o] / s_y)
            for i in range(Ho):
                for j in range(Wo):
                    acc = bias_q(biases[o], s_x, s_w[o]) if biases is not None else 0
                    for c in range(C):
                        for a in range(kh):
                            for b in range(kw):
                                y, x = i * stride + a - padding, j * stride + b - padding
                                v = qx[n_][c][y][x] if 0 <= y < H and 0 <= x < W else z_x
                                acc += (v - z_x) * qw[o][c][a][b]
                    r = z_y + mbqm(acc, M0, n)
                    lo = max(qmin, z_y) if relu else qmin
                    out[n_][o][i][j] = min(max(r, lo), qmax)
    return out
