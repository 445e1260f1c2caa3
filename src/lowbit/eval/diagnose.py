"""Where NaN/Inf first appears in a forward pass, so that a broken model is reported by layer.

Calibration (the runner), evaluation (`lowbit.eval.quality`, `lowbit.eval.reference`) and
generation (`lowbit.runtime.generate`) check their outputs cheaply (`lowbit.core.grid.all_finite`)
and, when a check fails, run the pass again once through `first_nonfinite` to name the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "to_tuple"):  # transformers' ModelOutput
        yield from _tensors(obj.to_tuple())


def _finite(objs) -> bool:
    return all(bool(torch.isfinite(t).all()) for o in objs for t in _tensors(o) if t.is_floating_point())


def first_nonfinite(module: nn.Module, *args, **kwargs) -> str | None:
    """Run ``module(*args, **kwargs)`` and return the name (relative to ``module``; "" for the
    module itself) of the first submodule to finish whose output holds NaN/Inf although its inputs
    were finite, or None when the pass stays finite. A module's forward hook runs when it
    finishes, so a NaN made inside an attention module's own arithmetic (not by one of its
    projections) is reported as that attention module."""
    found: list[str] = []
    handles = []
    for name, mod in module.named_modules():
        def hook(m, a, kw, out, name=name):
            if not found and not _finite([out]) and _finite([a, kw]):
                found.append(name)
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def where_nonfinite(model: nn.Module, input_ids: Tensor) -> str:
    """A phrase for a message: which module of ``model`` makes its logits on ``input_ids`` [1, L]
    non-finite."""
    try:
        name = first_nonfinite(model, input_ids=input_ids, use_cache=False)
    except Exception as e:  # the diagnosis must never hide the finding
        return f"(their origin could not be traced: {type(e).__name__})"
    if name is None:
        return "(the model's own forward pass stays finite here: a fast path made them)"
    return f"(they first appear in {name or 'the model itself'})"
