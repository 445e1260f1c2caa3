"""Prefill and decode speed of a causal LM, using the model's own KV cache.

Protocol
--------
* The prompt is ``prompt_len`` ids drawn uniformly from ``[0, vocab_size)`` with a fixed seed
  (``torch.Generator().manual_seed(0)``); content does not change the cost of a dense model.
* One *run* = a fresh transformers ``DynamicCache``, then

  - **prefill**: one forward pass over the whole prompt (``use_cache=True``) plus the argmax of
    the last position's logits (the first generated token);
  - **decode**: ``decode_tokens`` forward passes of one token each (the previous greedy token),
    each followed by the argmax of its logits.  The cache grows from ``prompt_len`` to
    ``prompt_len + decode_tokens``.

* ``warmup`` runs are discarded, then ``repeats`` runs are timed with ``time.perf_counter``
  (on CUDA with ``torch.cuda.synchronize`` before reading the clock).  Everything runs under
  ``torch.inference_mode``.  Reported numbers are medians over the timed runs:
  ``prefill_ms`` (whole prompt), ``prefill_tok_s = prompt_len / prefill seconds``,
  ``decode_ms_per_token = decode time / decode_tokens``, ``decode_tok_s = 1000 /
  decode_ms_per_token``.  Batch size 1, whatever ``torch.get_num_threads()`` is (recorded).

The model must already be on ``device`` and in eval mode.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["LatencyResult", "measure_latency"]


@dataclass
class LatencyResult:
    """Median prefill/decode speed; see the module docstring for exactly what is timed."""

    prefill_tok_s: float
    prefill_ms: float
    decode_tok_s: float
    decode_ms_per_token: float
    prompt_len: int = 0
    decode_tokens: int = 0
    repeats: int = 0
    threads: int = 0
    device: str = "cpu"


def _cache_kwarg(model: nn.Module) -> str:
    """Newer transformers 5.x call the cache argument ``cache``, older ones ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise LowbitError(f"{type(model).__name__}.forward takes no KV-cache argument (cache / past_key_values)")


def _new_cache(model: nn.Module):
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # older signature without config
        return DynamicCache()


def measure_latency(
    model: nn.Module,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    vocab_size: int | None = None,
    warmup: int = 1,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> LatencyResult:
    """Median prefill and greedy-decode speed of ``model`` (a transformers causal LM).

    ``vocab_size`` defaults to ``model.config.vocab_size``; prompt ids are drawn below it.
    """
    for label, value, low in (("prompt_len", prompt_len, 1), ("decode_tokens", decode_tokens, 1),
                              ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LowbitError(f"{label} must be an integer >= {low}, got {value!r}")
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is None:
            raise LowbitError(f"cannot tell the vocabulary size of {type(model).__name__}; pass vocab_size")
    if vocab_size < 1:
        raise LowbitError(f"vocab_size must be positive, got {vocab_size}")
    device = torch.device(device)
    cache_kw = _cache_kwarg(model)
    on_cuda = device.type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=gen).to(device)

    def one_run() -> tuple[float, float]:
        cache = _new_cache(model)
        sync()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
        sync()
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(nxt, use_cache=True, **{cache_kw: cache})
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
        seen = cache.get_seq_length()
        if seen != prompt_len + decode_tokens:  # the cache was not used as we think
            raise LowbitError(f"KV cache holds {seen} positions after the run, expected {prompt_len + decode_tokens}")
        return t1 - t0, t2 - t1

    with torch.inference_mode():
        for _ in range(warmup):
            one_run()
        timings = [one_run() for _ in range(repeats)]

    prefill_s = statistics.median(t[0] for t in timings)
    decode_s = statistics.median(t[1] for t in timings)
    decode_ms = 1000.0 * decode_s / decode_tokens
    return LatencyResult(
        prefill_tok_s=prompt_len / prefill_s,
        prefill_ms=1000.0 * prefill_s,
        decode_tok_s=1000.0 / decode_ms,
        decode_ms_per_token=decode_ms,
        prompt_len=prompt_len,
        decode_tokens=decode_tokens,
        repeats=repeats,
        threads=torch.get_num_threads(),
        device=str(device),
    )
