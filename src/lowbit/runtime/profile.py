"""Where the time of one decoded token goes, in the lean decoder.

`ProfiledDecoder` is a `LeanDecoder` whose projections, attention, norms and rotary/cache writes
are timed with ``time.perf_counter`` around each call (the kernels may be native code that
torch's profiler cannot see, so the timing is done at the decoder's own seams). Whatever is
left — embedding lookup, residual adds, views and the Python that strings it all together — is
reported as "other". The timers add ~0.2 µs per call; compare `total` with an unprofiled run.

    rows = profile_decode(model, prompt_len=128, tokens=16)   # [(name, ms per token, share), ...]
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from lowbit.runtime.decoder import LeanDecoder

__all__ = ["ProfiledDecoder", "profile_decode"]

class ProfiledDecoder(LeanDecoder):
    def __init__(self, model, max_len=None):
        super().__init__(model, max_len, native=False)  # times the Python path's seams
        self.times: dict[str, float] = defaultdict(float)
        for L in self.layers:
            for role, path in self.family.projections.items():  # labelled by the family's names
                setattr(L, role, self._timed(getattr(L, role), f"linear {path.rpartition('.')[2]}"))
            L.act = self._timed(L.act, "activation (silu/gelu)")
        self.lm_head = self._timed(self.lm_head, "linear lm_head")

    def _timed(self, fn, label):
        times = self.times

        def wrapped(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            times[label] += time.perf_counter() - t0
            return out

        return wrapped

    def _attention(self, *a):
        t0 = time.perf_counter()
        out = super()._attention(*a)
        self.times["attention (scores, softmax, values)"] += time.perf_counter() - t0
        return out

    def _rotate_and_store(self, *a):
        t0 = time.perf_counter()
        out = super()._rotate_and_store(*a)
        self.times["rotary + KV cache write"] += time.perf_counter() - t0
        return out

    def _rms(self, *a):
        t0 = time.perf_counter()
        out = LeanDecoder._rms(*a)
        self.times["RMSNorm"] += time.perf_counter() - t0
        return out


def profile_decode(model, prompt_len: int = 128, tokens: int = 16) -> list[tuple[str, float, float]]:
    """Prefill a benchmark prompt, then time ``tokens`` decoded tokens by category.
    Returns [(category, ms per token, fraction of the total)], largest first, "other" and "total" last."""
    from lowbit.runtime.timing import bench_prompt

    dec = ProfiledDecoder(model, max_len=prompt_len + tokens + 2)
    ids = bench_prompt(dec.config.vocab_size, prompt_len)
    tok = int(dec.forward(ids).argmax())
    tok = int(dec.forward([tok]).argmax())  # one untimed decode step (warm caches)
    dec.times.clear()
    step = torch.empty(1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(tokens):
        step[0] = tok
        tok = int(dec.forward(step).argmax())
    total = time.perf_counter() - t0
    rows = sorted(((k, v) for k, v in dec.times.items()), key=lambda kv: -kv[1])
    other = total - sum(v for _, v in rows)
    out = [(k, 1000 * v / tokens, v / total) for k, v in rows]
    out.append(("other (embedding, residual adds, argmax, Python glue)", 1000 * other / tokens, other / total))
    out.append(("total", 1000 * total / tokens, 1.0))
    return out
