"""E8P: QuIP#'s 2-bit lattice codebook of 8-dimensional vectors (65,536 points of ``E8 + 1/4``).

The E8 lattice is ``D8 u (D8 + 1/2)``, ``D8`` the integer vectors with an even sum; it is the
densest packing of 8-dimensional space, so its points near the origin quantize a Gaussian-like
8-vector (what an incoherence-processed weight row looks like) with less error than any
scalar grid of the same rate. E8P takes 2^16 of them, 16 bits per 8 weights = 2 bits/weight:

* 256 **absolute patterns** ``a`` (all coordinates positive half-integers): the 227 distinct
  ``|x|`` of the points ``x`` of ``D8 + 1/2`` with ``|x|^2 <= 10``, and 29 of the 56 patterns of
  norm 12 (five 3/2 and three 1/2; lowbit takes those whose three 1/2 positions come first
  when the 56 are ordered by position balance, see `_norm12`; the reference implementation pads
  with another 29, so codes are not interchangeable with its files);
* **signs**: 7 free, the eighth fixed by the parity rule (flipping one coordinate of a
  half-integer vector changes its sum by an odd number, so exactly one choice of the last sign
  puts ``s * a`` in ``D8 + 1/2``, i.e. gives it an even sum);
* a **shift** of ``+1/4`` or ``-1/4`` on every coordinate (``E8 - 1/4 = E8 + 1/4`` since the
  all-1/2 vector is in E8, so all 2^16 points lie in ``E8 + 1/4``; no two coincide).

A code is 16 bits: bits 0-7 the pattern, bits 8-14 the signs of coordinates 0-6 (set = negative),
bit 15 the shift (set = -1/4).

Nearest point (`encode`) is exact and cheap: for each shift and pattern the best signs are those
of the target, with the cheapest single flip when the parity rule forbids them, so 512
candidates per vector are scored instead of 65,536 (tested against the brute-force argmin).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

from lowbit.errors import LowbitError

DIM = 8
CODES = 1 << 16


@lru_cache(maxsize=1)
def _norm12() -> list[tuple[int, ...]]:
    """29 of the 56 triples of positions that hold the 1/2s in a norm-12 pattern: taken in an
    order that keeps every position's count as even as possible (each next triple is the one,
    lexicographically first among ties, whose positions have been used least so far)."""
    triples = list(itertools.combinations(range(DIM), 3))
    used = [0] * DIM
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < 29:
        best = min((t for t in triples if t not in chosen), key=lambda t: (sum(used[i] for i in t), t))
        chosen.append(best)
        for i in best:
            used[i] += 1
    return chosen


@lru_cache(maxsize=1)
def abs_patterns() -> Tensor:
    """The 256 absolute patterns [256, 8] float32 (module docstring), norm <= 10 ones first in
    lexicographic order, then the 29 of norm 12."""
    half = torch.tensor([0.5, 1.5, 2.5, 3.5])
    pats = set()
    for a in itertools.product(range(4), repeat=DIM):
        v = half[list(a)]
        if float((v * v).sum()) > 10:
            continue
        # some sign choice gives an even sum: flipping signs changes the sum's parity freely
        # (each flip by an odd amount), so every |x| of D8 + 1/2 within the ball is reachable
        pats.add(tuple(float(t) for t in v))
    small = sorted(pats)
    big = []
    for t in _norm12():
        big.append(tuple(0.5 if i in t else 1.5 for i in range(DIM)))
    out = torch.tensor(small + big, dtype=torch.float32)
    if out.shape != (256, DIM):
        raise LowbitError(f"internal: E8P has {out.shape[0]} absolute patterns, not 256")
    return out


def decode(codes: Tensor) -> Tensor:
    """Codes (any integer tensor, values 0..65535) -> points [..., 8] float32."""
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= CODES):
        raise LowbitError("E8P codes must lie in 0..65535")
    a = abs_patterns().to(codes.device)[codes & 255]                   # [..., 8] (on the codes' device)
    bits = (codes[..., None] >> (8 + torch.arange(DIM - 1, device=codes.device))) & 1  # [..., 7]
    s = 1.0 - 2.0 * bits.to(torch.float32)
    partial = (s * a[..., :-1]).sum(-1) + a[..., -1]                   # with the last sign +
    last = torch.where(torch.remainder(partial, 2) == 0, 1.0, -1.0)
    x = torch.cat([s * a[..., :-1], (last * a[..., -1])[..., None]], dim=-1)
    shift = torch.where((codes >> 15) & 1 == 1, -0.25, 0.25)
    return x + shift[..., None]


@lru_cache(maxsize=1)
def codebook() -> Tensor:
    """All 65,536 points [65536, 8] float32, row i = decode(i)."""
    return decode(torch.arange(CODES))


def encode(y: Tensor, chunk: int = 4096) -> Tensor:
    """The code of the nearest E8P point (Euclidean) to each row of ``y [N, 8]``; int32 [N].
    Rows are done ``chunk`` at a time (a [chunk, 256, 8] temporary)."""
    if y.dim() != 2 or y.shape[1] != DIM:
        raise LowbitError(f"E8P encodes [N, 8] vectors, got {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise LowbitError("E8P cannot encode NaN/Inf values")
    y = y.to(torch.float32)
    return torch.cat([_encode(y[i:i + chunk]) for i in range(0, y.shape[0], chunk)]) if y.shape[0] else \
        torch.zeros(0, dtype=torch.int32)


def _encode(y: Tensor) -> Tensor:
    A = abs_patterns()                                                  # [256, 8]
    best_d = torch.full((y.shape[0],), float("inf"))
    best_code = torch.zeros(y.shape[0], dtype=torch.int64)
    for shift_bit, shift in ((0, 0.25), (1, -0.25)):
        t = y - shift                                                   # target for s * a
        sign_neg = t < 0                                                # [N, 8] the unconstrained best signs
        mag = t.abs()
        # distance with the best signs: |t|^2 - 2 sum |t_i| a_i + |a|^2, per pattern
        gain = mag @ A.T                                                # [N, 256]
        dist = (mag * mag).sum(1, keepdim=True) - 2 * gain + (A * A).sum(1)[None, :]
        # the parity rule: with those signs, is sum(s * a) even? sum(s*a) = sum(a) - 2 sum_{neg} a
        neg_sum = sign_neg.to(torch.float32) @ A.T                      # [N, 256]
        total = A.sum(1)[None, :] - 2 * neg_sum
        bad = torch.remainder(total, 2) != 0
        # else flip the coordinate where it costs least: 4 |t_i| a_i
        cost = 4 * (mag[:, None, :] * A[None, :, :])                    # [N, 256, 8]
        flip_cost, flip_at = cost.min(dim=2)
        dist = torch.where(bad, dist + flip_cost, dist)
        d, p = dist.min(dim=1)                                          # best pattern per row
        neg = sign_neg.clone()
        rows = torch.arange(y.shape[0])
        fix = bad[rows, p]
        at = flip_at[rows, p]
        neg[rows[fix], at[fix]] = ~neg[rows[fix], at[fix]]
        bits = (neg[:, : DIM - 1].to(torch.int64) << (8 + torch.arange(DIM - 1))).sum(1)
        code = p.to(torch.int64) | bits | (shift_bit << 15)
        take = d < best_d
        best_d = torch.where(take, d, best_d)
        best_code = torch.where(take, code, best_code)
    return best_code.to(torch.int32)
