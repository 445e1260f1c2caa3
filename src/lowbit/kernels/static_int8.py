"""Full-integer static int8: fixed-point requantization and integer linear / conv2d (plain torch).

Notation for one layer (TFLite / gemmlowp conventions). Real values r and integers q are tied by
``r = s * (q - z)``: s > 0 a float32 scale, z an integer zero-point.

* activations: per tensor, ``q = clamp(round(r / s) + z, qmin, qmax)`` (round half to even), stored
  as int8. Symmetric: z = 0, [qmin, qmax] = [-2^(b-1), 2^(b-1)-1] (full) or [-(2^(b-1)-1), 2^(b-1)-1]
  (restricted). Asymmetric: the unsigned grid [0, 2^b-1] (restricted [0, 2^b-2]) shifted down by
  2^(b-1) so it fits int8, z in [qmin, qmax].
* weights: symmetric per output channel (z_w = 0), int8.
* accumulation (int32): ``acc[o] = bias_q[o] + sum_k (q_x[k] - z_x) * q_w[o, k]`` with the bias
  pre-scaled ``bias_q[o] = round(b[o] / (s_x * s_w[o]))`` (half away from zero, int32).
* requantization: the real multiplier ``M[o] = s_x * s_w[o] / s_y`` is written once, offline, as
  ``M = M0 * 2^(-n)`` with ``M0`` in [0.5, 1) stored as an int32 Q31 number (``round(M0 * 2^31)``)
  and an integer shift n (:func:`quantize_multiplier`). At run time, integers only:

      q_y = clamp(z_y + RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0_q31), n),
                  act_min, act_max)

  ``SaturatingRoundingDoublingHighMul(a, b)`` = the high 32 bits of 2ab, rounded to nearest
  (ties away from zero), saturating the single overflow case a = b = -2^31.
  ``RoundingDivideByPOT(x, n)`` = x / 2^n rounded to nearest, ties away from zero.
  A multiplier >= 1 (n < 0) is applied as a saturating left shift of acc by -n first (TFLite's
  ``MultiplyByQuantizedMultiplier``). A fused ReLU raises act_min to max(qmin, z_y).

Everything here is exact integer arithmetic in int64 tensors (values checked to stay within
int32 where the specification says int32). For large layers :func:`int_matmul` may instead use
the float32 GEMM on integer-valued operands in chunks small enough that every partial sum is an
integer below 2^24 (exact in float32 whatever the summation order), adding chunks in float64;
it returns the same integers (``tests/test_static_int8.py`` holds the two to each other and to a
naive Python reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels import register_kernel

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
F32_EXACT = 2**24  # every integer of magnitude <= 2^24 is a float32


# -- the fixed-point multiplier -------------------------------------------------------------------


def quantize_multiplier(M: float) -> tuple[int, int]:
    """Real multiplier M >= 0 -> (M0 as int32 Q31, right shift n) with M ~= M0_q31 * 2^-31 * 2^-n.

    ``frexp`` gives M = m * 2^e with m in [0.5, 1); M0_q31 = round(m * 2^31) (half away from zero);
    a round-up to 2^31 is halved and e incremented; n = -e. Multipliers too small for a 31-bit
    right shift become 0."""
    M = float(M)
    if not math.isfinite(M) or M < 0:
        raise LowbitError(f"requantization multiplier must be a finite number >= 0, got {M!r}")
    if M == 0.0:
        return 0, 0
    m, e = math.frexp(M)
    q = int(math.floor(m * 2**31 + 0.5))  # m > 0: half away from zero
    if q == 2**31:
        q //= 2
        e += 1
    if -e > 62:  # even the largest accumulator rounds to 0
        return 0, 0
    if e > 30:
        raise LowbitError(f"requantization multiplier {M!r} is too large (>= 2^30)")
    return q, -e


def quantize_multipliers(M: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel :func:`quantize_multiplier` (M float64 [C]) -> (M0 int64 [C], n int64 [C])."""
    pairs = [quantize_multiplier(float(m)) for m in M.reshape(-1).tolist()]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.int64),
            torch.tensor([p[1] for p in pairs], dtype=torch.int64))


def saturating_rounding_doubling_high_mul(a: Tensor, b: Tensor) -> Tensor:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values held in int64 tensors."""
    a, b = torch.broadcast_tensors(a.long(), b.long())
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b  # |ab| <= 2^62: exact in int64
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")  # C division truncates
    return torch.where(overflow, torch.full_like(high, INT32_MAX), high)


def rounding_divide_by_pot(x: Tensor, n: Tensor | int) -> Tensor:
    """gemmlowp's RoundingDivideByPOT: x / 2^n rounded to nearest, ties away from zero (n >= 0)."""
    x = x.long()
    n = torch.as_tensor(n, dtype=torch.int64).expand_as(x) if not isinstance(n, Tensor) else n.long().expand_as(x)
    mask = torch.bitwise_left_shift(torch.ones_like(n), n) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).long()
    return torch.bitwise_right_shift(x, n) + (remainder > threshold).long()


