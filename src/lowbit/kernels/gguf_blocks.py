"""Matmul of GGUF block weights (format "gguf_blocks"): the reference path only — the blocks are
dequantized by the GGUF reader's arithmetic (`GGUFBlockWeight.dequantize`), then an ordinary float
matmul. The row exists so that the table names the format's own product; llama.cpp runs these
blocks with its own kernels once exported."""

from __future__ import annotations

from torch import Tensor

from lowbit.kernels import register_kernel


@register_kernel("gguf_blocks", "float", "any")
def gguf_blocks_linear(x: Tensor, w, bias: Tensor | None = None):
    return NotImplemented  # the reference: dequantize, then F.linear
