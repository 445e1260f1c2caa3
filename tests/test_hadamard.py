"""Hadamard matrices of every size lowbit factorises, applied fast, and incoherence processing:
exact orthogonality, the fast transform equal to the dense matrix, round trips, and the layer
computing the same output through the transformed weight."""

import math

import pytest
import torch

from lowbit.core.hadamard import (
    Incoherence,
    fast_hadamard,
    fwht,
    hadamard_factors,
    hadamard_matrix,
    transform_for,
)
from lowbit.errors import LowbitError

# powers of two, the Paley bases, and the widths of SmolLM2 (576, 1536), Gemma-3-270M (640),
# Llama (2048), Qwen2.5-7B (3584, 18944)
SIZES = [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 64, 148, 576, 640, 1536, 2048, 3584]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_is_exactly_orthogonal(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and set(H.unique().tolist()) <= {-1, 1}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64))


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_the_dense_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want = x @ hadamard_matrix(n).to(torch.float64).T / math.sqrt(n)
    torch.testing.assert_close(fast_hadamard(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_hadamard(x, normalize=False), want * math.sqrt(n), rtol=0, atol=1e-9)


def test_the_factorisations_of_model_widths():
    assert hadamard_factors(576) == (36, 16)      # Paley II, q = 17
    assert hadamard_factors(1536) == (12, 128)    # Paley I, q = 11
    assert hadamard_factors(640) == (20, 32)      # Paley I, q = 19
    assert hadamard_factors(3584) == (28, 128)    # Paley II, q = 13
    assert hadamard_factors(18944) == (148, 128)  # Paley II, q = 73
    assert hadamard_factors(4096) == (1, 4096)
    assert hadamard_factors(7 * 64) == (28, 16)
    assert hadamard_factors(21) is None and hadamard_factors(6) is None and hadamard_factors(10) is None
    with pytest.raises(LowbitError, match="no Hadamard matrix of order 21"):
        hadamard_matrix(21)


def test_fwht_needs_a_power_of_two():
    with pytest.raises(LowbitError, match="power-of-two"):
        fwht(torch.zeros(12))
    x = torch.randn(16, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(x)), 16 * x)


@pytest.mark.parametrize("n,kind", [(576, "hadamard"), (64, "hadamard"), (21, "orthogonal"), (10, "orthogonal")])
def test_randomized_transforms_are_orthogonal_and_invert(n, kind):
    T = transform_for(n, seed=7)
    assert T.kind == kind
    M = T.matrix().double()
    torch.testing.assert_close(M @ M.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-5)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(T.apply(x), x @ M.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(T.apply_t(x), x @ M, rtol=0, atol=1e-5)
    torch.testing.assert_close(T.apply_t(T.apply(x)), x, rtol=0, atol=1e-10 if kind == "hadamard" else 1e-5)
    assert torch.equal(transform_for(n, 7).matrix(), T.matrix())  # the seed rebuilds it
    assert not torch.equal(transform_for(n, 8).matrix(), T.matrix())


def test_incoherence_keeps_the_layer_and_spreads_outliers():
    g = torch.Generator().manual_seed(0)
    out, inp = 640, 576
    W = torch.randn(out, inp, dtype=torch.float64, generator=g) * 0.02
    W[3, 5] = 5.0  # an outlier weight
    X = torch.randn(32, inp, dtype=torch.float64, generator=g)
    X[:, 9] *= 40  # an outlier input channel
    inc = Incoherence.for_shape(out, inp, seed=11)
    Wt = inc.weight(W)
    # the same layer: W x = U^T W~ (V x)
    torch.testing.assert_close(inc.output(inc.input(X) @ Wt.T), X @ W.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(inc.unweight(Wt), W, rtol=0, atol=1e-12)
    H = X.T @ X
    torch.testing.assert_close(inc.hessian(H), inc.input(X).T @ inc.input(X), rtol=1e-10, atol=1e-8)
    # incoherence: the largest entry relative to the RMS drops by far
    def mu(A):
        return float(A.abs().max() / A.pow(2).mean().sqrt())
    assert mu(Wt) < mu(W) / 10
    Ht = inc.hessian(H)
    assert float(Ht.diagonal().max() / Ht.diagonal().mean()) < float(H.diagonal().max() / H.diagonal().mean()) / 5
