"""Kernels: y = x Wᵀ + b for each packed weight format.

`reference.py` holds the plain-PyTorch path that always works (CPU or GPU): dequantize, then an
ordinary float matmul. Fast paths register per format and are tested against the reference.

A format whose matmul is *defined* differently (LLM.int8()'s outlier decomposition also
quantizes the activations) names its own kernel in ``FORMAT_KERNELS`` (format name -> function);
`linear` dispatches on the weight format's registered name and falls back to the reference.
"""

from lowbit.kernels import int8 as _int8
from lowbit.kernels import reference as _reference

FORMAT_KERNELS = {"llm-int8": _int8.linear}


def linear(x, weight_format, bias=None):
    kernel = FORMAT_KERNELS.get(getattr(type(weight_format), "name", None), _reference.linear)
    return kernel(x, weight_format, bias)
