"""HQQ: Half-Quadratic Quantization (Badri & Shaji, 2023). Calibration-free.

Paper: H. Badri, A. Shaji, "Half-Quadratic Quantization of Large Machine Learning Models",
Mobius Labs blog, Nov 2023 (https://mobiusml.github.io/hqq_blog/). Equation numbers below are
this file's, in the order the paper presents them.

Affine quantization with a real-valued zero-point z and a fixed scale s (one pair per group):

    Q_z(W)      = clamp(round(W / s + z), qmin, qmax)          quantize      (0)
    Q_z⁻¹(W_q)  = s · (W_q − z)                                 dequantize

RTN picks s, z from the group's min/max. HQQ keeps that s and looks for the z that minimises a
sparsity-promoting l_p error (p < 1: a few large errors — outliers — are cheap, many small ones
are not), with no data:

    argmin_z  φ(W − Q_z⁻¹(Q_z(W))),      φ(x) = ‖x‖_p^p                                   (1)

Half-quadratic splitting adds an auxiliary error variable W_e and a quadratic coupling β:

    argmin_{z, W_e}  φ(W_e) + β/2 · ‖W_e − (W − Q_z⁻¹(Q_z(W)))‖₂²                          (2)

and alternates two closed-form sub-problems, with β growing by κ each iteration:

    W_e ← shrink_lp(W − Q_z⁻¹(Q_z(W)), β)                                                  (3)
          shrink_lp(x, β) = sign(x) · relu(|x| − |x|^(p−1) / β)   (generalised soft-thresholding)
    z   ← ⟨ Q_z(W) − (W − W_e) / s ⟩        ⟨·⟩ = mean over the group                    (4)
    β   ← κ β                                                                              (5)

(4) is the least-squares fit of Q_z⁻¹(W_q) to W − W_e over z with the codes W_q held fixed: the
zero-point absorbs the mean of the "inlier" residual, while W_e soaks up the outliers so they do
not drag z around. Note W_e is in weight units, so β's threshold (errors below β^(−1/(2−p)),
≈ 0.17 for β = 10, p = 0.7, are zeroed) is not scale-invariant — as in the paper.

How this file differs from the reference implementation (mobiusml/hqq,
``optimize_weights_proximal_legacy``), all deliberate:

* Keep the best, per group. The reference stops at the first iteration whose *global* mean-|error|
  does not improve and returns the zero-point computed *after* that evaluation (never itself
  evaluated). Here every iterate z_0 (min/max), z_1, …, z_T is scored per group and each group
  keeps its best, so the result is never worse than RTN on the same grid, group by group (checked
  again after the final rounding of scale and zero-point to their storage dtype, below). The
  score (``select``) is the squared error Σ(W − Q_z⁻¹(Q_z(W)))² by default, not the paper's φ:
  the iteration lowers the squared error much more than φ (SmolLM2, W4 g64: Σ relative squared
  error −15% vs RTN, φ −1%), and picking the φ-best iterate stopped early and gave a clearly
  worse model than the hqq package (bench/llm_peers.py, 1k tokens: KL to fp32 0.290 vs the
  package's 0.246). With the squared-error pick the weights' total relative squared error equals
  the package's (within 0.01%) and KL is 0.251 at g64, 0.413 vs the package's 0.451 at g128.
  ``select="lp"`` keeps the φ-best, as the paper's objective reads; ``select="last"`` is the
  reference's rule (stop when the global mean |error| does not improve, return the update after
  it; on SmolLM2 it gives the same model as "l2" to 0.01 % ppl). Early stopping (on by default,
  as in the reference) ends the loop when the total score of the current iterate fails to
  decrease.
* The iteration runs in float32: scale and zero-point are rounded to the storage dtype (fp16 by
  default) once, after the chosen iterate is picked, and the codes are then computed for the
  stored values (the reference keeps the iterate's codes; same model quality here, and the
  stored weight's error is lower). Iterating in float32 is what the reference does, and it matters on SmolLM2 (W4 g64, 8k tokens, ppl ratio lowbit / hqq package on
  the same tokens ± 2 standard errors): rounding the zero-point after every update stalls the
  iteration (an fp16 zero-point near 8 moves in steps of 1/128 of a code, larger than most
  updates; KL 0.2238 vs 0.2221 on 4k tokens); iterating on the unrounded zero-point but the fp16
  scale gives 1.0047 ± 0.0022; all in float32, 0.9997 ± 0.0016. So the stored weight's objective
  differs from the recorded one by the final rounding (relative ~1e-3; at 8 bits, where an fp16
  zero-point near 128 has steps of 1/16 of a code, ~0.5 %).
* Ragged rows: when group_size does not divide the row, the last group of each row is shorter and
  its means and objectives run over its real entries only (the reference requires divisibility).
* ``optimize_scale`` (off by default; not in the paper): solve sub-problem (4) jointly over (s, z),
  a 2-parameter least-squares line fit of W − W_e against the codes. The reference's comparable
  experimental option is a grid search over s (``scale_gridsearch``). It lowers the lp error a lot
  on random heavy-tailed weights, but on SmolLM2 (g64) it made the model *worse* than the plain
  zero-point step (KL to fp32 at int3 2.10 vs 2.01, at int2 11.4 vs 8.7): hence off.

Speed: on CPU the iteration runs in C (``kernels/hqq_solver.py``, ``csrc/hqq.c``) when the library
is built: each group's twenty updates run while the group is in the cache, recording every
iterate's zero-point and errors; the early stop and the per-group pick are then decided from
those records exactly as the PyTorch loop below decides them (a group's iterates do not depend on
the other groups). It agrees with that loop to float32 rounding (another power function and
summation order; on SmolLM2 the total relative squared error agrees to 1e-6) and gives the same
bits on every instruction-set path and thread count. One Llama-3.1-8B down projection (4096 ×
14336, g64): 14.8 s → 2.8 s on 2 cores. The PyTorch loop stays the reference (``LOWBIT_NATIVE=0``)
and runs the options the C code does not ("last", ``optimize_scale``) and other devices.

Defaults follow the paper/reference: p = 0.7, β = 10, κ = 1.01, 20 iterations, early stop, 4-bit
groups of 64 with float zero-points.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core import grid
from lowbit.core.grid import check_finite, qparams_from_range
from lowbit.core.chunks import row_slices
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.base import WeightFormat
from lowbit.kernels import hqq_solver


def _default_scheme() -> QuantScheme:
    return QuantScheme(bits=4, symmetric=False, granularity="group", group_size=64, zero_point="float")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class HQQConfig:
    scheme: QuantScheme = field(default_factory=_default_scheme)
    lp_norm: float = 0.7         # p of the sparsity-promoting error φ = ‖·‖_p^p, 0 < p ≤ 1
    beta: float = 1e1            # initial half-quadratic coupling β
    kappa: float = 1.01          # β ← κβ every iteration
    iters: int = 20              # zero-point updates (each followed by an evaluation)
    early_stop: bool = True      # stop when the total objective of the iterate stops decreasing
    optimize_scale: bool = False  # extension: fit (s, z) jointly in step (4)
    select: str = "l2"           # per-group pick among the iterates: squared error "l2" or φ "lp";
                                 # "last": the reference's rule (no per-group pick)

    def __post_init__(self) -> None:
        s = self.scheme
        if not isinstance(s, QuantScheme):
            raise LowbitError(f"hqq: scheme must be a QuantScheme, got {type(s).__name__}")
        if s.symmetric or s.zero_point != "float":
            raise LowbitError(f"hqq optimizes a real-valued zero-point: it needs an asymmetric scheme with "
                              f"zero_point='float' (--float-zero), got {s.short_name()}")
        if not _is_number(self.lp_norm) or not 0 < self.lp_norm <= 1:
            raise LowbitError(f"hqq: lp_norm must be in (0, 1], got {self.lp_norm!r}")
        if not _is_number(self.beta) or self.beta <= 0:
            raise LowbitError(f"hqq: beta must be a positive number, got {self.beta!r}")
        if not _is_number(self.kappa) or self.kappa < 1:
            raise LowbitError(f"hqq: kappa must be a number >= 1, got {self.kappa!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise LowbitError(f"hqq: iters must be an integer >= 1, got {self.iters!r}")
        for name in ("early_stop", "optimize_scale"):
            if not isinstance(getattr(self, name), bool):
                raise LowbitError(f"hqq: {name} must be True or False, got {getattr(self, name)!r}")
        if self.select not in ("l2", "lp", "last"):
            raise LowbitError(f"hqq: select must be 'l2', 'lp' or 'last', got {self.select!r}")


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalised soft-thresholding, the proximal operator of φ in (3):
    sign(x) · relu(|x| − |x|^(p−1) / β)   (p = 1: ordinary soft-thresholding at 1/β).
    Elementwise, computed a slice of rows at a time (work tensors of one slice, not of x)."""
    out = torch.empty_like(x)
    for r in _row_slices(x):
        xr = x[r]
        a = xr.abs()
        thresh = a.pow(p - 1).div_(beta) if p != 1 else 1.0 / beta
        out[r] = a.sub_(thresh).relu_().mul_(torch.sign(xr))
    return out


