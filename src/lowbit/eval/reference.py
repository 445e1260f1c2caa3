"""The original model's next-token distributions on the evaluation windows, computed once and cached.

:func:`lowbit.eval.quality.evaluate_quality` runs the original and its variants in lockstep, so
both are in memory together.  For a model where that is too much, the original is run once
(streaming block by block if it does not fit alone, :mod:`lowbit.eval.streaming`), what the
comparison needs is stored in a file, and each variant is later scored against that file alone.

Two kinds of reference
----------------------
``hidden`` (exact)
    The input of the original's output layer at every position (``[W, ctx, H]``, after the final
    norm) plus the output layer itself (weight, bias, Gemma's logit soft-cap).  The baseline's
    logits are recomputed window by window with the same operation on the same tensors, so they
    are bit-identical to the original's forward pass and every number (KL both ways, top-1, Δppl)
    equals the in-memory lockstep path's exactly.  Size: ``W*ctx*H + V*H`` values (SmolLM2-135M,
    default protocol: 38 MB of hidden states + the 113 MB head).
``topk`` (compact, estimated)
    Per scored position: the ``k`` most likely tokens (ids and log-probabilities), the log of the
    mass of all the others (``rest``), and ``m`` tokens sampled from those others in proportion to
    their probability (ids and log-probabilities): ``(k + m) * 8 + 4`` bytes (default k = 32,
    m = 64: 772 bytes, against ``4 * H`` bytes of hidden state plus the head for ``hidden``).

    *The estimate.*  Let ``R`` be the tokens outside the top k, ``p_rest = sum_R p_i``,
    ``q_rest = sum_R q_i`` (exact: the model's whole distribution is at hand when it is scored),
    the tail distributions ``p~_i = p_i / p_rest`` and ``q~_i = q_i / q_rest`` on ``R``, and the
    ratio ``w_i = q~_i / p~_i``.  Splitting each sum over ``R`` into its total and its shape::

        KL(P||Q) = sum_top p log(p/q) + p_rest log(p_rest/q_rest) + p_rest * KL(p~||q~)
        KL(Q||P) = sum_top q log(q/p) + q_rest log(q_rest/p_rest) + q_rest * KL(q~||p~)

    The first two terms are exact; alone they are the one-bucket formula, a lower bound (the
    tails' KLs are >= 0, the log-sum inequality).  On SmolLM2-135M (flat distributions, 49k
    vocabulary) with RTN int4 g128 the bucket under-reports KL by 22.6 % and reverse KL by 38.7 %
    at k = 32 (17 % / 32 % at k = 64, 3.5 % / 11 % at k = 1024): the tail matters.  The tails'
    KLs are expectations over ``p~``, with the model's exactly known ``E_p~[w] = sum_R q~ = 1``
    used as a control variate::

        KL(p~||q~) = E_p~[-log w]  = E_p~[w - 1 - log w]
        KL(q~||p~) = E_p~[w log w] = E_p~[w log w - w + 1]

    and estimated by the mean over the ``m`` samples.  The estimate is unbiased; both integrands
    are >= 0, so it never falls below the bucket's lower bound; and where the model is close to
    the original (``w`` near 1) both are ``(w - 1)^2 / 2`` to second order, so an 8-bit model's
    tail estimate is as quiet as its KL is small.  Measured against the alternatives (SmolLM2,
    k = m = 32, 4,088 positions, relative standard deviation of the run's KL over 24 seeds,
    forward / reverse): the plain means ``p_rest * mean(log p_i - log q_i)`` and
    ``p_rest * mean(q_i/p_i * log(q_i/p_i))`` give 2.5 % / 2.5 % on RTN int8 against 0.19 % /
    0.20 % here, and on RTN int4 0.13 % / 2.4 % against 0.18 % / 1.5 % (far from the original the
    control variate costs the forward direction a little); self-normalised importance weights
    (``q_rest * sum(w log w) / sum(w)``) are biased, -8.8 % on RTN int4 (a heavy-tailed sample's
    ``sum(w)`` is usually below its expectation ``m``).

    *The samples.*  Systematic sampling over ``R`` sorted most likely first: one uniform offset
    ``u`` per position (a seeded generator, ``SEED``, drawn on the CPU so every device stores the
    same tokens) and sample ``j`` is the token where the cumulative tail mass crosses
    ``(j + u) / m`` of ``p_rest``.  Every token is included with probability ``min(1, m p~_i)``
    (without replacement below that) and the ``m`` strata follow the probability scale, so the
    likely part of the tail is always covered.  Over 48 seeds on the same data, relative
    standard deviation of the run's forward / reverse KL: i.i.d. draws with replacement 0.26 % /
    5.0 % (worst 27 %), systematic in token-id order 0.21 % / 1.25 % (worst 145 % on a GPTQ
    model), systematic sorted 0.17 % / 1.33 % (worst 4.5 %).  Flatter proposals (``p^0.5``, a
    half-and-half mixture with ``p``; importance weights then) reach the improbable tail more
    often but overshoot by up to 300 % when they hit a token the model made likely: ``p`` itself
    is used.

    *What it cannot see.*  Reverse KL weighs the tokens the model makes likely.  A token the
    original finds nearly impossible and the model likely is sampled with probability about
    ``m * p~_i``: the estimate stays unbiased, but a run usually misses such tokens (and, rarely,
    over-counts one).  On SmolLM2 with GPTQ int4, two of 4,088 positions put half the model's
    mass on a token with ``p ~ 1e-5``, about 2 % of the run's reverse KL; no compact record of
    ``P`` holds it (``hidden`` does).

    *Measured* (SmolLM2-135M, k = 32), error of the run's mean KL, forward / reverse.  Median over
    48 seeds of the absolute relative error on 4,088 positions, m = 32: RTN int4 g128 0.12 % /
    1.2 %, GPTQ int4 g128 0.14 % / 2.2 %, RTN int8 g128 0.14 % / 0.14 %; m = 64 (the default):
    0.08 % / 0.92 % (90th percentile 0.18 % / 1.7 %) on RTN int4, 0.11 % / 2.0 % on GPTQ int4.
    Other splits of 64 to 96 entries (k = 16, 24 with m = 48, 40, 80) were no better.  The default
    protocol (16,352 positions, the fixed seed, ``bench/topk_reference.py``), m = 64: RTN int4
    +0.02 % / +0.12 %, GPTQ int4 -0.04 % / -1.76 %, RTN int8 +0.15 % / +0.15 % (the bucket:
    -22.9 % / -38.0 %, -25.6 % / -32.2 %, -29.2 % / -29.2 %).  Sampling noise falls as one over the
    square root of the positions scored; the reverse direction's misses on GPTQ do not.

    *What is reported.*  ``kl_rel_se``/``kl_rev_rel_se``: the standard error of the run's mean
    relative to it, from the spread of the ``m`` samples at every position (it sees only what
    was sampled: a floor for the reverse direction).  The full log-probabilities of ``audit``
    evenly spaced positions are stored too and ``kl_rel_err``/``kl_rev_rel_err`` is ``(exact -
    estimate) / exact`` summed over them: a check against the truth on those positions only, so
    it carries ``sqrt(n / audit)`` times the run's sampling noise.  Each position's estimate is
    noisy, so ``kl_p99`` (a percentile of them) is a little high: +0.8 % on 4,088 positions with
    m = 32, within 0.2 % on 16,352 with m = 64.  ``m = 0`` stores the bucket alone (the lower
    bound that format 1 stored).

Both store the baseline's per-token NLL and argmax, so its perplexity and the variants' top-1
agreement are exact either way.

Cache
-----
A reference is keyed by the model (a fingerprint of its files: names, sizes, modification times,
samples of the bytes; or a hash of the tensors of a model held in memory), the exact window
token ids (text, tokenizer, protocol and BOS rule in one hash), the compute dtype, the kind and
its settings, and the torch/transformers versions.  The file is ``<cache_dir>/<kind>-<hash>.safetensors``
(default ``cache_dir``: ``$LOWBIT_CACHE/reference`` or ``~/.cache/lowbit/reference``), written to a
temporary name and renamed, with the key and a SHA-256 of its tensors in the header; a file that
does not open, names another key, or fails the checksum is reported as corrupt (and, by
:func:`cached_reference`, recomputed and replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.core.chunks import row_slices
from lowbit import outputs
from lowbit.errors import LowbitError
from lowbit.eval.quality import QualityResult, _exp, _kl_rows, _logits, nonfinite_note
from lowbit.core.grid import all_finite  # noqa: F401 (re-exported)
from lowbit.models.files import fingerprint  # noqa: F401 (re-exported)
from lowbit.eval.streaming import head_logits

__all__ = ["KINDS", "Reference", "build_reference", "cached_reference", "default_cache_dir", "fingerprint",
           "free_bytes", "hidden_reference_bytes", "load_reference", "reference_key", "sampled_kl_rows",
           "save_reference", "score_against_reference", "tail_sample_rows"]

KINDS = ("hidden", "topk")
# File format per kind, part of the key.  topk 2: top-k + tail samples (1, the bucket alone, is stale).
FORMATS = {"hidden": 1, "topk": 2}
SEED = 0  # of the tail samples' uniform offsets (changing it is a new topk format)
_NEG_INF = float("-inf")


def default_cache_dir() -> Path:
    from lowbit.models.builtin import cache_root

    return cache_root() / "reference"


# -- the model's outputs, window by window ---------------------------------------------------------
def _is_streamed(source) -> bool:
    return not isinstance(source, nn.Module) and hasattr(source, "materialize")


def _output_layer(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise LowbitError(f"{type(model).__name__} has no output layer (get_output_embeddings) to rebuild logits from")
    return head


def _outputs(source, windows: Tensor, device, want_hidden: bool, progress: bool, stream: dict
             ) -> Iterator[tuple[Tensor | None, Tensor]]:
    """``(hidden or None, logits)`` per window: ``hidden`` is the output layer's input."""
    if _is_streamed(source):
        from lowbit.eval.streaming import StreamingForward

        yield from StreamingForward(source, windows, device=device, progress=progress, **stream)
        return
    if getattr(source, "training", False):
        raise LowbitError(f"{type(source).__name__} is in training mode; call model.eval() first")
    from tqdm import tqdm

    seen: list[Tensor] = []
    handle = None
    if want_hidden:
        handle = _output_layer(source).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            for w in tqdm(range(windows.shape[0]), desc="quality", unit="window", file=sys.stderr,
                          disable=not progress, leave=False):
                seen.clear()
                logits = _logits(source, windows[w:w + 1].to(device))
                if want_hidden and len(seen) != 1:
                    raise LowbitError(f"{type(source).__name__} called its output layer {len(seen)} times in one "
                                      "forward pass; use the topk reference")
                yield (seen[0] if want_hidden else None), logits
    finally:
        if handle is not None:
            handle.remove()


