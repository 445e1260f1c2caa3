"""Layer-wise knowledge distillation (LKD; ZeroQuant, Yao et al. 2022, §4.2) as an option of any
method: ``lkd_steps=N`` (``lkd_lr``, ``lkd_mode``) after the method's own settings.

The calibration runner quantizes one decoder block at a time. With LKD, once the method has
replaced the block's linear layers, the quantized block is trained to reproduce the float block's
outputs on the same calibration inputs (the teacher is the float block itself, its outputs kept
by the runner; the loss is the relative squared error ``|block(x) - t|^2 / |t|^2``, one sample a
step, Adam; `lowbit.algorithms.block_tune.tune`):

* each packed layer through its trainable view (`lowbit.training.tunable`): ``"scales"`` (the
  default, ``"auto"``) keeps the integer codes and trains the scales (and float zero-points);
  ``"latent"`` trains a latent weight with the straight-through estimator and learned scales, so
  codes may move;
* the block's own float parameters (its norm gains).

Then the layers are packed again in their format. The block's error on the held-out calibration
batch and on all calibration batches is measured before and after, the latter with the packed
layers themselves: when either got worse, everything is put back as the method left it, so LKD
never increases a block's output error on its calibration data. The next block then sees the
tuned block's outputs (errors are not carried forward twice).

A method that needs no data (RTN, HQQ) becomes a calibrated one with LKD (its layers are solved
as before, the calibration data serve the distillation only). Refused: a method that fine-tunes
its blocks itself (QuIP#, AQLM with ``finetune_steps`` > 0) and one that must see the whole model
first (global pruning). Layers whose format has no trainable view are left as the method made
them (listed in the record).

The record is the method's own, plus ``"lkd"``: the settings and, per block, the held-out and
calibration errors before and after and whether the tuning was kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.algorithms.block_tune import block_parameters, output_error, tune
from lowbit.core.log import log
from lowbit.core.registry import register
from lowbit.errors import LowbitError
from lowbit.nn.linear import QuantizedLinear
from lowbit.training.tunable import MODES, STANDIN_TYPES, make_trainable, restore, trainable_parameters

DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class LKDConfig:
    steps: int                 # Adam steps per block (one calibration sample each); 0: no LKD
    lr: float = DEFAULT_LR
    mode: str = "auto"         # trainable view of the packed layers (`lowbit.training.tunable`)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise LowbitError(f"lkd_steps must be an integer >= 0, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise LowbitError(f"lkd_lr must be a finite number > 0, got {self.lr!r}")
        if self.mode not in MODES:
            raise LowbitError(f"lkd_mode must be one of {', '.join(MODES)}, got {self.mode!r}")


# the block's own parameters LKD trains are those outside the (packed, stand-in or float) layers
_LAYERS = (QuantizedLinear, nn.Linear, *STANDIN_TYPES)


def lkd_block(block: nn.Module, inputs, targets, block_kwargs: dict, cfg: LKDConfig) -> tuple[dict, dict, dict]:
    """Distil one quantized block towards the float block's outputs ``targets`` (module
    docstring), in place. Returns (tuned formats by layer name within the block, none when the
    tuning was undone; the block's report; {name: format} of the packed layers with no view)."""
    X, T = list(inputs), list(targets)
    before = output_error(block, X, T, block_kwargs)               # with the packed layers
    standins = make_trainable(block, cfg.mode)
    own = block_parameters(block, _LAYERS)
    saved = [p.detach().clone() for p in own]
    try:
        res = tune(block, trainable_parameters(standins) + own, X, T, block_kwargs, cfg.steps, cfg.lr,
                   calibration=True)
    except BaseException:
        restore(block, standins, keep=False)
        with torch.no_grad():
            for p, v in zip(own, saved):
                p.copy_(v)
        raise
    tuned = restore(block, standins, keep=res.kept)
    after = output_error(block, X, T, block_kwargs) if res.kept else before
    kept = res.kept and after <= before
    if res.kept and not kept:  # packed again, the layers lost what the stand-ins had gained: undo
        for n, s in standins.items():
            block.set_submodule(n, s.original)
        with torch.no_grad():
            for p, v in zip(own, saved):
                p.copy_(v)
        tuned, after = {}, before
    report = {"held_out_before": res.held_out_before, "held_out_after": res.held_out_after,
              "calibration_before": before, "calibration_after": after, "kept": kept}
    return tuned, report, dict(standins.skipped)


class LKD(Method):
    """Any method with layer-wise distillation of each quantized block (module docstring): every
    part of the `Method` interface is the wrapped method's, except the block tuning and the
    record's ``"lkd"`` entry."""

    config_cls = LKDConfig
    needs_calibration = True       # the distillation needs the block inputs, whatever the method
    option_prefix = "lkd_"         # make_method: lkd_steps=... -> LKDConfig(steps=...)
    option_types = {"steps": int, "lr": float, "mode": str}

    def __init__(self, inner: Method, config: LKDConfig):
        if isinstance(inner, LKD):
            raise LowbitError(f"{inner.name} is already wrapped in LKD")
        if inner.tunes_blocks:
            raise LowbitError(f"{inner.name} fine-tunes its blocks itself (finetune_steps > 0); use that or lkd_steps, "
                              "not both")
        if getattr(inner, "prepare_model", None) is not None:
            raise LowbitError(f"{inner.name} sees the whole model before it changes a layer; LKD runs block by block "
                              "and cannot wrap it")
        self.inner = inner
        self.lkd = config
        self.config = inner.config
        self.name = inner.name
        self.layer_records = tuple(inner.layer_records) + ("lkd_blocks",)
        self.distributed_transform = inner.distributed_transform
        self.lkd_blocks: dict[str, dict] = {}  # block prefix -> errors before/after, kept
        self.no_view: dict[str, str] = {}      # layer -> format, for layers LKD could not train

    @classmethod
    def wrap(cls, method: Method, options: dict) -> Method:
        """``method`` wrapped for the ``lkd_*`` options (without their prefix); ``method`` itself
        when ``steps`` is 0 (or not given)."""
        unknown = sorted(set(options) - set(cls.option_types))
        if unknown:
            raise LowbitError(f"method {method.name} does not take option(s) "
                              f"{', '.join(cls.option_prefix + k for k in unknown)}")
        cfg = LKDConfig(**{"steps": 0, **options})
        return cls(method, cfg) if cfg.steps > 0 else method

    def __getattr__(self, name: str):
        # the wrapped method's per-layer records (GPTQ's ``errors``, ...), read by the runner's resume
        inner = self.__dict__.get("inner")
        if inner is not None and name in inner.layer_records:
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- the wrapped method's part --------------------------------------------------------------
    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:
        self.inner.observe(layer_name, module, x)

    def transform_block(self, block: nn.Module, prefix: str, inputs, block_kwargs: dict) -> None:
        self.inner.transform_block(block, prefix, inputs, block_kwargs)

    def statistics(self) -> dict[str, Tensor]:
        return self.inner.statistics()

    def apply(self, layer_name: str, module: nn.Linear):
        return self.inner.apply(layer_name, module)

    # -- LKD ------------------------------------------------------------------------------------
    @property
    def tunes_blocks(self) -> bool:
        return self.lkd.steps > 0

    def tune_block(self, block: nn.Module, prefix: str, inputs, targets, block_kwargs: dict) -> dict:
        tuned, report, skipped = lkd_block(block, inputs, targets, block_kwargs, self.lkd)
        if skipped:
            log(f"LKD: {len(skipped)} layer(s) of {prefix} have no trainable view ("
                f"{', '.join(sorted(set(skipped.values())))}); they stay as {self.name} made them")
        self.no_view.update({f"{prefix}.{n}": f for n, f in skipped.items()})
        self.lkd_blocks[prefix] = report
        return tuned

    def describe(self) -> dict:
        d = self.inner.describe()
        d["lkd"] = {"steps": self.lkd.steps, "lr": self.lkd.lr, "mode": self.lkd.mode,
                    "blocks": dict(self.lkd_blocks)}
        if self.no_view:
            d["lkd"]["no_view"] = dict(sorted(self.no_view.items()))
        return d


register("wrapper", "lkd", LKD)
