"""Depth students: the teacher with some decoder blocks removed, and which blocks to remove.

A shallower student for distillation starts from the teacher's own weights, as DistilBERT kept
every other layer of BERT. Three steps:

    scores = block_scores(teacher, samples, "kl")   # one importance score per block, higher = more important
    keep   = choose_drop(scores, n)                  # drop the n least important (first/last block kept)
    student = drop_blocks(teacher, keep)             # a new model; the teacher is untouched

Two importance measures:

``"bi"`` -- ShortGPT's Block Influence (Men et al., 2024, eq. 1): ``BI_i = 1 - E_t[cos(x_i,t, y_i,t)]``,
the mean over every token ``t`` of the cosine similarity between block ``i``'s input ``x`` and
output ``y`` hidden states. A block that barely turns the residual stream scores near 0. One
forward pass.

``"kl"`` -- the measured end-to-end cost of removing the block alone: the mean over every token
position of ``KL(P_full || P_without_i)`` between the next-token distributions of the full model
and of the model with block ``i`` skipped (its output replaced by its input). One forward pass
per block, plus one for the full model whose log-probabilities are computed once per batch.

Everything about where the blocks are comes from the model family's record
(:func:`lowbit.models.families.find_blocks`); nothing here branches on the model type.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.models.families import family_of, find_blocks

__all__ = ["block_scores", "choose_drop", "drop_blocks", "SCORE_METHODS"]

SCORE_METHODS = ("kl", "bi")

# Config entries transformers keeps one value per decoder layer (in layer order): sliced like the
# blocks. ``layer_types``: "full_attention" / "sliding_attention" (Gemma 3, Qwen 2/3, ...);
# ``no_rope_layers``: 1 where a layer applies rotary (SmolLM3).
_PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
# Config entries that are a layer-count threshold: layers below it are one kind, layers at or above
# it another (Qwen's ``max_window_layers``: sliding window only from that layer on). Recounted over
# the kept layers, which keeps every kept layer on its side of the threshold.
_LAYER_THRESHOLDS = ("max_window_layers",)

# Bound one batch's float32 logits to about this many elements (256 MiB).
_LOGIT_ELEMENTS = 1 << 26


# -- dropping blocks ---------------------------------------------------------------------------


def _check_keep(keep, n_blocks: int) -> list[int]:
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise LowbitError(f"keep must be a list of block indices, got {type(keep).__name__}")
    keep = list(keep)
    if not keep:
        raise LowbitError(f"keep is empty: a student needs at least one of the {n_blocks} blocks")
    bad = [k for k in keep if isinstance(k, bool) or not isinstance(k, int)]
    if bad:
        raise LowbitError(f"keep must hold integer block indices, got {bad[0]!r}")
    out = [k for k in keep if not 0 <= k < n_blocks]
    if out:
        raise LowbitError(f"block index {out[0]} in keep is out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise LowbitError(f"keep must be sorted and without repeats, got {keep}")
    return keep


def drop_blocks(model: nn.Module, keep: list[int]) -> nn.Module:
    """A new model (a deep copy; ``model`` is untouched) holding only the decoder blocks ``keep``.

    ``keep``: strictly increasing block indices, at least one. Kept block ``keep[j]`` becomes block
    ``j``: every ``layer_idx`` inside it (the KV cache slot) is renumbered, and the config's
    per-layer entries (``num_hidden_layers``, ``layer_types``, ...) describe the new stack, so
    ``generate`` with a cache, ``save_pretrained`` and ``from_pretrained`` work on the student."""
    fam = family_of(model)
    n = len(find_blocks(model))
    keep = _check_keep(keep, n)
    student = copy.deepcopy(model)  # one copy: the config shared by model and submodules stays shared
    parent_path, _, attr = fam.blocks.rpartition(".")
    parent = student.get_submodule(parent_path) if parent_path else student
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([old[k] for k in keep]))
    for j, block in enumerate(getattr(parent, attr)):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j

    cfg = student.config
    for key in _PER_LAYER_LISTS:
        values = getattr(cfg, key, None)
        if values is None:
            continue
        if len(values) != n:
            raise LowbitError(f"config.{key} has {len(values)} entries but the model has {n} blocks")
        setattr(cfg, key, type(values)(values[k] for k in keep))
    for key in _LAYER_THRESHOLDS:
        limit = getattr(cfg, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool):
            setattr(cfg, key, sum(1 for k in keep if k < limit))
    cfg.num_hidden_layers = len(keep)
    return student


# -- which blocks matter -----------------------------------------------------------------------


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """A decoder layer's input hidden states from a forward hook's arguments."""
    return args[0] if args else kwargs["hidden_states"]


def _with_output(output, hidden: Tensor):
    """``output`` (a tensor, or a tuple led by the hidden states) with the hidden states replaced."""
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


def _first(output) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _check_samples(samples) -> Tensor:
    if not isinstance(samples, Tensor) or samples.dim() != 2 or samples.dtype.is_floating_point \
            or samples.dtype == torch.bool or samples.numel() == 0:
        what = f"{tuple(samples.shape)} {samples.dtype}" if isinstance(samples, Tensor) else type(samples).__name__
        raise LowbitError(f"samples must be a non-empty LongTensor [n, seq_len] of token ids, got {what}")
    return samples.long()


def _batches(samples: Tensor, vocab: int) -> list[Tensor]:
    rows = max(1, _LOGIT_ELEMENTS // max(1, samples.shape[1] * vocab))
    return list(samples.split(rows))


def _log_probs(model: nn.Module, x: Tensor) -> Tensor:
    """float32 next-token log-probabilities at every position, flattened to ``[n * L, V]``."""
    logits = model(input_ids=x, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).flatten(0, 1)


def _kl_sum(lp_p: Tensor, lp_q: Tensor) -> float:
    """sum over rows of KL(P || Q) from log-probabilities ``[rows, V]`` (float64 sums)."""
    return float((lp_p.exp() * (lp_p - lp_q)).sum(dim=-1, dtype=torch.float64).sum())


def _scores_bi(model: nn.Module, blocks: list[nn.Module], batches: list[Tensor], bar) -> list[float]:
    cos_sum = [0.0] * len(blocks)
    count = 0

    def recorder(i: int) -> Callable:
        def hook(module, args, kwargs, output):
            x, y = _hidden(args, kwargs).double(), _first(output).double()
            cos_sum[i] += float(nn.functional.cosine_similarity(x, y, dim=-1).sum())
        return hook

    handles = [b.register_forward_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for x in batches:
            model(input_ids=x, use_cache=False)
            count += x.numel()
            bar.update(1)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / count for s in cos_sum]


def _scores_kl(model: nn.Module, blocks: list[nn.Module], batches: list[Tensor], bar) -> list[float]:
    kl_sum = [0.0] * len(blocks)
    count = 0

    def identity(module, args, kwargs, output):  # the block's output becomes its input: block skipped
        return _with_output(output, _hidden(args, kwargs))

    for x in batches:
        full = _log_probs(model, x)  # the full model's log-probs: once per batch
        for i, block in enumerate(blocks):
            handle = block.register_forward_hook(identity, with_kwargs=True)
            try:
                kl_sum[i] += _kl_sum(full, _log_probs(model, x))
            finally:
                handle.remove()
            bar.update(1)
        count += full.shape[0]
        del full
    return [s / count for s in kl_sum]


@torch.inference_mode()
def block_scores(model: nn.Module, samples: Tensor, method: str = "kl", progress: bool = True) -> list[float]:
    """One importance score per decoder block of ``model`` (higher = more important to keep).

    ``samples``: token ids ``[n, seq_len]`` (e.g. :func:`lowbit.data.calibration_samples`), all
    positions scored. ``method``: ``"kl"`` (mean KL divergence, nats, of the next-token
    distribution when the block alone is skipped) or ``"bi"`` (ShortGPT's Block Influence,
    ``1 - mean cosine(input, output)``); see the module docstring."""
    if method not in SCORE_METHODS:
        raise LowbitError(f"unknown block score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    blocks = find_blocks(model)
    samples = _check_samples(samples)
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in _batches(samples, vocab)]
    was_training = model.training
    model.eval()
    total = len(batches) * (len(blocks) if method == "kl" else 1)
    try:
        with tqdm(total=total, desc=f"{method} block scores", unit="pass", disable=not progress, leave=False) as bar:
            run = _scores_kl if method == "kl" else _scores_bi
            return run(model, blocks, batches, bar)
    finally:
        model.train(was_training)


def choose_drop(scores: Sequence[float], n: int) -> list[int]:
    """The blocks to keep (sorted indices) after dropping the ``n`` with the lowest score.

    The rule: the first and the last block are never dropped while ``n`` can be met from the
    blocks between them (pruning studies -- ShortGPT, "The Unreasonable Ineffectiveness of the
    Deeper Layers" -- find the first and last blocks the most important, and the first one turns
    embeddings into the residual stream the rest expect). Among the inner blocks the lowest scores
    go first; equal scores drop the lower index first. Only when ``n`` exceeds the number of inner
    blocks is the lower-scored of the first and last block dropped too. At least one block stays:
    ``0 <= n < len(scores)``."""
    scores = [float(s) for s in scores]
    b = len(scores)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < max(b, 1):
        raise LowbitError(f"cannot drop {n!r} of {b} blocks: drop between 0 and {b - 1} (at least one block stays)")
    if any(math.isnan(s) for s in scores):
        raise LowbitError(f"block scores contain NaN (block {next(i for i, s in enumerate(scores) if math.isnan(s))})")
    inner = sorted(range(1, b - 1), key=lambda i: (scores[i], i))
    drop = set(inner[:n])
    if n > len(inner):  # only the ends are left: the lower-scored of them goes first
        ends = sorted({0, b - 1}, key=lambda i: (scores[i], i))
        drop.update(ends[: n - len(inner)])
    return [i for i in range(b) if i not in drop]
