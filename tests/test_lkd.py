"""Layer-wise knowledge distillation (lowbit.training.lkd) as an option of any method: it never makes a
block's calibration error larger, it brings the model closer to the float one, its checkpoints load
back, lkd_steps=0 is the plain method, and it refuses what it cannot wrap."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from lowbit import api, checkpoint
from lowbit.algorithms.base import make_method, wrapper_options
from lowbit.algorithms.block_tune import output_error, tune
from lowbit.algorithms.gptq import GPTQ
from lowbit.commands._args import options_from_flags
from lowbit.core.scheme import QuantScheme
from lowbit.data.texts import calibration_samples, load_text
from lowbit.errors import LowbitError
from lowbit.models.tiny import tiny_model
from lowbit.nn.linear import QuantizedLinear
from lowbit.training.lkd import LKD, LKDConfig
from lowbit.training.tunable import make_trainable, restore, trainable_parameters

SCHEME = QuantScheme(bits=3, group_size=32)
CALIB = dict(progress=False, n_samples=16, seq_len=48)


def _model(family="llama", seed=3):
    t = tiny_model(family, seed=seed)
    return api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


@pytest.fixture(scope="module")
def reference():
    """The float model's logits on held-out text (and on the calibration text)."""
    m = _model()
    texts = {"evaluation": calibration_samples(m.tokenizer, n_samples=4, seq_len=64, text=load_text("evaluation")),
             "calibration": calibration_samples(m.tokenizer, n_samples=16, seq_len=48, text=load_text("calibration"))}
    with torch.no_grad():
        return {k: (x, m.model(x).logits.log_softmax(-1)) for k, x in texts.items()}


def _kl(m, reference, which):
    x, p = reference[which]
    with torch.no_grad():
        q = m.model(x).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _check_blocks(rec, n_blocks=2):
    blocks = rec["method"]["lkd"]["blocks"]
    assert list(blocks) == [f"model.layers.{i}" for i in range(n_blocks)]
    for b in blocks.values():
        assert b["calibration_after"] <= b["calibration_before"]
        if b["kept"]:
            assert b["held_out_after"] < b["held_out_before"] and b["calibration_after"] < b["calibration_before"]
        else:
            assert b["calibration_after"] == b["calibration_before"]
    return blocks


def test_lkd_on_gptq_lowers_the_block_errors_and_the_checkpoint_loads_back(tmp_path, reference):
    plain = _model()
    api.quantize(plain, "gptq", SCHEME, **CALIB)
    m = _model()
    rec = api.quantize(m, "gptq", SCHEME, **CALIB, lkd_steps=30, lkd_lr=1e-4)
    assert rec["method"]["method"] == "gptq" and rec["method"]["config"]["scheme"] == SCHEME.to_dict()
    lkd = rec["method"]["lkd"]
    assert (lkd["steps"], lkd["lr"], lkd["mode"]) == (30, 1e-4, "auto") and "no_view" not in lkd
    blocks = _check_blocks(rec)
    assert any(b["kept"] for b in blocks.values())
    assert _kl(m, reference, "calibration") < _kl(plain, reference, "calibration")
    assert _kl(m, reference, "evaluation") <= _kl(plain, reference, "evaluation") * (1 + 1e-3)
    # the default (scales) view keeps GPTQ's codes (block 0's: later blocks see the tuned block's outputs)
    for (n, a), b in zip(m.model.named_modules(), plain.model.modules()):
        if isinstance(a, QuantizedLinear) and n.startswith("model.layers.0."):
            assert torch.equal(a.weight_format.qweight, b.weight_format.qweight)
    x = reference["evaluation"][0]
    with torch.no_grad():
        got = m.model(x).logits
    loaded, _, rec2 = checkpoint.load(api.save(m, str(tmp_path / "q")))
    assert rec2["method"]["method"] == "gptq" and rec2["method"]["lkd"] == lkd
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, got)


