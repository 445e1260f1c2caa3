"""GGUFBlockWeight: a weight stored as the blocks of a GGUF (llama.cpp) block type, unchanged.

The format of GPTQ onto a GGUF type's grid (`lowbit.export.gguf_grid.gptq_onto`, GPTQ with
``gguf_type``): the bytes are what the GGUF file will hold, so GGUF export writes them as they are
(`lowbit.export.gguf.export_gguf`), and the checkpoint runs exactly the weight llama.cpp will run.

Stored tensor:

* ``raw``  uint8 [out, in / block_size * bytes_per_block]: each row (an output channel) is its
  blocks along the input dimension, in the type's byte layout (`lowbit.export.gguf_quants`);
  rows in the model's (HF) order (export applies GGUF's q/k row permutation to whole rows)

Params: ``shape`` [out, in] and ``type``, the GGUF type name (Q4_K, Q6_K, Q8_0, IQ4_NL, ...: any
type `lowbit.export.gguf_quants` or IQ4_NL reads). ``dequantize()`` is the GGUF reader's value of
every block (`lowbit.export.gguf_imatrix.dequantize`); the matmul is the reference path
(dequantize, then a float matmul).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export import gguf_imatrix, gguf_quants
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

# the block types a GGUFBlockWeight may hold: every one lowbit dequantizes, F32 aside (not blocks)
TYPES = tuple(gguf_quants.BLOCK_LAYOUTS) + ("IQ4_NL",)


def check_type(t) -> str:
    if t not in TYPES:
        raise LowbitError(f"unknown GGUF block type {t!r}; one of {', '.join(TYPES)}")
    return t


def row_bytes(gguf_type: str, n: int) -> int:
    """Bytes of one row of ``n`` values in ``gguf_type``; one-line error if n is not whole blocks."""
    bs, bpb = gguf_quants.layout(gguf_type)
    if n % bs:
        raise LowbitError(f"rows of {n} are not whole {gguf_type} blocks of {bs}")
    return n // bs * bpb


class GGUFBlockWeight(WeightFormat, name="gguf_blocks"):
    raw: Tensor = tensor(torch.uint8, lambda w: (w.shape[0], row_bytes(w.gguf_type, w.shape[1])))
    shape: tuple[int, int] = shape_param()
    gguf_type: str = param(key="type", check=check_type)

    @classmethod
    def from_raw(cls, raw: np.ndarray | Tensor, gguf_type: str, shape: tuple[int, int]) -> "GGUFBlockWeight":
        """Blocks uint8 [out, bytes] of ``gguf_type`` holding a weight of ``shape`` [out, in] (e.g.
        `lowbit.export.gguf.encode_tensor`'s of a float weight, or `gptq_onto`'s)."""
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(np.ascontiguousarray(raw))
        w = cls(raw=raw.contiguous(), shape=(int(shape[0]), int(shape[1])), gguf_type=gguf_type)
        w.validate()
        return w

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The GGUF reader's value of every block, [out, in] (exact in float32), on raw's device."""
        x = gguf_imatrix.dequantize(self.raw.detach().cpu().numpy(), self.gguf_type)
        W = torch.from_numpy(np.ascontiguousarray(x)).reshape(self.shape)
        return W.to(device=self.raw.device, dtype=dtype)
