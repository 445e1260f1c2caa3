"""Kernels of the codebook formats.

E8P (QuIP#): ``y = U^T (W~ (V x))``: the activation is transformed once by the layer's input
Hadamard transform (``O(in log in)`` per token), multiplied by the decoded transformed weight, and
the product transformed back on the output side; the dense weight in the original basis is never
formed. The decoded ``W~`` is float (a C kernel that decodes codes into registers is still to
come); the result equals the reference (dequantize, then F.linear) up to float rounding.
"""

from __future__ import annotations

from torch import Tensor

from lowbit.kernels import register_kernel


@register_kernel("e8p", "float", "any")
def e8p_linear(x: Tensor, w, bias: Tensor | None = None):
    inc = w.incoherence()
    y = inc.output(inc.input(x) @ w.transformed().to(x.dtype).T)
    return y if bias is None else y + bias.to(y.dtype)
