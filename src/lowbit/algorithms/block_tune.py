"""Block-wise fine-tuning: the loop QuIP# and AQLM run on a quantized decoder block, after all its
linear layers were replaced, to bring its outputs back towards the float block's.

The runner (`lowbit.calibration.sequential`) hands a method's ``tune_block`` the block's input
batches ``X`` and the float block's outputs ``T`` on them. The method makes its continuous
parameters trainable (a codebook method: scales, sign vectors or codebooks, and the block's own
norm gains) and calls `tune`: Adam on the relative squared error ``|block(x) - t|^2 / |t|^2``, one
calibration sample a step, cycling over the samples of every batch but the last, which is held
out (a step on one sample costs a fraction of one on a whole batch, and more, smaller steps
converge faster for the same time). The held-out loss is measured before and after; when
tuning did not lower it, every parameter is put back as it was, so tuning never makes a block
worse on data it was not fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class TuneResult:
    steps: int
    held_out_before: float  # relative squared error on the held-out batch
    held_out_after: float
    kept: bool              # False: the tuned values were worse on the held-out batch and were undone


def _output(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def relative_error(block: nn.Module, x: Tensor, t: Tensor, kw: dict) -> Tensor:
    """``|block(x) - t|^2 / |t|^2`` (a scalar tensor, differentiable)."""
    y = _output(block(x, **kw)).float()
    t = t.float()
    return (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)


def block_parameters(block: nn.Module, skip: tuple[type, ...] = ()) -> list[nn.Parameter]:
    """The block's own floating-point parameters outside modules of the types ``skip`` (the
    quantized layers): e.g. its norm gains."""
    inside = {id(p) for m in block.modules() if isinstance(m, skip) for p in m.parameters()}
    return [p for p in block.parameters() if p.is_floating_point() and id(p) not in inside]


def tune(block: nn.Module, params: list[Tensor], inputs, targets, kw: dict, steps: int, lr: float) -> TuneResult:
    """Adam on ``params`` for ``steps`` steps over the batches of ``inputs`` but the last (module
    docstring); undone when the held-out batch got worse. ``params`` are leaf tensors; their
    ``requires_grad`` is set for the loop and restored after."""
    X, T = list(inputs), list(targets)
    if len(X) != len(T) or not X:
        raise LowbitError(f"block fine-tuning needs one target per input batch, got {len(X)} inputs, {len(T)} targets")
    hold = len(X) - 1
    train = [(b, r) for b in (range(hold) if hold else [0]) for r in range(X[b].shape[0])]  # one sample a step
    flags = [p.requires_grad for p in params]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            before = float(relative_error(block, X[hold], T[hold], kw))
        if steps <= 0 or not params:
            return TuneResult(0, before, before, True)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                b, r = train[step % len(train)]
                opt.zero_grad(set_to_none=True)
                loss = relative_error(block, X[b][r:r + 1], T[b][r:r + 1], kw)
                if not torch.isfinite(loss):
                    break
                loss.backward()
                opt.step()
        with torch.no_grad():
            after = float(relative_error(block, X[hold], T[hold], kw))
        kept = after < before
        if not kept:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
        return TuneResult(steps, before, after, kept)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
