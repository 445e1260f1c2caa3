"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The filters follow the usual order and meaning (as in transformers' logits processors):

1. ``temperature`` T: logits / T. ``T == 0`` means greedy (argmax; ties go to the lowest id).
2. ``top_k`` k > 0: keep the tokens whose logit is >= the k-th largest (ties at the boundary kept).
3. ``top_p`` p < 1 (nucleus): sort by probability, keep the smallest prefix whose mass reaches p,
   i.e. token i (in descending order) is kept iff the mass strictly before it is < p; the most
   likely token is always kept.

Then one token is drawn from the renormalised distribution with ``torch.multinomial`` and the
caller's ``torch.Generator`` (seeded once per generation), so a seed fixes the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError

__all__ = ["SamplingParams", "filtered_logits", "sample_next"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0 or t == float("inf"):
            raise LowbitError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise LowbitError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise LowbitError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LowbitError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def filtered_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """float32 [vocab] logits after temperature, top-k and top-p (removed tokens at -inf)."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(x, dim=-1), descending=True)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each sorted token
        drop = before >= params.top_p
        drop[0] = False
        x = x.index_put((order[drop],), torch.tensor(float("-inf")))
    return x


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token id for logits [vocab]."""
    if params.greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
            # numpy's argmax runs on the calling thread (same first-maximum rule): torch's splits a
            # large vocabulary over the thread pool, and with another process on a core that one
            # parallel region per token halved 1-thread decode (bench/shared_core.py)
            return int(logits.numpy().argmax())
        return int(torch.argmax(logits))
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
