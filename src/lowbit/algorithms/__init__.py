"""Quantization and pruning algorithms, one file each. Importing registers them by name."""

from lowbit.algorithms import rtn  # noqa: F401
