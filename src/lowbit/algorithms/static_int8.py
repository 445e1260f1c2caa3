"""Static int8 W8A8 for LLMs (method ``static-int8``): activation ranges calibrated with an
observer, int8 weights, int8 x int8 -> int32 products.

Every linear of every block gets a per-tensor static input scale (and zero-point) from an
observer of its calibration inputs and int8 per-channel weights; the output is the int32
accumulator scaled back to float (the ops that follow — norms, attention, SiLU — are float).
Optional SmoothQuant-style migration (``smooth_alpha`` > 0, Xiao et al. 2023, eq. 4): per input
channel j, ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; x is divided by s and W multiplied by it
before quantization, which flattens outlier channels of x. :func:`quantize_linears_static` does
the same for every ``nn.Linear`` of any model.

Scheme flags: ``bits`` and ``restricted_range`` apply to weights and activations alike; weights
are always symmetric (per output channel unless the scheme is per-tensor); ``symmetric`` chooses
symmetric or asymmetric (zero-point) *activations*. The integer pipeline for ordinary networks
(CNNs / MLPs, ``nn.Sequential``), which shares this config, is :mod:`lowbit.cnn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core.observers import OBSERVERS, get_observer
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.core.static_qparams import act_qparams, act_qparams_from_observer, act_scheme, quantize_weight
from lowbit.core.ste import fake_quantize
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat
from lowbit.formats.static_int8 import check_matmul


def _default_scheme() -> QuantScheme:
    return QuantScheme(bits=8, symmetric=False, granularity="channel", group_size=None, scale_dtype="float32")


@dataclass(frozen=True)
class StaticInt8Config:
    scheme: QuantScheme = field(default_factory=_default_scheme)
    observer: str = "minmax"
    percentile: float = 99.99     # for observer="percentile"
    n_bins: int = 2048            # for the histogram observers
    smooth_alpha: float = 0.0     # LLMs: SmoothQuant migration strength (0 = off)
    smooth_search: bool = False   # LLMs: pick alpha per layer from ALPHA_GRID by output error
    clip_search: bool = False     # with smooth_search: also shrink the observer's range by a ratio from CLIP_GRID
    matmul: str = "auto"          # LLMs: exact int32 via "int" (int64 matmul), "float" (chunked fp32
                                  # GEMM) or "native" (the AVX2 int8 GEMM; symmetric restricted only)

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {self.observer!r}; available: {', '.join(sorted(OBSERVERS))}")
        if self.scheme.granularity == "group":
            raise LowbitError("static-int8 weights are per-channel or per-tensor, not grouped "
                              "(use --per-channel or --per-tensor)")
        if not self.scheme.symmetric and self.scheme.zero_point == "float":
            raise LowbitError("static-int8 needs integer zero-points (not --float-zero)")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise LowbitError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.clip_search and not self.smooth_search:
            raise LowbitError("clip_search works together with smooth_search=true")
        check_matmul(self.matmul)

    @property
    def per_channel(self) -> bool:
        return self.scheme.granularity != "tensor"

    def make_observer(self):
        kw = {}
        if self.observer in ("entropy", "mse", "percentile"):
            kw["n_bins"] = self.n_bins
        if self.observer == "percentile":
            kw["percentile"] = self.percentile
        return get_observer(self.observer, **kw)


def smooth_factors(x_absmax: Tensor, W: Tensor, alpha: float) -> Tensor:
    """SmoothQuant eq. 4: s_j = max|X_j|^alpha / max_o |W[o, j]|^(1 - alpha) (channels with a zero
    statistic get s = 1)."""
    w_absmax = W.detach().float().abs().amax(dim=0)
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    ok = (x_absmax > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s))


ALPHA_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def w8a8_output(X: Tensor, W: Tensor, s: Tensor, cfg: StaticInt8Config, lo: float, hi: float) -> Tensor:
    """Float simulation of the W8A8 layer with smoothing factors s and input range [lo, hi] of
    X / s (used only to rank smoothing strengths and clipping ratios)."""
    sc = cfg.scheme
    Xs = X / s
    a = act_qparams(torch.tensor(lo), torch.tensor(hi), sc.bits, sc.symmetric, sc.restricted_range)
    Xq = fake_quantize(Xs, a.scale, float(a.zero), a.qmin, a.qmax)
    qw, s_w = quantize_weight(W * s[None, :], sc.bits, sc.restricted_range, cfg.per_channel)
    return Xq @ (qw.float() * s_w[:, None]).T


def search_smooth_alpha(X: Tensor, W: Tensor, cfg: StaticInt8Config, grid=ALPHA_GRID, clips=(1.0,),
                        max_rows: int = 512) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """The SmoothQuant strength from ``grid`` (and, with several ``clips``, the fraction of the
    min-max range of X / s to keep) whose W8A8 output is closest in mean squared error to the float
    output X Wᵀ on (up to ``max_rows`` evenly spaced) calibration rows. Ranges and smoothing
    statistics come from all rows. Returns ((alpha, clip), errors)."""
    W = W.detach().float()
    absmax = X.abs().amax(dim=0)
    Xe = X[torch.linspace(0, X.shape[0] - 1, max_rows).long()] if X.shape[0] > max_rows else X
    ref = Xe @ W.T
    errs = {}
    for a in grid:
        sm = smooth_factors(absmax, W, a) if a > 0 else torch.ones(X.shape[1])
        Xs = X / sm
        lo, hi = float(Xs.min()), float(Xs.max())
        for r in clips:
            errs[(a, r)] = float((w8a8_output(Xe, W, sm, cfg, lo * r, hi * r) - ref).pow(2).mean())
    best = min(errs, key=errs.get)
    return best, errs


@register_method("static-int8")
class StaticInt8(Method):
    """W8A8 static: see the module docstring."""

    config_cls = StaticInt8Config
    needs_calibration = True
    layer_records = ("_alpha", "_clip_record")
    distributed_transform = True  # transform_block only finishes the layers observed in this process

    def __init__(self, config: StaticInt8Config):
        super().__init__(config)
        self._inputs: dict[str, list[Tensor]] = {}
        self._obs: dict[str, object] = {}
        self._smooth: dict[str, Tensor] = {}
        self._alpha: dict[str, float] = {}
        self._clip: dict[str, float] = {}
        self._clip_record: dict[str, float] = {}

    @property
    def smoothing(self) -> bool:
        return self.config.smooth_alpha > 0 or self.config.smooth_search

    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:
        # one observer update per calibration sequence (moving averages step per sample)
        seqs = list(x.detach().float().reshape(-1, x.shape[-2] if x.dim() > 2 else 1, x.shape[-1]))
        if self.smoothing:  # keep the inputs: the smoothing factors must be known before observing
            self._inputs.setdefault(layer_name, []).extend(t.cpu() for t in seqs)
        else:
            obs = self._obs.setdefault(layer_name, self.config.make_observer())
            for t in seqs:
                obs.update(t)

    def transform_block(self, block: nn.Module, prefix: str, inputs: list[Tensor], block_kwargs: dict) -> None:
        if not self.smoothing:
            return
        from lowbit.models.families import linear_layers

        for name, lin in linear_layers(block).items():
            if f"{prefix}.{name}" in self._inputs:  # split over processes: the layers observed here
                self.finish_layer(f"{prefix}.{name}", lin)

    def finish_layer(self, full: str, lin: nn.Linear) -> None:
        """With smoothing: choose the factors from the stored inputs, then feed the observer x / s."""
        if not self.smoothing:
            return
        seqs = self._inputs.pop(full)
        X = torch.cat(seqs)
        clip = 1.0
        if self.config.smooth_search:
            clips = CLIP_GRID if self.config.clip_search else (1.0,)
            (alpha, clip), _ = search_smooth_alpha(X, lin.weight, self.config, clips=clips)
        else:
            alpha = self.config.smooth_alpha
        self._clip[full] = self._clip_record[full] = clip
        s = smooth_factors(X.abs().amax(dim=0), lin.weight, alpha) if alpha > 0 else torch.ones(X.shape[1])
        self._smooth[full] = s
        self._alpha[full] = alpha
        obs = self.config.make_observer()
        for t in seqs:
            obs.update(t / s)
        self._obs[full] = obs

    def describe(self) -> dict:
        d = super().describe()
        if self._alpha:
            d["smooth_alpha_per_layer"] = dict(self._alpha)
        if self.config.clip_search:
            d["clip_per_layer"] = dict(self._clip_record)
        return d

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        from lowbit.formats.static_int8 import StaticInt8Weight

        check_finite(module.weight, layer_name)
        s = self.config.scheme
        obs = self._obs.pop(layer_name, None)
        if obs is None:
            raise LowbitError(f"static-int8: layer {layer_name} saw no calibration data")
        clip = self._clip.pop(layer_name, 1.0)
        if clip == 1.0:
            aq = act_qparams_from_observer(obs, s.bits, s.symmetric, s.restricted_range)
        else:  # the observer's range, narrowed by the searched clipping ratio
            lo, hi = obs.range(act_scheme(s.bits, s.symmetric, s.restricted_range))
            aq = act_qparams(lo * clip, hi * clip, s.bits, s.symmetric, s.restricted_range)
        smooth = self._smooth.pop(layer_name, None)
        W = module.weight.detach().float()
        if smooth is not None:
            W = W * smooth[None, :]
        qw, s_w = quantize_weight(W, s.bits, s.restricted_range, self.config.per_channel)
        fmt = StaticInt8Weight(qweight=qw, w_scale=s_w,
                               act_qparams=torch.tensor([aq.scale, float(aq.zero)], dtype=torch.float32),
                               shape=(int(W.shape[0]), int(W.shape[1])), act_qmin=aq.qmin, act_qmax=aq.qmax,
                               smooth=None if smooth is None else smooth.float().contiguous(),
                               observer=self.config.observer, matmul=self.config.matmul,
                               w_min=-127 if s.restricted_range else -128)
        return fmt


@torch.no_grad()
def quantize_linears_static(model: nn.Module, run, **options) -> StaticInt8:
    """W8A8 static int8 for every ``nn.Linear`` of any model (encoders, classifiers): hooks observe
    each linear's inputs while ``run(model)`` feeds calibration data through the float model, then
    every linear is replaced by its static-int8 QuantizedLinear. ``options`` are the method's
    (``observer``, ``smooth_alpha``, ``smooth_search``, ``scheme``). Returns the method (its
    ``describe()`` records the settings)."""
    from lowbit.algorithms.base import make_method
    from lowbit.calibration.sequential import _set_submodule
    from lowbit.nn.replace import replacement

    meth = make_method("static-int8", options.pop("scheme", None), **options)
    lins = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    if not lins:
        raise LowbitError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: meth.observe(n, mod, args[0])) for n, m in lins]
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    for n, m in lins:
        if n not in meth._obs and n not in meth._inputs:
            raise LowbitError(f"static-int8: layer {n} saw no calibration data")
        meth.finish_layer(n, m)
        _set_submodule(model, n, replacement(m, meth.apply(n, m)))
    return meth
