"""AWQ: Activation-aware Weight Quantization (Lin et al., 2023, arXiv:2306.00978).

The paper in four lines
-----------------------
* §3.1  Not all weights matter equally: the input channels that meet *large activations* are
  salient. Keeping 1% of them in fp16 recovers most of the quantization loss, but mixed precision
  is awkward in hardware.
* §3.2  Instead, scale a salient channel up before quantizing and its activation down:
  ``Q(w·s)·(x/s)``. The rounding error of ``w·s`` is about the same as that of ``w`` (the group's
  scale barely moves), so the error on the product shrinks by ~1/s  (Eq. 1-3).
* Eq. 4  s* = argmin_s L(s),   L(s) = ‖ Q(W·diag(s)) · (diag(s)⁻¹·X) − W·X ‖²
* Eq. 5  s = s_X^α,  α* = argmin_α L(s_X^α)  on a grid of α in [0, 1), where s_X is the average
  magnitude |x| of each input channel. α = 0 is plain round-to-nearest; the search can only
  keep or lower L.
  The reference implementation also *clips* each group's weight range (shrinks it by a factor,
  searched per group to minimise the group's output error): outliers set the grid's step, and
  clipping them trades their error for a finer grid everywhere else.

diag(s)⁻¹ is never applied at run time: it is folded into the op that produces X — the RMSNorm's
weight, or the output rows of the previous linear — and diag(s) into the columns of W, so the
float model computes exactly what it did before (up to float rounding); only the quantization
grid sees the scaled weights.

How lowbit runs it (one decoder block at a time, driven by `calibration.sequential`)
------------------------------------------------------------------------------------
1. ``observe``: for every linear, accumulate statistics of its input tokens x [in] (at most
   ``max_tokens`` per layer): the Gram matrix H = Σ x xᵀ, Σ|x| and the token count. Because
   ‖X·Δᵀ‖² = tr(Δ·H·Δᵀ) for any weight error Δ = Ŵ − W, these sums are all Eq. 4 needs (``statistics``).
2. ``transform_block``: for each scaling group of the family (its record's `Family.awq`:
   norm → q/k/v, v_proj → o_proj, norm → gate/up, up_proj → down_proj): grid-search α (Eq. 5),
   fold 1/s into the producing op and s into the linears' columns. Then, per linear (except q/k),
   search each group's clipping factor.
3. ``apply``: round-to-nearest on the folded weight, each group's range [min, max] shrunk by its
   factor → `AffineWeight` in a `QuantizedLinear`.

Simplifications against the paper's reference code (mit-han-lab/llm-awq), on purpose
-------------------------------------------------------------------------------------
* Loss: Eq. 4 literally — the output of the *linear layers* that share s (summed over them),
  computed from H. The reference code instead measures the output of a larger module (the whole
  attention for q/k/v, the whole MLP for gate/up), which needs full sequences and a forward pass
  of that module per grid point; here a grid point costs O(out·in²) whatever the token count.
* Clipping shrinks both ends of the group's range, [f·min, f·max], and then uses the scheme's own
  min/max rule (the reference clamps to ±f·absmax even for asymmetric grids). Candidates are
  f = 1, 1 − 1/clip_grid, ... down to ``max_shrink`` inclusive (the reference stops one step
  before). Statistics for clipping use the same tokens as the scale search (the reference
  subsamples 512 tokens). q_proj/k_proj are not clipped, as in the reference (their error passes
  through the softmax, which a linear-output loss does not see).
* v_proj → o_proj is skipped when its shapes do not chain (grouped-query attention: v_proj has
  fewer outputs than o_proj has inputs), as in the reference.
* Scales are computed and folded in float32; channels whose mean |x| is below 1e-4 of the
  largest are floored there (the reference floors s at an absolute 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core import grid
from lowbit.core.grid import check_finite, qparams_from_range
from lowbit.core.processes import share
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.models.families import awq_layout, linear_layers
from lowbit.formats.base import WeightFormat

_ACT_FLOOR = 1e-4  # s_X is floored at this fraction of its largest entry (dead channels)


@dataclass(frozen=True)
class AWQConfig:
    scheme: QuantScheme = field(default_factory=lambda: QuantScheme(4, False, "group", 128))
    n_grid: int = 20          # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}  (Eq. 5)
    clip: bool = True         # search a clipping factor per group after scaling
    clip_grid: int = 20       # shrink factors f = 1 - i/clip_grid ...
    max_shrink: float = 0.5   # ... down to max_shrink
    max_tokens: int = 4096    # tokens per layer that feed the statistics

    def __post_init__(self) -> None:
        for name in ("n_grid", "clip_grid", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitError(f"AWQ {name} must be a positive integer, got {v!r}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0.0 < self.max_shrink <= 1.0:
            raise LowbitError(f"AWQ max_shrink must be in (0, 1], got {self.max_shrink!r}")
        if not isinstance(self.scheme, QuantScheme):
            raise LowbitError(f"AWQ scheme must be a QuantScheme, got {type(self.scheme).__name__}")


# -- statistics of a layer's inputs ------------------------------------------------------------
@dataclass
class ActStats:
    """Sums over the input tokens x [in] of one linear layer."""

    H: Tensor        # [in, in]  Σ x·xᵀ, so that ‖X·Δᵀ‖²_F = tr(Δ·H·Δᵀ)
    abs_sum: Tensor  # [in]      Σ |x|
    n: Tensor        # []        number of tokens (float64)

    @classmethod
    def of(cls, X: Tensor) -> "ActStats":
        X = X.reshape(-1, X.shape[-1]).float()               # [n, in]
        return cls(H=X.T @ X, abs_sum=X.abs().sum(0),
                   n=torch.tensor(float(X.shape[0]), dtype=torch.float64, device=X.device))

    def copy(self) -> "ActStats":
        return ActStats(self.H.clone(), self.abs_sum.clone(), self.n.clone())

    def add_(self, other: "ActStats") -> None:
        self.H += other.H
        self.abs_sum += other.abs_sum
        self.n += other.n

    @property
    def mean_abs(self) -> Tensor:
        """s_X of Eq. 5: the average magnitude of each input channel."""
        return self.abs_sum / self.n.clamp(min=1).to(self.abs_sum.dtype)

    def divide_inputs_(self, s: Tensor) -> None:
        """The statistics of x/s (after diag(s)⁻¹ was folded into the op producing x)."""
        self.H /= s[:, None] * s[None, :]
        self.abs_sum /= s


def output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> Tensor:
    """‖X·Ŵᵀ − X·Wᵀ‖²_F = tr(Δ·H·Δᵀ) with Δ = Ŵ − W [out, in] and H = XᵀX [in, in]."""
    D = W_hat - W
    return ((D @ H) * D).sum()


# -- the quantization grid on a grouped view ------------------------------------------------------
# Both searches fake-quantize the same weight many times. They view it once as [rows, n, g] (each
# row's columns in n groups of g, the last padded; per-channel and per-tensor: n = 1, g = in) and
# round there with `grid.fake_quantize_grouped`; slice ranges leave the padding out, as
# `grid.choose_qparams` does, so f = 1 / α = 0 is exactly round-to-nearest.
def _grouped(W: Tensor, scheme: QuantScheme, pad_value: float = 0.0) -> Tensor:
    return grid.grouped(W.float(), scheme, pad_value, by_row=True)


def _slice_range(Wg: Tensor, scheme: QuantScheme, cols: int) -> tuple[Tensor, Tensor]:
    """(min, max) over the real entries of every slice of the [rows, n, g] view of a weight with
    ``cols`` columns, shaped like the scales."""
    return grid.slice_range(Wg, scheme, grid.valid_mask((Wg.shape[0], cols), scheme, Wg))


# -- Eq. 4-5: the per-channel scale search ----------------------------------------------------
def awq_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """s = s_X^α (Eq. 5), normalised so that sqrt(max(s)·min(s)) = 1. α = 0 gives s = 1 exactly."""
    if alpha == 0:
        return torch.ones_like(mean_abs, dtype=torch.float32)
    top = float(mean_abs.max())
    if not top > 0:
        return torch.ones_like(mean_abs, dtype=torch.float32)
    s = mean_abs.float().clamp(min=_ACT_FLOOR * top).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    s: Tensor             # [in] the chosen scales
    alpha: float          # the chosen exponent
    losses: list[float]   # L(s_X^α) for every α on the grid (Eq. 4); losses[0] is RTN's


def search_scales(stats: ActStats, Ws: Sequence[Tensor], scheme: QuantScheme, n_grid: int) -> ScaleSearch:
    """Grid search of α (Eq. 5) for linears ``Ws`` [out_i, in] that read the same input.

    L(s) = Σ_i ‖X·(Q(W_i·diag(s))·diag(s)⁻¹)ᵀ − X·W_iᵀ‖²  (Eq. 4 summed over the linears), from H.
    Ties keep the smaller α, so n_grid = 1 (α = 0 only) is round-to-nearest."""
    if n_grid < 1:
        raise LowbitError(f"AWQ n_grid must be a positive integer, got {n_grid!r}")
    Wgs = [_grouped(W.detach(), scheme) for W in Ws]                   # [out_i, n, g]
    n, g = Wgs[0].shape[1:]
    cols = stats.H.shape[0]
    pad = n * g - cols
    Hp = F.pad(stats.H.float(), (0, pad, 0, pad))                     # [n·g, n·g]
    alphas = [i / n_grid for i in range(n_grid)]
    losses = []
    for alpha in alphas:
        s = awq_scales(stats.mean_abs, alpha).to(Hp.device)
        sg = _grouped(s[None, :], scheme, pad_value=1.0)              # [1, n, g]
        loss = 0.0
        for Wg in Wgs:
            WS = Wg * sg                                              # W·diag(s)
            Wq = grid.fake_quantize_grouped(WS, *qparams_from_range(*_slice_range(WS, scheme, cols), scheme), scheme)
            D = Wq.div_(sg).sub_(Wg)                                  # Δ = Q(W·diag(s))·diag(s)⁻¹ − W
            D = D.reshape(D.shape[0], n * g)
            loss += float(((D @ Hp) * D).sum())
        losses.append(loss)
    best = min(range(n_grid), key=losses.__getitem__)  # the first minimum: ties keep the smaller α
    return ScaleSearch(s=awq_scales(stats.mean_abs, alphas[best]).to(Hp.device), alpha=alphas[best], losses=losses)


@torch.no_grad()
def fold_scales(block: nn.Module, prev: str, linears: Sequence[str], s: Tensor, norm_offset: float = 0.0) -> None:
    """Make Eq. 4's diag(s)⁻¹·X part of the model: X is produced by ``prev`` inside ``block``.

    prev a norm with y = x_hat·(offset + w):  offset + w  ←  (offset + w) / s
    prev a linear:                            its output rows (and bias) ← / s
    each of ``linears``:                      W ← W·diag(s)
    In exact arithmetic the block computes the same function afterwards."""
    op = block.get_submodule(prev)
    s = s.detach().float()
    if isinstance(op, nn.Linear):
        if op.out_features != s.numel():
            raise LowbitError(f"cannot fold {s.numel()} scales into {prev} with {op.out_features} outputs")
        op.weight.copy_((op.weight.float() / s[:, None]).to(op.weight.dtype))
        if op.bias is not None:
            op.bias.copy_((op.bias.float() / s).to(op.bias.dtype))
    else:
        w = getattr(op, "weight", None)
        if not isinstance(w, Tensor) or w.dim() != 1 or w.numel() != s.numel():
            raise LowbitError(f"cannot fold {s.numel()} scales into {prev} ({type(op).__name__}): "
                              "expected a norm with a per-channel weight")
        w.copy_(((w.float() + norm_offset) / s - norm_offset).to(w.dtype))
        b = getattr(op, "bias", None)
        if isinstance(b, Tensor):
            b.copy_((b.float() / s).to(b.dtype))
    for name in linears:
        W = block.get_submodule(name).weight
        W.copy_((W.float() * s[None, :]).to(W.dtype))


# -- weight clipping -------------------------------------------------------------------------
def shrink_factors(clip_grid: int, max_shrink: float) -> list[float]:
    """f = 1, 1 - 1/clip_grid, ..., down to max_shrink (inclusive, up to float rounding)."""
    n = int((1.0 - max_shrink) * clip_grid + 1e-9)
    return [1.0 - i / clip_grid for i in range(n + 1)]


def _group_errors(D: Tensor, H: Tensor, scheme: QuantScheme) -> Tensor:
    """err[r, j] = Δ[r, j]·H_jj·Δ[r, j]ᵀ for Δ [rows, n, g] grouped; H_jj is the diagonal block of
    H on group j's columns. Shaped like the scales (per-tensor: the sum)."""
    rows, n, g = D.shape
    pad = n * g - H.shape[0]
    Hb = F.pad(H.float(), (0, pad, 0, pad)).reshape(n, g, n, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    Dt = D.transpose(0, 1)                                          # [n, rows, g]
    err = (torch.bmm(Dt, Hb) * Dt).sum(-1).T                        # [rows, n]
    return err.sum().reshape(1, 1) if scheme.granularity == "tensor" else err


def group_errors(W: Tensor, W_hat: Tensor, H: Tensor, scheme: QuantScheme) -> Tensor:
    """Output error of every slice that shares a scale, shaped like the scales:
    err[r, j] = ‖X_j·(Ŵ[r, j] − W[r, j])ᵀ‖², X_j the activations of group j's columns."""
    return _group_errors(_grouped(W_hat - W, scheme), H, scheme)


def search_clip(H: Tensor, W: Tensor, scheme: QuantScheme, clip_grid: int = 20,
                max_shrink: float = 0.5) -> Tensor:
    """Per slice, the factor f in [max_shrink, 1] whose grid on [f·min, f·max] minimises that
    slice's output error (shaped like the scales). f = 1 is tried first and kept on ties, so no
    slice ends up worse than round-to-nearest."""
    Wg = _grouped(W.detach(), scheme)
    lo, hi = _slice_range(Wg, scheme, W.shape[1])
    best_f = torch.ones_like(lo)
    best_err = torch.full_like(lo, float("inf"))
    for f in shrink_factors(clip_grid, max_shrink):
        Wq = grid.fake_quantize_grouped(Wg, *qparams_from_range(lo * f, hi * f, scheme), scheme)
        err = _group_errors(Wq.sub_(Wg), H, scheme)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, torch.full_like(lo, f), best_f)
    return best_f