_SLICE_VALUES = 1 << 22  # values per slice of the row-wise loops (16 MiB of float32)


def _row_slices(x: Tensor) -> list[slice]:
    """Slices of x's first dimension holding about _SLICE_VALUES values each."""
    return row_slices(x.shape[0], x[0].numel() if x.shape[0] else 1, _SLICE_VALUES)


# -- the solver ----------------------------------------------------------------------------------
@torch.no_grad()
def hqq_quantize(W: Tensor, cfg: HQQConfig) -> tuple[AffineWeight, dict]:
    """Pure solver: W [out, in] → (AffineWeight with float zero-points, info).

    info["objective"][t]      φ = Σ |W − Q_z⁻¹(Q_z(W))|^p of iterate t over the whole matrix
                              (t = 0: the min/max start, i.e. RTN on the same grid)
    info["error"][t]          Σ (W − Q_z⁻¹(Q_z(W)))² of iterate t
    info["best_objective"][t] Σ over groups of the best score (cfg.select: the squared error or φ)
                              seen up to iterate t (non-increasing); its last value is the stored
                              weight's score
    info["iterations"]        zero-point updates done (≤ cfg.iters; fewer if stopped early)
    info["stopped_early"]     whether early stopping ended the loop
    """
    if not isinstance(W, Tensor) or W.dim() != 2 or W.numel() == 0:
        raise LowbitError(f"hqq expects a non-empty 2-D weight, got {getattr(W, 'shape', type(W).__name__)}")
    check_finite(W, "passed to hqq")
    scheme, p, shape = cfg.scheme, float(cfg.lp_norm), (int(W.shape[0]), int(W.shape[1]))
    Wg = grid.grouped(W.detach().float(), scheme)                        # [R, n, g]
    valid = grid.valid_mask(shape, scheme, Wg)                           # [n, g] | None
    count = valid.sum(-1) if valid is not None else torch.tensor(float(Wg.shape[-1]), device=Wg.device)  # [n] | []

    def group_sum(X: Tensor) -> Tensor:                                  # [R, n, g] → [R, n]
        return (X if valid is None else X * valid).sum(-1)

    def row_sums(f, X: Tensor) -> Tensor:                                # group_sum(f(X)), a slice of rows at a time
        return torch.cat([group_sum(f(X[r])) for r in _row_slices(X)])

    def evaluate(W_over_s: Tensor, s: Tensor, z: Tensor):
        """(W_q, residual W − Q_z⁻¹(W_q), φ and squared error per group [R, n]) for scale s and
        zero z [R, n]. (In-place ops on fresh temporaries only: same numbers, fewer allocations.)"""
        S, Z = s[..., None], z[..., None]
        W_q = grid.round_scaled(W_over_s, Z, scheme)                      # Q_z(W)           (0)
        Res = grid.decode(W_q, S, Z)                                      # Q_z⁻¹(Q_z(W))
        torch.sub(Wg, Res, out=Res)                                       # W − Q_z⁻¹(Q_z(W))
        phi = row_sums(lambda R: R.abs().pow(p), Res).double()            # φ per group      (1)
        sq = row_sums(torch.square, Res).double()                         # squared error per group
        return W_q, Res, phi, sq

    # start: the min/max grid of RTN with a float zero-point (padding is never a min/max)
    lo, hi = grid.slice_range(Wg, scheme, valid)
    # the iteration runs in float32 (scale and zero-point unrounded, see the module docstring);
    # the storage dtype is applied once, to the chosen iterate's scale and zero-point
    run_scheme = dataclasses.replace(scheme, scale_dtype="float32")
    s, z = qparams_from_range(lo, hi, run_scheme)                         # [R, n] each
    use_l2, last = cfg.select == "l2", cfg.select == "last"
    native = _native_applies(Wg, cfg)
    last_len = int(count[-1]) if valid is not None else int(Wg.shape[-1])  # real values in a row's last group
    if native:  # every group's whole iteration in C, then the same early stop and pick as below
        Wg = Wg.contiguous()
        best_s, best_z, objective, error, best_objective, t, stopped_early = _iterate_native(
            Wg, s, z, last_len, cfg)
    else:
        W_over_s = Wg / s[..., None]
        W_q, Res, phi, sq = evaluate(W_over_s, s, z)
        score = sq if use_l2 else phi
        best_s, best_z, best_score = s.clone(), z.clone(), score.clone()
        objective, error, best_objective = [float(phi.sum())], [float(sq.sum())], [float(best_score.sum())]
        totals = [float(score.sum())]

        beta, stopped_early, t = float(cfg.beta), False, 0
        l1 = [float(group_sum(Res.abs()).double().sum())] if last else []  # the reference's stop measure

        def update(W_q: Tensor, Res: Tensor, s: Tensor, beta: float):
            """Steps (3)-(4) from the codes and residual of the current iterate: (s, z)."""
            W_e = shrink_lp(Res, beta, p)                                     # (3)
            Target = torch.sub(Wg, W_e, out=W_e)                              # W − W_e: what Q_z⁻¹(W_q) should fit
            if cfg.optimize_scale:
                s = _fit_scale(W_q, Target, s, group_sum, count, run_scheme)
            Target.div_(s[..., None])
            return s, group_sum(torch.sub(W_q, Target, out=Target)) / count   # (4)

        for t in range(1, cfg.iters + 1):
            s_new, z = update(W_q, Res, s, beta)
            if s_new is not s:
                s, W_over_s = s_new, Wg / s_new[..., None]
            beta *= cfg.kappa                                                 # (5)

            W_q, Res, phi, sq = evaluate(W_over_s, s, z)
            score = sq if use_l2 else phi
            better = score < best_score
            best_score = torch.where(better, score, best_score)
            best_z = torch.where(better, z, best_z)
            best_s = torch.where(better, s, best_s)
            objective.append(float(phi.sum()))
            error.append(float(sq.sum()))
            best_objective.append(float(best_score.sum()))
            totals.append(float(score.sum()))
            if last:
                l1.append(float(group_sum(Res.abs()).double().sum()))
                if cfg.early_stop and l1[-1] >= l1[-2]:
                    # as the reference: return the update computed from the iterate that did not improve
                    s, z = update(W_q, Res, s, beta)
                    stopped_early = True
                    break
            elif cfg.early_stop and totals[-1] >= totals[-2]:
                stopped_early = True
                break

        if last:
            best_s, best_z = s, z

    def codes_of(s: Tensor, z: Tensor):
        """(codes [R, n, g], squared error, φ per group [R, n]) of a stored scale and zero-point."""
        if native:
            return hqq_solver.evaluate(Wg, s.contiguous(), z.contiguous(), last_len, scheme.qmin, scheme.qmax, p)
        W_q, _, phi, sq = evaluate(Wg / s[..., None], s, z)
        return W_q, sq, phi

    s, z = grid.round_scale(best_s, scheme), grid.stored(best_z, scheme)  # stored once, then the codes
    if not last and scheme.scale_dtype != "float32":
        # rounding can cost a group more than it gained over the start (an 8-bit fp16 zero-point
        # near 128 moves in 1/16 of a code): per group, keep RTN's stored grid where that is better
        s0, z0 = qparams_from_range(lo, hi, scheme)
        got, start = codes_of(s, z), codes_of(s0, z0)
        rtn_better = (start[1] < got[1]) if use_l2 else (start[2] < got[2])
        s, z = torch.where(rtn_better, s0, s), torch.where(rtn_better, z0, z)
        W_q = torch.where(rtn_better[..., None], start[0], got[0])       # the codes for (s, z)
    else:
        W_q = codes_of(s, z)[0] if native else grid.round_codes(Wg, s[..., None], z[..., None], scheme)
    fmt = AffineWeight.from_integers(grid.ungrouped(W_q, shape).to(torch.int32), s, z, scheme)
    info = {"objective": objective, "error": error, "best_objective": best_objective, "iterations": t,
            "stopped_early": stopped_early}
    return fmt, info


