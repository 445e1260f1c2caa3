"""Block-wise fine-tuning (QuIP#'s sign vectors, scales and norms): the trainable stand-in computes
what the stored layer computes, tuning lowers the held-out error and is stored, and a tuning that
makes the held-out batch worse is undone."""

import pytest
import torch
from torch import nn

from lowbit import api, checkpoint
from lowbit.algorithms.block_tune import block_parameters, relative_error, tune
from lowbit.algorithms.quip import QuIPConfig, quip_quantize
from lowbit.errors import LowbitError
from lowbit.models.tiny import tiny_model
from lowbit.nn.linear import QuantizedLinear
from lowbit.training.tunable import TunableE8P


def _model(seed=3):
    t = tiny_model("llama", seed=seed)
    return t, api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_trainable_stand_in_equals_the_stored_layer(bits):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    fmt, _ = quip_quantize(W, X.T @ X, QuIPConfig(bits=bits), seed=4)
    q = QuantizedLinear(fmt, torch.randn(48, generator=g))
    t = TunableE8P(q)
    x = torch.randn(3, 5, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(t(x), q(x), rtol=1e-5, atol=1e-5)
        t.sv[:5] *= 1.5  # a tuned value is what the rebuilt weight stores
        t.scale.mul_(0.9)
        again = QuantizedLinear(t.weight_format(), q.bias)
        torch.testing.assert_close(t(x), again(x), rtol=1e-5, atol=1e-5)
    assert again.weight_format.sv is not None and again.weight_format.su is not None


def test_quip_fine_tuning_lowers_the_held_out_error_and_is_saved(tmp_path):
    t, m = _model()
    x = torch.arange(40)[None] % 250
    rec = api.quantize(m, "quip", None, progress=False, n_samples=12, seq_len=48, finetune_steps=60)
    tuning = rec["method"]["tuning"]
    assert sorted(tuning) == ["model.layers.0", "model.layers.1"]
    for b in tuning.values():
        assert b["kept"] and b["held_out_after"] < 0.9 * b["held_out_before"]
    with torch.no_grad():
        got = m.model(x).logits
    fmts = [mod.weight_format for mod in m.model.modules() if isinstance(mod, QuantizedLinear)]
    assert fmts and all(f.su is not None and f.sv is not None for f in fmts)
    out = api.save(m, str(tmp_path / "q"))
    loaded, _, rec2 = checkpoint.load(out)
    assert rec2["method"]["tuning"] == tuning
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, got)


def test_a_tuning_that_hurts_the_held_out_batch_is_undone():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    X = [torch.randn(4, 8) for _ in range(3)]
    T = [block(x).detach() + 0.01 * torch.randn(4, 8) for x in X]
    before = [p.detach().clone() for p in block.parameters()]
    params = list(block.parameters())
    res = tune(block, params, X, T, {}, steps=20, lr=50.0)  # a step size that wrecks it
    assert not res.kept and res.held_out_after > res.held_out_before
    assert all(torch.equal(a, b) for a, b in zip(before, block.parameters()))
    res = tune(block, params, X, T, {}, steps=0, lr=1e-3)
    assert res.kept and res.held_out_after == res.held_out_before
    with pytest.raises(LowbitError, match="one target per input batch"):
        tune(block, params, X, T[:2], {}, steps=1, lr=1e-3)
    with torch.no_grad():
        assert float(relative_error(block, X[0], T[0], {})) > 0


def test_block_parameters_skip_the_quantized_layers():
    block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    got = block_parameters(block, (nn.Linear,))
    assert [p.shape for p in got] == [torch.Size([8]), torch.Size([8])]  # the norm's gain and bias


def test_fine_tuning_options_are_checked():
    with pytest.raises(LowbitError, match="finetune_steps"):
        QuIPConfig(finetune_steps=-1)
    with pytest.raises(LowbitError, match="finetune_lr"):
        QuIPConfig(finetune_lr=0.0)