def quantize_clipped(W: Tensor, shrink: Tensor | None, scheme: QuantScheme) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integers, scale, zero of W on the grid of each slice's range [f·min, f·max] (values
    outside clamp to the ends). ``shrink`` None is round-to-nearest."""
    W = W.detach().float()
    s, z = grid.choose_qparams(W, scheme, shrink)
    return grid.quantize(W, s, z, scheme), s, z


def awq_quantize(W: Tensor, shrink: Tensor | None, scheme: QuantScheme) -> AffineWeight:
    """Pack the (already scaled) weight on its clipped grid."""
    q, s, z = quantize_clipped(W, shrink, scheme)
    return AffineWeight.from_integers(q, s, z, scheme)


# -- the method --------------------------------------------------------------------------------
def _model_type(block: nn.Module) -> str | None:
    """HF model_type of a decoder block (its layers keep a reference to the model config)."""
    for m in block.modules():
        mt = getattr(getattr(m, "config", None), "model_type", None)
        if mt:
            return mt
    return None


@register_method("awq")
class AWQ(Method):
    config_cls = AWQConfig
    needs_calibration = True
    distributed_transform = True  # each group searched where its statistics are, scales shared

    def __init__(self, config: AWQConfig):
        super().__init__(config)
        self._stats: dict[str, ActStats] = {}   # per layer of the current block
        self._shrink: dict[str, Tensor] = {}    # per layer: clipping factor per slice
        self._last: tuple | None = None         # (x, budget, ActStats): q/k/v (gate/up) share x
        self.alphas: dict[str, float] = {}      # chosen α per scaling group, for inspection

    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:
        st = self._stats.get(layer_name)
        budget = self.config.max_tokens - (0 if st is None else int(st.n))
        if budget <= 0:
            return
        if self._last is not None and self._last[0] is x and self._last[1] == budget:
            batch = self._last[2]
        else:
            batch = ActStats.of(x.detach().reshape(-1, x.shape[-1])[:budget])
            self._last = (x, budget, batch)
        if st is None:
            self._stats[layer_name] = batch.copy()
        else:
            st.add_(batch)

    def statistics(self) -> dict[str, Tensor]:
        out = {}
        for name, st in self._stats.items():
            out.update({f"{name}.H": st.H, f"{name}.abs_sum": st.abs_sum, f"{name}.n": st.n})
        return out

    @torch.no_grad()
    def transform_block(self, block: nn.Module, prefix: str, inputs: list[Tensor], block_kwargs: dict) -> None:
        cfg = self.config
        self._last = None
        layout = awq_layout(_model_type(block))
        # Eq. 4-5 per scaling group, where the statistics of its first linear are (split over
        # processes: in that linear's owner; `share` gives every process every group's scales).
        # A group's search reads only its own linears' weights and input statistics, which no
        # earlier group's fold touches (in every family's layout a linear is never the linear or
        # the producer of an earlier group; tests/test_distributed checks it), so searching all
        # groups before folding any gives what alternating search and fold gives.
        found = share(lambda: self._search_groups(block, prefix, layout))
        for group in layout.groups:
            if group.prev not in found:
                continue
            s = found[group.prev]
            fold_scales(block, group.prev, group.linears, s.s.to(block.get_submodule(group.prev).weight.device),
                        layout.norm_offset)
            for n in group.linears:
                st = self._stats.get(f"{prefix}.{n}")
                if st is not None:
                    st.divide_inputs_(s.s.to(st.H.device))
            self.alphas[f"{prefix}.{group.prev}"] = s.alpha
        if not cfg.clip:
            return
        for name, lin in linear_layers(block).items():
            full = f"{prefix}.{name}"
            if name in layout.no_clip or full not in self._stats:
                continue
            check_finite(lin.weight, full)
            self._shrink[full] = search_clip(self._stats[full].H, lin.weight, cfg.scheme, cfg.clip_grid, cfg.max_shrink)

    def _search_groups(self, block: nn.Module, prefix: str, layout) -> dict[str, ScaleSearch]:
        """The scale search of every group whose first linear's statistics this process holds."""
        out = {}
        for group in layout.groups:
            try:
                prev = block.get_submodule(group.prev)
                lins = [block.get_submodule(n) for n in group.linears]
            except AttributeError:
                continue
            width = prev.out_features if isinstance(prev, nn.Linear) else getattr(prev, "weight", torch.empty(0)).numel()
            names = [f"{prefix}.{n}" for n in group.linears]
            if (not all(isinstance(lin, nn.Linear) and lin.in_features == width for lin in lins)
                    or names[0] not in self._stats):
                continue  # e.g. v_proj -> o_proj under grouped-query attention; or another process's
            for n, lin in zip(names, lins):
                check_finite(lin.weight, n)
            out[group.prev] = search_scales(self._stats[names[0]], [lin.weight for lin in lins], self.config.scheme,
                                            self.config.n_grid)
        return out

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        self._stats.pop(layer_name, None)
        shrink = self._shrink.pop(layer_name, None)
        with torch.no_grad():
            fmt = awq_quantize(module.weight, shrink, self.config.scheme)
        return fmt


class ScalesOnly(AWQ):
    """AWQ's channel scaling alone (Eq. 4-5, folded as above), without quantizing: ``apply``
    hands back the scaled float weight, so the model computes what it did before while its
    linears hold W·diag(s). `lowbit auto` runs it once and then chooses each tensor's grid (any
    method) on the scaled weights; ``config.scheme`` is the grid the α search assumes."""

    name = "awq-scales"

    def __init__(self, config: AWQConfig):
        from dataclasses import replace

        super().__init__(replace(config, clip=False))

    def apply(self, layer_name: str, module: nn.Linear) -> Tensor:
        check_finite(module.weight, layer_name)
        self._stats.pop(layer_name, None)
        return module.weight.detach()
