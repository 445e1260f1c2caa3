"""What every packed weight format shares: its stored size, derived from its tensors."""

from __future__ import annotations

import math


class StoredSize:
    """Mixin for format dataclasses with ``tensors()`` (what is stored) and ``shape``."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.n_weights
