"""Row slices for work on large tensors a part at a time.

Elementwise and per-row work gives the same values whether it runs on the whole tensor or on
consecutive slices of its rows; done a slice at a time it needs work memory for one slice only
(a 58M-weight layer of an 8B model is 235 MB in float32, and a pass over it can make several
temporaries of that size)."""

from __future__ import annotations


def row_slices(n_rows: int, per_row: int, max_values: int = 1 << 22) -> list[slice]:
    """Consecutive slices covering ``n_rows`` rows of ``per_row`` values each, about
    ``max_values`` values per slice (at least one row)."""
    step = max(1, max_values // max(1, per_row))
    return [slice(r, r + step) for r in range(0, n_rows, step)]