def multiply_by_quantized_multiplier(acc: Tensor, M0: Tensor, n: Tensor) -> Tensor:
    """acc * M rounded, with M = M0 * 2^-31 * 2^-n (n < 0: saturating left shift of acc first)."""
    acc = acc.long()
    M0, n = torch.broadcast_tensors(M0.long(), n.long())
    M0, n = M0.expand_as(acc), n.expand_as(acc)
    left = n.clamp(max=0).neg()
    right = n.clamp(min=0)
    x = torch.bitwise_left_shift(acc, left).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, M0), right)


def requantize(acc: Tensor, M0: Tensor, n: Tensor, z_out: int, act_min: int, act_max: int) -> Tensor:
    """int32 accumulators -> output integers in [act_min, act_max] (int8 tensor). ``M0``/``n``
    broadcast against ``acc`` (per output channel: shape [C] for acc [..., C], or [C, 1, 1])."""
    check_int32(acc, "accumulator")
    y = multiply_by_quantized_multiplier(acc, M0, n) + int(z_out)
    return y.clamp(act_min, act_max).to(torch.int8)


def check_int32(t: Tensor, what: str) -> None:
    if t.numel() and (int(t.min()) < INT32_MIN or int(t.max()) > INT32_MAX):
        raise LowbitError(f"{what} overflows int32 (range {int(t.min())}..{int(t.max())})")


# -- quantizing real values ------------------------------------------------------------------------


def quantize_activation(x: Tensor, scale: float, zero: int, qmin: int, qmax: int) -> Tensor:
    """Real x -> int8 codes: clamp(round(x / s) + z, qmin, qmax), in float32 (round half to even)."""
    q = torch.round(x.float() / torch.tensor(scale, dtype=torch.float32)) + zero
    return q.clamp(qmin, qmax).to(torch.int8)


def dequantize_activation(q: Tensor, scale: float, zero: int) -> Tensor:
    return (q.float() - zero) * torch.tensor(scale, dtype=torch.float32)


def quantize_bias(bias: Tensor | None, s_x: float, s_w: Tensor) -> Tensor:
    """bias_q[o] = round(b[o] / (s_x * s_w[o])) (float64, half away from zero), int64 in int32 range."""
    out = s_w.numel()
    if bias is None:
        return torch.zeros(out, dtype=torch.int64)
    r = bias.double() / (float(s_x) * s_w.double())
    q = torch.sign(r) * torch.floor(r.abs() + 0.5)
    return q.clamp(INT32_MIN, INT32_MAX).long()


# -- exact integer products -----------------------------------------------------------------------


