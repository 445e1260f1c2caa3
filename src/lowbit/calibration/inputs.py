"""Statistics of the inputs of chosen layers over calibration text, the whole model run at once
(for consumers that need no block-by-block solving, e.g. the importance matrix of the GGUF
export). The hooks live here, with the rest of the calibration code."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def input_square_sums(model: nn.Module, layers: dict[str, nn.Module], samples: Tensor,
                      batch_size: int = 4) -> tuple[dict[str, Tensor], dict[str, int]]:
    """({key: Σ x² per input column, float64}, {key: number of tokens}) of every layer in
    ``layers`` (key -> module) over ``samples`` ([n, L] token ids), run ``batch_size`` at a time."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(mod, args, out, key):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        s = (x * x).sum(0)
        sums[key] = sums[key] + s if key in sums else s
        counts[key] = counts.get(key, 0) + x.shape[0]

    handles = [mod.register_forward_hook(lambda m, a, o, k=key: hook(m, a, o, k)) for key, mod in layers.items()]
    try:
        model.eval()
        for i in range(0, samples.shape[0], batch_size):
            model(samples[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return sums, counts
