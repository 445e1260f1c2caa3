"""QuantizedLinear: a drop-in for nn.Linear whose weight is a packed format.

The packed tensors are registered as buffers (so `state_dict()` saves exactly what is stored and
`.to(device)` moves them); the forward pass asks the kernel layer for y = x Wᵀ + b.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from lowbit.formats import get_format
from lowbit.kernels import linear as kernel_linear


class QuantizedLinear(nn.Module):
    def __init__(self, weight_format, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_format.shape
        self._format_cls = type(weight_format)
        self._meta = weight_format.meta()
        tensors = weight_format.tensors()
        # Non-tensor fields (shape, scheme, ...) are kept as plain attributes, tensors as buffers.
        self._fields = {f.name: getattr(weight_format, f.name) for f in dataclasses.fields(weight_format)
                        if f.name not in self._format_cls.tensor_names}
        self._tensor_names = tuple(tensors)
        for k, t in tensors.items():
            self.register_buffer(k, t)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)
        else:
            self.bias = None

    @property
    def weight_format(self):
        """The packed weight, viewing this module's (current-device) buffers.

        Built once and reused while the buffers are the same tensor objects (`.to()`, loading a
        state dict into new tensors or assigning a buffer makes a new one) and no field changed
        (change fields with `set_field`): decode calls every layer once per token, and rebuilding
        the dataclass each time cost ~3 µs a call."""
        bufs = tuple(self._buffers[k] for k in self._tensor_names)
        cached = self.__dict__.get("_fmt_cache")
        if cached is not None and len(cached[0]) == len(bufs) and all(a is b for a, b in zip(cached[0], bufs)):
            return cached[1]
        tensors = {k: None for k in self._format_cls.tensor_names}
        tensors.update(zip(self._tensor_names, bufs))
        fmt = self._format_cls(**tensors, **self._fields)
        self.__dict__["_fmt_cache"] = (bufs, fmt)
        return fmt

    def clear_cache(self) -> None:
        """Forget the cached weight format (it holds the buffers it was built from: after the
        buffers are swapped out, e.g. released to the meta device once a streamed block is
        written, the cache alone would keep the packed weight in memory)."""
        self.__dict__.pop("_fmt_cache", None)

    def set_field(self, name: str, value) -> None:
        """Change one non-tensor field of the weight format (e.g. LLM.int8()'s threshold)."""
        if name not in self._fields:
            raise KeyError(f"{self._format_cls.__name__} has no field {name!r}")
        self._fields[name] = value
        self.__dict__.pop("_fmt_cache", None)

    def meta(self) -> dict:
        return dict(self._meta, bias=self.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        return kernel_linear(x, self.weight_format, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self._meta['format']}"

    @classmethod
    def from_meta(cls, meta: dict, tensors: dict[str, Tensor], bias: Tensor | None) -> "QuantizedLinear":
        fmt = get_format(meta["format"]).from_tensors(tensors, meta)
        return cls(fmt, bias)
