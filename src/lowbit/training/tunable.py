"""Trainable views of packed layers: what layer-wise distillation (`lowbit.training.lkd`), the
recovery of a quantized checkpoint by distillation and adapters build on.

    standins = make_trainable(model_or_block, mode="auto")   # QuantizedLinear -> trainable stand-in
    opt = torch.optim.Adam(trainable_parameters(standins), lr=...)
    ...                                                       # train model_or_block as usual
    tuned = restore(model_or_block, standins, keep=True)      # packed again: {name: tuned format}

A stand-in computes what its packed layer computes (up to float rounding) and can write its tuned
weight back in the same format (``weight_format()``, validated). Views of an `AffineWeight`:

* ``"scales"`` (`TunableAffine`): the integer codes stay exactly as they are; the scales (and the
  float zero-points of a ``zero_point="float"`` scheme) are trained;
* ``"latent"`` (`lowbit.training.fake_quant.FakeQuantLinear.from_affine`): a latent float weight
  (the dequantized one) fake-quantized with the straight-through estimator, with learned scales
  (LSQ): codes may change when the weight is written back;
* ``"auto"``: ``"scales"``, the view that helped reliably in short block-wise runs (SmolLM2-135M,
  GPTQ W3 g64, 100-300 steps a block: the scales lowered every block's error; the latent
  weights, whose codes flip under single-sample steps, made the first blocks worse).

The view of an `E8PWeight` (QuIP#, `TunableE8P`; every mode) keeps the lattice codes and trains
the continuous rest, as the paper's fine-tuning does (§5): the two sign vectors of the
incoherence transforms (made real-valued) and the scales. QuIP#'s block-wise tuning
(`lowbit.algorithms.quip`) and the end-to-end recovery (`lowbit distill --student`) share it.
The view of an `AQLMWeight` (`TunableAQLM`; every mode) keeps the codes and the bias and trains
the codebooks and a factor per output row, as AQLM's block tuning (`lowbit.algorithms.aqlm`) does.

Layers in a format with no view (incoherent or sparse weights, int8 with outliers, ...)
stay as they are; their names are listed in the returned mapping's ``skipped``. The affine views
copy the layer's bias into a parameter of their own, trained with the rest; the E8P view trains
the layer's own bias in place, the AQLM view keeps it as it is (as their block tunings always
did). Every stand-in's ``original`` is the QuantizedLinear it replaced.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from lowbit.core import e8p, grid
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.aqlm import AQLMWeight, reconstruct
from lowbit.formats.e8p import E8PWeight, decode_signs
from lowbit.nn.linear import QuantizedLinear
from lowbit.nn.replace import replacement
from lowbit.training.fake_quant import FakeQuantLinear

MODES = ("auto", "scales", "latent")


class _View(nn.Module):
    """What every view of a packed layer shares: the format it takes (``FORMAT``), checked, and
    ``original``, the layer it stands in for (kept out of the module tree: its parameters are
    not the view's)."""

    FORMAT: type = object

    def __init__(self, q: QuantizedLinear):
        super().__init__()
        if type(q.weight_format) is not self.FORMAT:
            raise LowbitError(f"{type(self).__name__} needs a layer over a {self.FORMAT.__name__}, "
                              f"got {q.weight_format.name}")
        self.__dict__["_original"] = q

    @property
    def original(self) -> QuantizedLinear:
        return self.__dict__["_original"]


class TunableAffine(_View):
    """An affine layer with its integer codes fixed and its scales (and float zero-points)
    trainable: ``W = (q - z) s`` per slice, with the trained values as they are stored."""

    FORMAT = AffineWeight

    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        fmt = q.weight_format
        self.scheme = fmt.scheme
        self.shape = tuple(fmt.shape)
        ints = fmt.integers()
        self.register_buffer("codes", ints.to(torch.int32), persistent=False)
        self.register_buffer("_levels", grid.grouped(ints.float(), self.scheme), persistent=False)
        self.scale = nn.Parameter(fmt.scales.float().clone())
        z = fmt.zero_points()
        if z is not None and self.scheme.zero_point == "float":
            self.zero = nn.Parameter(z.float().clone())
        else:
            self.register_buffer("zero", None if z is None else z.float(), persistent=False)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone())


    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """(scale, zero-point) as stored (gradient straight through the storage rounding)."""
        return grid.stored_qparams_ste(self.scale, self.zero, self.scheme)

    def quantized_weight(self) -> Tensor:
        s, z = self.qparams()
        W = grid.decode(self._levels, s.unsqueeze(-1), None if z is None else z.unsqueeze(-1))
        return grid.ungrouped(W, self.shape)

    def forward(self, x: Tensor) -> Tensor:
        W = self.quantized_weight()
        b = self.bias
        return nn.functional.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def weight_format(self) -> AffineWeight:
        """The same codes with the tuned scales (and zero-points), validated."""
        s, z = self.qparams()
        fmt = AffineWeight.from_integers(self.codes, s.detach(), None if z is None else z.detach(), self.scheme)
        fmt.validate()
        return fmt


