"""QuIP# (Tseng et al. 2024): incoherence processing, then BlockLDLQ onto the E8P lattice
codebook: 2 bits per weight, 3 and 4 with a residual stage.

Per layer ``W [out, in]`` with its calibration Hessian ``H`` (accumulated exactly as GPTQ does):

1. incoherence: ``W~ = U W V^T``, ``H~ = V H V^T`` with randomized Hadamard transforms from the
   layer's seed (`lowbit.core.hadamard`): the weight's and Hessian's outliers are spread out;
2. a scale ``s``: ``W~ / s`` should sit where E8P's points are dense; chosen among a few
   multiples of ``W~``'s RMS by the plain rounding error on a sample of rows (about 4096
   8-vectors: more only slows the search, which took 80 % of the solve at 256 whole rows);
3. BlockLDLQ (`lowbit.algorithms.ldlq`) with blocks of 8 columns: each row's 8-vector target is
   rounded to its nearest E8P point (`lowbit.core.e8p.encode`), the error fed back through the
   block LDL of the damped ``H~``.

3 and 4 bits (the paper's residual vector quantization, §4.3): the block quantizer rounds the
target onto ``s1 E8P``, then what is left onto a second, finer codebook: ``s2 {-1, +1}^8`` (one
more bit per weight) or ``s2 E8P`` (two more); both scales are searched together in step 2.
A width with no Hadamard factorisation gets a random orthogonal transform, stored with the
weight (and said so).

The result is an `E8PWeight` (codes, residual, scales, seed). The block-wise fine-tuning of the
paper is `QuIP.tune_block` (``finetune_steps`` > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.block_tune import block_parameters, tune
from lowbit.algorithms.gptq import GPTQ
from lowbit.algorithms.hessian import check_solver_inputs
from lowbit.algorithms.ldlq import block_ldlq, proxy_loss
from lowbit.core import e8p
from lowbit.core.grid import check_finite
from lowbit.core.hadamard import Incoherence, layer_seed
from lowbit.core.log import log
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError
from lowbit.formats.e8p import BITS, E8PWeight, decode_signs, encode_signs
from lowbit.training.tunable import TunableE8P

SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4)  # candidate s / RMS(W~) (E8P's coordinates have RMS ~1.1)
RESIDUAL_SCALES = (0.25, 0.35, 0.5, 0.7, 1.0)  # candidate s2 / RMS(residual) for the 4-bit E8P residual


@dataclass(frozen=True)
class QuIPConfig:
    bits: int = 2            # 2: E8P; 3: E8P + a sign per weight; 4: E8P + an E8P residual
    damp: float = 0.01       # λ = damp · mean(diag H~)
    seed: int = 0            # with the layer's name: the seed of its transforms
    scale_vectors: int = 4096  # 8-vectors of W~ the scale search rounds (whole rows, evenly spaced)
    finetune_steps: int = 0  # > 0: Adam steps per block on sign vectors, scales and norms (`QuIP.tune_block`)
    finetune_lr: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise LowbitError(f"QuIP# bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp) \
                or self.damp <= 0:
            raise LowbitError(f"QuIP# damp must be a finite number > 0, got {self.damp!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise LowbitError(f"QuIP# seed must be an integer in [0, 2^31), got {self.seed!r}")
        if isinstance(self.scale_vectors, bool) or not isinstance(self.scale_vectors, int) or self.scale_vectors < 1:
            raise LowbitError(f"QuIP# scale_vectors must be a positive integer, got {self.scale_vectors!r}")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            raise LowbitError(f"QuIP# finetune_steps must be an integer >= 0, got {self.finetune_steps!r}")
        if isinstance(self.finetune_lr, bool) or not isinstance(self.finetune_lr, (int, float)) \
                or not math.isfinite(self.finetune_lr) or self.finetune_lr <= 0:
            raise LowbitError(f"QuIP# finetune_lr must be a finite number > 0, got {self.finetune_lr!r}")


def _round(Y: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(codes [rows, cols/8] int64, values) of Y [rows, cols] on s * E8P. The nearest points are
    found by the C encoder where the native library is built (the same rule as `e8p.encode`, which
    runs otherwise); the values are rows of `e8p.codebook` (equal to `e8p.decode`)."""
    from lowbit.kernels.codebook import e8p_encode

    target = (Y / s).reshape(-1, e8p.DIM).float()
    codes = e8p_encode(target)
    codes = (e8p.encode(target) if codes is None else codes).to(torch.int64)
    return codes.reshape(Y.shape[0], -1), (e8p.codebook()[codes].reshape(Y.shape) * s).to(Y.dtype)


