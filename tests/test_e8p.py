"""E8P, QuIP#'s 2-bit lattice codebook: 256 absolute patterns, 2^16 distinct points of E8 + 1/4,
and an exact nearest-point encoder (equal to the brute-force search over all 65,536 points)."""

import pytest
import torch

from lowbit.core import e8p
from lowbit.errors import LowbitError


def test_absolute_patterns():
    A = e8p.abs_patterns()
    assert A.shape == (256, 8) and len({tuple(r) for r in A.tolist()}) == 256
    norms = (A * A).sum(1)
    assert bool((norms[:227] <= 10).all()) and bool((norms[227:] == 12).all())
    assert bool(((A * 2) % 2 == 1).all())  # positive half-integers
    # every pattern of norm <= 10 is there: 1 + 8 + 28 + 56 + 70 (1/2s and 3/2s) + 8 + 56 (one 5/2)
    assert sorted(A[227:].eq(0.5).sum(1).tolist()) == [3] * 29


def test_codebook_is_2_16_distinct_points_of_e8_plus_a_quarter():
    C = e8p.codebook().double()
    assert C.shape == (65536, 8)
    assert torch.unique(C, dim=0).shape[0] == 65536
    x = C - 0.25  # in E8: all integers or all half-integers, with an even sum
    frac = torch.remainder(x, 1)
    whole = (frac == 0).all(1)
    half = (frac == 0.5).all(1)
    assert bool((whole | half).all())
    assert bool((torch.remainder(x.sum(1), 2) == 0).all())
    assert torch.equal(e8p.decode(torch.tensor([0, 65535, 12345])), e8p.codebook()[[0, 65535, 12345]])


def test_encode_is_the_nearest_point():
    g = torch.Generator().manual_seed(0)
    C = e8p.codebook()
    for scale in (0.5, 1.0, 1.6, 3.0):
        y = torch.randn(700, 8, generator=g) * scale
        codes = e8p.encode(y, chunk=256)
        got = (e8p.decode(codes) - y).pow(2).sum(1)
        best = torch.cdist(y.double(), C.double()).pow(2).min(1).values
        torch.testing.assert_close(got.double(), best, rtol=0, atol=1e-4)
    idx = torch.randint(0, 65536, (1000,), generator=g)
    assert torch.equal(e8p.encode(C[idx]).long(), idx)  # every point encodes to itself


def test_bad_input():
    with pytest.raises(LowbitError, match=r"\[N, 8\]"):
        e8p.encode(torch.zeros(3, 7))
    with pytest.raises(LowbitError, match="NaN/Inf"):
        e8p.encode(torch.full((2, 8), float("nan")))
    with pytest.raises(LowbitError, match="0..65535"):
        e8p.decode(torch.tensor([65536]))
