"""BitLinear: the linear layer of BitNet (1-bit weights) and BitNet b1.58 (ternary weights), with
8-bit activations, trained through latent float weights with straight-through estimators.

Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language Models" (``bits=1``) and
Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits"
(``bits=1.58``). For an input x [..., in] and the latent weight W [out, in]:

    x   = RMSNorm(x) = x / sqrt(mean(x²) + eps_norm) · g     SubLN inside the layer (norm=True; g: gain, init 1)

    activations, 8 bits, absmax per token (both papers):
    γ   = max_j |x_j|                                        per token (clamped below by eps)
    x~  = Clip(round(x · Qb / γ), −Qb, Qb)                   Qb = 2^(8−1) − 1 = 127

    weights, b1.58 (absmean):                                 weights, 1-bit (BitNet):
    β   = mean_ij |W_ij|                                      α  = mean_ij W_ij
    W~  = RoundClip(W / (β + eps), −1, 1)                     W~ = Sign(W − α)  (+1 where > 0, else −1)
                                                              β  = mean_ij |W_ij|

    y   = (W~ x~) · β · γ / Qb  (+ bias)                     dequantized output, bias added after

The papers write the activation clip as [−Qb + ε, Qb − ε] (ε keeps the float clip from
overflowing); on the rounded integers that is [−Qb, Qb], and with γ the token's own absmax the
clip never cuts anything: the token's largest entry maps to exactly ±127. BitNet also describes
a variant for the input of a non-linearity that shifts the activations into [0, Qb]
(``x~ = Clip((x − min x) · Qb / γ, ε, Qb − ε)``); it is not used here (b1.58 dropped it too).

``W~ x~`` is an integer product computed in float32: exact as long as ``in · 127 < 2^24`` for
1-bit / ternary codes, which holds for every width lowbit meets (in < 132 000).

Gradients (straight-through, the papers' training recipe): the rounding of W is treated as the
identity, so ``dL/dW`` equals the gradient through an ordinary linear layer with weight ``W~ · β``
(β and α held constant); the rounding of x likewise (identity inside the clip range, which per-
token absmax makes the whole range; γ held constant). Written as ``q(u) + (u − u.detach())`` on
the scaled inputs ``u = x · Qb / γ`` and ``u = W / β``: the same gradient as ``u + (q(u) − u).detach()``,
and the forward values are the integers exactly.

**norm=True changes the function.** The papers train from scratch with the norm in place; when a
float model is converted (`convert`), the inputs of q/k/v and gate/up are already normalised by
the block's norms (the extra RMSNorm only rescales them, up to the gain), but those of o and down
are not. ``norm=False`` leaves the input as it is. Either way the converted model must be trained
(e.g. `lowbit.training.kd.distill` from the float original) before it is any good.

**At run time** the packed layer (`BitLinear.packed`: codes + β in a `TernaryWeight`) needs, per
token: the RMSNorm (with its gain ``norm_weight``), γ = absmax, the int8 activations x~, an
integer product ``W~ x~`` (int32 accumulation), then ``· β · γ / 127`` and the bias. That
activation path and its kernel are not part of the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.ternary import TernaryWeight
from lowbit.models.families import block_prefix, family_of, find_blocks

BITS = (1, 1.58)
QB = 127          # Qb = 2^(b−1) − 1 for b = 8 activation bits
EPS = 1e-5        # the papers' eps: guards β of an all-zero weight and γ of an all-zero token
NORM_EPS = 1e-6   # RMSNorm's eps


def check_bits(bits) -> float:
    if isinstance(bits, bool) or bits not in BITS:
        raise LowbitError(f"BitLinear bits must be 1 (BitNet) or 1.58 (BitNet b1.58), got {bits!r}")
    return 1 if bits == 1 else 1.58


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = NORM_EPS) -> Tensor:
    """x / sqrt(mean(x²) + eps) over the last dimension, times the gain when given (no offset)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def activation_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token absmax to 8 bits: (x~ [..., in] integer-valued float, γ [..., 1]). No gradient."""
    gamma = x.detach().abs().amax(-1, keepdim=True).clamp(min=EPS)
    return torch.round(x.detach() * QB / gamma).clamp(-QB, QB), gamma


def weight_quant(W: Tensor, bits: float) -> tuple[Tensor, Tensor]:
    """(W~ [out, in] in {−1, 0, 1} (b1.58) or {−1, 1} (1-bit) as float, β [] = mean|W|). No gradient."""
    W = W.detach()
    beta = W.abs().mean()
    if bits == 1.58:
        Wt = torch.round(W / (beta + EPS)).clamp(-1, 1)                    # RoundClip(W / (β + ε), −1, 1)
    else:
        Wt = torch.where(W - W.mean() > 0, 1.0, -1.0).to(W.dtype)          # Sign(W − α), α = mean(W)
    return Wt, beta


class BitLinear(nn.Module):
    """A drop-in for ``nn.Linear`` computing BitNet's quantized product (module docstring).

    Parameters: ``weight`` [out, in] the latent float weight, ``bias`` [out] or None, and with
    ``norm=True`` and ``norm_gain=True`` the RMSNorm gain ``norm_weight`` [in] (initialised to 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: float = 1.58, *,
                 norm: bool = True, norm_gain: bool = True, norm_eps: float = NORM_EPS):
        super().__init__()
        self.bits = check_bits(bits)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's initialisation
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.norm = bool(norm)
        self.norm_eps = float(norm_eps)
        self.norm_weight = nn.Parameter(torch.ones(self.in_features)) if self.norm and norm_gain else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: float = 1.58, *, norm: bool = True,
                    norm_gain: bool = True) -> "BitLinear":
        """A BitLinear whose latent weight (and bias) are a float32 copy of ``lin``'s."""
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, norm=norm, norm_gain=norm_gain)
        with torch.no_grad():
            m.weight.copy_(lin.weight.detach().float())
            if lin.bias is not None:
                m.bias.copy_(lin.bias.detach().float())
        return m.to(lin.weight.device)

    def quantized_weight(self) -> tuple[Tensor, Tensor]:
        """(W~, β) of the current latent weight."""
        return weight_quant(self.weight, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if self.norm:
            x = rms_norm(x, self.norm_weight, self.norm_eps)
        xq, gamma = activation_quant(x)
        Wq, beta = self.quantized_weight()
        # straight-through: the forward sees the integers, the backward the scaled float inputs
        # (u − u.detach() is exactly 0, so the forward values are the integers themselves)
        xs = x * (QB / gamma)
        xq = xq + (xs - xs.detach())                     # d x~/dx = Qb/γ
        Ws = self.weight / beta
        Wq = Wq + (Ws - Ws.detach())                     # d W~/dW = 1/β
        y = F.linear(xq, Wq) * (beta * gamma / QB)       # (W~ x~) · β · γ / Qb
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def packed(self) -> TernaryWeight:
        """W~ and β in lowbit's `TernaryWeight` (2-bit codes, one per-tensor scale): its
        `dequantize()` is exactly ``W~ · β``. A 1-bit layer has no format of its own: its codes are
        stored as ternary codes that never hold 0 (2 bits per weight where 1 would do). The bias and
        the norm gain are not part of the weight format; the activation path (module docstring)
        is the run time's."""
        Wt, beta = self.quantized_weight()
        return TernaryWeight.from_ternary(Wt.to(torch.int8), beta.float().reshape(1), "tensor")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, norm={self.norm}")


def convert(model: nn.Module, bits: float, norm: bool = True, norm_gain: bool = True) -> dict[str, BitLinear]:
    """Replace every projection of every decoder block (the model family's record names them) by a
    `BitLinear` initialised from its float weight; returns {full module name: BitLinear}."""
    bits = check_bits(bits)
    fam = family_of(model)
    out = {}
    for i, blk in enumerate(find_blocks(model)):
        prefix = block_prefix(model, i)
        for path in fam.projections.values():
            lin = blk.get_submodule(path)
            if not isinstance(lin, nn.Linear):
                raise LowbitError(f"{prefix}.{path} is {type(lin).__name__}, not nn.Linear; "
                                  "BitLinear conversion starts from a float model")
            bl = BitLinear.from_linear(lin, bits, norm=norm, norm_gain=norm_gain)
            blk.set_submodule(path, bl)
            out[f"{prefix}.{path}"] = bl
    if not out:
        raise LowbitError(f"{type(model).__name__} has no projections in its blocks to convert")
    return out
