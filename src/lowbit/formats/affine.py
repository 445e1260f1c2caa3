"""AffineWeight: integer codes + per-slice scale (+ zero-point), bit-packed row by row.

The format produced by RTN, GPTQ, AWQ, HQQ and friends. Stored tensors:

* ``qweight``  uint8 [out, packed_row_bytes(in, bits)]  codes u = q + code_offset, packed
* ``scales``   float16/float32 [out, n_groups] (per-tensor: [1, 1])
* ``qzeros``   uint8 [out, packed_row_bytes(n_groups, bits)] (asymmetric, integer zero-points),
  zero-points packed with the same bit width as the codes
* ``zeros``    float16/float32 [out, n_groups] (asymmetric with ``zero_point="float"``)

Dequantization: W[r, c] = scales[r, g(c)] * (u[r, c] - offset)            (symmetric)
                W[r, c] = scales[r, g(c)] * (u[r, c] - qzeros[r, g(c)])    (asymmetric)
with g(c) = c // group_size. The last group of a row may be shorter than group_size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.core import grid, packing
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _scale_dtype(w: "AffineWeight") -> torch.dtype:
    return _SCALE_DTYPES[w.scheme.scale_dtype]


def _scale_shape(w: "AffineWeight") -> tuple[int, int]:
    return grid.scale_shape(w.shape, w.scheme)


def _qzeros_shape(w: "AffineWeight") -> tuple[int, int]:
    rows, n = _scale_shape(w)
    return (rows, packing.packed_row_bytes(n, w.scheme.bits))


def _int_zeros(w: "AffineWeight") -> bool:
    return not w.scheme.symmetric and w.scheme.zero_point == "int"


def _float_zeros(w: "AffineWeight") -> bool:
    return not w.scheme.symmetric and w.scheme.zero_point == "float"


def _decode_scheme(d) -> QuantScheme:
    if not isinstance(d, dict):
        raise TypeError(f"scheme must be a mapping, got {type(d).__name__}")
    return QuantScheme.from_dict(d)


class AffineWeight(WeightFormat, name="affine"):
    qweight: Tensor = tensor(torch.uint8, lambda w: (w.shape[0], packing.packed_row_bytes(w.shape[1], w.scheme.bits)))
    scales: Tensor = tensor(_scale_dtype, _scale_shape, finite=True)
    qzeros: Tensor | None = tensor(torch.uint8, _qzeros_shape, when=_int_zeros)
    shape: tuple[int, int] = shape_param()
    scheme: QuantScheme = param(encode=QuantScheme.to_dict, decode=_decode_scheme)
    zeros: Tensor | None = tensor(_scale_dtype, _scale_shape, when=_float_zeros, finite=True)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_integers(cls, q: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> "AffineWeight":
        """Pack integers q [out, in] (in [qmin, qmax]) with per-slice scale/zero."""
        if q.dim() != 2:
            raise LowbitError(f"expected 2-D integer weight, got shape {tuple(q.shape)}")
        if q.numel() and (int(q.min()) < scheme.qmin or int(q.max()) > scheme.qmax):
            raise LowbitError(f"integers outside [{scheme.qmin}, {scheme.qmax}] for {scheme.short_name()}")
        dtype = _SCALE_DTYPES[scheme.scale_dtype]
        qweight = packing.pack(q, scheme.bits, offset=scheme.code_offset)
        qzeros = zeros = None
        if not scheme.symmetric:
            if zero is None:
                raise LowbitError("asymmetric scheme needs zero-points")
            if scheme.zero_point == "float":
                zeros = zero.to(dtype).contiguous()
            else:
                qzeros = packing.pack(zero.to(torch.int64), scheme.bits)
        return cls(qweight=qweight, scales=scale.to(dtype).contiguous(), qzeros=qzeros,
                   shape=(int(q.shape[0]), int(q.shape[1])), scheme=scheme, zeros=zeros)

    @classmethod
    def quantize_rtn(cls, W: Tensor, scheme: QuantScheme) -> "AffineWeight":
        s, z = grid.choose_qparams(W, scheme)
        return cls.from_integers(grid.quantize(W, s, z, scheme), s, z, scheme)

    # -- reading ----------------------------------------------------------------------------
    def integers(self) -> Tensor:
        """Signed integers q [out, in] (int32)."""
        return packing.unpack(self.qweight, self.scheme.bits, self.shape[1]) - self.scheme.code_offset

    def zero_points(self) -> Tensor | None:
        """Integer zero-points (int32), or the float ones (float32), or None if symmetric."""
        if self.zeros is not None:
            return self.zeros.float()
        if self.qzeros is None:
            return None
        return packing.unpack(self.qzeros, self.scheme.bits, self.scales.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight: `grid.dequantize_` on the unpacked codes ((code - zero) * scale, in
        float32; symmetric codes first lose their offset), in place on one buffer."""
        W = packing.unpack_u8(self.qweight, self.scheme.bits, self.shape[1]).to(torch.float32)
        if self.scheme.symmetric:
            W.sub_(float(self.scheme.code_offset))
        grid.dequantize_(W, self.scales, self.zero_points(), self.scheme)
        return W if dtype == torch.float32 else W.to(dtype)
