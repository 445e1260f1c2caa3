"""RTN for the layers outside the decoder blocks: the token embedding and the output head
(``lowbit quantize --embed/--head int8|int6|int4``).

The block methods leave these two in float; they are often a large share of a small model (the
embedding of SmolLM2-135M is a fifth of its weights) and of every model with a large vocabulary.
``HEAD_SCHEMES`` names the grids offered: int8 per output channel, a Q6_K-like int6 in groups of
16, and asymmetric int4 in groups of 32.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

HEAD_SCHEMES = {
    "int8": QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None),
    "int6": QuantScheme(bits=6, symmetric=True, granularity="group", group_size=16),  # Q6_K-like
    "int4": QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32),
}


def quantize_head(model: nn.Module, scheme: QuantScheme) -> None:
    """Replace the output layer by an RTN-quantized copy (the token embedding keeps its float
    weight, so a tied pair is untied)."""
    from lowbit.formats.affine import AffineWeight
    from lowbit.nn.replace import replacement

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out, nn.Linear):
        raise LowbitError(f"{type(model).__name__} has no float nn.Linear output layer to quantize")
    W = out.weight.detach().float()
    if not torch.isfinite(W).all():
        raise LowbitError("the output layer has NaN/Inf weights")
    fmt = AffineWeight.quantize_rtn(W, scheme)
    model.set_output_embeddings(replacement(out, fmt))


def quantize_embedding(model: nn.Module, scheme: QuantScheme) -> None:
    """Replace the token embedding by an RTN-quantized copy, row by row (a tied output layer
    keeps the float weight)."""
    from lowbit.models.families import family_of
    from lowbit.nn.embedding import QuantizedEmbedding

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise LowbitError(f"{type(model).__name__} has no float nn.Embedding to quantize")
    name = family_of(model).embed
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, QuantizedEmbedding.quantize(emb, scheme))

