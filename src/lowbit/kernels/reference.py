"""Reference kernels: dequantize the packed weight to the activation dtype, then F.linear.

Always correct, works on any device torch supports; every fast path is checked against it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, weight_format, bias: Tensor | None = None) -> Tensor:
    W = weight_format.dequantize(dtype=x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))
