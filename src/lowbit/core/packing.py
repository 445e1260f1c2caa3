"""Exact bit packing of unsigned codes, 1 to 8 bits each, row by row.

Layout: each row of N codes is packed independently (so rows can be sliced without unpacking
the others). Codes are taken 8 at a time; a run of 8 codes of b bits forms one little-endian
integer of 8*b bits (code j occupies bits [j*b, (j+1)*b)), which is stored as b bytes, low byte
first. A row therefore takes ceil(N / 8) * b bytes (N bytes for b = 8); the tail of the last run
is zero-padded.
For b in {1, 2, 4} this is the familiar "code j of a byte sits at bit j*b" layout, and for
b = 8 it is the codes themselves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.core.chunks import row_slices
from lowbit.errors import LowbitError


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of n codes takes (8-bit codes are stored as-is, unpadded)."""
    return n if bits == 8 else math.ceil(n / 8) * bits


# Rows packed per step: the int64 work tensors of one step stay near 2**22 codes (32 MiB), so
# packing a large weight needs a few times its packed size, not 16x its code count.
_CHUNK_CODES = 1 << 22


def pack(codes: Tensor, bits: int, offset: int = 0) -> Tensor:
    """Pack unsigned integer codes [..., N] (each < 2**bits) into uint8 [..., ceil(N/8)*bits].
    ``offset`` is added to every code first (signed integers and their code offset in one pass)."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"can only pack 1 to 8 bits per value, got {bits}")
    if codes.numel():
        lo, hi = int(codes.min()) + offset, int(codes.max()) + offset
        if lo < 0 or hi >= 2**bits:
            raise LowbitError(f"codes out of range for {bits}-bit packing: [{lo}, {hi}]")
    *lead, n = codes.shape
    rows = codes.reshape(-1, n) if codes.dim() != 1 else codes.reshape(1, n)
    out = torch.empty(rows.shape[0], packed_row_bytes(n, bits), dtype=torch.uint8, device=codes.device)
    for r in row_slices(rows.shape[0], n, _CHUNK_CODES):
        out[r] = _pack_rows(rows[r].to(torch.int64) + offset, bits)
    return out.reshape(*lead, out.shape[-1])


def _pack_rows(codes: Tensor, bits: int) -> Tensor:
    """`pack` of int64 codes [rows, N], in range."""
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    runs = math.ceil(n / 8)
    pad = runs * 8 - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(rows, runs, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (codes << shifts).sum(dim=-1)  # [rows, runs], < 2**(8*bits) <= 2**56
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [rows, runs, bits]
    return out.reshape(rows, runs * bits).to(torch.uint8)


def holds_code(packed: Tensor, bits: int, code: int) -> bool:
    """Whether any ``bits``-bit code of ``packed`` (bits 1, 2 or 4: whole codes per byte, padding
    included) equals ``code``, checked on the bytes without unpacking (corrupt-file checks)."""
    if bits not in (1, 2, 4):
        raise LowbitError(f"holds_code reads 1, 2 or 4 bits per code, got {bits}")
    mask = (1 << bits) - 1
    return any(bool((((packed >> shift) & mask) == code).any()) for shift in range(0, 8, bits))


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: uint8 [..., ceil(n/8)*bits] -> int32 codes [..., n]."""
    return unpack_u8(packed, bits, n).to(torch.int32)


def unpack_u8(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack` returning uint8 codes [..., n] (the cheapest form for dequantization)."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"can only unpack 1 to 8 bits per value, got {bits}")
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise LowbitError(f"packed row has {nbytes} bytes, expected {packed_row_bytes(n, bits)} for {n} {bits}-bit values")
    if bits == 8:
        return packed
    if bits in (1, 2, 4):
        # Same layout, read byte-wise: byte k holds codes k*(8/b) .. k*(8/b)+8/b-1, code m at bit m*b.
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        codes = codes.reshape(*lead, nbytes * per_byte)
        return codes if codes.shape[-1] == n else codes[..., :n].contiguous()
    runs = nbytes // bits
    wt = torch.int32 if bits <= 3 else torch.int64  # a run is 8*bits bits wide
    b = packed.to(wt).reshape(*lead, runs, bits)
    byte_shifts = torch.arange(bits, dtype=wt, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=-1, dtype=wt)  # [..., runs]
    shifts = torch.arange(8, dtype=wt, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., runs, 8]
    return codes.reshape(*lead, runs * 8)[..., :n].to(torch.uint8)
