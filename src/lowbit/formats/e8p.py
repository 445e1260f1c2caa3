"""E8PWeight: a QuIP# weight on the E8P lattice codebook after incoherence processing
(`lowbit.core.e8p`, `lowbit.core.hadamard`): 2 bits per weight, or 3 and 4 with a residual.

Stored:

* ``codes`` int16 [out, in / 8]: one 16-bit E8P code per 8 consecutive weights of a row of the
  *transformed* weight ``W~ = U W V^T`` (the bits of the uint16 code, read as int16);
* ``residual`` (``bits`` 3 and 4 only) [out, in / 8]: the second stage of residual vector
  quantization, what the first leaves of each 8-vector: at 4 bits another E8P code (int16), at 3
  bits one sign per weight (uint8, bit ``i`` set = coordinate ``i`` is ``-1``, else ``+1``);
* ``scale`` float32 [1] (2 bits) or [2] (first stage, residual):
  ``W~ ~ scale[0] * decode(codes) + scale[1] * decode_residual(residual)``;
* ``seed``: the layer's transforms ``U`` (output side) and ``V`` (input side), randomized
  Hadamard transforms rebuilt from it (`Incoherence.for_shape(out, in, seed)`);
* ``su`` [out], ``sv`` [in] float32 (optional): the transforms' diagonals when fine-tuning made
  the random signs continuous (QuIP#'s tuned sign vectors); absent, the signs come from the seed;
* ``u_dense`` [out, out], ``v_dense`` [in, in] float32: stored exactly when that width has no
  Hadamard factorisation and the transform is a random orthogonal matrix instead (a dense
  product per call, and ``width^2`` floats on disk: every model width lowbit knows factorises).

Bits per weight: ``bits`` + the scales, signs and matrices over ``out * in``. The dense weight
in the original basis is ``U^T W~ V`` (`dequantize`); a fast kernel instead transforms the
activation by ``V``, multiplies by ``W~`` decoded from the codes and transforms the output by
``U^T``. ``in`` must be a multiple of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.core import e8p
from lowbit.core.hadamard import Incoherence, hadamard_factors
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

BITS = (2, 3, 4)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise LowbitError(f"seed must be an integer in [0, 2^62), got {seed!r}")


def _check_bits(bits) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise LowbitError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")


def _vectors(w) -> tuple[int, int]:
    return w.shape[0], w.shape[1] // e8p.DIM


def decode_signs(bits8: Tensor) -> Tensor:
    """uint8 sign bytes [...] -> [..., 8] float32 of +-1 (bit i set: coordinate i is -1)."""
    b = (bits8.to(torch.int64)[..., None] >> torch.arange(e8p.DIM)) & 1
    return 1.0 - 2.0 * b.to(torch.float32)


def encode_signs(y: Tensor) -> Tensor:
    """The nearest +-1 8-vector to each row of ``y [..., 8]`` (its signs; 0 counts as +), packed
    as uint8 [...]."""
    neg = (y < 0).to(torch.int64)
    return (neg << torch.arange(e8p.DIM)).sum(-1).to(torch.uint8)


class E8PWeight(WeightFormat, name="e8p"):
    codes: Tensor = tensor(torch.int16, _vectors)
    residual: Tensor = tensor(lambda w: torch.int16 if w.bits == 4 else torch.uint8, _vectors,
                              when=lambda w: w.bits > 2)
    scale: Tensor = tensor(torch.float32, lambda w: (1 if w.bits == 2 else 2,), finite=True)
    su: Tensor = tensor(torch.float32, lambda w: (w.shape[0],), optional=True, finite=True)
    sv: Tensor = tensor(torch.float32, lambda w: (w.shape[1],), optional=True, finite=True)
    u_dense: Tensor = tensor(torch.float32, lambda w: (w.shape[0], w.shape[0]), finite=True,
                             when=lambda w: hadamard_factors(w.shape[0]) is None)
    v_dense: Tensor = tensor(torch.float32, lambda w: (w.shape[1], w.shape[1]), finite=True,
                             when=lambda w: hadamard_factors(w.shape[1]) is None)
    shape: tuple[int, int] = shape_param()
    seed: int = param(0, check=_check_seed)
    bits: int = param(2, check=_check_bits)

    def check(self) -> None:
        n = self.shape[1]
        if n % e8p.DIM:
            raise LowbitError(f"an E8P weight needs a multiple of {e8p.DIM} input columns, got {n}")
        if float(self.scale.min()) <= 0:
            raise LowbitError(f"an E8P weight's scale must be positive, got {self.scale.tolist()}")

    def incoherence(self) -> Incoherence:
        return Incoherence.for_shape(self.shape[0], self.shape[1], self.seed, su=self.su, sv=self.sv,
                                     u_dense=self.u_dense, v_dense=self.v_dense)

    def transformed(self) -> Tensor:
        """``W~`` [out, in] float32: the weight in the transformed basis."""
        W = e8p.decode(self.codes.to(torch.int64) & 0xFFFF) * self.scale[0]
        if self.bits == 4:
            W = W + e8p.decode(self.residual.to(torch.int64) & 0xFFFF) * self.scale[1]
        elif self.bits == 3:
            W = W + decode_signs(self.residual) * self.scale[1]
        return W.reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = self.incoherence().unweight(self.transformed())
        return W if dtype == torch.float32 else W.to(dtype)

    @classmethod
    def from_codes(cls, codes: Tensor, scale, shape: tuple[int, int], seed: int, *, bits: int = 2,
                   residual: Tensor | None = None, su: Tensor | None = None, sv: Tensor | None = None,
                   u_dense: Tensor | None = None, v_dense: Tensor | None = None) -> "E8PWeight":
        """Pack uint16 codes (integer values 0..65535) [out, in / 8]; ``scale`` a float or a list of
        two; ``residual`` uint16 codes (4 bits) or sign bytes (3 bits)."""
        def int16(c: Tensor) -> Tensor:
            c = c.to(torch.int64)
            return torch.where(c >= 2**15, c - 2**16, c).to(torch.int16).contiguous()

        if residual is not None:
            residual = int16(residual) if bits == 4 else residual.to(torch.uint8).contiguous()
        scales = [float(scale)] if isinstance(scale, (int, float)) else [float(s) for s in scale]
        f32 = (lambda t: None if t is None else t.detach().to(torch.float32).contiguous())
        w = cls(codes=int16(codes), residual=residual, scale=torch.tensor(scales, dtype=torch.float32),
                su=f32(su), sv=f32(sv), u_dense=f32(u_dense), v_dense=f32(v_dense),
                shape=(int(shape[0]), int(shape[1])), seed=int(seed), bits=int(bits))
        w.validate()
        return w
