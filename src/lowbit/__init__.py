"""lowbit: quantize, prune and distill neural networks, and measure what it cost."""

__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402,F401

# transformers loads lowbit checkpoints once lowbit is imported (registered lazily: no import cost)
from lowbit.integrations import install as _install_integrations  # noqa: E402

_install_integrations()