def test_lkd_makes_rtn_a_calibrated_run_and_brings_it_closer(reference):
    plain = _model()
    assert api.quantize(plain, "rtn", SCHEME, **CALIB)["runner"] is None
    m = _model()
    rec = api.quantize(m, "rtn", SCHEME, **CALIB, lkd_steps=60, lkd_mode="latent")  # codes may move
    assert rec["runner"] is not None and rec["calibration"]["n_samples"] == 16
    assert rec["method"]["lkd"]["mode"] == "latent" and rec["method"]["lkd"]["lr"] == LKDConfig(1).lr
    blocks = _check_blocks(rec)
    assert all(b["kept"] for b in blocks.values())
    assert all(b["calibration_after"] < 0.8 * b["calibration_before"] for b in blocks.values())
    assert _kl(m, reference, "evaluation") < 0.8 * _kl(plain, reference, "evaluation")


def test_lkd_on_gemma3_with_hqq():
    m = _model("gemma3_text")
    rec = api.quantize(m, "hqq", QuantScheme(bits=3, group_size=32, symmetric=False, zero_point="float"),
                       progress=False, n_samples=12, seq_len=32, lkd_steps=20, lkd_lr=1e-4)
    assert rec["method"]["method"] == "hqq" and rec["runner"] is not None
    blocks = _check_blocks(rec, len(m.model.model.layers))
    assert any(b["kept"] for b in blocks.values())
    zeros = [q.weight_format.zeros for q in m.model.modules() if isinstance(q, QuantizedLinear)]
    assert zeros and all(z is not None and z.dtype == torch.float16 for z in zeros)


@pytest.mark.filterwarnings("error:optimizer contains a parameter group with duplicate parameters")
def test_lkd_on_quip_trains_the_e8p_layers():
    """QuIP#'s E8P layers have a trainable view (sign vectors, scales; lattice codes kept): LKD
    trains them instead of leaving them as the method made them."""
    plain = _model()
    api.quantize(plain, "quip", None, **CALIB)
    m = _model()
    rec = api.quantize(m, "quip", None, **CALIB, lkd_steps=30, lkd_lr=1e-3)
    assert "no_view" not in rec["method"]["lkd"]
    blocks = _check_blocks(rec)
    assert any(b["kept"] for b in blocks.values())
    a = {n: q.weight_format for n, q in m.model.named_modules() if isinstance(q, QuantizedLinear)}
    b = {n: q.weight_format for n, q in plain.model.named_modules() if isinstance(q, QuantizedLinear)}
    assert len(a) == 14 and all(f.name == "e8p" for f in a.values())
    kept = [k for k, v in blocks.items() if v["kept"]]
    for n, f in a.items():  # block 0's codes are the plain run's (later blocks see tuned inputs)
        if n.startswith("model.layers.0."):
            assert torch.equal(f.codes, b[n].codes)
        if any(n.startswith(k + ".") for k in kept):
            assert f.sv is not None and not torch.equal(f.sv, b[n].incoherence().V.diagonal())


