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
    (β is rounded to the nearest float16 value: `lowbit.formats.bitnet`)

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

**At run time** the packed layer (`BitLinear.packed`: a `lowbit.formats.bitnet.BitNetWeight`, which
owns the arithmetic above; β is rounded to float16 there, and this layer trains with the same
rounded β) is run by `lowbit.kernels.bitnet`: the norm, int8 activations, an integer product of
codes and activations, one rescale. `lowbit.nn.replace` swaps packed layers in for the trained ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.bitnet import (BITS, EPS, NORM_EPS, QB, BitNetWeight, activation_quant, check_bits,  # noqa: F401
                                   output_scale, rms_norm, weight_quant)
from lowbit.models.families import block_prefix, family_of, find_blocks


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
        y = F.linear(xq, Wq) * output_scale(beta, gamma)  # (W~ x~) · ((β · γ) / Qb)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def packed(self) -> BitNetWeight:
        """The layer as stored and run: W~, β and the norm (gain, eps) in a `BitNetWeight`, whose
        own product (`lowbit.formats.bitnet.product`, the kernels' reference) is this layer's
        forward. The bias is the module's, not the format's."""
        Wt, beta = self.quantized_weight()
        return BitNetWeight.from_codes(Wt, beta, self.bits, norm=self.norm, norm_weight=self.norm_weight,
                                       norm_eps=self.norm_eps)

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


def pack(model: nn.Module) -> dict[str, BitNetWeight]:
    """Replace every `BitLinear` in ``model`` by a `QuantizedLinear` over its `BitNetWeight` (the
    same function, now stored in 2 or 1 bits a weight and run by the BitNet kernels); returns
    {full module name: format}."""
    from lowbit.nn.replace import replacement

    found = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    out = {}
    for n, bl in found.items():
        out[n] = bl.packed()
        model.set_submodule(n, replacement(bl, out[n]))
    return out


def parameters_of(layers: dict[str, BitLinear]) -> dict[str, Tensor]:
    """The trainable tensors of converted layers by full parameter name: latent weights, biases,
    norm gains."""
    return {f"{n}.{p}": t for n, bl in layers.items() for p, t in bl.named_parameters()}
