"""AQLMWeight: additive quantization (AQLM, Egiazarian et al. 2024): every group of ``in_group_size``
consecutive weights of a row is the sum of one vector from each of ``num_codebooks`` learned
codebooks, times the row's scale.

Stored (the layout of the ``aqlm`` package and of transformers' AQLM integration, so that an
export copies the tensors as they are):

* ``codes`` [out / out_group, in / in_group, M] int8 (``nbits_per_codebook`` B <= 8) or int16
  (B <= 16): the B-bit code of each group and codebook, stored as its signed B-bit
  reinterpretation (an unsigned code u >= 2^(B-1) is kept as u - 2^B), so every value lies in
  [-2^(B-1), 2^(B-1)); the unsigned code is ``codes & (2^B - 1)``;
* ``codebooks`` [M, 2^B, out_group, in_group] float16 (float32 or bfloat16 allowed);
* ``scales`` [out / out_group, 1, 1, 1], the codebooks' dtype, finite.

    W[o, g*in_group:(g+1)*in_group] = scales[o] * sum_m codebooks[m, codes[o, g, m] & (2^B - 1), 0]

Bits per weight: M * B / in_group for the codes (2x8 with groups of 8: 2 bits), plus the
codebooks (M * 2^B * in_group * 16 bits per layer) and one 16-bit scale per row. Only
``out_group_size`` 1 is supported (the configuration the AQLM paper recommends and its CPU
kernels run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

CODEBOOK_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
MAX_CODEBOOKS = 64


def reconstruct(C: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """W^ [out, in] = s_o Σ_m C_m[b_ojm] from codebooks C [M, K, g], unsigned codes b [out, groups,
    M] and scales s [out] (in C's dtype): the format's dequantization, shared by the solver, its
    tuning and the trainable view (differentiable in C and s)."""
    out = b.shape[0]
    V = C[0][b[..., 0]]
    for m in range(1, C.shape[0]):
        V = V + C[m][b[..., m]]
    return (V * s.to(V.dtype)[:, None, None]).reshape(out, -1)


def _int(what: str, lo: int, hi: int):
    def check(v) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise LowbitError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
    return check


def _check_out_group(v) -> None:
    if v != 1 or isinstance(v, bool):
        raise LowbitError(f"lowbit supports AQLM out_group_size 1 only, got {v!r}")


def code_dtype(nbits: int) -> torch.dtype:
    """The integer type of B-bit codes: int8 up to 8 bits, int16 up to 16."""
    return torch.int8 if nbits <= 8 else torch.int16


def _groups(w) -> tuple[int, int]:
    out, n = w.shape
    if n % w.in_group_size:
        raise LowbitError(f"an AQLM weight's input width {n} is not a multiple of in_group_size {w.in_group_size}")
    return out // w.out_group_size, n // w.in_group_size


class AQLMWeight(WeightFormat, name="aqlm"):
    codes: Tensor = tensor(lambda w: code_dtype(w.nbits_per_codebook), lambda w: (*_groups(w), w.num_codebooks))
    codebooks: Tensor = tensor(CODEBOOK_DTYPES, lambda w: (w.num_codebooks, 2 ** w.nbits_per_codebook,
                                                           w.out_group_size, w.in_group_size), finite=True)
    scales: Tensor = tensor(lambda w: w.codebooks.dtype, lambda w: (_groups(w)[0], 1, 1, 1), finite=True)
    shape: tuple[int, int] = shape_param()
    in_group_size: int = param(8, check=_int("in_group_size", 1, 1024))
    out_group_size: int = param(1, check=_check_out_group)
    num_codebooks: int = param(check=_int("num_codebooks", 1, MAX_CODEBOOKS))
    nbits_per_codebook: int = param(check=_int("nbits_per_codebook", 1, 16))

    def check(self) -> None:
        half = 2 ** (self.nbits_per_codebook - 1)
        if self.codes.numel() and (int(self.codes.min()) < -half or int(self.codes.max()) >= half):
            raise LowbitError(f"aqlm codes must be {self.nbits_per_codebook}-bit values stored in "
                              f"[{-half}, {half - 1}], got [{int(self.codes.min())}, {int(self.codes.max())}]")

    @property
    def codebook_size(self) -> int:
        return 2 ** self.nbits_per_codebook

    def unsigned_codes(self) -> Tensor:
        """The codes as unsigned int64 values in [0, 2^B), [out, in / in_group, M]."""
        return self.codes.to(torch.int64) & (self.codebook_size - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = reconstruct(self.codebooks[:, :, 0, :].float(), self.unsigned_codes(), self.scales.reshape(-1).float())
        return W if dtype == torch.float32 else W.to(dtype)

    @classmethod
    def from_codes(cls, codes: Tensor, codebooks: Tensor, scales: Tensor, shape: tuple[int, int], *,
                   dtype: torch.dtype = torch.float16) -> "AQLMWeight":
        """Pack unsigned codes (integer values in [0, 2^B)) [out, in / g, M], codebooks
        [M, 2^B, g] (or [M, 2^B, 1, g]) and per-row scales [out] (any shape of out values),
        rounding the floats to ``dtype``. M, B and g are read from the codebooks."""
        if dtype not in CODEBOOK_DTYPES:
            raise LowbitError(f"AQLM codebooks must be float16, float32 or bfloat16, got {dtype}")
        if codebooks.dim() == 3:
            codebooks = codebooks.unsqueeze(2)
        if codebooks.dim() != 4:
            raise LowbitError(f"AQLM codebooks must be [M, 2^B, g], got shape {tuple(codebooks.shape)}")
        M, K, _, g = codebooks.shape
        B = K.bit_length() - 1
        if K < 2 or K != 2 ** B:
            raise LowbitError(f"an AQLM codebook must hold a power of two (>= 2) vectors, got {K}")
        c = codes.to(torch.int64)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= K):
            raise LowbitError(f"AQLM codes must be in [0, {K - 1}], got [{int(c.min())}, {int(c.max())}]")
        packed = torch.where(c >= K // 2, c - K, c).to(code_dtype(B)).contiguous()
        out = int(shape[0])
        w = cls(codes=packed, codebooks=codebooks.detach().to(dtype).contiguous(),
                scales=scales.detach().reshape(out, 1, 1, 1).to(dtype).contiguous(),
                shape=(out, int(shape[1])), in_group_size=int(g), out_group_size=1, num_codebooks=int(M),
                nbits_per_codebook=int(B))
        w.validate()
        return w
