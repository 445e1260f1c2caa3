"""FloatWeight (format "half"): the weight stored in a 16-bit float type — float16 (IEEE half) or bfloat16.

No integer grid: each weight is rounded to the nearest value of the narrower float type (round
half to even, torch's cast). float16 keeps 10 mantissa bits but overflows above 65504 (such a
weight is refused); bfloat16 keeps float32's exponent range with 7 mantissa bits.

Stored tensor:

* ``weight16``  float16 or bfloat16 [out, in]

``compute`` says how the matmul runs, and travels in ``meta()``:

* ``"fp32"`` (default): the weight is widened to float32 on each call and multiplied in float32.
  Half the storage and memory of fp32 for the same accuracy as a float32 matmul with the rounded
  weight; on a CPU without native 16-bit float arithmetic this is the faster of the two.
* ``"native"``: the activations are cast to the 16-bit type and the matmul runs in it (what a
  GPU or a CPU with AVX512-FP16/AMX does well); slower than fp32 on CPUs without such units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.core.registry import register_format
from lowbit.errors import LowbitError
from lowbit.formats.base import StoredSize

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE = ("fp32", "native")


def check_compute(compute: str) -> str:
    if compute not in COMPUTE:
        raise LowbitError(f"compute must be one of {', '.join(COMPUTE)}, got {compute!r}")
    return compute


@register_format("half")
@dataclass
class FloatWeight(StoredSize):
    weight16: Tensor
    shape: tuple[int, int]
    compute: str = "fp32"

    tensor_names = ("weight16",)

    @classmethod
    def cast(cls, W: Tensor, dtype: str = "float16", compute: str = "fp32") -> "FloatWeight":
        """Round a 2-D float weight W [out, in] to ``dtype`` ("float16" or "bfloat16")."""
        if dtype not in DTYPES:
            raise LowbitError(f"16-bit float type must be float16 or bfloat16, got {dtype!r}")
        if W.dim() != 2:
            raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise LowbitError("weight has NaN/Inf values; refusing to convert it")
        h = W.detach().to(DTYPES[dtype]).contiguous()
        if not torch.isfinite(h).all():
            raise LowbitError(f"weight has values beyond the {dtype} range (|w| > {torch.finfo(h.dtype).max:g})")
        return cls(weight16=h, shape=(int(W.shape[0]), int(W.shape[1])), compute=check_compute(compute))

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.weight16.dtype == torch.bfloat16 else "float16"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight widened to ``dtype`` (exact for float32)."""
        return self.weight16.to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight16": self.weight16}

    def meta(self) -> dict:
        return {"format": "half", "shape": list(self.shape), "dtype": self.dtype_name,
                "compute": self.compute}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> "FloatWeight":
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        w = cls(weight16=tensors["weight16"], shape=shape, compute=check_compute(meta.get("compute", "fp32")))
        want = DTYPES.get(meta.get("dtype", "float16"))
        if want is None or w.weight16.dtype != want:
            raise LowbitError(f"weight16 is {w.weight16.dtype}, the record says {meta.get('dtype')!r}")
        w.validate()
        return w

    def validate(self) -> None:
        if tuple(self.weight16.shape) != tuple(self.shape) or self.weight16.dtype not in DTYPES.values():
            raise LowbitError(f"weight16 has shape {tuple(self.weight16.shape)}/{self.weight16.dtype}, "
                              f"expected {tuple(self.shape)}/float16 or bfloat16")
        if not torch.isfinite(self.weight16).all():
            raise LowbitError("weight16 contains NaN/Inf")