class TunableE8P(_View):
    """An E8P layer whose continuous parts are trainable: the transforms' diagonals ``su``, ``sv``
    (initialised to the seed's signs) and the scales; the codes stay as they are, decoded once
    into float buffers. The bias is the layer's own parameter (trained in place, as the block
    tuning's norm gains are). ``weight_format()`` is the weight with the tuned values stored."""

    FORMAT = E8PWeight

    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        f = self.fmt = q.weight_format
        self._inc = f.incoherence()
        du, dv = self._inc.U.diagonal(), self._inc.V.diagonal()
        self.su = nn.Parameter(torch.ones(f.shape[0]) if du is None else du.clone(), requires_grad=False)
        self.sv = nn.Parameter(torch.ones(f.shape[1]) if dv is None else dv.clone(), requires_grad=False)
        self.scale = nn.Parameter(f.scale.clone(), requires_grad=False)
        self.register_buffer("stage1", e8p.decode(f.codes.to(torch.int64) & 0xFFFF).reshape(f.shape), persistent=False)
        stage2 = None
        if f.bits == 4:
            stage2 = e8p.decode(f.residual.to(torch.int64) & 0xFFFF).reshape(f.shape)
        elif f.bits == 3:
            stage2 = decode_signs(f.residual).reshape(f.shape)
        self.register_buffer("stage2", stage2, persistent=False)
        self.bias = q.bias

    def forward(self, x: Tensor) -> Tensor:
        W = self.scale[0] * self.stage1
        if self.stage2 is not None:
            W = W + self.scale[1] * self.stage2
        U = dataclasses.replace(self._inc.U, diag=self.su)
        V = dataclasses.replace(self._inc.V, diag=self.sv)
        y = U.apply_t(V.apply(x.float()) @ W.T)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    @torch.no_grad()
    def weight_format(self) -> E8PWeight:
        """The same codes with the tuned sign vectors and scales, validated."""
        fmt = dataclasses.replace(self.fmt, scale=self.scale.detach().clone(), su=self.su.detach().clone(),
                                  sv=self.sv.detach().clone())
        fmt.validate()
        return fmt


class TunableAQLM(_View):
    """An AQLM layer with its codes fixed: y = x (s ⊙ r ⊙ Σ_m C_m[b])ᵀ + bias, trainable codebooks
    C and per-row factors r (ones at the start: Adam's steps are about the same size for every
    parameter, while the scales s are as small as the weights); the scales s and the bias stay.
    ``weight_format()`` stores s ⊙ r and the codebooks in the format's dtype."""

    FORMAT = AQLMWeight

    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        fmt = q.weight_format
        self.shape = fmt.shape
        self.dtype = fmt.codebooks.dtype
        self.codebooks = nn.Parameter(fmt.codebooks[:, :, 0, :].float().clone(), requires_grad=False)  # [M, K, g]
        self.factors = nn.Parameter(torch.ones(fmt.shape[0]), requires_grad=False)                    # [out]
        self.register_buffer("scales", fmt.scales.reshape(-1).float().clone())                        # [out]
        self.register_buffer("codes", fmt.unsigned_codes())                                           # [out, groups, M]
        self.bias = None if q.bias is None else q.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        W = reconstruct(self.codebooks, self.codes, self.scales * self.factors).to(x.dtype)
        return nn.functional.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """Codebooks and s ⊙ r rounded to the stored dtype (factors back to one), in place."""
        self.codebooks.copy_(self.codebooks.to(self.dtype))
        self.scales.copy_((self.scales * self.factors).to(self.dtype))
        self.factors.fill_(1.0)

    @torch.no_grad()
    def weight_format(self) -> AQLMWeight:
        fmt = AQLMWeight.from_codes(self.codes, self.codebooks.detach(), self.scales * self.factors.detach(),
                                    self.shape, dtype=self.dtype)
        fmt.validate()
        return fmt


