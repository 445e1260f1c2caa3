"""Hadamard transforms of any size a model has, applied fast, and the randomized orthogonal
transforms of incoherence processing (QuIP / QuIP#).

Incoherence processing multiplies a weight ``W [out, in]`` on both sides by random orthogonal
matrices, ``W~ = U W V^T``, and its Hessian by the input side's, ``H~ = V H V^T``: the outliers
of ``W`` and of ``H``'s diagonal are spread over every entry, so a grid (or a lattice codebook)
that is fitted to the bulk loses little on them. The layer then computes ``W x = U^T W~ (V x)``:
``V`` is applied to the activation, ``U^T`` to the output, both in ``O(n log n)``.

The transforms are ``T = H_n D / sqrt(n)``: ``D`` a diagonal of random signs drawn from a stored
seed and ``H_n`` a Hadamard matrix (entries +-1, ``H H^T = n I``). ``H_n`` exists for the sizes
models use when ``n = b * 2^r`` for a base ``b`` with a known construction:

* Sylvester: ``b = 1`` (``H_2m = [[H, H], [H, -H]]``), applied by the fast Walsh-Hadamard
  butterfly (``r`` passes of additions);
* Paley I: ``b = q + 1`` for a prime ``q = 3 (mod 4)`` (12, 20, 24, 44, 60, ...);
* Paley II: ``b = 2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (28, 36, 60, 108, 148, ...);

and ``H_n = H_b (x) H_{2^r}`` (Kronecker product), applied as the butterfly over the ``2^r``
axis and a small dense ``b x b`` product over the other. SmolLM2: 576 = 36 x 16, 1536 = 12 x 128;
Gemma-3-270M: 640 = 20 x 32; Qwen2.5-7B: 3584 = 28 x 128, 18944 = 148 x 128. A size with no such
factorisation falls back to a random orthogonal matrix (QR of a seeded Gaussian), which must be
stored with the weights (``Transform.kind == "orthogonal"``) and costs a dense product.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from lowbit.errors import LowbitError

_MAX_BASE = 512  # largest non-power-of-two base searched (a b x b dense product per application)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q (chi(0) = 0)."""
    chi = torch.zeros(q, dtype=torch.int64)
    for a in range(1, q):
        chi[a] = 1 if pow(a, (q - 1) // 2, q) == 1 else -1
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> Tensor:
    """Order q + 1, q = 3 (mod 4) prime: I + [[0, 1^T], [-1, Q]] (Q antisymmetric)."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> Tensor:
    """Order 2 (q + 1), q = 1 (mod 4) prime: the symmetric conference matrix C = [[0, 1^T], [1, Q]]
    expanded as C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]."""
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]])
    b = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def _base_construction(b: int) -> str | None:
    if b & (b - 1) == 0:
        return "sylvester"
    if b % 4 == 0 and _is_prime(b - 1) and (b - 1) % 4 == 3:
        return "paley1"
    if b % 4 == 0 and _is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(b, 2^r)`` with ``b * 2^r == n`` and ``H_b`` constructible (the smallest such ``b``), or
    None when ``n`` has no factorisation lowbit can build."""
    if not isinstance(n, int) or n < 1:
        raise LowbitError(f"a Hadamard size must be a positive integer, got {n!r}")
    k = (n & -n).bit_length() - 1  # n = m * 2^k, m odd
    m = n >> k
    for j in range(k + 1):
        b = m << j
        if b > _MAX_BASE and m != 1:
            break
        if _base_construction(b) is not None:
            return b, n // b
    return None


