"""BitNetWeight: a trained BitLinear layer as stored and run — ternary (b1.58) or binary (BitNet)
weight codes, one scale, and the layer's own activation path (norm, 8-bit absmax per token).

Wang et al. 2023 ("BitNet") and Ma et al. 2024 ("The Era of 1-bit LLMs", b1.58). This module owns
BitNet's arithmetic; `lowbit.nn.bitlinear.BitLinear` trains through it (with straight-through
gradients) and the kernels (`lowbit.kernels.bitnet`) compute it. For an input x [..., in]:

    x   = RMSNorm(x) = x / sqrt(mean(x²) + norm_eps) · g     only when ``norm`` (g: ``norm_weight``, or 1)
    γ   = max_j |x_j|  (clamped below by EPS)                per token
    x~  = Clip(round((x · Qb) / γ), −Qb, Qb)                 Qb = 127, round half to even
    y   = float(W~ x~) · ((β · γ) / Qb)  (+ bias)            W~ x~ an exact integer sum

with the weights (from the latent float weight W, `weight_quant`)

    b1.58:  W~ = RoundClip(W / (β₀ + EPS), −1, 1),  β₀ = mean |W|
    1-bit:  W~ = Sign(W − mean W)  (+1 where > 0, else −1)
    β  = β₀ rounded to the nearest float16 value

β is rounded to float16 so that GGUF's ternary types (TQ1_0 / TQ2_0, whose block scale is a
float16) carry the layer's weight exactly; the change is at most 2⁻¹¹ of β, and training sees the
same rounded β, so the trained layer and the stored one are the same function.

Stored tensors:

* ``qweight``      uint8 [out, packed_row_bytes(in, b)]  b1.58: codes u = W~ + 1 ∈ {0, 1, 2}, 2 bits
  each; 1-bit: u = (W~ + 1) / 2 ∈ {0, 1}, 1 bit each (`lowbit.core.packing` layout: code j of a
  byte at bits j·b)
* ``scale``        float32 [1]  β
* ``norm_weight``  float32 [in] the norm's gain g (stored when ``norm_gain``; needs ``norm``)

Bits per weight: 2 (b1.58) or 1 (1-bit) plus 32/(out·in), plus 32/out for a norm gain. The layer's
product is *defined* with quantized activations (like dynamic int8's), so the format's own kernel
row takes int8 activations; ``dequantize()`` gives β·W~, the weight that product multiplies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.core import packing
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

BITS = (1, 1.58)
QB = 127          # Qb = 2^(8−1) − 1: 8-bit activations
EPS = 1e-5        # the papers' eps: guards β of an all-zero weight and γ of an all-zero token
NORM_EPS = 1e-6   # the layer norm's default eps


def check_bits(bits) -> float:
    if isinstance(bits, bool) or bits not in BITS:
        raise LowbitError(f"BitNet bits must be 1 (BitNet) or 1.58 (BitNet b1.58), got {bits!r}")
    return 1 if bits == 1 else 1.58


def code_bits(bits: float) -> int:
    """Bits per stored code: 2 for b1.58 (three values), 1 for 1-bit."""
    return 2 if check_bits(bits) == 1.58 else 1


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = NORM_EPS) -> Tensor:
    """x / sqrt(mean(x²) + eps) over the last dimension, times the gain when given (no offset)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def activation_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token absmax to 8 bits: (x~ [..., in] integer-valued float, γ [..., 1]). No gradient."""
    x = x.detach()
    gamma = x.abs().amax(-1, keepdim=True).clamp(min=EPS)
    return torch.round(x * QB / gamma).clamp(-QB, QB), gamma


def weight_quant(W: Tensor, bits: float) -> tuple[Tensor, Tensor]:
    """(W~ [out, in] in {−1, 0, 1} (b1.58) or {−1, 1} (1-bit) as float, β [] float32). No gradient."""
    W = W.detach().float()
    beta0 = W.abs().mean()
    if check_bits(bits) == 1.58:
        Wt = torch.round(W / (beta0 + EPS)).clamp(-1, 1)                   # RoundClip(W / (β₀ + ε), −1, 1)
    else:
        Wt = torch.where(W - W.mean() > 0, 1.0, -1.0)                      # Sign(W − α), α = mean(W)
    return Wt, beta0.to(torch.float16).to(torch.float32)


def output_scale(beta: Tensor, gamma: Tensor) -> Tensor:
    """(β · γ) / Qb: what the integer product W~ x~ is multiplied by, per token."""
    return beta * gamma / QB


def product(x: Tensor, Wt: Tensor, beta: Tensor, bias: Tensor | None = None, norm: bool = False,
            norm_weight: Tensor | None = None, norm_eps: float = NORM_EPS) -> Tensor:
    """The layer's product on float32 x [..., in] (module docstring), without gradients' tricks:
    the reference every kernel is checked against."""
    if norm:
        x = rms_norm(x, norm_weight, norm_eps)
    xq, gamma = activation_quant(x)
    y = torch.nn.functional.linear(xq, Wt) * output_scale(beta, gamma)
    return y if bias is None else y + bias


def _norm_shape(w):
    return (w.shape[1],)


class BitNetWeight(WeightFormat, name="bitnet"):
    qweight: Tensor = tensor(torch.uint8, lambda w: (w.shape[0], packing.packed_row_bytes(w.shape[1], code_bits(w.bits))))
    scale: Tensor = tensor(torch.float32, lambda w: (1,), finite=True)
    norm_weight: Tensor = tensor(torch.float32, _norm_shape, when=lambda w: w.norm_gain, finite=True)
    shape: tuple[int, int] = shape_param()
    bits: float = param(1.58, check=check_bits)
    norm: bool = param(False)
    norm_gain: bool = param(False)
    norm_eps: float = param(NORM_EPS)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_codes(cls, Wt: Tensor, beta: Tensor, bits: float = 1.58, *, norm: bool = False,
                   norm_weight: Tensor | None = None, norm_eps: float = NORM_EPS) -> "BitNetWeight":
        """Pack W~ [out, in] ({−1, 0, 1} for b1.58, {−1, 1} for 1-bit) and β."""
        bits = check_bits(bits)
        if Wt.dim() != 2:
            raise LowbitError(f"expected a 2-D BitNet weight, got shape {tuple(Wt.shape)}")
        T = Wt.detach().round().to(torch.int8)
        if T.numel():
            allowed = (-1, 0, 1) if bits == 1.58 else (-1, 1)
            bad = ~torch.isin(T, torch.tensor(allowed, dtype=torch.int8))
            if bool(bad.any()):
                raise LowbitError(f"{bits}-bit BitNet codes must be {allowed}, found {int(T[bad][0])}")
        codes = T + 1 if bits == 1.58 else (T + 1) // 2
        if norm_weight is not None and not norm:
            raise LowbitError("a BitNet norm gain needs norm=True")
        w = cls(qweight=packing.pack(codes.to(torch.uint8), code_bits(bits)),
                scale=beta.detach().to(torch.float32).reshape(1).contiguous(),
                norm_weight=None if norm_weight is None else norm_weight.detach().to(torch.float32).contiguous(),
                shape=(int(Wt.shape[0]), int(Wt.shape[1])), bits=bits, norm=bool(norm),
                norm_gain=norm_weight is not None, norm_eps=float(norm_eps))
        w.validate()
        return w

    @classmethod
    def from_float(cls, W: Tensor, bits: float = 1.58, **kw) -> "BitNetWeight":
        """Quantize a float weight with BitNet's weight rule (`weight_quant`) and pack it."""
        Wt, beta = weight_quant(W, bits)
        return cls.from_codes(Wt, beta, bits, **kw)

    # -- reading ----------------------------------------------------------------------------
    def codes(self) -> Tensor:
        """W~ as int8 [out, in]: {−1, 0, 1} (b1.58) or {−1, 1} (1-bit)."""
        u = packing.unpack_u8(self.qweight, code_bits(self.bits), self.shape[1]).to(torch.int8)
        return u - 1 if self.bits == 1.58 else 2 * u - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """β · W~ (exact in float32), then cast to dtype."""
        W = self.codes().to(torch.float32) * self.scale
        return W if dtype == torch.float32 else W.to(dtype)

    def forward_reference(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's product in plain torch (`product`)."""
        y = product(x.float(), self.codes().to(torch.float32), self.scale[0], bias, self.norm, self.norm_weight,
                    self.norm_eps)
        return y.to(x.dtype)

    def check(self) -> None:
        if self.bits == 1.58:
            q = self.qweight
            if packing.holds_code(q, 2, 3):
                raise LowbitError("bitnet qweight holds the invalid 2-bit code 3")
        if self.norm_gain and not self.norm:
            raise LowbitError("bitnet norm_gain is set but norm is off")
