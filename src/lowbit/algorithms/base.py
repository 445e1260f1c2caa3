"""The interface every algorithm implements, and the walk that applies data-free methods.

A method sees one linear layer at a time. Methods that need calibration data set
``needs_calibration = True`` and receive that layer's inputs through ``observe`` (called by the
sequential calibration runner, which alone knows about blocks, hooks and devices) before
``apply`` is asked for the layer's new weight (a format, or a dense tensor); the runner wraps it
in the module that takes the layer's place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from lowbit.formats.base import WeightFormat


class Method:
    name: str = "?"
    config_cls: type = object
    needs_calibration: bool = False
    # Names of dict attributes, keyed by full layer name, in which the method keeps per-layer
    # results (read by describe()). When the runner splits a run over processes, each layer is
    # solved in one process; its entries are copied from there to every process.
    layer_records: tuple[str, ...] = ()
    # True when transform_block works with the statistics of the layers this process observed and
    # makes every change to the block identically in every process (lowbit.core.processes.share);
    # the runner refuses to split the run of a method that overrides transform_block without it.
    distributed_transform: bool = False

    def __init__(self, config):
        self.config = config

    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:  # pragma: no cover
        """Accumulate statistics of this layer's input activations x [..., in_features]."""

    def transform_block(self, block: nn.Module, prefix: str, inputs: list[Tensor], block_kwargs: dict) -> None:
        """Optional: rewrite ``block`` in place after observation and before its layers are
        replaced (e.g. AWQ's per-channel scales folded into the preceding norm). ``inputs`` are the
        block's input hidden states (a list of batches on the block's device) and ``block_kwargs``
        the keyword arguments the block is called with, so a method can run the block or its
        submodules on real data. The default does nothing.

        Split over processes (`lowbit.calibration.distributed`), ``inputs`` are this process's
        batches only and the method holds statistics only for the layers this process owns: see
        ``distributed_transform``."""

    @property
    def tunes_blocks(self) -> bool:
        """True when the runner should call `tune_block` (after observation, a copy of the float
        block's outputs is kept for it). The default: no."""
        return False

    def tune_block(self, block: nn.Module, prefix: str, inputs, targets, block_kwargs: dict) -> dict:
        """Optional: fine-tune ``block`` after all its linear layers were replaced by their
        quantized modules, so that ``block(x, **block_kwargs)`` comes closer to ``targets`` (the
        float block's outputs, one tensor per batch of ``inputs``, in order). Returns the new
        weights of the layers tuning changed, by name within the block (the runner installs them
        as it installs `apply`'s results); the block's own float parameters (norm gains) may be
        changed in place. Called only when `tunes_blocks`; the block's outputs are computed
        after it, so the next block sees the tuned one. One process only (the runner refuses a
        split run)."""
        return {}

    def statistics(self) -> dict[str, Tensor]:
        """Optional: the accumulated statistics that are *sums over calibration samples* (e.g. the
        GPTQ Hessian and its sample count), for inspection and tests. The default has none."""
        return {}

    def apply(self, layer_name: str, module: nn.Linear) -> "WeightFormat | Tensor":
        """Solve one layer: return its weight in a format (`lowbit.formats`), or a dense float
        weight (a pruned layer). The runner builds the replacement module from it
        (`lowbit.nn.replace.replacement`); no method builds modules."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-serialisable record of this method's settings, saved with the model."""
        cfg = self.config
        d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        if "scheme" in d:
            d["scheme"] = d["scheme"].to_dict()
        return {"method": self.name, "config": d}


def wrapper_options() -> dict[str, type]:
    """The options every method takes on top of its own, for the registered method wrappers
    (registry kind "wrapper": a class with ``option_prefix``, ``option_types`` and
    ``wrap(method, options)``): {"lkd_steps": int, ...}."""
    from lowbit.core.registry import available, lookup

    wrappers = [lookup("wrapper", n) for n in available("wrapper")]
    return {w.option_prefix + k: t for w in wrappers for k, t in w.option_types.items()}


def make_method(name: str, scheme=None, **options) -> Method:
    """Instantiate the registered method ``name`` with its config built from scheme + options.
    Options of a registered wrapper (``lkd_steps``, ...) are taken out first; the wrapper then
    decides whether to wrap the method (``wrap``)."""
    import dataclasses

    from lowbit.algorithms import get_method
    from lowbit.core.registry import available, lookup
    from lowbit.errors import LowbitError

    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    wrappers = []
    for w in [lookup("wrapper", n) for n in available("wrapper")]:
        taken = {k[len(w.option_prefix):]: options.pop(k) for k in list(options)
                 if k.startswith(w.option_prefix) and k not in fields and options[k] is not None}
        if taken:
            wrappers.append((w, taken))
    unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
    if unknown:
        raise LowbitError(f"method {name} does not take option(s) {', '.join(unknown)}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    if scheme is not None and "scheme" in fields:
        kwargs["scheme"] = scheme
    method = cls(cls.config_cls(**kwargs))
    for w, taken in wrappers:
        method = w.wrap(method, taken)
    return method