def test_lkd_steps_0_is_the_plain_method():
    meth = make_method("gptq", SCHEME, lkd_steps=0, lkd_lr=1e-3)
    assert type(meth) is GPTQ and "lkd" not in meth.describe()
    a, b = _model(), _model()
    api.quantize(a, "gptq", SCHEME, **CALIB)
    api.quantize(b, "gptq", SCHEME, **CALIB, lkd_steps=0)
    fa = [m.weight_format for m in a.model.modules() if isinstance(m, QuantizedLinear)]
    fb = [m.weight_format for m in b.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(fa) == len(fb) == 14
    for x, y in zip(fa, fb):
        assert all(torch.equal(s, t) for s, t in zip(x.tensors().values(), y.tensors().values()))


def test_what_lkd_refuses():
    with pytest.raises(LowbitError, match="fine-tunes its blocks"):
        make_method("quip", None, finetune_steps=5, lkd_steps=5)
    with pytest.raises(LowbitError, match="whole model"):
        make_method("magnitude", None, sparsity=0.5, lkd_steps=5)
    with pytest.raises(LowbitError, match="lkd_lr"):
        make_method("gptq", SCHEME, lkd_steps=5, lkd_lr=0.0)
    with pytest.raises(LowbitError, match="lkd_mode"):
        make_method("gptq", SCHEME, lkd_steps=5, lkd_mode="codes")
    with pytest.raises(LowbitError, match="lkd_steps"):
        make_method("gptq", SCHEME, lkd_steps=-1)
    with pytest.raises(LowbitError, match="lkd_nonsense"):
        make_method("gptq", SCHEME, lkd_steps=5, lkd_nonsense=1)
    with pytest.raises(LowbitError, match="already wrapped"):
        LKD(make_method("gptq", SCHEME, lkd_steps=5), LKDConfig(5))
    meth = make_method("quip", None, lkd_steps=5)                       # QuIP# without its own tuning: fine
    assert isinstance(meth, LKD) and meth.name == "quip" and meth.tunes_blocks and meth.needs_calibration
    assert meth.errors is meth.inner.errors and meth.layer_records == ("errors", "tuned", "lkd_blocks")
    with pytest.raises(AttributeError):
        meth.take_nothing  # noqa: B018 (only the wrapped method's records are looked up there)


def test_the_command_line_options_are_typed():
    assert wrapper_options() == {"lkd_steps": int, "lkd_lr": float, "lkd_mode": str}
    args = argparse.Namespace(option=["lkd_steps=200", "lkd-lr=3e-5", "lkd_mode=scales", "damp=0.1"], bits=None)
    from lowbit.algorithms import get_method

    opts = options_from_flags(args, get_method("gptq"))
    assert opts == {"lkd_steps": 200, "lkd_lr": 3e-5, "lkd_mode": "scales", "damp": 0.1}
    assert type(opts["lkd_steps"]) is int and type(opts["lkd_lr"]) is float
    with pytest.raises(LowbitError, match="lkd_steps expects a int"):
        options_from_flags(argparse.Namespace(option=["lkd_steps=many"], bits=None), get_method("gptq"))


def test_tune_undoes_what_makes_the_calibration_error_larger():
    """Training sees batch 0 only (one step); the held-out batch agrees with it, batch 1 (large)
    does not: the held-out error drops, the error on all batches grows."""
    block = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        block.weight.copy_(torch.eye(4))
    g = torch.Generator().manual_seed(0)
    X = [torch.randn(1, 3, 4, generator=g), 100 * torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)]
    T = [0.5 * X[0], X[1], 0.5 * X[2]]
    params = [block.weight]
    res = tune(block, params, X, T, {}, steps=1, lr=0.05)                                 # held-out only: kept
    assert res.kept and res.held_out_after < res.held_out_before and res.calibration_before is None
    with torch.no_grad():
        block.weight.copy_(torch.eye(4))
    before = output_error(block, X, T, {})
    res = tune(block, params, X, T, {}, steps=1, lr=0.05, calibration=True)
    assert res.held_out_after < res.held_out_before and res.calibration_after > res.calibration_before == before
    assert not res.kept and torch.equal(block.weight, torch.eye(4))


def test_recovery_of_a_whole_quantized_model(tmp_path, reference):
    """The whole-model path: views of every packed layer, trained against the float model, packed
    again in place and saved."""
    m = _model()
    api.quantize(m, "rtn", SCHEME, progress=False)
    teacher = _model().model
    x = reference["calibration"][0][:4]
    with torch.no_grad():
        t = teacher(x).logits
        before = float((m.model(x).logits - t).pow(2).mean())
    standins = make_trainable(m.model, "scales")
    assert len(standins) == 14 and not standins.skipped
    opt = torch.optim.Adam(trainable_parameters(standins), lr=1e-3)
    for _ in range(10):
        opt.zero_grad()
        (m.model(x).logits - t).pow(2).mean().backward()
        opt.step()
    tuned = restore(m.model, standins, keep=True)
    assert len(tuned) == 14 and len(checkpoint.quantized_modules(m.model)) == 14
    with torch.no_grad():
        after = m.model(x).logits
    assert float((after - t).pow(2).mean()) < before
    loaded, _, _ = checkpoint.load(api.save(m, str(tmp_path / "r")))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, after)
