"""Prefill/decode speed of the lean decoder, with the same protocol as `lowbit.eval.latency`.

* Prompt: ``prompt_len`` ids drawn uniformly from ``[0, vocab)`` with
  ``torch.Generator().manual_seed(0)`` (identical to `lowbit.eval.latency`'s, so the two can be
  compared side by side), batch 1.
* One run = reset the cache, prefill the prompt and choose the first token greedily (prefill),
  then ``new_tokens`` passes of one token each, each followed by its greedy choice (decode).
  No stop token: every run does exactly the same work.
* ``warmup`` runs discarded, medians of ``repeats`` timed runs reported.
"""

from __future__ import annotations

import statistics

import torch

from lowbit.errors import LowbitError
from lowbit.eval.latency import LatencyResult
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.generate import GenerationStats, generate

__all__ = ["bench_prompt", "measure_lean"]


def bench_prompt(vocab_size: int, prompt_len: int) -> torch.Tensor:
    """The benchmark prompt: [prompt_len] ids, the same draw as `lowbit.eval.latency`."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, prompt_len), generator=gen)[0]


def measure_lean(dec: LeanDecoder, prompt_len: int = 128, new_tokens: int = 64, warmup: int = 1,
                 repeats: int = 3) -> LatencyResult:
    for label, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1),
                              ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LowbitError(f"{label} must be an integer >= {low}, got {value!r}")
    if prompt_len + new_tokens > dec.max_len:
        raise LowbitError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the decoder's max length "
                          f"{dec.max_len}")
    prompt = bench_prompt(dec.config.vocab_size, prompt_len)

    def one_run() -> GenerationStats:
        st = GenerationStats()
        for _ in generate(dec, prompt, new_tokens + 1, stats=st):  # 1 token from prefill + new_tokens decoded
            pass
        return st

    for _ in range(warmup):
        one_run()
    runs = [one_run() for _ in range(repeats)]
    prefill_s = statistics.median(r.prefill_s for r in runs)
    decode_s = statistics.median(r.decode_s for r in runs)
    return LatencyResult(
        prefill_tok_s=prompt_len / prefill_s,
        prefill_ms=1000.0 * prefill_s,
        decode_tok_s=new_tokens / decode_s,
        decode_ms_per_token=1000.0 * decode_s / new_tokens,
        prompt_len=prompt_len,
        decode_tokens=new_tokens,
        repeats=repeats,
        threads=torch.get_num_threads(),
        device=str(dec.device),
    )
