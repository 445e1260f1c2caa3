"""TernaryWeight: weights in {-1, 0, +1} times one absmean scale (BitNet b1.58).

Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", eq. (1)-(3):

    gamma    = (1 / nm) * sum_ij |W_ij|                       absmean of the slice
    W~_ij    = RoundClip(W_ij / (gamma + eps), -1, 1)         RoundClip(x, a, b) = max(a, min(b, round(x)))
    W_hat_ij = gamma * W~_ij                                   (the dequantized weight)

The paper uses one gamma per tensor; ``granularity="channel"`` keeps one per output row instead
(the same formula over each row), which costs 32 bits per row and follows the rows' spread.

Stored tensors:

* ``qweight``  uint8   [out, packed_row_bytes(in, 2)]  codes u = W~ + 1 in {0, 1, 2}, packed
  2 bits each row by row with `lowbit.core.packing` (code j of a byte at bits 2j..2j+1; u = 3
  never occurs and is rejected)
* ``scales``   float32 [1] (per tensor) or [out] (per channel): gamma

Bits per weight: 2 + 32/(out*in) per tensor (2 + 32/in per channel). The 2-bit codes waste
log2(4/3) of a bit against the 1.58-bit entropy bound, for a byte layout that unpacks with two
shifts and a mask.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowbit.core import grid, packing
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

GRANULARITIES = ("tensor", "channel")


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise LowbitError(f"ternary granularity must be tensor or channel, got {granularity!r}")
    return granularity


@functools.lru_cache(maxsize=None)
def ternary_grid(granularity: str) -> QuantScheme:
    """{-1, 0, 1} as an affine grid: symmetric 2-bit with the restricted range, one float32 scale
    per tensor or per output row."""
    return QuantScheme(bits=2, symmetric=True, granularity=check_granularity(granularity), group_size=None,
                       restricted_range=True, scale_dtype="float32")


class TernaryWeight(WeightFormat, name="ternary"):
    qweight: Tensor = tensor(torch.uint8, lambda w: (w.shape[0], packing.packed_row_bytes(w.shape[1], 2)))
    scales: Tensor = tensor(torch.float32, lambda w: (1,) if w.granularity == "tensor" else (w.shape[0],),
                            finite=True)
    shape: tuple[int, int] = shape_param()
    granularity: str = param("tensor", check=check_granularity)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_ternary(cls, T: Tensor, gamma: Tensor, granularity: str = "tensor") -> "TernaryWeight":
        """Pack T [out, in] with values in {-1, 0, 1} and its scale(s) gamma ([1] or [out])."""
        if T.dim() != 2:
            raise LowbitError(f"expected a 2-D ternary weight, got shape {tuple(T.shape)}")
        if T.numel() and (int(T.min()) < -1 or int(T.max()) > 1):
            raise LowbitError(f"ternary values must be -1, 0 or 1, got [{int(T.min())}, {int(T.max())}]")
        w = cls(qweight=packing.pack(T, 2, offset=1),
                scales=gamma.detach().to(torch.float32).reshape(-1).contiguous(),
                shape=(int(T.shape[0]), int(T.shape[1])), granularity=granularity)
        w.validate()
        return w

    # -- reading ----------------------------------------------------------------------------
    def ternary(self) -> Tensor:
        """W~ as int8 [out, in], values in {-1, 0, 1}."""
        return (packing.unpack_u8(self.qweight, 2, self.shape[1]).to(torch.int8) - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """gamma * W~ in float32 (exact: W~ is -1, 0 or 1), then cast to dtype."""
        W = grid.dequantize_(self.ternary().to(torch.float32), self.scales.reshape(-1, 1), None,
                             ternary_grid(self.granularity))
        return W if dtype == torch.float32 else W.to(dtype)

    def check(self) -> None:
        # code 3 would decode to +2: only a corrupt file holds it
        q = self.qweight
        if packing.holds_code(q, 2, 3):
            raise LowbitError("ternary qweight holds the invalid 2-bit code 3")