def _native_applies(Wg: Tensor, cfg: HQQConfig) -> bool:
    """Whether the native iteration (kernels/hqq_solver.py) runs this solve: on CPU, for the
    per-group picks ("l2", "lp") with the scale fixed, when the library is built. The PyTorch loop
    is the reference it is tested against (LOWBIT_NATIVE=0 forces it)."""
    s = cfg.scheme
    return (Wg.device.type == "cpu" and cfg.select in ("l2", "lp") and not cfg.optimize_scale
            and s.qmin >= 0 and s.qmax <= 255 and hqq_solver.native_lib() is not None)


def _iterate_native(Wg: Tensor, s: Tensor, z: Tensor, last_len: int, cfg: HQQConfig):
    """The iteration of `hqq_quantize` with every group's updates computed at once in C: the C
    code records each iterate's zero-point and errors per group; the early stop (on the total score)
    and the per-group pick of the best iterate are then decided here exactly as the PyTorch loop
    decides them iterate by iterate (a group's iterates do not depend on the other groups).
    Returns (best_s, best_z, objective, error, best_objective, iterations, stopped_early)."""
    scheme = cfg.scheme
    zh, sqh, phih = hqq_solver.iterate(Wg, s.contiguous(), z.contiguous(), last_len, scheme.qmin, scheme.qmax,
                                       float(cfg.lp_norm), float(cfg.beta), float(cfg.kappa), cfg.iters)
    scores = sqh if cfg.select == "l2" else phih
    totals = scores.double().sum(dim=(1, 2)).tolist()
    t_end, stopped_early = cfg.iters, False
    if cfg.early_stop:
        stop = next((t for t in range(1, cfg.iters + 1) if totals[t] >= totals[t - 1]), None)
        if stop is not None:
            t_end, stopped_early = stop, True
    objective = phih[: t_end + 1].double().sum(dim=(1, 2)).tolist()
    error = sqh[: t_end + 1].double().sum(dim=(1, 2)).tolist()
    best_score, best_z = scores[0].double(), zh[0]
    best_objective = [float(best_score.sum())]
    for t in range(1, t_end + 1):
        score = scores[t].double()
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_z = torch.where(better, zh[t], best_z)
        best_objective.append(float(best_score.sum()))
    return s, best_z.clone(), objective, error, best_objective, t_end, stopped_early


