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

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat, param, shape_param, tensor

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE = ("fp32", "native")


def check_compute(compute: str) -> str:
    if compute not in COMPUTE:
        raise LowbitError(f"compute must be one of {', '.join(COMPUTE)}, got {compute!r}")
    return compute


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise LowbitError(f"16-bit float type must be float16 or bfloat16, got {dtype!r}")
    return dtype


class FloatWeight(WeightFormat, name="half"):
    weight16: Tensor = tensor(lambda w: DTYPES[w.dtype_name], lambda w: tuple(w.shape), finite=True)
    shape: tuple[int, int] = shape_param()
    dtype_name: str = param("float16", key="dtype", check=check_dtype)  # weight16's type
    compute: str = param("fp32", check=check_compute)

    @classmethod
    def cast(cls, W: Tensor, dtype: str = "float16", compute: str = "fp32") -> "FloatWeight":
        """Round a 2-D float weight W [out, in] to ``dtype`` ("float16" or "bfloat16")."""
        check_dtype(dtype)
        if W.dim() != 2:
            raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise LowbitError("weight has NaN/Inf values; refusing to convert it")
        h = W.detach().to(DTYPES[dtype]).contiguous()
        if not torch.isfinite(h).all():
            raise LowbitError(f"weight has values beyond the {dtype} range (|w| > {torch.finfo(h.dtype).max:g})")
        return cls(weight16=h, shape=(int(W.shape[0]), int(W.shape[1])), dtype_name=dtype,
                   compute=check_compute(compute))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight widened to ``dtype`` (exact for float32)."""
        return self.weight16.to(dtype)
