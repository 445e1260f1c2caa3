"""BlockLDLQ: the block LDL factorisation is exact, the feedback makes each block's term its own
rounding error, and with one-column blocks on a scalar grid it is GPTQ (no act-order) exactly."""

import pytest
import torch

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.ldlq import block_ldl, block_ldlq, proxy_loss
from lowbit.core import e8p
from lowbit.core.grid import choose_qparams, round_to_grid
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


def _problem(out=24, n=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, dtype=torch.float64, generator=g) @ torch.randn(n, n, dtype=torch.float64, generator=g)
    W = torch.randn(out, n, dtype=torch.float64, generator=g)
    H = 2 * X.T @ X / tokens
    return W, H


@pytest.mark.parametrize("b", [1, 2, 8, 16])
def test_block_ldl_is_exact(b):
    _, H = _problem()
    P, D = block_ldl(H, b)
    n = H.shape[0]
    for k in range(n // b):  # block lower unit-triangular
        assert torch.equal(P[k * b:(k + 1) * b, k * b:(k + 1) * b], torch.eye(b, dtype=H.dtype))
        assert not P[k * b:(k + 1) * b, (k + 1) * b:].any()
    torch.testing.assert_close(P.T @ torch.block_diag(*D) @ P, H, rtol=1e-10, atol=1e-9)


def test_each_term_is_the_blocks_own_rounding_error():
    W, H = _problem()
    b = 8
    scale = 0.7
    targets = []

    def q(Z, k):
        targets.append(Z.clone())
        return (e8p.decode(e8p.encode(Z / scale).long()) * scale).to(Z.dtype)

    Q = block_ldlq(W, H, q, b)
    P, D = block_ldl(H, b)
    F = (Q - W) @ P.T  # column block k = E_k + sum_{j<k} E_j P_kj^T
    want = sum(float(((F[:, k * b:(k + 1) * b] @ D[k]) * F[:, k * b:(k + 1) * b]).sum()) for k in range(len(D)))
    assert proxy_loss(W, Q, H) == pytest.approx(want, rel=1e-9)
    for k, Z in enumerate(targets):
        torch.testing.assert_close(F[:, k * b:(k + 1) * b], Q[:, k * b:(k + 1) * b] - Z, rtol=0, atol=1e-9)
    # adaptive rounding beats rounding each block alone
    plain = torch.cat([q(W[:, k * b:(k + 1) * b], k) for k in range(W.shape[1] // b)], dim=1)
    assert proxy_loss(W, Q, H) < proxy_loss(W, plain, H)


def test_one_column_blocks_on_a_scalar_grid_are_gptq():
    W, H = _problem(out=32, n=96, seed=3)
    scheme = QuantScheme(bits=4, symmetric=True, granularity="channel", group_size=None)
    fmt, info = gptq_quantize(W, H, GPTQConfig(scheme=scheme, act_order=False, damp=0.01), dtype=torch.float64)
    s, z = choose_qparams(W, scheme)
    Hd = H + info["lambda"] * torch.eye(H.shape[0], dtype=H.dtype)
    Q = block_ldlq(W, Hd, lambda Zk, k: round_to_grid(Zk, s.to(Zk), None, scheme)[1], 1)
    got = fmt.dequantize().double()
    assert (torch.isclose(got, Q, rtol=0, atol=1e-9).float().mean()) > 0.999
    assert proxy_loss(W, Q, H) == pytest.approx(info["error"], rel=1e-6)


def test_bad_input():
    W, H = _problem()
    with pytest.raises(LowbitError, match="must divide"):
        block_ldl(H, 7)
    with pytest.raises(LowbitError, match="positive definite"):
        block_ldl(-H, 8)