def _fit_scale(W_q: Tensor, Target: Tensor, s: Tensor, group_sum, count: Tensor, scheme: QuantScheme) -> Tensor:
    """optimize_scale: least-squares line Target ≈ a·W_q + b per group (codes fixed), s = a.
    Groups whose codes are all equal, or whose fitted slope is not a positive finite number that
    survives the storage dtype, keep their scale. (z then follows from (4) with the new s, which is
    the same line's intercept: b = −s·z.)"""
    mq = group_sum(W_q) / count                                           # [R, n]
    mt = group_sum(Target) / count
    dq = W_q - mq[..., None]                                              # padding is masked by group_sum
    var = group_sum(dq * dq)
    cov = group_sum(dq * (Target - mt[..., None]))
    a = grid.stored(cov / torch.where(var > 0, var, torch.ones_like(var)), scheme)
    ok = (var > 0) & torch.isfinite(a) & (a > 0)
    return torch.where(ok, a, s)


# -- the method ----------------------------------------------------------------------------------
@register_method("hqq")
class HQQ(Method):
    config_cls = HQQConfig
    needs_calibration = False
    layer_records = ("info",)

    def __init__(self, config):
        super().__init__(config)
        self.info: dict[str, dict] = {}  # per layer: score (config.select) at the start / at the end, iterations

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        fmt, info = hqq_quantize(module.weight, self.config)
        self.info[layer_name] = {"objective_rtn": info["objective"][0], "objective": info["best_objective"][-1],
                                 "iterations": info["iterations"]}
        return fmt
