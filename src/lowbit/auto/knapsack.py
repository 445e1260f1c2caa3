"""The multiple-choice knapsack: one option per item (a tensor's format), least total cost (predicted
damage) within a budget (bytes, or microseconds of kernel time).

    sol = solve([[(cost, size), ...] for each item], budget)
    sol.choice[i]        the option taken for item i
    sol.cost, sol.size   the totals (size <= budget always)
    sol.lower_bound      a bound no solution within the budget can beat (Lagrangian dual)

Exact by dynamic programming over sizes: ``dp[b]`` = the least cost of the items so far whose sizes
add up to at most ``b`` units. Sizes are integers; when ``budget / unit`` would exceed
``max_states`` the unit grows (``unit = ceil(budget / max_states)``) and every size is rounded *up*
to whole units, so the answer always fits the true budget and is optimal among the choices whose
rounded sizes fit (with unit 1, optimal outright; the tests check it against brute force). The
Lagrangian bound ``max_λ Σ_i min_o (c_io + λ·s_io) − λ·B`` (a concave function of λ, maximised by
bisection on its slope) certifies how far from optimal a rounded answer can be: ``sol.gap``.
Cost O(items · options · budget/unit) with numpy; the choices are kept as int16 per state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lowbit.errors import LowbitError

MAX_STATES = 20_000


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]
    cost: float
    size: int
    budget: int
    unit: int
    lower_bound: float

    @property
    def gap(self) -> float:
        """cost − lower bound (≥ 0): how much better any solution within the budget could be."""
        return max(0.0, self.cost - self.lower_bound)


def _check(options: Sequence[Sequence[tuple[float, int]]], budget: int):
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise LowbitError(f"the budget must be a non-negative integer, got {budget!r}")
    if not options:
        raise LowbitError("nothing to allocate: no items")
    costs, sizes = [], []
    for i, opts in enumerate(options):
        if not opts:
            raise LowbitError(f"item {i} has no options")
        c = np.array([float(o[0]) for o in opts])
        s = np.array([o[1] for o in opts])
        if not np.isfinite(c).all():
            raise LowbitError(f"item {i} has a non-finite cost")
        if s.dtype.kind not in "iu" or (s < 0).any():
            raise LowbitError(f"item {i}: sizes must be non-negative integers")
        costs.append(c)
        sizes.append(s.astype(np.int64))
    if len(max(options, key=len)) > np.iinfo(np.int16).max:
        raise LowbitError("too many options for one item")
    return costs, sizes


def lagrangian_bound(costs: list[np.ndarray], sizes: list[np.ndarray], budget: int, iters: int = 100) -> float:
    """max over λ ≥ 0 of Σ_i min_o (c_io + λ s_io) − λ·budget: a lower bound on the optimum."""
    def value(lam):
        picks = [int(np.argmin(c + lam * s)) for c, s in zip(costs, sizes)]
        v = sum(float(c[k] + lam * s[k]) for c, s, k in zip(costs, sizes, picks)) - lam * budget
        used = sum(int(s[k]) for s, k in zip(sizes, picks))
        return v, used

    v0, used = value(0.0)
    if used <= budget:  # the unconstrained optimum fits: it is the optimum
        return v0
    lo, hi = 0.0, 1.0
    while value(hi)[1] > budget and hi < 1e30:
        hi *= 4
    best = max(v0, value(hi)[0])
    for _ in range(iters):  # the slope (used − budget) falls as λ grows
        mid = 0.5 * (lo + hi)
        v, used = value(mid)
        best = max(best, v)
        if used > budget:
            lo = mid
        else:
            hi = mid
    return best


def solve(options: Sequence[Sequence[tuple[float, int]]], budget: int, *, max_states: int = MAX_STATES) -> Solution:
    """The least-cost choice of one option per item whose sizes add up to at most ``budget``
    (module docstring). A one-line LowbitError when even the smallest options do not fit."""
    costs, sizes = _check(options, budget)
    smallest = sum(int(s.min()) for s in sizes)
    if smallest > budget:
        raise LowbitError(f"the budget {budget} is below the smallest possible total {smallest}")
    unit = max(1, math.ceil(budget / max_states))
    B = budget // unit
    units = [-(-s // unit) for s in sizes]  # rounded up: what fits in units fits in truth
    INF = np.inf
    dp = np.zeros(B + 1)  # no items: cost 0 at every capacity
    picks = np.empty((len(costs), B + 1), dtype=np.int16)
    for i, (c, u) in enumerate(zip(costs, units)):
        new = np.full(B + 1, INF)
        arg = np.full(B + 1, -1, dtype=np.int16)
        for k in range(len(c)):
            w = int(u[k])
            if w > B:
                continue
            cand = np.full(B + 1, INF)
            cand[w:] = dp[:B + 1 - w] + c[k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp, picks[i] = new, arg
    if not np.isfinite(dp[B]):
        raise LowbitError(f"no choice fits the budget {budget} once sizes are rounded up to units of {unit}; "
                          "raise max_states")
    choice = []
    b = B
    for i in range(len(costs) - 1, -1, -1):
        k = int(picks[i, b])
        choice.append(k)
        b -= int(units[i][k])
    choice.reverse()
    total_cost = float(sum(c[k] for c, k in zip(costs, choice)))
    total_size = int(sum(s[k] for s, k in zip(sizes, choice)))
    assert total_size <= budget
    return Solution(tuple(choice), total_cost, total_size, int(budget), unit,
                    min(total_cost, lagrangian_bound(costs, sizes, int(budget))))
