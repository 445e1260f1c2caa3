"""Training data: a text tokenised once into packed windows, and the order the trainer reads them in.

`packed_windows` cuts the token stream of a text into consecutive, non-overlapping windows of
``seq_len`` ids (each starting with BOS when the tokenizer uses one), the usual packing for causal
language-model training: no padding, every token a target. `batch_indices` says which windows
step ``s`` trains on. It depends only on (seed, step), not on what ran before, so a resumed run
reads exactly the windows the uninterrupted one would have: the order is a fresh seeded
permutation per epoch (an epoch is one pass over all windows), batches taken from it in turn and
wrapping into the next epoch's permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError


def packed_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> Tensor:
    """``text`` as a LongTensor ``[n, seq_len]`` of consecutive windows (module docstring)."""
    from lowbit.data.texts import default_bos_id, tokenize

    if not isinstance(seq_len, int) or seq_len < 2:
        raise LowbitError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    ids = tokenize(tokenizer, text)
    bos = default_bos_id(tokenizer)
    span = seq_len - (bos is not None)
    n = ids.numel() // span
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise LowbitError(f"the text has {ids.numel()} tokens: too few for one training window of {seq_len}")
    w = ids[: n * span].reshape(n, span)
    if bos is not None:
        w = torch.cat([torch.full((n, 1), bos, dtype=torch.long), w], dim=1)
    return w


def batch_indices(n_windows: int, batch_size: int, step: int, seed: int) -> Tensor:
    """The window indices (``[batch_size]``) that step ``step`` (0-based) trains on."""
    if n_windows < 1 or batch_size < 1:
        raise LowbitError(f"need at least one window and a positive batch size, got {n_windows}, {batch_size}")
    first = step * batch_size
    out = []
    while len(out) < batch_size:
        pos = first + len(out)
        epoch, i = divmod(pos, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch))
        take = min(batch_size - len(out), n_windows - i)
        out.extend(perm[i:i + take].tolist())
    return torch.tensor(out, dtype=torch.long)
