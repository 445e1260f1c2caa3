"""QuantizedEmbedding: a token embedding whose table is an AffineWeight, one row per token.

The table [vocab, hidden] is quantized row by row (per-row scale, or groups along the hidden
dimension), so looking up tokens reads only their rows: the packed codes and scales of those rows
are gathered and dequantized, giving exactly the rows of ``weight_format.dequantize()``.
Gemma's embedding multiplies the looked-up rows by sqrt(hidden); ``embed_scale`` keeps that
factor (None for plain embeddings). Packed tensors are buffers, as in QuantizedLinear, so the
state dict holds what is stored.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from lowbit.formats import get_format
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight


class QuantizedEmbedding(nn.Module):
    def __init__(self, weight_format: AffineWeight, padding_idx: int | None = None, embed_scale: float | None = None):
        super().__init__()
        if not isinstance(weight_format, AffineWeight) or weight_format.scheme.granularity == "tensor":
            raise LowbitError("a quantized embedding needs an affine per-row or per-group format")
        self.num_embeddings, self.embedding_dim = weight_format.shape
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self._fields = {f.name: getattr(weight_format, f.name) for f in dataclasses.fields(weight_format)
                        if f.name not in AffineWeight.tensor_names}
        self._tensor_names = tuple(weight_format.tensors())
        for k, t in weight_format.tensors().items():
            self.register_buffer(k, t)

    @property
    def weight_format(self) -> AffineWeight:
        tensors = {k: None for k in AffineWeight.tensor_names}
        tensors.update({k: self._buffers[k] for k in self._tensor_names})
        return AffineWeight(**tensors, **self._fields)

    def meta(self) -> dict:
        return dict(self.weight_format.meta(), bias=False, module="embedding", padding_idx=self.padding_idx,
                    embed_scale=self.embed_scale)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = {k: self._buffers[k].index_select(0, flat) for k in self._tensor_names}
        tensors = {k: None for k in AffineWeight.tensor_names}
        tensors.update(rows)
        fields = dict(self._fields, shape=(int(flat.numel()), self.embedding_dim))
        x = AffineWeight(**tensors, **fields).dequantize()
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format=affine {self._fields['scheme'].short_name()}"

    @classmethod
    def from_meta(cls, meta: dict, tensors: dict[str, Tensor]) -> "QuantizedEmbedding":
        fmt = get_format(meta["format"]).from_tensors(tensors, meta)
        return cls(fmt, meta.get("padding_idx"), meta.get("embed_scale"))

    @classmethod
    def quantize(cls, emb: nn.Embedding, scheme) -> "QuantizedEmbedding":
        """RTN-quantize an ``nn.Embedding`` (Gemma's scaled one keeps its scale)."""
        W = emb.weight.detach().float()
        if not torch.isfinite(W).all():
            raise LowbitError("the token embedding has NaN/Inf weights")
        return cls.replacing(emb, AffineWeight.quantize_rtn(W, scheme))

    @classmethod
    def replacing(cls, emb: nn.Embedding, weight_format: AffineWeight) -> "QuantizedEmbedding":
        """The quantized module standing for ``emb`` with table ``weight_format`` (Gemma's scaled
        embedding keeps its scale)."""
        if tuple(weight_format.shape) != tuple(emb.weight.shape):
            raise LowbitError(f"an embedding table of shape {tuple(weight_format.shape)} cannot replace one of "
                              f"shape {tuple(emb.weight.shape)}")
        scale = getattr(emb, "embed_scale", None)
        scale = None if scale is None else float(scale)
        return cls(weight_format, emb.padding_idx, scale)
