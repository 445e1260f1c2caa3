"""Quality of a (quantized) model against its baseline: perplexity, KL divergence, top-1 agreement.

The perplexity protocol (fixed; every number lowbit reports uses it)
--------------------------------------------------------------------
Input: one token stream ``t`` (1-D ids of the evaluation text, *no* special tokens, e.g. from
:func:`lowbit.data.eval_tokens`), a :class:`PplProtocol` ``(ctx, max_tokens)`` and ``bos_id``
(the tokenizer's BOS id if it prepends BOS by default, else ``None``; see
:func:`lowbit.data.default_bos_id`).

1. Every window is exactly ``ctx`` model inputs and consumes ``S`` stream tokens:
   ``S = ctx - 1`` with BOS, ``S = ctx`` without.
2. Only the first ``min(len(t), max_tokens)`` stream tokens are used (``max_tokens=None``: all
   of them).  They are cut into ``W = min(len(t), max_tokens) // S`` consecutive,
   non-overlapping windows; window ``w`` holds ``t[w*S : (w+1)*S]``.  A partial last window
   is dropped (whole windows only).
3. With BOS the model input is ``[BOS] + window`` and *all* ``ctx - 1`` text tokens are scored
   (the first one is predicted from BOS alone).  Without BOS the input is the window itself and
   its first token is context only; the other ``ctx - 1`` are scored.  Either way: input
   ``x`` of length ``ctx``, targets ``x[1:]``, predicted by the logits at ``x[:-1]``, so
   ``n_tokens = W * (ctx - 1)``.  Each window starts from an empty context (no state carries
   over between windows; batch size 1).
4. Logits are cast to float32 and log-softmaxed in float32.  For each scored position ``i``
   ``nll_i = -log p(x[i+1] | x[:i+1])``; sums are accumulated in float64.
   ``nll = mean_i nll_i`` (token-level, nats) and ``ppl = exp(nll)``.

This is the GPTQ-paper protocol (non-overlapping windows, token-level mean) with an explicit
BOS rule and an explicit token budget.  The default ``PplProtocol(ctx=512, max_tokens=16384)``
scores 32 windows x 511 = 16,352 tokens, which on the bundled evaluation text is the beginning
of *Persuasion*.  Numbers are comparable only between runs with the same protocol, text and
tokenizer.

Agreement with the baseline (like llama.cpp's ``--kl-divergence``)
-------------------------------------------------------------------
All models see the same windows in lockstep (one window, every model, next window), so the
baseline's logits are never stored for more than one window.  At every scored position ``i``,
with ``P`` the baseline's and ``Q`` the model's next-token distribution (float32 log-softmax,
float64 sum over the vocabulary)::

    KL_i = sum_v P_i(v) * (log P_i(v) - log Q_i(v))          (nats; terms with P_i(v) = 0 are 0)

``kl_mean`` is the mean over all scored positions, ``kl_p99`` the 99th percentile (linear
interpolation, numpy's default).  The reverse direction ``KL(Q || P)`` (same formula with the roles
swapped) is reported as ``kl_rev_mean`` / ``kl_rev_p99``: it weighs the tokens the model makes
likely rather than those the baseline does, so it exposes a model that invents mass where the
baseline has almost none.  ``top1`` is the fraction of positions where the argmax of the
model's logits equals the argmax of the baseline's.  ``delta_ppl = ppl - ppl_baseline``.
For the baseline itself these agreement fields are ``None``.  A model that produces NaN/inf
logits gets NaN/inf numbers rather than an exception, so a broken variant shows up in tables.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.core.grid import all_finite

__all__ = ["PplProtocol", "QualityResult", "evaluate_quality", "perplexity", "protocol_windows"]

# Bound the float64 temporaries of the KL sum to ~this many elements at a time (32 MiB).
_KL_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PplProtocol:
    """The windowing of the perplexity protocol (see the module docstring).

    ``ctx``: model inputs per window (>= 2).  ``max_tokens``: at most this many stream tokens are
    read (``None``: the whole stream); only whole windows are evaluated.
    """

    ctx: int = 512
    max_tokens: int | None = 16384

    def __post_init__(self) -> None:
        if isinstance(self.ctx, bool) or not isinstance(self.ctx, int) or self.ctx < 2:
            raise LowbitError(f"PplProtocol.ctx must be an integer >= 2, got {self.ctx!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise LowbitError(f"PplProtocol.max_tokens must be a positive integer or None, got {self.max_tokens!r}")

    def stride(self, bos: bool) -> int:
        """Stream tokens consumed per window: ``ctx - 1`` with BOS, ``ctx`` without."""
        return self.ctx - 1 if bos else self.ctx

    def n_windows(self, n_stream_tokens: int, bos: bool) -> int:
        """How many whole windows a stream of ``n_stream_tokens`` ids yields."""
        usable = n_stream_tokens if self.max_tokens is None else min(n_stream_tokens, self.max_tokens)
        return usable // self.stride(bos)

    def n_scored(self, n_stream_tokens: int, bos: bool) -> int:
        """How many positions are scored: ``n_windows * (ctx - 1)``."""
        return self.n_windows(n_stream_tokens, bos) * (self.ctx - 1)


@dataclass
class QualityResult:
    """One model's numbers under a :class:`PplProtocol` (see the module docstring).

    ``nll`` is the mean negative log-likelihood per scored token in nats, ``ppl = exp(nll)``.
    ``kl_mean``/``kl_p99`` (KL(baseline || model), nats), ``kl_rev_mean``/``kl_rev_p99``
    (KL(model || baseline)), ``top1`` (fraction in [0, 1]) and ``delta_ppl`` compare with the
    baseline and are ``None`` for the baseline itself.
    """

    ppl: float
    nll: float
    kl_mean: float | None
    kl_p99: float | None
    top1: float | None
    n_tokens: int
    delta_ppl: float | None = None
    kl_rev_mean: float | None = None
    kl_rev_p99: float | None = None
    # an estimated KL (lowbit.eval.reference, topk; None when exact): its relative error measured
    # on the audit positions, and its estimated relative standard error over the whole run
    kl_rel_err: float | None = None
    kl_rev_rel_err: float | None = None
    kl_rel_se: float | None = None
    kl_rev_rel_se: float | None = None
    token_nll: np.ndarray | None = field(default=None, repr=False)  # [n_tokens] float32, in scoring order
    # where NaN/Inf logits first appeared ("window 3 (they first appear in model.layers.5.mlp)"), or None
    nonfinite: str | None = None


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if logits is None:
        raise LowbitError(f"model {type(model).__name__} returned {type(out).__name__} without .logits")
    return logits


def _kl_rows(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from float32 log-probabilities ``[n, V]``; float64 result ``[n]``."""
    n, vocab = lp_p.shape
    rows = max(1, _KL_CHUNK_ELEMENTS // max(vocab, 1))
    out = torch.empty(n, dtype=torch.float64, device=lp_p.device)
    for start in range(0, n, rows):
        a = lp_p[start : start + rows]
        b = lp_q[start : start + rows]
        p = a.exp()
        kl = (p * (a - b)).sum(dim=-1, dtype=torch.float64)
        bad = kl.isnan()
        if bool(bad.any()):
            # 0 * (-inf - -inf) or 0 * inf gave NaN: recompute those rows with 0 * anything = 0
            # (a row with NaN log-probabilities stays NaN, since NaN == 0 is false).
            pa, aa, bb = p[bad], a[bad], b[bad]
            terms = torch.where(pa == 0, torch.zeros((), dtype=aa.dtype, device=aa.device), pa * (aa - bb))
            kl[bad] = terms.sum(dim=-1, dtype=torch.float64)
        out[start : start + rows] = kl
    return out


def _exp(x: float) -> float:
    """exp in float64 that overflows to inf (and keeps NaN) instead of raising."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.exp(np.float64(x)))


class _Accumulator:
    def __init__(self) -> None:
        self.nll_sum = 0.0  # python float == float64
        self.n = 0
        self.top1 = 0
        self.kl: list[torch.Tensor] = []
        self.kl_rev: list[torch.Tensor] = []
        self.nll: list[torch.Tensor] = []


def protocol_windows(tokens, protocol: PplProtocol, bos_id: int | None = None) -> torch.Tensor:
    """The model inputs of the protocol (module docstring, steps 1-3): LongTensor ``[W, ctx]``.

    ``tokens`` is the 1-D id stream; with ``bos_id`` every window starts with it."""
    if not isinstance(protocol, PplProtocol):
        raise LowbitError(f"protocol must be a PplProtocol, got {type(protocol).__name__}")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise LowbitError(f"tokens must be a 1-D tensor of integer ids, got {tuple(tokens.shape)} {tokens.dtype}")
    tokens = tokens.to(torch.long)
    use_bos = bos_id is not None
    stride = protocol.stride(use_bos)
    n_windows = protocol.n_windows(tokens.numel(), use_bos)
    if n_windows == 0:
        raise LowbitError(
            f"too few tokens: {tokens.numel()} (max_tokens={protocol.max_tokens}) do not fill one window "
            f"of ctx={protocol.ctx} ({stride} stream tokens{' after BOS' if use_bos else ''})"
        )
    if tokens.numel() and int(tokens.min()) < 0:
        raise LowbitError(f"tokens contain a negative id ({int(tokens.min())})")
    windows = tokens[: n_windows * stride].reshape(n_windows, stride)
    if use_bos:
        windows = torch.cat([torch.full((n_windows, 1), int(bos_id), dtype=torch.long), windows], dim=1)
    return windows


def evaluate_quality(
    models: dict[str, nn.Module],
    baseline: str,
    tokens,
    protocol: PplProtocol = PplProtocol(),
    bos_id: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, QualityResult]:
    """Perplexity of every model, and KL / top-1 / Δppl of every other model vs ``baseline``.

    ``models`` maps a display name to a causal LM in eval mode already on ``device`` (called as
    ``model(input_ids)`` with ``input_ids`` of shape ``[1, ctx]``; its output's ``.logits``
    are used).  ``tokens`` is the 1-D id stream; ``bos_id`` follows the protocol in the module
    docstring.  The same module object listed under several names is run once per window.
    Returns results in the order of ``models``.  A tqdm bar over windows goes to stderr.
    """
    if not isinstance(models, dict) or not models:
        raise LowbitError("evaluate_quality needs a non-empty dict of name -> model")
    if baseline not in models:
        raise LowbitError(f"baseline {baseline!r} is not one of the models: {', '.join(map(repr, models))}")
    if not isinstance(protocol, PplProtocol):
        raise LowbitError(f"protocol must be a PplProtocol, got {type(protocol).__name__}")
    for name, model in models.items():
        if getattr(model, "training", False):
            raise LowbitError(f"model {name!r} is in training mode; call model.eval() first")
    windows = protocol_windows(tokens, protocol, bos_id)
    n_windows = windows.shape[0]
    top_id = int(windows.max())
    for name, model in models.items():  # before any forward pass: an embedding lookup would fail obscurely
        get_emb = getattr(model, "get_input_embeddings", None)
        n_emb = getattr(get_emb(), "num_embeddings", None) if callable(get_emb) else None
        if isinstance(n_emb, int) and top_id >= n_emb:
            raise LowbitError(f"token id {top_id} is out of range for model {name!r} ({n_emb} input embeddings)")

    # Run each distinct module once per window; names sharing a module share its logits.
    runs: dict[int, nn.Module] = {}
    for model in models.values():
        runs.setdefault(id(model), model)
    base_key = id(models[baseline])
    acc = {name: _Accumulator() for name in models}
    bad: dict[int, str] = {}  # module id -> where its logits first went NaN/Inf

    from tqdm import tqdm

    bar = tqdm(range(n_windows), desc="quality", unit="window", file=sys.stderr, disable=not progress, leave=False)
    vocab = None
    with torch.inference_mode():
        for w in bar:
            x = windows[w : w + 1].to(device)  # [1, ctx]
            targets = x[0, 1:]  # [ctx-1]

            logprobs: dict[int, torch.Tensor] = {}
            argmax: dict[int, torch.Tensor] = {}
            # baseline first, then the others, so only one extra [ctx, V] set is alive at a time
            order = [base_key] + [k for k in runs if k != base_key]
            for key in order:
                logits = _logits(runs[key], x)
                if logits.dim() != 3 or logits.shape[:2] != (1, protocol.ctx):
                    raise LowbitError(
                        f"model {type(runs[key]).__name__} returned logits of shape {tuple(logits.shape)}, "
                        f"expected (1, {protocol.ctx}, vocab)"
                    )
                if vocab is None:
                    vocab = logits.shape[-1]
                    if top_id >= vocab:
                        raise LowbitError(f"token id {top_id} is out of range for a vocabulary of {vocab} logits")
                elif logits.shape[-1] != vocab:
                    raise LowbitError(f"models disagree on vocabulary size: {logits.shape[-1]} vs {vocab}")
                if key not in bad and not all_finite(logits):
                    bad[key] = nonfinite_note(runs[key], x, w)
                pred = logits[0, :-1].float()  # [ctx-1, V]
                argmax[key] = pred.argmax(dim=-1)
                logprobs[key] = torch.log_softmax(pred, dim=-1)
                del logits, pred

                nll = -logprobs[key].gather(-1, targets[:, None]).squeeze(-1)  # [ctx-1] float32
                nll_sum = float(nll.sum(dtype=torch.float64))
                kl = kl_rev = None
                if key != base_key:
                    kl = _kl_rows(logprobs[base_key], logprobs[key]).cpu()
                    kl_rev = _kl_rows(logprobs[key], logprobs[base_key]).cpu()
                    same = int((argmax[key] == argmax[base_key]).sum())
                for name, model in models.items():
                    if id(model) != key:
                        continue
                    a = acc[name]
                    a.nll_sum += nll_sum
                    a.nll.append(nll.cpu())
                    a.n += targets.numel()
                    if kl is not None:
                        a.kl.append(kl)
                        a.kl_rev.append(kl_rev)
                        a.top1 += same
                if key != base_key:
                    del logprobs[key]  # keep only the baseline's for the next model
            if progress:
                b = acc[baseline]
                bar.set_postfix(ppl=f"{_exp(b.nll_sum / b.n):.3f}", refresh=False)
    bar.close()

    base_ppl = _exp(acc[baseline].nll_sum / acc[baseline].n)
    results: dict[str, QualityResult] = {}
    for name, model in models.items():
        a = acc[name]
        nll = a.nll_sum / a.n
        ppl = _exp(nll)
        if id(model) == base_key:
            # Same module as the baseline (the baseline itself or an alias): agreement is exact.
            is_base = name == baseline
            results[name] = QualityResult(
                ppl=ppl,
                nll=nll,
                kl_mean=None if is_base else 0.0,
                kl_p99=None if is_base else 0.0,
                top1=None if is_base else 1.0,
                n_tokens=a.n,
                delta_ppl=None if is_base else 0.0,
                kl_rev_mean=None if is_base else 0.0,
                kl_rev_p99=None if is_base else 0.0,
                token_nll=torch.cat(a.nll).numpy(),
                nonfinite=bad.get(id(model)),
            )
            continue
        kl_all = torch.cat(a.kl).numpy()
        kl_rev_all = torch.cat(a.kl_rev).numpy()
        results[name] = QualityResult(
            ppl=ppl,
            nll=nll,
            kl_mean=float(kl_all.mean()),
            kl_p99=float(np.percentile(kl_all, 99)),
            top1=a.top1 / a.n,
            n_tokens=a.n,
            delta_ppl=ppl - base_ppl,
            kl_rev_mean=float(kl_rev_all.mean()),
            kl_rev_p99=float(np.percentile(kl_rev_all, 99)),
            token_nll=torch.cat(a.nll).numpy(),
            nonfinite=bad.get(id(model)),
        )
    return results


def nonfinite_note(model: nn.Module | None, x: torch.Tensor, w: int) -> str:
    """Where NaN/Inf logits came from, for the row's note: window ``w`` and, for a model held in
    memory, the first module whose output went non-finite (`lowbit.eval.diagnose`)."""
    from lowbit.eval.diagnose import where_nonfinite

    if model is None:
        return f"window {w} (a streamed model: run it in memory to trace the layer)"
    return f"window {w} {where_nonfinite(model, x)}"


def perplexity(
    model: nn.Module,
    tokens,
    protocol: PplProtocol = PplProtocol(),
    bos_id: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QualityResult:
    """Perplexity of one model under ``protocol`` (:func:`evaluate_quality` with no comparison)."""
    return evaluate_quality({"model": model}, "model", tokens, protocol, bos_id, device, progress)["model"]


def paired_ppl_ratio(nll_a, nll_b, block: int) -> tuple[float, float]:
    """ppl(a) / ppl(b) of two models scored on the same tokens, and its standard error.

    ppl(a)/ppl(b) = exp(mean(nll_a − nll_b)). The per-token differences are correlated within a
    window, so the standard error is estimated from the means of consecutive blocks of ``block``
    tokens (one protocol window each: ``ctx − 1`` scored tokens) and propagated through exp:
    se(ratio) ≈ ratio · sd(block means) / sqrt(n_blocks)."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise LowbitError(f"paired ppl ratio needs two equal-length token NLL vectors, got {a.shape} and {b.shape}")
    if block < 1 or a.size % block:
        raise LowbitError(f"{a.size} scored tokens do not split into blocks of {block}")
    d = (a - b).reshape(-1, block).mean(axis=1)
    ratio = float(np.exp((a - b).mean()))
    se = float(d.std(ddof=1) / np.sqrt(d.size)) * ratio if d.size > 1 else float("nan")
    return ratio, se
