"""lowbit: quantize, prune and distill neural networks, and measure what it cost."""

from lowbit.errors import LowbitError  # noqa: E402,F401
from lowbit.version import __version__  # noqa: E402,F401

# transformers loads lowbit checkpoints once lowbit is imported (registered lazily: no import cost)
from lowbit.integrations import install as _install_integrations  # noqa: E402

_install_integrations()
