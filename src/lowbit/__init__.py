"""lowbit: quantize, prune and distill neural networks, and measure what it cost."""

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402,F401