def _round_signs(Y: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(sign bytes [rows, cols/8] uint8, values) of Y [rows, cols] on s * {-1, +1}^8."""
    bits = encode_signs(Y.reshape(Y.shape[0], -1, e8p.DIM))
    return bits, (decode_signs(bits).reshape(Y.shape) * s).to(Y.dtype)


def round_rvq(Y: Tensor, scales: tuple[float, ...], bits: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """Residual vector quantization of Y [rows, cols]: (codes, residual codes or None, values):
    ``Y ~ s1 E8P(Y / s1)``, then what is left on ``s2 E8P`` (4 bits) or ``s2 {-1, +1}^8`` (3 bits)."""
    c1, v1 = _round(Y, scales[0])
    if bits == 2:
        return c1, None, v1
    c2, v2 = (_round if bits == 4 else _round_signs)(Y - v1, scales[1])
    return c1, c2, v1 + v2


def choose_scales(Wt: Tensor, vectors: int, bits: int = 2) -> tuple[float, ...]:
    """The scales whose plain (RVQ) rounding error is least on about ``vectors`` 8-vectors of
    ``W~`` (whole rows, evenly spaced): ``s1`` among multiples of RMS(W~) in SCALES; at 3 bits
    ``s2`` = the mean |residual| (the least-squares scale of a sign code), at 4 bits a multiple of
    RMS(residual) in RESIDUAL_SCALES, jointly with ``s1``."""
    rows = min(Wt.shape[0], max(1, -(-vectors // (Wt.shape[1] // e8p.DIM))))
    sample = Wt[torch.linspace(0, Wt.shape[0] - 1, rows).round().long()]
    rms = float(Wt.pow(2).mean().sqrt())
    if rms == 0:
        return (1.0,) if bits == 2 else (1.0, 1.0)
    best = (math.inf, ())
    for c in SCALES:
        s1 = rms * c
        v1 = _round(sample, s1)[1]
        R = sample - v1
        if bits == 2:
            cands = [(s1,)]
        elif bits == 3:
            cands = [(s1, max(float(R.abs().mean()), 1e-12 * rms))]
        else:
            r = max(float(R.pow(2).mean().sqrt()), 1e-12 * rms)
            cands = [(s1, r * c2) for c2 in RESIDUAL_SCALES]
        for sc in cands:
            v = v1 if bits == 2 else v1 + (_round if bits == 4 else _round_signs)(R, sc[1])[1]
            best = min(best, (float((v - sample).pow(2).sum()), sc))
    return best[1]


def choose_scale(Wt: Tensor, vectors: int) -> float:
    """The 2-bit scale (`choose_scales`)."""
    return choose_scales(Wt, vectors, 2)[0]


@torch.no_grad()
def quip_quantize(W: Tensor, H: Tensor, cfg: QuIPConfig, seed: int) -> tuple[E8PWeight, dict]:
    """Pure solver (module docstring). Returns the weight and ``info``: ``error`` =
    tr((W - W^) H (W - W^)^T) with the H given, ``scale`` (s1, and s2 with a residual),
    ``lambda`` and ``orthogonal`` (the sides whose width has no Hadamard factorisation: a random
    orthogonal matrix is stored for them)."""
    check_solver_inputs(W, H, "QuIP#")
    out, n = W.shape
    if n % e8p.DIM:
        raise LowbitError(f"QuIP# needs a multiple of {e8p.DIM} input columns, got {n}")
    inc = Incoherence.for_shape(out, n, seed)
    dense = {side: t.base() for side, t in (("u", inc.U), ("v", inc.V)) if t.kind == "orthogonal"}
    if dense:  # keep the matrices: the weight stores them rather than rebuilding them at load
        inc = Incoherence.for_shape(out, n, seed, u_dense=dense.get("u"), v_dense=dense.get("v"))
    Wt = inc.weight(W.detach().double())
    Ht = inc.hessian(H.detach().double())
    lam = cfg.damp * float(Ht.diagonal().mean())
    Ht.diagonal().add_(lam if lam > 0 else 1.0)
    sc = choose_scales(Wt, cfg.scale_vectors, cfg.bits)
    nv = n // e8p.DIM
    codes = torch.empty(out, nv, dtype=torch.int64)
    residual = None if cfg.bits == 2 else torch.empty(out, nv, dtype=torch.int64 if cfg.bits == 4 else torch.uint8)

    def q(Z: Tensor, k: int) -> Tensor:
        c1, c2, v = round_rvq(Z, sc, cfg.bits)
        codes[:, k] = c1[:, 0]
        if residual is not None:
            residual[:, k] = c2[:, 0]
        return v

    Qt = block_ldlq(Wt, Ht, q, e8p.DIM)
    fmt = E8PWeight.from_codes(codes, sc, (out, n), seed, bits=cfg.bits, residual=residual,
                               u_dense=dense.get("u"), v_dense=dense.get("v"))
    Hd = H.detach().double()
    info = {"error": proxy_loss(W.detach().double(), inc.unweight(Qt), Hd), "scale": sc, "lambda": lam,
            "orthogonal": sorted(dense)}
    return fmt, info


@register_method("quip")
class QuIP(GPTQ):
    """Accumulates Σ x xᵀ per layer exactly as GPTQ does (inherited `observe`); solves with
    `quip_quantize`."""

    config_cls = QuIPConfig
    needs_calibration = True
    layer_records = ("errors", "tuned")

    def __init__(self, config: QuIPConfig):
        super().__init__(config)
        self.tuned: dict[str, dict] = {}  # block -> held-out error before/after its fine-tuning

    def apply(self, layer_name: str, module: nn.Linear) -> E8PWeight:
        check_finite(module.weight, layer_name)
        H = self.take_hessian(layer_name, "QuIP#")
        fmt, info = quip_quantize(module.weight, H, self.config, layer_seed(self.config.seed, layer_name))
        for side in info["orthogonal"]:
            width = fmt.shape[0 if side == "u" else 1]
            log(f"{layer_name}: width {width} has no Hadamard factorisation; its transform is a random orthogonal "
                f"matrix, stored with the weight ({width}x{width} floats, a dense product per call)")
        self.errors[layer_name] = info["error"]
        return fmt

    @property
    def tunes_blocks(self) -> bool:
        return self.config.finetune_steps > 0

    def tune_block(self, block: nn.Module, prefix: str, inputs, targets, block_kwargs: dict) -> dict:
        """The paper's fine-tuning within a block (§5), codes fixed: each E8P layer's sign vectors
        ``su``, ``sv`` (made continuous) and scales, and the block's norm gains, by
        `lowbit.algorithms.block_tune.tune`. Returns the layers' weights with the tuned values
        (none when tuning did not help on the held-out batch)."""
        layers = {n: TunableE8P(m) for n, m in block.named_modules()
                  if isinstance(getattr(m, "weight_format", None), E8PWeight)}
        for n, t in layers.items():  # stand-ins while tuning; the runner installs the results
            block.set_submodule(n, t)
        params = [p for t in layers.values() for p in t.parameters()] + block_parameters(block, (TunableE8P,))
        try:
            res = tune(block, params, inputs, targets, block_kwargs, self.config.finetune_steps, self.config.finetune_lr)
        finally:
            for n, t in layers.items():
                block.set_submodule(n, t.original)
        self.tuned[prefix] = {"held_out_before": res.held_out_before, "held_out_after": res.held_out_after,
                              "kept": res.kept}
        return {n: t.weight_format() for n, t in layers.items()} if res.kept else {}

    def describe(self) -> dict:
        d = super().describe()
        if self.tuned:
            d["tuning"] = dict(sorted(self.tuned.items()))
        return d