def int_matmul(A: Tensor, B: Tensor, method: str = "auto") -> Tensor:
    """Exact A @ B.T for integer matrices A [N, K], B [M, K] (any integer or integer-valued float
    dtype) -> int64 [N, M].

    ``method="int"``: int64 matmul (exact, slow for large sizes). ``"float"``: float32 GEMMs over
    chunks of K small enough that ``max|A| * max|B| * chunk <= 2^24``, summed in float64 (exact
    below 2^53). ``"auto"``: int for small products, float otherwise."""
    N, K = A.shape
    M = B.shape[0]
    if method == "auto":
        method = "int" if N * M * K <= 2**21 else "float"
    if method == "int":
        return A.long() @ B.long().T
    if method != "float":
        raise LowbitError(f"int_matmul method must be auto, int or float, got {method!r}")
    Af, Bf = A.float(), B.float()
    amax = max(float(Af.abs().max()) if Af.numel() else 0.0, 1.0)
    bmax = max(float(Bf.abs().max()) if Bf.numel() else 0.0, 1.0)
    chunk = max(1, int(F32_EXACT // (amax * bmax)))
    if K <= chunk:
        return (Af @ Bf.T).long()
    n = math.ceil(K / chunk)
    c = math.ceil(K / n)
    acc = None
    for k in range(0, K, c):
        part = Af[:, k:k + c].contiguous() @ Bf[:, k:k + c].contiguous().T
        acc = part.double() if acc is None else acc.add_(part)
    return acc.long()


def int_linear_acc(qx: Tensor, z_x: int, qw: Tensor, bias_q: Tensor, method: str = "auto") -> Tensor:
    """int32 accumulators acc[..., o] = bias_q[o] + sum_k (qx[..., k] - z_x) * qw[o, k] (int64)."""
    lead = qx.shape[:-1]
    X = qx.reshape(-1, qx.shape[-1]).long() - int(z_x)
    acc = int_matmul(X, qw, method) + bias_q.long()
    check_int32(acc, "accumulator")
    return acc.reshape(*lead, qw.shape[0])


def int_conv2d_acc(qx: Tensor, z_x: int, qw: Tensor, bias_q: Tensor, stride=1, padding=0, dilation=1,
                   method: str = "auto") -> Tensor:
    """int32 accumulators of a conv2d (groups = 1): qx int [N, C, H, W], qw int [O, C, kh, kw].

    Padding is in the real domain (real 0 = code z_x), so the zero-point is subtracted first and
    the centred integers padded with 0. The patches are gathered with ``unfold`` on float32
    holding integers of magnitude <= 2^8 (exact)."""
    N, C, H, W = qx.shape
    O, Cw, kh, kw = qw.shape
    if Cw != C:
        raise LowbitError(f"conv input has {C} channels, the weight expects {Cw}")
    X = qx.float() - float(z_x)
    cols = F.unfold(X, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    L = cols.shape[-1]
    pairs = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (sh, sw), (ph, pw), (dh, dw) = pairs(stride), pairs(padding), pairs(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    A = cols.transpose(1, 2).reshape(N * L, C * kh * kw)
    acc = int_matmul(A, qw.reshape(O, -1), method) + bias_q.long()
    check_int32(acc, "accumulator")
    return acc.reshape(N, Ho, Wo, O).permute(0, 3, 1, 2).contiguous()


# -- W8A8 linear for LLMs (format "static-int8") ----------------------------------------------------
# With symmetric restricted activations and weights (all codes in [-127, 127], z_x = 0) the int32
# products come from the native int8 GEMM (``lowbit.kernels.dynamic_int8.native_gemm``) when it is
# built; otherwise from the exact torch paths above. ``w.matmul`` ("auto", "int", "float",
# "native") chooses.


def quantize_input(w, x: Tensor) -> Tensor:
    """Float input x [..., in] -> int8 codes: x divided by the smoothing factors (if any), then
    quantized with the calibrated static scale and zero-point of StaticInt8Weight ``w``."""
    X = x.float()
    if w.smooth is not None:
        X = X / w.smooth.float()
    return quantize_activation(X, w.s_x, w.z_x, w.act_qmin, w.act_qmax)


def native_ok(w) -> bool:
    """The native int8 x int8 -> int32 GEMM applies: codes in [-127, 127] on both sides and z_x = 0."""
    if w.w_min < -127 or w.act_qmin < -127 or w.z_x != 0:
        return False
    from lowbit.kernels.dynamic_int8 import native_lib

    return native_lib() is not None


def accumulators(w, x: Tensor, bias: Tensor | None = None, method: str | None = None) -> Tensor:
    """The int32 accumulators (int64 tensor) of StaticInt8Weight ``w`` for float input x [..., in]."""
    qx = quantize_input(w, x)
    bq = quantize_bias(bias, w.s_x, w.w_scale)
    method = method or w.matmul
    if method in ("auto", "native") and native_ok(w):
        from lowbit.kernels.dynamic_int8 import native_gemm

        acc = native_gemm(qx.reshape(-1, w.shape[1]), w.qweight).long() + bq
        return acc.reshape(*x.shape[:-1], w.shape[0])
    if method == "native":
        raise LowbitError("the native int8 GEMM needs symmetric restricted activations and weights, and the built kernel")
    return int_linear_acc(qx, w.z_x, w.qweight, bq, method)


@register_kernel("static-int8", "int8", "any")
def static_int8_linear(x: Tensor, w, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b through the integer pipeline of :class:`lowbit.formats.static_int8.StaticInt8Weight`:
    x (divided by the smoothing factors, if any) quantized with the calibrated static scale and
    zero-point, exact int32 accumulation with the int32 bias, and the accumulators scaled back to
    float (``acc * s_x * s_w[o]``, float32) since the ops that follow in an LLM are float ones."""
    if x.shape[-1] != w.shape[1]:
        raise LowbitError(f"input has {x.shape[-1]} features, the static-int8 layer expects {w.shape[1]}")
    acc = accumulators(w, x, bias)
    y = acc.float() * (torch.tensor(w.s_x, dtype=torch.float32) * w.w_scale.float())
    return y.to(x.dtype)