@lru_cache(maxsize=64)
def _base_matrix(b: int) -> Tensor:
    kind = _base_construction(b)
    if kind == "sylvester":
        H = torch.ones(1, 1, dtype=torch.int64)
        while H.shape[0] < b:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        return H
    if kind == "paley1":
        return _paley1(b - 1)
    if kind == "paley2":
        return _paley2(b // 2 - 1)
    raise LowbitError(f"no Hadamard construction for order {b}")


def hadamard_matrix(n: int) -> Tensor:
    """The +-1 Hadamard matrix ``H_b (x) H_{2^r}`` of order ``n`` (int64, dense: for tests and
    small sizes; `fast_hadamard` applies it without building it)."""
    f = hadamard_factors(n)
    if f is None:
        raise LowbitError(f"no Hadamard matrix of order {n} can be built (it must be b * 2^r with a Paley base b)")
    b, p = f
    return torch.kron(_base_matrix(b), _base_matrix(p) if p > 1 else torch.ones(1, 1, dtype=torch.int64))


def fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) along the last dimension, whose
    size must be a power of two: ``x @ H^T`` in ``log2(n)`` butterfly passes."""
    n = x.shape[-1]
    if n & (n - 1):
        raise LowbitError(f"the fast Walsh-Hadamard transform needs a power-of-two size, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def fast_hadamard(x: Tensor, normalize: bool = True, transpose: bool = False) -> Tensor:
    """``x @ H_n^T`` along the last dimension (``x @ H_n`` with ``transpose``; ``/ sqrt(n)`` with
    ``normalize``, making it orthonormal), with ``H_n = H_b (x) H_{2^r}``: the butterfly over the
    ``2^r`` axis (Sylvester's matrix is symmetric), a dense ``b x b`` product over the other.
    Never the dense ``n x n`` matrix."""
    n = x.shape[-1]
    f = hadamard_factors(n)
    if f is None:
        raise LowbitError(f"no Hadamard transform of size {n}")
    b, p = f
    y = x.reshape(*x.shape[:-1], b, p)
    if p > 1:
        y = fwht(y)
    if b > 1:
        Hb = _base_matrix(b).to(dtype=x.dtype, device=x.device)
        y = torch.matmul(Hb.T if transpose else Hb, y)  # [b, b] @ [..., b, p]: row i is sum_j H[i, j] y_j
    y = y.reshape(x.shape)
    return y / math.sqrt(n) if normalize else y


@dataclass(frozen=True)
class Transform:
    """An orthogonal ``T = M D`` [n, n]: ``M`` is ``H_n / sqrt(n)`` (kind "hadamard") or a random
    orthogonal matrix (kind "orthogonal", a QR of a Gaussian from ``seed``; stored with the weights
    as ``dense`` since rebuilding it costs an n x n QR), and ``D`` a diagonal: the random signs
    from ``seed`` for the Hadamard kind, the identity for the orthogonal kind, unless ``diag``
    gives it (QuIP#'s fine-tuning makes the signs continuous; ``T`` is then no longer exactly
    orthogonal, and the inverse below applies its transpose)."""

    n: int
    seed: int
    kind: str
    diag: Tensor | None = field(default=None, compare=False, repr=False)    # [n] replaces D
    dense: Tensor | None = field(default=None, compare=False, repr=False)   # [n, n] the stored M (orthogonal)

    def signs(self) -> Tensor:
        """The random signs the seed gives (``D`` of the Hadamard kind unless ``diag`` replaces it)."""
        g = torch.Generator().manual_seed(int(self.seed))
        return torch.randint(0, 2, (self.n,), generator=g, dtype=torch.int64).mul(2).sub(1).to(torch.float32)

    def diagonal(self) -> Tensor | None:
        """``D`` [n] float32, or None for the identity."""
        if self.diag is not None:
            return self.diag.to(torch.float32)
        return self.signs() if self.kind == "hadamard" else None

    def base(self) -> Tensor:
        """``M`` dense, float32: the stored matrix, or the one the seed gives."""
        if self.kind == "hadamard":
            return hadamard_matrix(self.n).to(torch.float32) / math.sqrt(self.n)
        if self.dense is not None:
            return self.dense.to(torch.float32)
        g = torch.Generator().manual_seed(int(self.seed))
        A = torch.randn(self.n, self.n, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(A)
        return (Q * torch.sign(torch.diagonal(R))[None, :]).to(torch.float32)  # Haar-distributed

    def matrix(self) -> Tensor:
        """``T`` dense, float32 (for tests and references)."""
        d = self.diagonal()
        M = self.base()
        return M if d is None else M * d[None, :]

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.n:
            raise LowbitError(f"the transform is of size {self.n}, the input's last dimension {x.shape[-1]}")

    def apply(self, x: Tensor) -> Tensor:
        """``x @ T^T`` along the last dimension (``T`` applied to each row vector of ``x``)."""
        self._check(x)
        d = self.diagonal()
        if d is not None:
            x = x * d.to(x.device, x.dtype)
        if self.kind == "hadamard":
            return fast_hadamard(x)
        return x @ self.base().to(x.device, x.dtype).T

    def apply_t(self, x: Tensor) -> Tensor:
        """``x @ T`` (``T^T`` applied to each row vector: the inverse while ``D`` is signs)."""
        self._check(x)
        y = fast_hadamard(x, transpose=True) if self.kind == "hadamard" else x @ self.base().to(x.device, x.dtype)
        d = self.diagonal()
        return y if d is None else y * d.to(x.device, x.dtype)


def layer_seed(seed: int, layer_name: str) -> int:
    """A layer's transform seed from a run's ``seed`` and the layer's name: stable across runs and
    processes (not Python's salted hash)."""
    return (seed << 32) | zlib.crc32(layer_name.encode())


def transform_for(n: int, seed: int) -> Transform:
    """The randomized Hadamard transform of size ``n``, or the random orthogonal fallback."""
    return Transform(n=n, seed=int(seed), kind="hadamard" if hadamard_factors(n) is not None else "orthogonal")


@dataclass(frozen=True)
class Incoherence:
    """The two transforms of one layer: ``U`` on the output side, ``V`` on the input side."""

    U: Transform
    V: Transform

    @classmethod
    def for_shape(cls, out_features: int, in_features: int, seed: int, *, su: Tensor | None = None,
                  sv: Tensor | None = None, u_dense: Tensor | None = None, v_dense: Tensor | None = None) -> "Incoherence":
        """The transforms of a layer [out, in] from its seed; ``su``/``sv`` replace their diagonals
        and ``u_dense``/``v_dense`` are the stored matrices of the orthogonal kind."""
        U, V = transform_for(out_features, 2 * seed), transform_for(in_features, 2 * seed + 1)
        return cls(U=dataclasses.replace(U, diag=su, dense=u_dense), V=dataclasses.replace(V, diag=sv, dense=v_dense))

    def weight(self, W: Tensor) -> Tensor:
        """``U W V^T``."""
        return self.U.apply(self.V.apply(W).T).T

    def hessian(self, H: Tensor) -> Tensor:
        """``V H V^T`` (H symmetric)."""
        return self.V.apply(self.V.apply(H).T).T

    def unweight(self, Wt: Tensor) -> Tensor:
        """``U^T W~ V``: the weight back in the original basis."""
        return self.U.apply_t(self.V.apply_t(Wt).T).T

    def input(self, x: Tensor) -> Tensor:
        """``V x`` for activations ``x [..., in]``."""
        return self.V.apply(x)

    def output(self, z: Tensor) -> Tensor:
        """``U^T z`` for outputs ``z [..., out]`` of the transformed weight."""
        return self.U.apply_t(z)
