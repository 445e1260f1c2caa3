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

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.base import StoredSize
from lowbit.core import packing, primitives
from lowbit.core.registry import register_format
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


@register_format("affine")
@dataclass
class AffineWeight(StoredSize):
    qweight: Tensor
    scales: Tensor
    qzeros: Tensor | None
    shape: tuple[int, int]
    scheme: QuantScheme
    zeros: Tensor | None = None

    tensor_names = ("qweight", "scales", "qzeros", "zeros")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_integers(cls, q: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> "AffineWeight":
        """Pack integers q [out, in] (in [qmin, qmax]) with per-slice scale/zero."""
        if q.dim() != 2:
            raise LowbitError(f"expected 2-D integer weight, got shape {tuple(q.shape)}")
        if q.numel() and (int(q.min()) < scheme.qmin or int(q.max()) > scheme.qmax):
            raise LowbitError(f"integers outside [{scheme.qmin}, {scheme.qmax}] for {scheme.short_name()}")
        dtype = torch.float16 if scheme.scale_dtype == "float16" else torch.float32
        qweight = packing.pack(q.to(torch.int64) + scheme.code_offset, scheme.bits)
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
        s, z = primitives.choose_qparams(W, scheme)
        return cls.from_integers(primitives.quantize(W, s, z, scheme), s, z, scheme)

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
        """Float weight. Same arithmetic as `primitives.dequantize` ((code - zero) * scale, in
        float32), done in place on views of one buffer so that it costs three passes."""
        rows, cols = self.shape
        W = packing.unpack_u8(self.qweight, self.scheme.bits, cols).to(torch.float32)
        s = self.scales.float()
        z = self.zero_points()
        z = float(self.scheme.code_offset) if z is None else z.float()
        if self.scheme.granularity == "tensor":
            W.sub_(z if isinstance(z, float) else z.reshape(())).mul_(s.reshape(()))
        elif self.scheme.granularity == "channel":
            W.sub_(z if isinstance(z, float) else z[:, :1]).mul_(s[:, :1])
        else:
            g = int(self.scheme.group_size)
            nf = cols // g  # full groups; a shorter last group (if any) is handled separately
            if nf:
                main = W[:, : nf * g].view(rows, nf, g)
                main.sub_(z if isinstance(z, float) else z[:, :nf, None]).mul_(s[:, :nf, None])
            if nf * g < cols:
                tail = W[:, nf * g:]
                tail.sub_(z if isinstance(z, float) else z[:, nf:nf + 1]).mul_(s[:, nf:nf + 1])
        return W if dtype == torch.float32 else W.to(dtype)

    # -- storage ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def meta(self) -> dict:
        return {"format": "affine", "shape": list(self.shape), "scheme": self.scheme.to_dict()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "AffineWeight":
        scheme = QuantScheme.from_dict(meta["scheme"])
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        w = cls(qweight=tensors["qweight"], scales=tensors["scales"], qzeros=tensors.get("qzeros"),
                shape=shape, scheme=scheme, zeros=tensors.get("zeros"))
        w.validate()
        return w

    def validate(self) -> None:
        rows, cols = self.shape
        n_groups, _ = primitives.group_layout(self.shape, self.scheme)
        exp_scales = (1, 1) if self.scheme.granularity == "tensor" else (rows, n_groups)
        exp_q = (rows, packing.packed_row_bytes(cols, self.scheme.bits))
        if tuple(self.qweight.shape) != exp_q or self.qweight.dtype != torch.uint8:
            raise LowbitError(f"qweight has shape {tuple(self.qweight.shape)}/{self.qweight.dtype}, expected {exp_q}/uint8")
        if tuple(self.scales.shape) != exp_scales:
            raise LowbitError(f"scales have shape {tuple(self.scales.shape)}, expected {exp_scales}")
        if not torch.isfinite(self.scales.float()).all():
            raise LowbitError("scales contain NaN/Inf")
        want_int = not self.scheme.symmetric and self.scheme.zero_point == "int"
        want_float = not self.scheme.symmetric and self.scheme.zero_point == "float"
        if want_int != (self.qzeros is not None) or want_float != (self.zeros is not None):
            raise LowbitError("zero-points present/absent inconsistently with the scheme")
        if self.zeros is not None and tuple(self.zeros.shape) != exp_scales:
            raise LowbitError(f"zeros have shape {tuple(self.zeros.shape)}, expected {exp_scales}")
