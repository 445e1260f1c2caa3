"""IncoherentAffineWeight: an affine (integer grid) weight stored in the basis of incoherence
processing, ``W~ = U W V^T`` (`lowbit.core.hadamard`): GPTQ with ``incoherent=true`` (QuIP's
incoherence processing with GPTQ's rounding).

It is an `AffineWeight` over ``W~`` (the same stored tensors and scheme, every check of that
format) plus the ``seed`` of its randomized Hadamard transforms; ``dequantize`` returns the weight
in the original basis, ``U^T W~ V``. A layer computes ``y = U^T (W~ (V x))``: the kernel
(`lowbit.kernels.incoherent`) transforms the activation, runs the affine kernel, and transforms
the product back. Both widths must have a Hadamard factorisation (every model width lowbit
knows does; QuIP#'s format stores a random orthogonal matrix for one that does not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.core.hadamard import Incoherence, hadamard_factors
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.base import param
from lowbit.formats.e8p import _check_seed


class IncoherentAffineWeight(AffineWeight, name="affine-incoherent"):
    seed: int = param(0, check=_check_seed)

    def check(self) -> None:
        super().check()
        for what, size in (("output", self.shape[0]), ("input", self.shape[1])):
            if hadamard_factors(size) is None:
                raise LowbitError(f"an incoherent weight needs Hadamard-factorisable widths; its {what} width "
                                  f"{size} is not")

    def incoherence(self) -> Incoherence:
        return Incoherence.for_shape(self.shape[0], self.shape[1], self.seed)

    def transformed(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W~``: the affine weight as stored."""
        return AffineWeight.dequantize(self, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = self.incoherence().unweight(self.transformed())
        return W if dtype == torch.float32 else W.to(dtype)

    def affine(self) -> AffineWeight:
        """The stored affine weight ``W~`` (the same tensors), for the affine kernels."""
        return AffineWeight(**{n: getattr(self, n) for n in AffineWeight.tensor_names + AffineWeight.param_names})

    @classmethod
    def wrap(cls, w: AffineWeight, seed: int) -> "IncoherentAffineWeight":
        out = cls(**{n: getattr(w, n) for n in AffineWeight.tensor_names + AffineWeight.param_names}, seed=int(seed))
        out.validate()
        return out
