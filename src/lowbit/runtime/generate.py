"""Token-by-token generation on a `LeanDecoder`, with timing and streamed text.

    stats = GenerationStats()
    for tok in generate(dec, prompt_ids, max_new_tokens=64, sampling=SamplingParams(), stop_ids={eos},
                        stats=stats):
        ...
    stats.prefill_tok_s, stats.decode_tok_s

Timing: ``prefill_s`` covers the prompt's forward pass and the choice of the first token;
``decode_s`` covers every later forward pass of one token and its choice (``decode_tokens`` of
them). A generation stopped by a stop token counts the passes actually run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.sampling import SamplingParams, sample_next

__all__ = ["GenerationStats", "TextStream", "generate", "run_generation"]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0  # forward passes of one token after the prefill
    decode_s: float = 0.0
    generated: int = 0  # tokens produced (including a final stop token)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _as_ids(prompt_ids) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise LowbitError("the prompt is empty: give at least one token")
    return ids


def generate(dec: LeanDecoder, prompt_ids, max_new_tokens: int, sampling: SamplingParams | None = None,
             stop_ids: Iterable[int] = (), stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids after ``prompt_ids`` (the decoder is reset first).
    Stops after yielding a token in ``stop_ids``."""
    sampling = sampling or SamplingParams()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids = _as_ids(prompt_ids)
    need = ids.numel() + max_new_tokens - 1  # the last new token is never fed back
    if ids.numel() > dec.max_len or need > dec.max_len:
        raise LowbitError(f"prompt of {ids.numel()} tokens + {max_new_tokens} new tokens needs {need} positions; "
                          f"the maximum length is {dec.max_len}")
    stop = frozenset(int(s) for s in stop_ids)
    gen = None if sampling.greedy else sampling.generator()
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(ids.numel())
    dec.reset()
    t0 = time.perf_counter()
    history = ids.reshape(-1).tolist()
    tok = sample_next(_finite_logits(dec, dec.forward(ids), history), sampling, gen)
    stats.prefill_s = time.perf_counter() - t0
    stats.generated = 1
    yield tok
    if tok in stop:
        return
    step = torch.empty(1, dtype=torch.long)
    for _ in range(max_new_tokens - 1):
        t0 = time.perf_counter()
        step[0] = tok
        history.append(tok)
        tok = sample_next(_finite_logits(dec, dec.forward(step), history), sampling, gen)
        stats.decode_s += time.perf_counter() - t0
        stats.decode_tokens += 1
        stats.generated += 1
        yield tok
        if tok in stop:
            return


def _finite_logits(dec: LeanDecoder, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
    """``logits``, or an error saying at which position NaN/Inf appeared and in which layer. (The
    check runs in numpy for float32 CPU logits: on the calling thread, as `sample_next` does.)"""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        finite = bool(np.isfinite(logits.numpy()).all())
    else:
        finite = bool(torch.isfinite(logits).all())
    if finite:
        return logits
    from lowbit.eval.diagnose import where_nonfinite

    model = getattr(dec, "model", None)
    where = where_nonfinite(model, torch.tensor([history])) if isinstance(model, torch.nn.Module) else ""
    raise LowbitError(f"NaN/Inf logits at position {len(history) - 1} of the sequence {where}".rstrip())


class TextStream:
    """Incremental detokenization: ``push(id)`` returns the text that became final.

    Decodes a short window of recent tokens and emits only the new suffix, holding text back while
    it ends in an incomplete UTF-8 sequence (U+FFFD) — byte-level tokens can split a character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text was emitted

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def run_generation(dec: LeanDecoder, tokenizer, prompt_ids, max_new_tokens: int, sampling: SamplingParams,
                   stop_ids: Iterable[int] = (), write=None) -> tuple[list[int], GenerationStats]:
    """Generate and stream the text through ``write(str)`` as it becomes final; returns the new ids
    (stop token included) and the timing."""
    stats = GenerationStats()
    stream = TextStream(tokenizer)
    out: list[int] = []
    for tok in generate(dec, prompt_ids, max_new_tokens, sampling, stop_ids, stats):
        out.append(tok)
        piece = stream.push(tok)
        if piece and write:
            write(piece)
    tail = stream.flush()
    if tail and write:
        write(tail)
    return out, stats
