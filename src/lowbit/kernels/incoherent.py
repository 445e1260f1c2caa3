"""Kernel of incoherent affine weights (GPTQ with ``incoherent=true``): ``y = U^T (W~ (V x)) + b``,
the activation transformed once by the layer's input transform (a fast Hadamard,
``O(in log in)`` per token), the product by the affine kernel on the stored ``W~`` (its C path
where it has one), and the output transformed back; the dense weight in the original basis is
never formed."""

from __future__ import annotations

from torch import Tensor

from lowbit.kernels import linear as kernel_linear
from lowbit.kernels import register_kernel


@register_kernel("affine-incoherent", "float", "any")
def incoherent_linear(x: Tensor, w, bias: Tensor | None = None):
    inc = w.incoherence()
    y = inc.output(kernel_linear(inc.input(x), w.affine()))
    return y if bias is None else y + bias.to(y.dtype)
