"""The schema every packed weight format is declared with; storage, loading and checks derive from it.

A format is a class of stored tensors and settings, declared once:

    class TernaryWeight(WeightFormat, name="ternary"):
        qweight: Tensor = tensor(torch.uint8, lambda w: (w.shape[0], packed_row_bytes(w.shape[1], 2)))
        scales: Tensor = tensor(torch.float32, lambda w: (1,) if w.granularity == "tensor" else (w.shape[0],),
                                finite=True)
        shape: tuple[int, int] = shape_param()
        granularity: str = param("tensor", check=check_granularity)

Subclassing registers the class under ``name`` (the string checkpoints record, given only here) and
makes it a keyword-only dataclass. From the declaration the base derives

* ``tensors()``    the stored tensors by name (absent optional ones left out): what a checkpoint's
                   safetensors file holds for the layer
* ``meta()``       ``{"format": name, <param>: <encoded value>, ...}``, JSON-serialisable: what
                   ``lowbit.json`` records for the layer
* ``from_tensors(tensors, meta)``  decodes the params, builds the weight, validates it (a tensor
  that is always stored but absent from ``tensors`` is a KeyError, as for any mapping: the loaders
  turn it into "module ... lacks tensor ..."; everything else is a LowbitError);
  ``to_state_dict()`` / ``WeightFormat.from_state_dict(tensors, meta)`` are the same pair, the
  latter picking the class by ``meta["format"]``
* ``validate()``   each param's check, then each tensor's presence, dtype, shape and finiteness
                   (one-line `LowbitError` naming the format and the field), then the format's
                   own ``check()`` for what a declaration cannot say (corrupt indices, ...)
* ``nbytes``, ``n_weights``, ``bits_per_weight`` from the stored tensors and ``shape``

A tensor field is required unless it has ``when`` (stored exactly when ``when(weight)`` holds) or
``optional=True`` (may be stored or not). A param is stored in ``meta()`` under its field name, or
under ``key``, through ``encode`` / ``decode`` (identity by default); a checkpoint whose record
lacks a param with a default loads with that default, so records written before a param existed
still load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass
from typing import Any, Callable, ClassVar, dataclass_transform

import torch
from torch import Tensor

from lowbit.core import registry
from lowbit.errors import LowbitError

_SPEC = "lowbit.format"


@dataclass(frozen=True)
class TensorSpec:
    dtype: Any                                # torch.dtype, a tuple of them, or weight -> dtype
    shape: Callable[[Any], tuple] | None      # weight -> expected shape (None: not checked here)
    when: Callable[[Any], bool] | None        # stored exactly when this holds (None: always)
    optional: bool                            # may be stored or not
    finite: bool                              # values must be finite


@dataclass(frozen=True)
class ParamSpec:
    key: str | None                           # meta key (None: the field name)
    encode: Callable | None                   # value -> JSON value
    decode: Callable | None                   # JSON value -> value
    check: Callable | None                    # value -> None, raises LowbitError when bad


def tensor(dtype, shape: Callable[[Any], tuple] | None = None, *, when: Callable[[Any], bool] | None = None,
           optional: bool = False, finite: bool = False):
    """A stored tensor of ``dtype`` (a dtype, a tuple of allowed ones, or a function of the
    weight) and ``shape`` (a function of the weight)."""
    spec = TensorSpec(dtype, shape, when, optional, finite)
    default = None if (when is not None or optional) else MISSING
    return dataclasses.field(default=default, metadata={_SPEC: spec})


def param(default=MISSING, *, key: str | None = None, encode: Callable | None = None,
          decode: Callable | None = None, check: Callable | None = None):
    """A setting recorded in ``meta()``."""
    return dataclasses.field(default=default, metadata={_SPEC: ParamSpec(key, encode, decode, check)})


def _decode_shape(v) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or any(isinstance(s, bool) or int(s) != s for s in v):
        raise ValueError(f"not a list of integers: {v!r}")
    return tuple(int(s) for s in v)


def _check_shape(shape) -> None:
    if not shape or any(s <= 0 for s in shape):
        raise LowbitError(f"shape must be non-empty with positive sizes, got {tuple(shape)}")


def shape_param(ndim: int | None = 2):
    """The dense weight's shape, recorded as a list; ``ndim`` None allows any rank."""
    def check(shape) -> None:
        if ndim is not None and len(shape) != ndim:
            raise LowbitError(f"shape must have {ndim} dimensions, got {tuple(shape)}")
        _check_shape(shape)
    return param(encode=list, decode=_decode_shape, check=check)


def _dtype_name(d) -> str:
    return str(d).removeprefix("torch.")


