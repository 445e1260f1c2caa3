"""Kernels: y = x Wᵀ + b for each packed weight format.

`reference.py` holds the plain-PyTorch path that always works (CPU or GPU): dequantize, then an
ordinary float matmul. Fast paths register per format and are tested against the reference.
"""

from lowbit.kernels.reference import linear  # noqa: F401
