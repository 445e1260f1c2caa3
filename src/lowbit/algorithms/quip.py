"""QuIP# (Tseng et al. 2024): incoherence processing, then BlockLDLQ onto the E8P lattice
codebook: 2 bits per weight.

Per layer ``W [out, in]`` with its calibration Hessian ``H`` (accumulated exactly as GPTQ does):

1. incoherence: ``W~ = U W V^T``, ``H~ = V H V^T`` with randomized Hadamard transforms from the
   layer's seed (`lowbit.core.hadamard`): the weight's and Hessian's outliers are spread out;
2. a scale ``s``: ``W~ / s`` should sit where E8P's points are dense; chosen among a few
   multiples of ``W~``'s RMS by the plain rounding error on a sample of rows (about 4096
   8-vectors: more only slows the search, which took 80 % of the solve at 256 whole rows);
3. BlockLDLQ (`lowbit.algorithms.ldlq`) with blocks of 8 columns: each row's 8-vector target is
   rounded to its nearest E8P point (`lowbit.core.e8p.encode`), the error fed back through the
   block LDL of the damped ``H~``.

The result is an `E8PWeight` (codes, scale, seed). The 3- and 4-bit residual variants and the
block-wise fine-tuning of the paper are not implemented yet.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.gptq import GPTQ, check_solver_inputs
from lowbit.algorithms.ldlq import block_ldlq, proxy_loss
from lowbit.core import e8p
from lowbit.core.grid import check_finite
from lowbit.core.hadamard import Incoherence
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError
from lowbit.formats.e8p import E8PWeight

SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4)  # candidate s / RMS(W~) (E8P's coordinates have RMS ~1.1)


@dataclass(frozen=True)
class QuIPConfig:
    damp: float = 0.01       # λ = damp · mean(diag H~)
    seed: int = 0            # with the layer's name: the seed of its transforms
    scale_vectors: int = 4096  # 8-vectors of W~ the scale search rounds (whole rows, evenly spaced)

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp) \
                or self.damp <= 0:
            raise LowbitError(f"QuIP# damp must be a finite number > 0, got {self.damp!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise LowbitError(f"QuIP# seed must be an integer in [0, 2^31), got {self.seed!r}")
        if isinstance(self.scale_vectors, bool) or not isinstance(self.scale_vectors, int) or self.scale_vectors < 1:
            raise LowbitError(f"QuIP# scale_vectors must be a positive integer, got {self.scale_vectors!r}")


def layer_seed(seed: int, layer_name: str) -> int:
    """A layer's transform seed: stable across runs and processes (not Python's salted hash)."""
    return (seed << 32) | zlib.crc32(layer_name.encode())


def _round(Y: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(codes [rows, cols/8] int64, values) of Y [rows, cols] on s * E8P."""
    codes = e8p.encode((Y / s).reshape(-1, e8p.DIM).float()).to(torch.int64)
    return codes.reshape(Y.shape[0], -1), (e8p.decode(codes).reshape(Y.shape) * s).to(Y.dtype)


def choose_scale(Wt: Tensor, vectors: int) -> float:
    """The multiple of RMS(W~) in SCALES whose plain E8P rounding error is least on about
    ``vectors`` 8-vectors (whole rows, evenly spaced)."""
    rows = min(Wt.shape[0], max(1, -(-vectors // (Wt.shape[1] // e8p.DIM))))
    sample = Wt[torch.linspace(0, Wt.shape[0] - 1, rows).round().long()]
    rms = float(Wt.pow(2).mean().sqrt())
    if rms == 0:
        return 1.0
    errs = [(float((_round(sample, rms * c)[1] - sample).pow(2).sum()), rms * c) for c in SCALES]
    return min(errs)[1]


@torch.no_grad()
def quip_quantize(W: Tensor, H: Tensor, cfg: QuIPConfig, seed: int) -> tuple[E8PWeight, dict]:
    """Pure solver (module docstring). Returns the weight and ``info``: ``error`` =
    tr((W - W^) H (W - W^)^T) with the H given, ``scale`` and ``lambda``."""
    check_solver_inputs(W, H, "QuIP#")
    out, n = W.shape
    if n % e8p.DIM:
        raise LowbitError(f"QuIP# needs a multiple of {e8p.DIM} input columns, got {n}")
    inc = Incoherence.for_shape(out, n, seed)
    if inc.U.kind != "hadamard" or inc.V.kind != "hadamard":
        raise LowbitError(f"QuIP# needs Hadamard-factorisable widths (b * 2^r with a Paley base b); "
                          f"this layer is {out} x {n}")
    Wt = inc.weight(W.detach().double())
    Ht = inc.hessian(H.detach().double())
    lam = cfg.damp * float(Ht.diagonal().mean())
    Ht.diagonal().add_(lam if lam > 0 else 1.0)
    s = choose_scale(Wt, cfg.scale_vectors)
    codes = torch.empty(out, n // e8p.DIM, dtype=torch.int64)

    def q(Z: Tensor, k: int) -> Tensor:
        c, v = _round(Z, s)
        codes[:, k] = c[:, 0]
        return v

    Qt = block_ldlq(Wt, Ht, q, e8p.DIM)
    fmt = E8PWeight.from_codes(codes, s, (out, n), seed)
    Hd = H.detach().double()
    info = {"error": proxy_loss(W.detach().double(), inc.unweight(Qt), Hd), "scale": s, "lambda": lam}
    return fmt, info


@register_method("quip")
class QuIP(GPTQ):
    """Accumulates Σ x xᵀ per layer exactly as GPTQ does (inherited `observe`); solves with
    `quip_quantize`."""

    config_cls = QuIPConfig
    needs_calibration = True
    layer_records = ("errors",)

    def apply(self, layer_name: str, module: nn.Linear) -> E8PWeight:
        check_finite(module.weight, layer_name)
        H = self.take_hessian(layer_name, "QuIP#")
        fmt, info = quip_quantize(module.weight, H, self.config, layer_seed(self.config.seed, layer_name))
        self.errors[layer_name] = info["error"]
        return fmt