@dataclass_transform(kw_only_default=True, field_specifiers=(tensor, param, shape_param, dataclasses.field))
class WeightFormat:
    """Base of every packed weight format (see the module docstring)."""

    name: ClassVar[str] = "?"
    tensor_names: ClassVar[tuple[str, ...]] = ()   # stored tensors, in declaration order
    param_names: ClassVar[tuple[str, ...]] = ()    # settings recorded in meta(), in declaration order
    _declared: ClassVar[dict[str, dataclasses.Field]] = {}

    def __init_subclass__(cls, name: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(kw_only=True, eq=False)(cls)
        cls._declared = {f.name: f for f in dataclasses.fields(cls)}
        specs = {n: f.metadata.get(_SPEC) for n, f in cls._declared.items()}
        cls.tensor_names = tuple(n for n, s in specs.items() if isinstance(s, TensorSpec))
        cls.param_names = tuple(n for n, s in specs.items() if isinstance(s, ParamSpec))
        if name is not None:
            cls.name = name
            registry.register("format", name, cls)

    # -- what is stored -----------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name; absent optional ones are left out."""
        return {n: t for n in self.tensor_names if (t := getattr(self, n)) is not None}

    def meta(self) -> dict:
        """``{"format": name, ...params}``, JSON-serialisable."""
        out: dict = {"format": self.name}
        fields = self._declared
        for n in self.param_names:
            spec: ParamSpec = fields[n].metadata[_SPEC]
            v = getattr(self, n)
            out[spec.key or n] = spec.encode(v) if spec.encode is not None else v
        return out

    def to_state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """(stored tensors, meta): everything a checkpoint keeps of this weight."""
        return self.tensors(), self.meta()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict):
        """Build from stored tensors and the recorded meta, then validate."""
        if not isinstance(meta, dict):
            raise LowbitError(f"{cls.name} metadata must be a mapping, got {type(meta).__name__}")
        fields = cls._declared
        kwargs: dict[str, Any] = {}
        for n in cls.param_names:
            f = fields[n]
            spec: ParamSpec = f.metadata[_SPEC]
            key = spec.key or n
            if key not in meta:
                if f.default is MISSING:
                    raise LowbitError(f"{cls.name} metadata is malformed: it lacks {key!r} ({meta})")
                continue
            try:
                kwargs[n] = spec.decode(meta[key]) if spec.decode is not None else meta[key]
            except LowbitError:
                raise
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
                raise LowbitError(f"{cls.name} metadata is malformed: {key}={meta[key]!r} ({e})") from None
        missing = next((n for n in cls.tensor_names if n not in tensors and fields[n].default is MISSING), None)
        if missing is not None:  # a mapping lookup that fails: loaders report it with the module's name
            raise KeyError(missing)
        unknown = sorted(set(tensors) - set(cls.tensor_names))
        if unknown:
            raise LowbitError(f"{cls.name} weight has unexpected tensor(s) {', '.join(unknown)}")
        w = cls(**kwargs, **{n: tensors.get(n) for n in cls.tensor_names})
        w.validate()
        return w

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], meta: dict):
        """Inverse of `to_state_dict`. On `WeightFormat` itself the class is the one registered
        under ``meta["format"]``; on a format class, ``meta["format"]`` must name it."""
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if cls is WeightFormat:
            if not isinstance(fmt, str):
                raise LowbitError(f"weight metadata names no format: {meta}")
            # every format is registered: importing this module ran the package's __init__ first
            return registry.lookup("format", fmt).from_tensors(tensors, meta)
        if fmt is not None and fmt != cls.name:
            raise LowbitError(f"metadata is for format {fmt!r}, not {cls.name!r}")
        return cls.from_tensors(tensors, meta)

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """One-line `LowbitError` naming the field for any inconsistency (see the module docstring)."""
        fields = self._declared
        for n in self.param_names:
            spec: ParamSpec = fields[n].metadata[_SPEC]
            if spec.check is not None:
                try:
                    spec.check(getattr(self, n))
                except LowbitError as e:
                    raise LowbitError(f"{self.name} {n}: {e}") from None
        for n in self.tensor_names:
            self._validate_tensor(n, fields[n].metadata[_SPEC])
        self.check()

    def _validate_tensor(self, n: str, spec: TensorSpec) -> None:
        t = getattr(self, n)
        wanted = spec.when(self) if spec.when is not None else (None if spec.optional else True)
        if t is None:
            if wanted:
                raise LowbitError(f"{self.name} weight lacks tensor {n!r}")
            return
        if wanted is False:
            raise LowbitError(f"{self.name} weight has tensor {n!r}, which its settings do not use")
        if not isinstance(t, Tensor):
            raise LowbitError(f"{self.name} {n} must be a tensor, got {type(t).__name__}")
        dtypes = spec.dtype(self) if callable(spec.dtype) else spec.dtype
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        shape = tuple(spec.shape(self)) if spec.shape is not None else tuple(t.shape)
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            want = "/".join(_dtype_name(d) for d in dtypes)
            raise LowbitError(f"{self.name} {n} has shape {tuple(t.shape)}/{_dtype_name(t.dtype)}, "
                              f"expected {shape}/{want}")
        if spec.finite and not torch.isfinite(t).all():
            raise LowbitError(f"{self.name} {n} contains NaN/Inf")

    def check(self) -> None:
        """Format-specific checks after the declared ones (default: none)."""

    # -- reading ------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:  # pragma: no cover - abstract
        """The dense float weight of ``shape``."""
        raise NotImplementedError

    # -- size ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.n_weights
