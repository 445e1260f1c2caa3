"""NF4Weight: 4-bit NormalFloat codes with blockwise absmax, optionally double-quantized.

The storage of QLoRA (Dettmers et al. 2023, §3) laid out byte for byte as bitsandbytes'
``quantize_4bit(W, quant_type="nf4", compress_statistics=...)`` leaves it:

* The weight is flattened row-major (the whole tensor, rows are *not* independent) and cut into
  blocks of ``blocksize`` (64) consecutive values; the last block is shorter when the size is not
  a multiple of ``blocksize``.
* ``qweight``  uint8 [ceil(n / 2)]: one 4-bit index into `NF4_CODEBOOK` per weight, two per byte,
  the *first* weight of each pair in the high nibble. An odd count is padded with the index of
  0.0 (7), which is what bitsandbytes' padding with a zero weight produces.
* without double quantization: ``absmax`` float32 [n_blocks], the per-block absolute maximum.
* with double quantization (QLoRA §3 "Double Quantization"): the fp32 block absmaxes c2 have
  their mean subtracted (``offset``, float32 [1]) and are quantized again, blockwise over
  ``dq_blocksize`` (256) consecutive constants, with bitsandbytes' signed 8-bit *dynamic* map
  (`dynamic_map_8bit`): ``absmax`` then holds uint8 [n_blocks] indices into that map and
  ``nested_absmax`` float32 [ceil(n_blocks / dq_blocksize)] the absmax of each 256-block.

Dequantization (all in float32, the same operations in the same order as bitsandbytes):

    a[b]   = DYN[absmax[b]] * nested_absmax[b // dq_blocksize] + offset     (double-quantized)
    a[b]   = absmax[b]                                                      (otherwise)
    W[i]   = NF4[code[i]] * a[i // blocksize]            then cast to the requested dtype

Bits per weight (n a multiple of 64·256): 4 + 8/64 + 32/(64·256) ≈ 4.127 with double
quantization (plus 32 bits per tensor for the offset), 4 + 32/64 = 4.5 without.

The two codebooks are constants of the format and are not stored per tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

# The 16 NormalFloat4 values, exactly the float32 constants bitsandbytes uses (QLoRA's NF4:
# quantiles of N(0, 1) with an exact zero, 8 positive and 7 negative levels, normalised to
# [-1, 1]; tests/test_nf4.py recomputes them from that construction).
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_ZERO_CODE = 7  # NF4_CODEBOOK[7] == 0.0


def dynamic_map_8bit() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561), sorted, float32 [256].

    Seven decades 10^-6 .. 10^0; decade e (0..6) holds the 2^e midpoints of 2^e + 1 evenly
    spaced points of [0.1, 1], scaled by 10^(e-6), with both signs (2·127 values), plus 0 and 1.
    Its most negative value is -0.99297 (there is no -1).
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (e - 6) * mids).tolist() + (-(10.0 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP_8BIT = dynamic_map_8bit()

# byte -> (value of its high nibble, value of its low nibble): one gather decodes two weights
_NF4_PAIRS = torch.stack([NF4_CODEBOOK[torch.arange(256) >> 4], NF4_CODEBOOK[torch.arange(256) & 15]], dim=1)


# -- nibble packing ---------------------------------------------------------------------------
def pack_nibbles(codes: Tensor) -> Tensor:
    """4-bit codes (any shape, flattened row-major, each in 0..15) -> uint8 [ceil(n / 2)];
    element 2k goes to the high nibble of byte k, element 2k+1 to its low nibble."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise LowbitError(f"4-bit codes must be in 0..15, got [{int(codes.min())}, {int(codes.max())}]")
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), NF4_ZERO_CODE)])
    return (c[0::2] << 4) | c[1::2]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of `pack_nibbles`: uint8 [ceil(n / 2)] -> uint8 codes [n]."""
    if packed.dim() != 1 or packed.numel() != (n + 1) // 2:
        raise LowbitError(f"packed NF4 codes have shape {tuple(packed.shape)}, expected ({(n + 1) // 2},)")
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]


def _blockwise_scale(values: Tensor, scale: Tensor, blocksize: int) -> Tensor:
    """values [n] * scale[i // blocksize], float32 (the last block may be shorter)."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    if full:
        torch.mul(values[:full].view(-1, blocksize), scale[: full // blocksize, None],
                  out=out[:full].view(-1, blocksize))
    if full < n:
        torch.mul(values[full:], scale[-1], out=out[full:])
    return out


def _check_blocksize(bs) -> None:
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1 or bs & (bs - 1)):
        raise LowbitError(f"must be a positive power of two, got {bs!r}")


def _decode_blocksize(v) -> int | None:
    return None if v is None else int(v)


def _n_bytes(w: "NF4Weight") -> tuple[int]:
    return ((w.n_weights + 1) // 2,)


def _n_blocks(w: "NF4Weight") -> tuple[int]:
    return (w.n_blocks,)


def _n_nested(w: "NF4Weight") -> tuple[int]:
    return (math.ceil(w.n_blocks / w.dq_blocksize),)


def _double_quant(w: "NF4Weight") -> bool:
    return w.double_quant


class NF4Weight(WeightFormat, name="nf4"):
    qweight: Tensor = tensor(torch.uint8, _n_bytes)          # two NF4 codes per byte
    # float32 [n_blocks], or uint8 [n_blocks] (indices into DYNAMIC_MAP_8BIT) when double-quantized
    absmax: Tensor = tensor(lambda w: torch.uint8 if w.double_quant else torch.float32, _n_blocks,
                            finite=True)
    nested_absmax: Tensor | None = tensor(torch.float32, _n_nested, when=_double_quant, finite=True)
    offset: Tensor | None = tensor(torch.float32, lambda w: (1,), when=_double_quant, finite=True)
    shape: tuple[int, ...] = shape_param(ndim=None)
    blocksize: int = param(64, decode=int, check=_check_blocksize)
    # blocks of absmaxes that share one nested absmax; None: no double quantization
    dq_blocksize: int | None = param(256, decode=_decode_blocksize, check=_check_blocksize)

    @property
    def double_quant(self) -> bool:
        return self.dq_blocksize is not None

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_weights / self.blocksize)

    # -- reading ----------------------------------------------------------------------------
    def codes(self) -> Tensor:
        """NF4 indices of the flattened weight, uint8 [n]."""
        return unpack_nibbles(self.qweight, self.n_weights)

    def block_absmax(self) -> Tensor:
        """The per-block scale actually used by dequantization, float32 [n_blocks]."""
        if not self.double_quant:
            return self.absmax.float()
        dyn = DYNAMIC_MAP_8BIT.to(self.absmax.device)[self.absmax.long()]
        return _blockwise_scale(dyn, self.nested_absmax.float(), self.dq_blocksize) + self.offset.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight of ``shape``: NF4 value × block absmax in float32, then cast to dtype."""
        n = self.n_weights
        pairs = torch.nn.functional.embedding(self.qweight.int(), _NF4_PAIRS.to(self.qweight.device))
        values = pairs.view(-1)[:n]  # [n_bytes, 2] -> weights in order (high nibble first)
        W = _blockwise_scale(values, self.block_absmax(), self.blocksize).view(self.shape)
        return W if dtype == torch.float32 else W.to(dtype)
