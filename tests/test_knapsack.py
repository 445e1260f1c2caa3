"""The multiple-choice knapsack allocator against brute force on small random instances."""

import itertools
import random

import pytest

from lowbit.auto.knapsack import lagrangian_bound, solve
from lowbit.errors import LowbitError


def brute(options, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        size = sum(options[i][k][1] for i, k in enumerate(combo))
        if size <= budget:
            cost = sum(options[i][k][0] for i, k in enumerate(combo))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, combo)
    return best


def instance(rng, n_items, n_opts, max_size=20):
    # like formats: more bytes, less damage (with noise so that some options are dominated)
    out = []
    for _ in range(n_items):
        opts = []
        for _ in range(rng.randint(1, n_opts)):
            s = rng.randint(0, max_size)
            opts.append((rng.random() * (max_size - s + 1) + rng.random(), s))
        out.append(opts)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force(seed):
    rng = random.Random(seed)
    options = instance(rng, rng.randint(1, 6), 4)
    lo = sum(min(s for _, s in o) for o in options)
    hi = sum(max(s for _, s in o) for o in options)
    budget = rng.randint(lo, hi)
    sol = solve(options, budget)
    want_cost, _ = brute(options, budget)
    assert sol.cost == pytest.approx(want_cost, abs=1e-9)
    assert sol.unit == 1 and sol.size <= budget
    assert sol.size == sum(options[i][k][1] for i, k in enumerate(sol.choice))
    assert sol.cost == pytest.approx(sum(options[i][k][0] for i, k in enumerate(sol.choice)))
    assert sol.lower_bound <= want_cost + 1e-9 and sol.gap >= 0


@pytest.mark.parametrize("seed", range(10))
def test_rounded_units_always_fit_and_the_gap_is_certified(seed):
    rng = random.Random(100 + seed)
    options = [[(rng.random() * 10, rng.randint(1000, 50_000)) for _ in range(3)] for _ in range(5)]
    budget = sum(sorted(s for _, s in o)[1] for o in options)
    sol = solve(options, budget, max_states=50)  # units of ~ budget/50: coarse on purpose
    want_cost, _ = brute(options, budget)
    assert sol.unit > 1 and sol.size <= budget
    assert sol.cost >= want_cost - 1e-9  # feasible, so no better than the optimum
    assert sol.lower_bound <= want_cost + 1e-9  # the bound is a bound
    exact = solve(options, budget, max_states=budget)
    assert exact.cost == pytest.approx(want_cost)


def test_lagrangian_bound_is_tight_when_everything_fits():
    options = [[(1.0, 5), (0.5, 9)], [(2.0, 1), (0.1, 4)]]
    import numpy as np

    c = [np.array([o[0] for o in x]) for x in options]
    s = [np.array([o[1] for o in x]) for x in options]
    assert lagrangian_bound(c, s, 100) == pytest.approx(0.6)
    assert solve(options, 100).choice == (1, 1)


def test_bad_input():
    with pytest.raises(LowbitError, match="below the smallest"):
        solve([[(1.0, 5)], [(1.0, 5)]], 9)
    with pytest.raises(LowbitError, match="non-negative integer"):
        solve([[(1.0, 5)]], -1)
    with pytest.raises(LowbitError, match="no options"):
        solve([[]], 10)
    with pytest.raises(LowbitError, match="non-finite"):
        solve([[(float("nan"), 1)]], 10)
