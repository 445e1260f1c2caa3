"""Quantization-aware training (QAT) for ordinary networks, ending in the integer model.

1. :func:`prepare_qat` — a copy of the float ``nn.Sequential``, instrumented exactly as for static
   PTQ (:func:`lowbit.cnn.ptq.prepare`): weights fake-quantized per output channel
   (symmetric min-max of the current weight at every step), every activation fake-quantized by a
   :class:`~lowbit.cnn.fake_quant.FakeQuantAct` whose observer keeps updating during training
   (moving-average min-max by default), gradients through the clipped straight-through estimator.
   A first pass over ``warmup`` batches only observes (fake-quant off), so the ranges start from
   the data rather than from the first noisy batch.
2. :func:`train_qat` — an ordinary training loop (Adam, cross-entropy) over the fake-quant model.
3. :func:`convert_qat` — freeze the observers and convert with the same
   :func:`lowbit.cnn.ptq.convert` as PTQ: the integer-only network whose weights are
   the trained ones and whose activation qparams are the observers' final ranges.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.algorithms.static_int8 import StaticInt8Config
from lowbit.cnn.fake_quant import FakeQuantSequential
from lowbit.cnn.integer import IntegerSequential
from lowbit.cnn.ptq import convert, prepare
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class QATConfig:
    bits: int = 8
    symmetric: bool = False        # activations (weights are always symmetric per channel)
    restricted: bool = False
    observer: str = "moving-minmax"
    averaging_constant: float = 0.01
    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 64
    warmup_batches: int = 4
    seed: int = 0

    def static_config(self) -> StaticInt8Config:
        scheme = QuantScheme(bits=self.bits, symmetric=self.symmetric, granularity="channel", group_size=None,
                             restricted_range=self.restricted, scale_dtype="float32")
        return StaticInt8Config(scheme=scheme, observer=self.observer)

    def make_observer(self):
        from lowbit.core.observers import get_observer

        if self.observer == "moving-minmax":
            return get_observer("moving-minmax", averaging_constant=self.averaging_constant)
        return get_observer(self.observer)


def prepare_qat(model: nn.Sequential, cfg: QATConfig, warmup_data: Tensor | None = None) -> FakeQuantSequential:
    """Fake-quant copy of ``model`` ready to train (the original is left untouched)."""
    if cfg.epochs < 0 or cfg.lr <= 0:
        raise LowbitError(f"QAT needs epochs >= 0 and lr > 0, got {cfg.epochs}, {cfg.lr}")
    fq = prepare(copy.deepcopy(model).eval(), cfg.static_config(), cfg.make_observer)
    if warmup_data is not None:
        fq.set_mode(observing=True, quantizing=False)
        with torch.no_grad():
            for k in range(0, min(len(warmup_data), cfg.warmup_batches * cfg.batch_size), cfg.batch_size):
                fq(warmup_data[k:k + cfg.batch_size])
    return fq.set_mode(observing=True, quantizing=True)


def train_qat(fq: FakeQuantSequential, X: Tensor, y: Tensor, cfg: QATConfig) -> FakeQuantSequential:
    """Adam on cross-entropy through the fake quantizers; observers keep updating."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(fq.parameters(), lr=cfg.lr)
    fq.set_mode(observing=True, quantizing=True).train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=g)
        for k in range(0, len(y), cfg.batch_size):
            idx = perm[k:k + cfg.batch_size]
            loss = F.cross_entropy(fq(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fq.eval()


def convert_qat(fq: FakeQuantSequential) -> IntegerSequential:
    """Freeze every quantizer's range and build the integer-only model."""
    fq.eval().freeze()
    return convert(fq)


def qat(model: nn.Sequential, X: Tensor, y: Tensor, cfg: QATConfig | None = None
        ) -> tuple[IntegerSequential, FakeQuantSequential]:
    """prepare -> train -> convert; returns (integer model, its frozen fake-quant simulation)."""
    cfg = cfg or QATConfig()
    fq = prepare_qat(model, cfg, warmup_data=X)
    train_qat(fq, X, y, cfg)
    return convert_qat(fq), fq