def _check_logits(logits: Tensor, ctx: int, vocab: int | None) -> None:
    if logits.dim() != 3 or logits.shape[:2] != (1, ctx):
        raise LowbitError(f"the model returned logits of shape {tuple(logits.shape)}, expected (1, {ctx}, vocab)")
    if vocab is not None and logits.shape[-1] != vocab:
        raise LowbitError(f"the model has {logits.shape[-1]} logits, the reference {vocab}")


# -- top-k + sampled tail math --------------------------------------------------------------------
_ROW_ELEMENTS = 1 << 22  # rows of [n, V] temporaries handled at a time (~32 MiB of float64)


def topk_rows(lp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids [n, k] ascending, their log-probs [n, k], log of the other tokens' mass [n])``
    from float32 log-probabilities ``lp [n, V]`` (the rest is ``-inf`` when ``k == V``)."""
    ids = lp.topk(k, dim=-1).indices.sort(dim=-1).values
    logp = lp.gather(-1, ids)
    rest = torch.logsumexp(lp.scatter(-1, ids, _NEG_INF), dim=-1)
    return ids, logp, rest


def tail_sample_rows(lp: Tensor, k: int, m: int, u: Tensor) -> dict[str, Tensor]:
    """What the ``topk`` reference stores of float32 log-probabilities ``lp [n, V]`` (module
    docstring): ``ids``/``logp`` ``[n, k]`` (the ``k`` most likely tokens, ids ascending; ties
    broken towards the lower id), ``rest [n]`` (log of the other tokens' mass), and
    ``tail_ids``/``tail_logp`` ``[n, m]``: ``m`` tokens drawn from the other tokens in proportion
    to their probability, by systematic sampling over them sorted most likely first (sample
    ``j`` is where the cumulative tail mass crosses ``(j + u) / m`` of the total, ``u [n]``
    uniform in [0, 1)).  With no tail (``k >= V``) or no mass in it, the samples are token 0 with
    log-probability ``rest``."""
    n, V = lp.shape
    k = min(k, V)
    out = {"ids": torch.empty((n, k), dtype=torch.long, device=lp.device),
           "logp": torch.empty((n, k), dtype=lp.dtype, device=lp.device),
           "rest": torch.empty(n, dtype=lp.dtype, device=lp.device),
           "tail_ids": torch.zeros((n, m), dtype=torch.long, device=lp.device),
           "tail_logp": torch.empty((n, m), dtype=lp.dtype, device=lp.device)}
    strata = torch.arange(m, dtype=torch.float64, device=lp.device)
    for rows in row_slices(n, V, _ROW_ELEMENTS):
        vals, order = lp[rows].sort(dim=-1, descending=True, stable=True)
        ids, asc = order[:, :k].sort(dim=-1)
        out["ids"][rows] = ids
        out["logp"][rows] = vals[:, :k].gather(-1, asc)
        tail = vals[:, k:]
        rest = torch.logsumexp(tail, dim=-1) if V > k else torch.full_like(vals[:, 0], _NEG_INF)
        out["rest"][rows] = rest
        if m == 0:
            continue
        if V == k:
            out["tail_logp"][rows] = rest[:, None]
            continue
        cdf = (tail.double() - rest.double()[:, None]).exp().cumsum(dim=-1)
        total = cdf[:, -1:]
        points = torch.minimum((strata[None] + u[rows].to(lp.device, torch.float64)[:, None]) / m * total,
                               torch.nextafter(total, torch.zeros_like(total)))  # < total: a token with mass
        pick = torch.searchsorted(cdf, points, right=True).clamp_(max=V - k - 1)
        ok = torch.isfinite(rest)[:, None]
        out["tail_ids"][rows] = torch.where(ok, order[:, k:].gather(-1, pick), 0)
        out["tail_logp"][rows] = torch.where(ok, tail.gather(-1, pick), rest[:, None])
        del vals, order, tail, cdf, pick
    return out


def bucket_kl_rows(ids: Tensor, logp: Tensor, rest: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """KL(P||Q) and KL(Q||P) per row (float64) with P given by :func:`topk_rows` and the rest of
    each distribution as one bucket: lower bounds of the exact values (module docstring);
    ``lq [n, V]`` the model's log-probs."""
    fwd, rev, _ = _bucket_kl_rows(ids, logp, rest, lq)
    return fwd, rev


def _bucket_kl_rows(ids: Tensor, logp: Tensor, rest: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lq_top = lq.gather(-1, ids)
    lq_rest = torch.logsumexp(lq.scatter(-1, ids, _NEG_INF), dim=-1)
    fwd = _kl_rows(logp, lq_top) + _kl_rows(rest[:, None], lq_rest[:, None])
    rev = _kl_rows(lq_top, logp) + _kl_rows(lq_rest[:, None], rest[:, None])
    return fwd, rev, lq_rest


def sampled_kl_rows(ids: Tensor, logp: Tensor, rest: Tensor, tail_ids: Tensor, tail_logp: Tensor, lq: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(fwd, rev, fwd_var, rev_var)`` per row (float64): KL(P||Q) and KL(Q||P) with P given by
    :func:`tail_sample_rows` and ``lq [n, V]`` the model's log-probs: exact on the top-k tokens,
    the bucket term for the rest plus the sampled correction (module docstring); ``*_var`` is
    the variance of the sampled part as estimated from the samples' own spread (0 with fewer
    than two samples)."""
    fwd, rev, lq_rest = _bucket_kl_rows(ids, logp, rest, lq)
    m = tail_ids.shape[-1]
    zero = torch.zeros_like(fwd)
    if m == 0:
        return fwd, rev, zero, zero
    lpr, lqr = rest.double(), lq_rest.double()
    # log w = log(q_i / q_rest) - log(p_i / p_rest): E over the tail samples of w is exactly 1
    lw = (lq.gather(-1, tail_ids).double() - lqr[:, None]) - (tail_logp.double() - lpr[:, None])
    w = lw.exp()
    g_fwd = torch.expm1(lw) - lw  # w - 1 - log w >= 0
    g_rev = torch.where(w == 0, 1.0, w * lw - torch.expm1(lw))  # w log w - w + 1 >= 0
    p_rest, q_rest = lpr.exp(), lqr.exp()
    outs = []
    for scale, g in ((p_rest, g_fwd), (q_rest, g_rev)):
        # no tail mass (k = V, or underflow): nothing to add; the bucket term already holds an
        # infinite forward KL where the model has no mass left
        none = (scale == 0) | (q_rest == 0)
        mean = torch.where(none, 0.0, scale * g.mean(dim=-1))
        var = torch.where(none, 0.0, scale.square() * g.var(dim=-1) / m) if m > 1 else zero
        outs.append((mean, var))
    return fwd + outs[0][0], rev + outs[1][0], outs[0][1], outs[1][1]


# -- the reference --------------------------------------------------------------------------------
@dataclass
class Reference:
    """What the comparison needs of the original (module docstring); ``key`` identifies it."""

    key: dict
    tensors: dict[str, Tensor]
    info: dict = field(default_factory=dict)  # softcap, head dtype, how it was computed
    path: Path | None = None

    @property
    def kind(self) -> str:
        return self.key["kind"]

    @property
    def n_windows(self) -> int:
        return int(self.key["n_windows"])

    @property
    def ctx(self) -> int:
        return int(self.key["ctx"])

    @property
    def vocab(self) -> int:
        return int(self.info["vocab"])

    def baseline_result(self) -> QualityResult:
        """The original's own row: perplexity from the stored per-token NLL (as the lockstep path sums it)."""
        nll = self.tensors["nll"].reshape(self.n_windows, self.ctx - 1)
        total = 0.0
        for w in range(self.n_windows):
            total += float(nll[w].sum(dtype=torch.float64))
        n = nll.numel()
        return QualityResult(ppl=_exp(total / n), nll=total / n, kl_mean=None, kl_p99=None, top1=None, n_tokens=n,
                             token_nll=nll.reshape(-1).numpy())

    def window_logprobs(self, w: int) -> Tensor:
        """The baseline's float32 log-probs ``[ctx-1, V]`` of window ``w`` (``hidden`` kind only)."""
        t = self.tensors  # a head stored in bf16 stays so; each call widens it for its GEMM only
        logits = head_logits(t["hidden"][w:w + 1], t["head.weight"], t.get("head.bias"), self.info.get("softcap"))
        return torch.log_softmax(logits[0, :-1].float(), dim=-1)


def reference_key(model_id: str, windows: Tensor, kind: str, *, k: int = 32, m: int = 64, audit: int = 64,
                  dtype: torch.dtype | None = torch.float32) -> dict:
    """The cache key: everything the stored numbers depend on (module docstring)."""
    import transformers

    if kind not in KINDS:
        raise LowbitError(f"reference kind must be one of {', '.join(KINDS)}, got {kind!r}")
    windows = torch.as_tensor(windows).to(torch.long).contiguous()
    key = {"format": FORMATS[kind], "kind": kind, "model": model_id, "dtype": str(dtype).removeprefix("torch."),
           "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
           "n_windows": int(windows.shape[0]), "ctx": int(windows.shape[1]),
           "torch": torch.__version__, "transformers": transformers.__version__}
    if kind == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LowbitError(f"--topk must be a positive integer, got {k!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise LowbitError(f"--tail-samples must be an integer >= 0, got {m!r}")
        if isinstance(audit, bool) or not isinstance(audit, int) or audit < 0:
            raise LowbitError(f"the number of audit positions must be >= 0, got {audit!r}")
        key.update(k=k, m=m, audit=audit)
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def hidden_reference_bytes(model: nn.Module, n_windows: int, ctx: int) -> int | None:
    """About how large a ``hidden`` reference of ``model`` on ``n_windows`` windows of ``ctx``
    would be: float32 hidden states and a float32 output layer (None when it has none)."""
    try:
        weight = _output_layer(model).weight
    except (LowbitError, AttributeError):
        return None
    if weight is None or weight.dim() != 2:
        return None
    vocab, hidden = weight.shape
    return 4 * hidden * (n_windows * ctx + vocab)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space of the file system that holds ``folder`` (or would: its nearest existing parent)."""
    import shutil

    path = Path(folder).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _positions(n: int, audit: int) -> Tensor:
    if audit == 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, n - 1, min(audit, n), dtype=torch.float64).round().long().unique()


def build_reference(source, windows: Tensor, key: dict, *, device: str | torch.device = "cpu",
                    progress: bool = True, stream: dict | None = None) -> Reference:
    """Run the original (``nn.Module`` in memory, or a lazy model streamed block by block) over
    ``windows [W, ctx]`` and keep what ``key['kind']`` needs (module docstring)."""
    kind = key["kind"]
    windows = torch.as_tensor(windows).to(torch.long)
    W, ctx = windows.shape
    if (W, ctx) != (key["n_windows"], key["ctx"]):
        raise LowbitError(f"the key is for {key['n_windows']} windows of {key['ctx']}, got {W} of {ctx}")
    n = W * (ctx - 1)
    nll = torch.empty(n, dtype=torch.float32)
    argmax = torch.empty(n, dtype=torch.int64)
    out: dict[str, Tensor] = {"nll": nll, "argmax": argmax}
    info: dict = {"streamed": _is_streamed(source)}
    audit_pos = None
    offsets = torch.Generator().manual_seed(SEED) if kind == "topk" else None
    hidden = None
    vocab = None
    for w, (h, logits) in enumerate(_outputs(source, windows, device, kind == "hidden", progress, stream or {})):
        _check_logits(logits, ctx, vocab)
        if not all_finite(logits):  # a reference of NaNs compares nothing
            note = nonfinite_note(None if _is_streamed(source) else source, windows[w:w + 1].to(device), w)
            raise LowbitError(f"the original model gives NaN/Inf logits on {note}")
        if vocab is None:
            vocab = logits.shape[-1]
            info["vocab"] = vocab
            if int(windows.max()) >= vocab:
                raise LowbitError(f"token id {int(windows.max())} is out of range for a vocabulary of {vocab} logits")
            if kind == "hidden":
                model = source.model if _is_streamed(source) else source
                head = _output_layer(model)
                weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
                if not isinstance(head, nn.Linear) or weight is None:
                    raise LowbitError(f"the output layer of {type(model).__name__} is a {type(head).__name__}, "
                                      "not a float nn.Linear; use the topk reference")
                softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
                info["softcap"] = softcap
                if not torch.equal(head_logits(h, weight, bias, softcap), logits):
                    raise LowbitError(f"the logits of {type(model).__name__} are not its output layer applied to "
                                      "that layer's input; use the topk reference")
                hidden = torch.empty((W,) + tuple(h.shape[1:]), dtype=h.dtype)
                wt = weight.detach().to("cpu")
                narrow = wt.to(torch.bfloat16)
                # bf16 holds it exactly (a bf16 checkpoint computed in float32)? Checked a slice
                # of rows at a time: a float32 copy of a 128k-vocabulary head is 2 GB.
                lossless = wt.dtype == torch.float32 and all(
                    torch.equal(narrow[r].to(wt.dtype), wt[r]) for r in row_slices(wt.shape[0], wt[0].numel()))
                info["head_dtype"] = str(wt.dtype).removeprefix("torch.")
                out["head.weight"] = narrow if lossless else wt
                del narrow
                if bias is not None:
                    out["head.bias"] = bias.detach().to("cpu")
            else:
                k, m = min(key["k"], vocab), key["m"]
                audit_pos = _positions(n, key["audit"])
                out.update(ids=torch.empty((n, k), dtype=torch.int32), logp=torch.empty((n, k), dtype=torch.float32),
                           rest=torch.empty(n, dtype=torch.float32),
                           tail_ids=torch.empty((n, m), dtype=torch.int32),
                           tail_logp=torch.empty((n, m), dtype=torch.float32), audit_pos=audit_pos,
                           audit_logp=torch.empty((audit_pos.numel(), vocab), dtype=torch.float32))
        rows = slice(w * (ctx - 1), (w + 1) * (ctx - 1))
        x = windows[w]
        pred = logits[0, :-1].float()
        argmax[rows] = pred.argmax(dim=-1).cpu()
        lp = torch.log_softmax(pred, dim=-1)
        nll[rows] = (-lp.gather(-1, x[1:].to(lp.device)[:, None]).squeeze(-1)).cpu()
        if kind == "hidden":
            hidden[w] = h[0].detach().to("cpu")
        else:
            u = torch.rand(ctx - 1, generator=offsets, dtype=torch.float64)  # on the CPU: any device, same draws
            for name, t in tail_sample_rows(lp, key["k"], key["m"], u).items():
                out[name][rows] = t.to(out[name].dtype).cpu()
            here = (audit_pos >= rows.start) & (audit_pos < rows.stop)
            if bool(here.any()):
                out["audit_logp"][here] = lp[audit_pos[here] - rows.start].cpu()
        del logits, pred, lp
    if kind == "hidden":
        out["hidden"] = hidden
    return Reference(key=key, tensors=out, info=info)


# -- scoring a model against a reference ------------------------------------------------------------
def score_against_reference(ref: Reference, source, windows: Tensor, *, device: str | torch.device = "cpu",
                            progress: bool = True, stream: dict | None = None) -> QualityResult:
    """Perplexity of ``source`` (in memory, or streamed) and its agreement with the reference's
    model, as :func:`~lowbit.eval.quality.evaluate_quality` reports them (for ``hidden``: the
    same numbers bit for bit).  With ``topk`` the KL fields are the sampled estimates,
    ``kl_rel_se``/``kl_rev_rel_se`` their estimated relative standard error over the run and
    ``kl_rel_err``/``kl_rev_rel_err`` their measured relative error on the audit positions."""
    windows = torch.as_tensor(windows).to(torch.long)
    W, ctx = windows.shape
    if (W, ctx) != (ref.n_windows, ref.ctx):
        raise LowbitError(f"the reference holds {ref.n_windows} windows of {ref.ctx} tokens, not {W} of {ctx}")
    if hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest() != ref.key["windows_sha256"]:
        raise LowbitError("the reference was computed on other tokens (text, tokenizer or protocol differ)")
    t = ref.tensors
    nll_sum, n, top1 = 0.0, 0, 0
    kls, kl_revs, nlls = [], [], []
    var = np.zeros(2)  # the sampled parts' variance, summed over positions (forward, reverse)
    audit = np.zeros(4)  # exact fwd, approx fwd, exact rev, approx rev over the audit positions
    bad = None
    for w, (_, logits) in enumerate(_outputs(source, windows, device, False, progress, stream or {})):
        _check_logits(logits, ctx, ref.vocab)
        if bad is None and not all_finite(logits):
            bad = nonfinite_note(None if _is_streamed(source) else source, windows[w:w + 1].to(device), w)
        rows = slice(w * (ctx - 1), (w + 1) * (ctx - 1))
        targets = windows[w, 1:].to(logits.device)
        pred = logits[0, :-1].float()
        amax = pred.argmax(dim=-1).cpu()
        lq = torch.log_softmax(pred, dim=-1)
        del logits, pred
        nll = -lq.gather(-1, targets[:, None]).squeeze(-1)
        nll_sum += float(nll.sum(dtype=torch.float64))
        nlls.append(nll.cpu())
        n += ctx - 1
        top1 += int((amax == t["argmax"][rows]).sum())
        if ref.kind == "hidden":
            lp = ref.window_logprobs(w).to(lq.device)
            kls.append(_kl_rows(lp, lq).cpu())
            kl_revs.append(_kl_rows(lq, lp).cpu())
            continue
        dev = lq.device
        fwd, rev, fwd_var, rev_var = sampled_kl_rows(
            t["ids"][rows].to(dev, torch.long), t["logp"][rows].to(dev), t["rest"][rows].to(dev),
            t["tail_ids"][rows].to(dev, torch.long), t["tail_logp"][rows].to(dev), lq)
        var += [float(fwd_var.sum()), float(rev_var.sum())]
        kls.append(fwd.cpu())
        kl_revs.append(rev.cpu())
        pos = t["audit_pos"]
        here = (pos >= rows.start) & (pos < rows.stop)
        if bool(here.any()):
            local = (pos[here] - rows.start).to(dev)
            lp_a = t["audit_logp"][here].to(dev)
            lq_a = lq[local]
            audit += [float(_kl_rows(lp_a, lq_a).sum()), float(fwd[local].sum()),
                      float(_kl_rows(lq_a, lp_a).sum()), float(rev[local].sum())]
    base = ref.baseline_result()
    nll_mean = nll_sum / n
    ppl = _exp(nll_mean)
    kl_all = torch.cat(kls).numpy()
    kl_rev_all = torch.cat(kl_revs).numpy()
    res = QualityResult(ppl=ppl, nll=nll_mean, kl_mean=float(kl_all.mean()), kl_p99=float(np.percentile(kl_all, 99)),
                        top1=top1 / n, n_tokens=n, delta_ppl=ppl - base.ppl, kl_rev_mean=float(kl_rev_all.mean()),
                        kl_rev_p99=float(np.percentile(kl_rev_all, 99)), token_nll=torch.cat(nlls).numpy(),
                        nonfinite=bad)
    if ref.kind == "topk":
        res.kl_rel_se = _ratio(float(np.sqrt(var[0])) / n, res.kl_mean)
        res.kl_rev_rel_se = _ratio(float(np.sqrt(var[1])) / n, res.kl_rev_mean)
    if ref.kind == "topk" and t["audit_pos"].numel():
        res.kl_rel_err = _rel(audit[0], audit[1])
        res.kl_rev_rel_err = _rel(audit[2], audit[3])
    return res


def _ratio(a: float, b: float) -> float:
    if a == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def _rel(exact: float, approx: float) -> float:
    if exact == approx:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(exact - approx) / np.float64(exact))


# -- the file --------------------------------------------------------------------------------------
def _content_sha256(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_reference(ref: Reference, path: str | os.PathLike) -> Path:
    """Write ``ref`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in ref.tensors.items()}
    meta = {"lowbit.reference": json.dumps(ref.key, sort_keys=True), "lowbit.info": json.dumps(ref.info, sort_keys=True),
            "lowbit.sha256": _content_sha256(tensors)}
    with outputs.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    ref.path = path
    return path


_REQUIRED = {"hidden": ("nll", "argmax", "hidden", "head.weight"),
             "topk": ("nll", "argmax", "ids", "logp", "rest", "tail_ids", "tail_logp", "audit_pos", "audit_logp")}


def load_reference(path: str | os.PathLike, key: dict | None = None) -> Reference:
    """Read a reference file; LowbitError naming the file if it is unreadable, for another key
    (when ``key`` is given), or its tensors do not match its checksum or its key's shapes."""
    from safetensors import safe_open

    path = Path(path).expanduser()

    def corrupt(why: str) -> LowbitError:
        return LowbitError(f"reference cache file {path} is corrupt ({why}); delete it to recompute")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise LowbitError(f"reference cache file {path} does not exist") from None
    except Exception as e:  # SafetensorError, OSError, ...
        raise corrupt(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__) from None
    try:
        stored_key = json.loads(meta["lowbit.reference"])
        info = json.loads(meta["lowbit.info"])
        checksum = meta["lowbit.sha256"]
    except (KeyError, json.JSONDecodeError, TypeError):
        raise corrupt("no lowbit reference header") from None
    if not isinstance(stored_key, dict) or stored_key.get("kind") not in FORMATS:
        raise corrupt("no lowbit reference header")
    if stored_key.get("format") != FORMATS[stored_key["kind"]]:
        raise LowbitError(f"reference cache file {path} is stale (a {stored_key['kind']} reference of format "
                          f"{stored_key.get('format')}; this lowbit writes format {FORMATS[stored_key['kind']]}); "
                          "delete it to recompute")
    if key is not None and stored_key != key:
        raise corrupt("it holds the reference for another model, text, protocol or setting")
    if _content_sha256(tensors) != checksum:
        raise corrupt("its tensors do not match their checksum")
    kind = stored_key.get("kind")
    missing = [n for n in _REQUIRED.get(kind, ("?",)) if n not in tensors]
    if missing:
        raise corrupt(f"missing {', '.join(missing)}")
    n = stored_key["n_windows"] * (stored_key["ctx"] - 1)
    if tensors["nll"].shape != (n,) or tensors["argmax"].shape != (n,):
        raise corrupt(f"expected {n} scored positions")
    if kind == "topk":
        k, m = min(stored_key["k"], int(info.get("vocab", 0))), stored_key["m"]
        shapes = {"ids": (n, k), "logp": (n, k), "rest": (n,), "tail_ids": (n, m), "tail_logp": (n, m)}
        bad = [name for name, shape in shapes.items() if tuple(tensors[name].shape) != shape]
        if bad:
            raise corrupt(f"{', '.join(bad)} do not have the shapes of its key")
    return Reference(key=stored_key, tensors=tensors, info=info, path=path)


def cached_reference(key: dict, cache_dir: str | os.PathLike | None, build: Callable[[], Reference], *,
                     on_corrupt: str = "recompute", log: Callable[[str], None] | None = None
                     ) -> tuple[Reference, bool]:
    """The reference for ``key`` from ``cache_dir`` (hit), else ``build()`` saved there (miss).

    Returns ``(reference, hit)``.  A corrupt cache file is recomputed and replaced
    (``on_corrupt="recompute"``, with a message to ``log``) or raised (``"error"``)."""
    if on_corrupt not in ("recompute", "error"):
        raise LowbitError(f"on_corrupt must be 'recompute' or 'error', got {on_corrupt!r}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{key['kind']}-{key_hash(key)}.safetensors"
    if path.is_file():
        try:
            return load_reference(path, key), True
        except LowbitError as e:
            if on_corrupt == "error":
                raise
            if log is not None:
                log(f"{e}; recomputing it")
    ref = build()
    if ref.key != key:
        raise LowbitError("the reference built does not carry the requested key")
    try:
        save_reference(ref, path)
    except OSError as e:
        raise LowbitError(f"cannot write the reference cache file {path}: {e.strerror or e}") from None
    return ref, False
