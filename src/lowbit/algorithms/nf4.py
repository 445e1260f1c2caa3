"""NF4 with double quantization (QLoRA, Dettmers et al. 2023, §3), bit-compatible with bitsandbytes.

Data-free, like RTN, but the grid is not uniform: each block of 64 consecutive weights (of the
whole tensor flattened row-major) is scaled by its absolute maximum into [-1, 1] and every value
is rounded to the nearest of the 16 NormalFloat levels (equal-probability quantiles of N(0, 1)
with an exact zero), which suits normally distributed weights better than evenly spaced levels:

    c2[b]   = max_{i in block b} |W_i|                       (fp32 quantization constants)
    q_i     = argmin_k |W_i / c2[b] - NF4[k]|                (ties to the lower level)

Double quantization then quantizes the constants themselves (QLoRA Eq. 6): subtract their mean,
and quantize c2 - mean blockwise (256 constants per block) with the 8-bit dynamic map:

    offset  = mean(c2)
    c1[g]   = max_{b in block g} |c2[b] - offset|             (fp32, one per 256 blocks)
    k2[b]   = nearest DYN level to (c2[b] - offset) / c1[g]    (uint8)

which brings the statistics from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per weight.

Every step reproduces bitsandbytes 0.50 (``quantize_4bit`` on CPU) operation for operation, so
the bytes agree exactly (tests/test_nf4.py checks against bitsandbytes and a stored fixture):

* full blocks are scaled by multiplying with ``1 / absmax`` (absmax clamped to 1e-38 so an
  all-zero block gives code 7, i.e. 0.0); the last, shorter block is *divided* by its absmax,
  and that absmax is stored clamped to 1e-38 — small asymmetries kept for byte equality;
* the 8-bit codes are chosen as bitsandbytes' CPU kernel chooses them: through a 65,536-entry
  table over [-1, 1] that holds, for each grid point, the nearest map level. It equals
  exact-nearest rounding except for values within one grid step (3e-5) of a level midpoint —
  near zero, where the map's levels are denser than the table; bitsandbytes on CUDA rounds
  those exactly to the nearest level and so may differ there by one level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError
from lowbit.formats.nf4 import DYNAMIC_MAP_8BIT, NF4_CODEBOOK, NF4Weight, pack_nibbles
from lowbit.formats.base import WeightFormat


def _is_pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class NF4Config:
    blocksize: int = 64
    double_quant: bool = True
    dq_blocksize: int = 256

    def __post_init__(self) -> None:
        if not _is_pow2(self.blocksize) or self.blocksize < 16:
            raise LowbitError(f"nf4 blocksize must be a power of two >= 16, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise LowbitError(f"nf4 double_quant must be true or false, got {self.double_quant!r}")
        if not _is_pow2(self.dq_blocksize) or self.dq_blocksize < 16:
            raise LowbitError(f"nf4 dq_blocksize must be a power of two >= 16, got {self.dq_blocksize!r}")


# -- step 1: blockwise absmax + nearest NF4 level ------------------------------------------------
_NF4_BOUNDS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2  # midpoints between consecutive levels


def nf4_encode(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Flat float32 x [n] -> (NF4 codes uint8 [n], block absmax float32 [ceil(n / blocksize)])."""
    n = x.numel()
    full = n - n % blocksize
    c2 = x[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = torch.clamp(x[:full].view(-1, blocksize) * (1.0 / c2.clamp(min=1e-38)[:, None]), -1, 1).view(-1)
    if full < n:  # the shorter last block: divided, its absmax stored clamped (as bitsandbytes)
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        c2 = torch.cat([c2, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / tail_max, -1, 1)])
    q = torch.bucketize(scaled, _NF4_BOUNDS.to(x.device))  # bounds[k-1] < v <= bounds[k] -> k
    return q.to(torch.uint8), c2


# -- step 2: double quantization of the constants with the 8-bit dynamic map ----------------------
_LUT_SIZE = 65536


def _dynamic_lut(code: Tensor) -> Tensor:
    """For each of 65,536 evenly spaced points v_i = -1 + 2i/65535, the index of the nearest level
    of ``code`` (a midpoint tie goes to the lower level) — bitsandbytes' CPU rounding table."""
    i = torch.arange(_LUT_SIZE, dtype=torch.float64)
    grid = ((2.0 * i) / (_LUT_SIZE - 1)).to(torch.float32) + (-1.0)  # float32 division, then add
    mids = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8)


_DYN_LUT = _dynamic_lut(DYNAMIC_MAP_8BIT)


def dynamic8_encode(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Flat float32 x [m] -> (8-bit dynamic-map codes uint8 [m], block absmax float32 [ceil(m / blocksize)])."""
    m = x.numel()
    nb = -(-m // blocksize)
    xb = torch.nn.functional.pad(x, (0, nb * blocksize - m)).view(nb, blocksize)  # zeros: absmax unchanged
    c1 = xb.abs().amax(dim=1)
    inv = torch.where(c1 > 0, 1.0 / c1, torch.zeros_like(c1))
    v = torch.clamp(xb * inv[:, None], -1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, v + 1 >= 0
    codes = _DYN_LUT.to(x.device)[idx]
    codes[c1 == 0] = 0  # an all-zero block: code 0, and absmax 0 makes it decode to 0
    return codes.reshape(-1)[:m].contiguous(), c1


# -- the solver ----------------------------------------------------------------------------------
def nf4_quantize(W: Tensor, cfg: NF4Config) -> NF4Weight:
    """Pure solver: a float tensor (any shape, flattened row-major) -> packed NF4Weight."""
    if W.numel() == 0:
        raise LowbitError(f"cannot quantize an empty tensor of shape {tuple(W.shape)} to nf4")
    check_finite(W, "given to nf4_quantize")
    x = W.detach().reshape(-1).float().contiguous()
    q, c2 = nf4_encode(x, cfg.blocksize)
    shape = tuple(int(s) for s in W.shape)
    if not cfg.double_quant:
        return NF4Weight(qweight=pack_nibbles(q), absmax=c2, nested_absmax=None, offset=None,
                         shape=shape, blocksize=cfg.blocksize, dq_blocksize=None)
    offset = c2.mean()
    k2, c1 = dynamic8_encode(c2 - offset, cfg.dq_blocksize)
    return NF4Weight(qweight=pack_nibbles(q), absmax=k2, nested_absmax=c1, offset=offset.reshape(1),
                     shape=shape, blocksize=cfg.blocksize, dq_blocksize=cfg.dq_blocksize)


@register_method("nf4")
class NF4(Method):
    config_cls = NF4Config
    needs_calibration = False

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        with torch.no_grad():
            fmt = nf4_quantize(module.weight, self.config)
        return fmt
