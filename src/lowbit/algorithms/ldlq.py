"""BlockLDLQ: adaptive rounding of a weight onto a vector codebook with the block-LDL feedback of
its Hessian (QuIP#, Algorithm 1). With blocks of one column and a scalar grid it is GPTQ (without
act-order), which the tests check.

The objective is GPTQ's, ``tr((W^ - W) H (W^ - W)^T)`` for ``W [out, in]`` and the layer's input
second moment ``H [in, in]``. Write ``H = P^T D P`` with ``P`` block *lower* unit-triangular
(identity ``b x b`` blocks on the diagonal) and ``D`` block diagonal (`block_ldl`). With the error
``E = W^ - W`` split into column blocks ``E_k``, the objective is::

    sum_k  F_k D_k F_k^T,    F_k = E_k + sum_{j < k} E_j P_kj^T

Quantizing the blocks in order, each ``W^_k = Q(Z_k)`` with the target
``Z_k = W_k - sum_{j<k} E_j P_kj^T`` makes ``F_k = Q(Z_k) - Z_k``: each term is exactly the
rounding error of one block, fed back from the blocks already fixed. ``Q`` rounds ``b`` columns of
every row at once (an 8-vector onto E8P for QuIP#; a scalar grid for ``b = 1``), ignoring ``D_k``'s
off-diagonal, as QuIP# does.

``H = P^T D P`` is the ordinary block LDL^T of ``H`` with the index order reversed: Cholesky of the
reversed matrix, normalised block by block, reversed back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.errors import LowbitError


def block_ldl(H: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """``(P, D)`` with ``H = P^T blockdiag(D) P``: ``P [n, n]`` block lower unit-triangular,
    ``D [n / b, b, b]`` symmetric positive definite blocks. ``H`` must be positive definite (damp
    it first) and ``n`` a multiple of ``b``."""
    n = H.shape[0]
    if H.dim() != 2 or H.shape[1] != n:
        raise LowbitError(f"H must be a square matrix, got {tuple(H.shape)}")
    if b < 1 or n % b:
        raise LowbitError(f"the block size {b} must divide the number of columns {n}")
    J = torch.arange(n - 1, -1, -1, device=H.device)
    C, info = torch.linalg.cholesky_ex(H[J][:, J])
    if int(info):
        raise LowbitError("H is not positive definite (damp it before the block LDL)")
    nb = n // b
    Ckk = torch.stack([C[k * b:(k + 1) * b, k * b:(k + 1) * b] for k in range(nb)])    # [nb, b, b] lower
    D = Ckk @ Ckk.transpose(1, 2)                                                     # Hr = L blockdiag(D) L^T
    inv = torch.linalg.solve_triangular(Ckk, torch.eye(b, dtype=H.dtype, device=H.device).expand(nb, b, b),
                                        upper=False)
    L = torch.einsum("ikb,kbc->ikc", C.view(n, nb, b), inv).reshape(n, n)  # block k of C times C_kk^-1
    for k in range(nb):  # C_kk C_kk^-1 is the identity; make it exactly that
        L[k * b:(k + 1) * b, k * b:(k + 1) * b] = torch.eye(b, dtype=H.dtype, device=H.device)
    U = L[J][:, J]                              # reversed back: block unit upper, H = U D' U^T
    Dr = D.flip(0).flip(1).flip(2)              # the blocks in reversed order, each reversed
    return U.T.contiguous(), Dr


def block_ldlq(W: Tensor, H: Tensor, quantize: Callable[[Tensor, int], Tensor], b: int) -> Tensor:
    """``W^`` [out, in]: column block ``k`` is ``quantize(Z_k, k)`` for the feedback target
    ``Z_k [out, b]`` (module docstring). ``H`` positive definite (damped)."""
    out, n = W.shape
    if H.shape != (n, n):
        raise LowbitError(f"H is {tuple(H.shape)}, the weight has {n} columns")
    P, _ = block_ldl(H, b)
    W = W.to(H.dtype)
    E = torch.zeros_like(W)
    Q = torch.empty_like(W)
    for k in range(n // b):
        sl = slice(k * b, (k + 1) * b)
        Z = W[:, sl] - E[:, :k * b] @ P[sl, :k * b].T if k else W[:, sl]
        q = quantize(Z, k)
        if q.shape != Z.shape:
            raise LowbitError(f"the block quantizer returned {tuple(q.shape)} for a {tuple(Z.shape)} block")
        Q[:, sl] = q
        E[:, sl] = q - W[:, sl]
    return Q


def proxy_loss(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """``tr((Q - W) H (Q - W)^T)``, the objective."""
    E = (Q - W).to(H.dtype)
    return float(((E @ H) * E).sum())
