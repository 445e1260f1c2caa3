"""Fake-quantized linear layer for LLMs: a float latent weight that is quantized and dequantized
on the fly, so that it can be trained (QAT) and written back as a packed `AffineWeight`.

    y = x fq(W)^T + b,    fq(W) = s (clamp(round(W / s) + z, qmin, qmax) - z)    (per slice)

on the grouped grid of any affine `QuantScheme` (2-8 bits, symmetric or asymmetric, per tensor,
per channel or per group with a ragged last group, integer or float zero-points): the rounding
and dequantization are `lowbit.core.grid`'s (`grid.fake_quantize_ste`), so ``fq(W)`` is bit for bit
what `to_format().dequantize()` gives.

Gradients: W gets the clipped straight-through estimator (identity where W falls inside the grid,
zero where it is clipped). The scales either

* follow the weight (``learn_scale=False``): chosen from the current weight by
  `grid.choose_qparams` at every forward (min/max or absmax, as RTN does; no gradient), or
* are trained (``learn_scale=True``, LSQ, Esser et al. 2020): a parameter initialised from
  `grid.choose_qparams` (or from a packed layer's own scales), its gradient
  ``(q - z) - W / s`` inside the grid and ``q - z`` outside, multiplied by LSQ's gradient scale
  ``1 / sqrt(n qmax)`` (n = weights per scale; ``grad_scale=False``: 1). Integer zero-points stay
  fixed; float zero-points are trained too (LSQ+, gradient ``-s`` where clipped). Trained values
  are used as they are stored (fp16 scales rounded, `grid.stored_ste`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.core import grid
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is fake-quantized on ``scheme``'s grid (module docstring).

    ``weight`` [out, in] is the latent float weight (an ``nn.Parameter``), ``bias`` an optional
    float parameter; with ``learn_scale`` the parameters ``scale`` [rows, groups] and, for a float
    zero-point scheme, ``zero`` (an integer zero-point scheme keeps its ``zero`` as a buffer).
    ``original`` is the module it was built from (not a submodule: the stand-in's parameters and
    state are its own)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, scheme: QuantScheme, *, learn_scale: bool = False,
                 scale: Tensor | None = None, zero: Tensor | None = None, grad_scale: bool = True):
        super().__init__()
        if weight.dim() != 2:
            raise LowbitError(f"a fake-quantized linear layer needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.scheme = scheme
        self.learn_scale = bool(learn_scale)
        self.grad_scale = bool(grad_scale)
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.__dict__["_original"] = None
        if not self.learn_scale:
            self.scale = self.zero = None
            return
        if scale is None:
            scale, zero = grid.choose_qparams(self.weight.detach(), scheme)
        want = grid.scale_shape(self.shape, scheme)
        if tuple(scale.shape) != want or (zero is None) != scheme.symmetric \
                or (zero is not None and tuple(zero.shape) != want):
            raise LowbitError(f"scales/zero-points for a {self.shape} weight under {scheme.short_name()} must be "
                              f"{want}, got {tuple(scale.shape)}/{None if zero is None else tuple(zero.shape)}")
        self.scale = nn.Parameter(scale.detach().float().clone())
        if zero is None:
            self.zero = None
        elif scheme.zero_point == "float":
            self.zero = nn.Parameter(zero.detach().float().clone())
        else:
            self.register_buffer("zero", zero.detach().float().clone())

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: QuantScheme, learn_scale: bool = False,
                    grad_scale: bool = True) -> "FakeQuantLinear":
        """QAT of a float layer: its weight is the latent weight (at init the forward is RTN's)."""
        m = cls(lin.weight, lin.bias, scheme, learn_scale=learn_scale, grad_scale=grad_scale)
        m.__dict__["_original"] = lin
        return m

    @classmethod
    def from_affine(cls, q: nn.Module, learn_scale: bool = True, grad_scale: bool = True) -> "FakeQuantLinear":
        """Tuning of a packed affine layer (a QuantizedLinear over an `AffineWeight`): the latent
        weight is its dequantized weight, the scales and zero-points its own (``learn_scale``;
        otherwise re-chosen from the weight), so that at init the forward is the packed layer's."""
        fmt = getattr(q, "weight_format", None)
        if type(fmt) is not AffineWeight:
            raise LowbitError(f"FakeQuantLinear.from_affine needs a layer over an affine weight, got "
                              f"{getattr(fmt, 'name', type(q).__name__)}")
        m = cls(fmt.dequantize(), q.bias, fmt.scheme, learn_scale=learn_scale,
                scale=fmt.scales.float() if learn_scale else None,
                zero=None if fmt.scheme.symmetric or not learn_scale else fmt.zero_points().float(),
                grad_scale=grad_scale)
        m.__dict__["_original"] = q
        return m

    @property
    def original(self) -> nn.Module | None:
        """The module this one was built from (None when built from tensors)."""
        return self.__dict__.get("_original")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # -- the quantized weight ---------------------------------------------------------------------
    def scale_grad(self) -> float:
        """LSQ's gradient scale ``1 / sqrt(n qmax)``, n = weights per scale (1 without ``grad_scale``)."""
        if not self.grad_scale:
            return 1.0
        n = self.out_features * self.in_features if self.scheme.granularity == "tensor" \
            else grid.group_layout(self.shape, self.scheme)[1]
        return 1.0 / math.sqrt(n * self.scheme.qmax)

    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """(scale, zero-point) the forward uses, as stored: chosen from the current weight, or the
        trained ones rounded to the storage dtype (gradient straight through the rounding)."""
        if not self.learn_scale:
            return grid.choose_qparams(self.weight.detach(), self.scheme)
        return grid.stored_qparams_ste(self.scale, self.zero, self.scheme)

    def quantized_weight(self) -> Tensor:
        """``fq(W)`` [out, in] float32 (differentiable; see the module docstring)."""
        s, z = self.qparams()
        Wg = grid.grouped(self.weight, self.scheme)
        return grid.ungrouped(grid.fake_quantize_ste(Wg, s, z, self.scheme, self.scale_grad()), self.shape)

    def forward(self, x: Tensor) -> Tensor:
        W = self.quantized_weight()
        b = self.bias
        return F.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def to_format(self) -> AffineWeight:
        """The latent weight rounded onto the grid of the current scales and zero-points, packed
        (validated). Its ``dequantize()`` is ``quantized_weight()``, bit for bit."""
        s, z = self.qparams()
        s = s.detach()
        z = None if z is None else z.detach()
        q = grid.quantize(self.weight.detach().float(), s, z, self.scheme)
        fmt = AffineWeight.from_integers(q, s, z, self.scheme)
        fmt.validate()
        return fmt

    def weight_format(self) -> AffineWeight:
        """The tuned packed weight (`to_format`): the name every trainable stand-in answers to
        (`lowbit.training.tunable`)."""
        return self.to_format()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.short_name()}, "
                f"learn_scale={self.learn_scale}")
