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
worse on data it was not fitted to. With ``calibration=True`` the error on all calibration
batches together (`output_error`) is measured before and after too, and tuning is also undone
when that got worse (LKD's promise: never a larger block error on its calibration data).
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
    kept: bool              # False: the tuned values were worse (held-out, or all batches) and were undone
    calibration_before: float | None = None  # relative squared error on all batches (``calibration=True``)
    calibration_after: float | None = None


def _output(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def relative_error(block: nn.Module, x: Tensor, t: Tensor, kw: dict) -> Tensor:
    """``|block(x) - t|^2 / |t|^2`` (a scalar tensor, differentiable)."""
    y = _output(block(x, **kw)).float()
    t = t.float()
    return (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def output_error(block: nn.Module, inputs, targets, kw: dict) -> float:
    """``sum |block(x) - t|^2 / sum |t|^2`` over all batches: the block's relative output error on
    the whole calibration set."""
    num = den = 0.0
    for x, t in zip(inputs, targets):
        y = _output(block(x, **kw)).float()
        t = t.float()
        num += float((y - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return num / max(den, 1e-30)


def block_parameters(block: nn.Module, skip: tuple[type, ...] = ()) -> list[nn.Parameter]:
    """The block's own floating-point parameters outside modules of the types ``skip`` (the
    quantized layers): e.g. its norm gains."""
    inside = {id(p) for m in block.modules() if isinstance(m, skip) for p in m.parameters()}
    return [p for p in block.parameters() if p.is_floating_point() and id(p) not in inside]


def tune(block: nn.Module, params: list[Tensor], inputs, targets, kw: dict, steps: int, lr: float, *,
         calibration: bool = False) -> TuneResult:
    """Adam on ``params`` for ``steps`` steps over the batches of ``inputs`` but the last (module
    docstring); undone when the held-out batch got worse, and with ``calibration`` also when the
    error on all batches (`output_error`) grew. ``params`` are leaf tensors; their
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
        cal_before = output_error(block, X, T, kw) if calibration else None
        if steps <= 0 or not params:
            return TuneResult(0, before, before, True, cal_before, cal_before)
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
        cal_after = output_error(block, X, T, kw) if calibration else None
        kept = after < before and (cal_after is None or cal_after <= cal_before)
        if not kept:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
        return TuneResult(steps, before, after, kept, cal_before, cal_after)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