class TrainableLayers(dict):
    """{name: stand-in} of `make_trainable`; ``skipped`` maps the names of the packed layers left
    as they were (no trainable view of their format) to the format's name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}


def view(q: QuantizedLinear, mode: str = "auto") -> nn.Module | None:
    """The trainable stand-in of one packed layer in ``mode``, or None when its format has none."""
    if mode not in MODES:
        raise LowbitError(f"trainable view must be one of {', '.join(MODES)}, got {mode!r}")
    if type(q.weight_format) is AffineWeight:
        return FakeQuantLinear.from_affine(q, learn_scale=True) if mode == "latent" else TunableAffine(q)
    if type(q.weight_format) is E8PWeight:
        return TunableE8P(q)
    if type(q.weight_format) is AQLMWeight:
        return TunableAQLM(q)
    return None


def make_trainable(module: nn.Module, mode: str = "auto", dense: tuple[str, ...] | list[str] = ()) -> TrainableLayers:
    """Put a trainable stand-in in the place of every QuantizedLinear inside ``module`` whose format
    has a view (module docstring), and of every float nn.Linear named in ``dense`` (a pruned
    layer: `MaskedLinear`, its zeros kept); returns {name within ``module``: stand-in}, with the
    layers left alone in ``skipped``."""
    if mode not in MODES:
        raise LowbitError(f"trainable view must be one of {', '.join(MODES)}, got {mode!r}")
    dense = set(dense)
    out = TrainableLayers()
    for name, m in list(module.named_modules()):
        if not name:
            continue
        if name in dense:
            if type(m) is not nn.Linear:
                raise LowbitError(f"{name} is {type(m).__name__}, not a float linear layer")
            s = MaskedLinear(m)
        elif isinstance(m, QuantizedLinear):
            s = view(m, mode)
            if s is None:
                out.skipped[name] = m.weight_format.name
                continue
        else:
            continue
        module.set_submodule(name, s)
        out[name] = s
    missing = dense - set(out)
    if missing:
        raise LowbitError(f"no layer named {sorted(missing)[0]} to train")
    return out


class MaskedLinear(nn.Module):
    """A pruned float layer whose surviving weights train and whose zeros stay zero: the forward
    uses ``W * mask`` (mask = the weights that were non-zero), so a pruned weight gets no gradient,
    and AdamW never moves it. ``weight_format()`` is the dense weight (the runner and `restore`
    put an nn.Linear back)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.__dict__["_original"] = lin
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(lin.weight.detach().float().clone())
        self.register_buffer("mask", lin.weight.detach() != 0, persistent=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().float().clone())

    @property
    def original(self) -> nn.Linear:
        return self.__dict__["_original"]

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight * self.mask
        b = self.bias
        return nn.functional.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def weight_format(self) -> Tensor:
        return (self.weight * self.mask).to(self.original.weight.dtype)


# every kind of stand-in `make_trainable` makes
STANDIN_TYPES = (TunableAffine, FakeQuantLinear, TunableE8P, TunableAQLM, MaskedLinear)


def trainable_parameters(standins: dict[str, nn.Module]) -> list[nn.Parameter]:
    """Every parameter of the stand-ins (latent weights, scales, float zero-points, biases)."""
    return [p for s in standins.values() for p in s.parameters()]


def restore(module: nn.Module, standins: dict[str, nn.Module], keep: bool) -> dict:
    """Take the stand-ins out of ``module``. ``keep=False``: the original packed layers go back,
    unchanged; returns {}. ``keep=True``: each stand-in's tuned weight (``weight_format()``) goes in
    as a new QuantizedLinear (with the stand-in's bias), and {name: tuned format} is returned (for
    a caller that installs formats itself, such as the calibration runner)."""
    tuned = {n: s.weight_format() for n, s in standins.items()} if keep else {}
    for n, s in standins.items():
        module.set_submodule(n, replacement(s, tuned[n]) if keep else s.original)
    return tuned
