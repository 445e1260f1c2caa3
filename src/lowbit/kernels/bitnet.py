"""BitNet's product (`lowbit.formats.bitnet`): norm, 8-bit absmax activations per token, an integer
product with ternary or binary weight codes, one rescale.

The reference row (any device) is the format's own arithmetic in plain torch
(`BitNetWeight.forward_reference`).
"""

from __future__ import annotations

from torch import Tensor

from lowbit.formats.bitnet import BitNetWeight
from lowbit.kernels import register_kernel


@register_kernel("bitnet", "int8", "any")
def linear(x: Tensor, w: BitNetWeight, bias: Tensor | None = None) -> Tensor:
    """y = BitNet's product of x [..., in] (the format's docstring)."""
    return w.forward_reference(x, bias)
