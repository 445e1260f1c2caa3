"""SparseNMWeight: an N:M-sparse weight stored compressed — the kept values plus their positions.

In an N:M-sparse weight W [out, in] every group of M consecutive inputs of a row (columns
[gM, gM + M)) holds at most N nonzeros (see `lowbit.algorithms.pruning`; "2:4" keeps 2 of 4).
The compressed form keeps exactly N entries per group, NVIDIA's sparse tensor core layout:

* ``values``   float32 [out, in·N/M]   the kept entries of each row, group by group, ascending
  column within a group (a group with fewer than N nonzeros also stores some of its zeros)
* ``indices``  uint8 [out, packed_row_bytes(in·N/M, b)]   each kept entry's position in its group
  (0 … M−1), b = ceil(log2 M) bits each, packed row by row with `lowbit.core.packing`
  (2:4: 2-bit indices, four per byte, entry j of a row at bits 2(j mod 4) of byte j div 4)

Entry j of a row sits at column (j div N)·M + index_j. Positions within a group are strictly
increasing, so every column appears at most once. Dequantization scatters the values back into a
zero matrix: the round trip dense → SparseNMWeight → dense is exact (bit for bit, -0.0 included).

Storage: N/M · (32 + b) bits per dense weight — 17 bits for 2:4 (vs 32 for fp32), 17.5 for 4:8.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.core import packing
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor


def index_bits(m: int) -> int:
    """Bits per stored position for groups of m (at least 1)."""
    return max(1, math.ceil(math.log2(m)))


def nonzero_bits(W: Tensor) -> Tensor:
    """True where the float32 bit pattern is not +0.0 (so -0.0 counts as a value to keep)."""
    return W.contiguous().view(torch.int32) != 0


def _check_nm(n, m) -> tuple[int, int]:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) \
            or not 1 <= n < m or m > 256:
        raise LowbitError(f"N:M sparse storage needs integers 1 <= N < M <= 256, got {n}:{m}")
    return n, m


def _decode_pattern(v) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in str(v).split(":"))
    except ValueError:
        raise LowbitError(f"sparse-nm record has no valid 'pattern' (got {v!r})") from None
    return n, m


def _kept(w: "SparseNMWeight") -> int:
    """Stored entries per row: in·N/M."""
    return w.shape[1] // w.m * w.n


class SparseNMWeight(WeightFormat, name="sparse-nm"):
    values: Tensor = tensor(torch.float32, lambda w: (w.shape[0], _kept(w)), finite=True)
    indices: Tensor = tensor(torch.uint8,
                             lambda w: (w.shape[0], packing.packed_row_bytes(_kept(w), index_bits(w.m))))
    shape: tuple[int, int] = shape_param()
    pattern: tuple[int, int] = param(encode=lambda p: f"{p[0]}:{p[1]}", decode=_decode_pattern,
                                     check=lambda p: _check_nm(*p))   # (N, M)

    @property
    def n(self) -> int:
        return self.pattern[0]

    @property
    def m(self) -> int:
        return self.pattern[1]

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dense(cls, W: Tensor, n: int, m: int) -> "SparseNMWeight":
        """Compress a dense N:M-sparse float weight W [out, in] (in a multiple of m)."""
        n, m = _check_nm(n, m)
        if W.dim() != 2:
            raise LowbitError(f"N:M sparse storage expects a 2-D weight, got shape {tuple(W.shape)}")
        if not W.is_floating_point():
            raise LowbitError(f"N:M sparse storage expects a float weight, got {W.dtype}")
        W = W.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(W).all():
            raise LowbitError("weight has NaN/Inf values; refusing to store it sparse")
        rows, cols = W.shape
        if cols % m:
            raise LowbitError(f"{cols} input columns are not a multiple of M={m} for pattern {n}:{m}")
        G = cols // m
        nz = nonzero_bits(W).reshape(rows, G, m)                              # [out, G, m]
        per_group = nz.sum(-1)
        if per_group.numel() and int(per_group.max()) > n:
            r, g = (per_group > n).nonzero()[0].tolist()
            raise LowbitError(f"weight is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} "
                              f"hold {int(per_group[r, g])} nonzeros (at most {n} allowed)")
        # keep the nonzeros and, where a group has fewer than n, its first zeros: rank positions by
        # (zero?, position) and take the n best, then sort them back into ascending column order
        pos = torch.arange(m, dtype=torch.int64)
        key = (~nz).to(torch.int64) * m + pos                                  # nonzeros first
        idx = torch.sort(torch.topk(key, n, dim=-1, largest=False).indices, dim=-1).values  # [out, G, n]
        values = torch.gather(W.reshape(rows, G, m), 2, idx).reshape(rows, G * n)
        indices = packing.pack(idx.reshape(rows, G * n), index_bits(m))
        return cls(values=values.contiguous(), indices=indices, shape=(int(rows), int(cols)), pattern=(n, m))

    # -- reading ----------------------------------------------------------------------------
    def positions(self) -> Tensor:
        """Each stored entry's position within its group, int64 [out, in·N/M]."""
        rows, cols = self.shape
        K = cols // self.m * self.n
        return packing.unpack_u8(self.indices, index_bits(self.m), K).to(torch.int64)

    def columns(self) -> Tensor:
        """Each stored entry's column in W, int64 [out, in·N/M]."""
        rows, cols = self.shape
        K = cols // self.m * self.n
        group = torch.arange(K, dtype=torch.int64, device=self.values.device) // self.n
        return group[None, :] * self.m + self.positions()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        rows, cols = self.shape
        W = torch.zeros(rows, cols, dtype=torch.float32, device=self.values.device)
        W.scatter_(1, self.columns(), self.values.float())
        return W if dtype == torch.float32 else W.to(dtype)

    @property
    def nnz(self) -> int:
        return int(nonzero_bits(self.values).sum())

    def check(self) -> None:
        n, m = self.pattern
        rows, cols = self.shape
        if cols % m:
            raise LowbitError(f"sparse-nm: {cols} columns are not a multiple of M={m}")
        p = self.positions().reshape(rows, cols // m, n)
        if p.numel() and (int(p.max()) >= m or (n > 1 and bool((p[..., 1:] <= p[..., :-1]).any()))):
            raise LowbitError(f"sparse-nm indices are corrupt: positions must be strictly increasing within "
                              f"each group and below M={m}")
