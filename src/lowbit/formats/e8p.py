"""E8PWeight: a QuIP# weight, 2 bits per weight on the E8P lattice codebook after incoherence
processing (`lowbit.core.e8p`, `lowbit.core.hadamard`).

Stored:

* ``codes`` int16 [out, in / 8]: one 16-bit E8P code per 8 consecutive weights of a row of the
  *transformed* weight ``W~ = U W V^T`` (the bits of the uint16 code, read as int16);
* ``scale`` float32 [1]: ``W~ ~ scale * decode(codes)``;
* ``seed``: the layer's transforms ``U`` (output side) and ``V`` (input side), randomized
  Hadamard transforms rebuilt from it (`Incoherence.for_shape(out, in, seed)`).

Bits per weight: 2 + 32 / (out * in). The dense weight in the original basis is
``U^T (scale * decode(codes)) V`` (`dequantize`); a fast kernel instead transforms the
activation by ``V``, multiplies by the decoded codes and transforms the output by ``U^T``.
Widths must have a Hadamard factorisation (every model width lowbit supports does); ``in`` must
be a multiple of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.core import e8p
from lowbit.core.hadamard import Incoherence, hadamard_factors
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise LowbitError(f"seed must be an integer in [0, 2^62), got {seed!r}")


class E8PWeight(WeightFormat, name="e8p"):
    codes: Tensor = tensor(torch.int16, lambda w: (w.shape[0], w.shape[1] // e8p.DIM))
    scale: Tensor = tensor(torch.float32, lambda w: (1,), finite=True)
    shape: tuple[int, int] = shape_param()
    seed: int = param(0, check=_check_seed)

    def check(self) -> None:
        out, n = self.shape
        if n % e8p.DIM:
            raise LowbitError(f"an E8P weight needs a multiple of {e8p.DIM} input columns, got {n}")
        for what, size in (("output", out), ("input", n)):
            if hadamard_factors(size) is None:
                raise LowbitError(f"an E8P weight needs Hadamard-factorisable widths; its {what} width {size} is not")
        if float(self.scale[0]) <= 0:
            raise LowbitError(f"an E8P weight's scale must be positive, got {float(self.scale[0])}")

    def incoherence(self) -> Incoherence:
        return Incoherence.for_shape(self.shape[0], self.shape[1], self.seed)

    def transformed(self) -> Tensor:
        """``scale * decode(codes)`` [out, in] float32: the weight in the transformed basis."""
        codes = self.codes.to(torch.int64) & 0xFFFF
        return e8p.decode(codes).reshape(self.shape) * self.scale[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = self.incoherence().unweight(self.transformed())
        return W if dtype == torch.float32 else W.to(dtype)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: float, shape: tuple[int, int], seed: int) -> "E8PWeight":
        """Pack uint16 codes (int64/int32 values 0..65535) [out, in / 8]."""
        c = codes.to(torch.int64)
        w = cls(codes=torch.where(c >= 2**15, c - 2**16, c).to(torch.int16).contiguous(),
                scale=torch.tensor([float(scale)], dtype=torch.float32), shape=(int(shape[0]), int(shape[1])),
                seed=int(seed))
        w.validate()
        return w
