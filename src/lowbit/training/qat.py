"""Quantization-aware training of an LLM: every linear layer of every block fake-quantized on its
target grid (`lowbit.training.fake_quant.FakeQuantLinear`: straight-through gradients, scales
following the weight or learned as in LSQ), trained towards the original model's outputs with the
shared distillation recipe (`lowbit.training.kd.distill`), then packed into the same `AffineWeight`
format post-training methods write, so the result is an ordinary lowbit checkpoint (eval, export,
the C decode step).

    standins = prepare(model, scheme, learn_scale=True)   # nn.Linear -> FakeQuantLinear
    distill(model, teacher, {**named_parameters_of(standins), **norm_parameters(model)}, ...)
    convert(model, standins)                                 # FakeQuantLinear -> QuantizedLinear
"""

from __future__ import annotations

from torch import nn

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.families import block_linears
from lowbit.training.fake_quant import FakeQuantLinear
from lowbit.training.tunable import restore


def prepare(model: nn.Module, scheme: QuantScheme, learn_scale: bool = False,
            grad_scale: bool = True) -> dict[str, FakeQuantLinear]:
    """Replace every block linear by its fake-quantized twin (latent weight = the float weight, so
    the forward starts as RTN's); returns {full name: FakeQuantLinear}."""
    out = {}
    for name, lin in block_linears(model).items():  # nn.Linear only: a layer already replaced is not one
        fq = FakeQuantLinear.from_linear(lin, scheme, learn_scale=learn_scale, grad_scale=grad_scale)
        model.set_submodule(name, fq)
        out[name] = fq
    if not out:
        raise LowbitError(f"{type(model).__name__} has no linear layers in its blocks to quantize")
    return out


def convert(model: nn.Module, standins: dict[str, FakeQuantLinear]) -> dict:
    """Pack every fake-quantized layer: QuantizedLinear over its `AffineWeight` (the weights the
    trained model computed with, exactly). Returns {name: format}."""
    return restore(model, standins, keep=True)
