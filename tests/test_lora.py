"""LoRA adapters on a frozen (quantized) base: the layer against a naive reference for several
packed formats (forward, and gradients by autograd on the dequantized weight and by finite
differences), the model-level helpers, PEFT's file layout (loaded by ``peft`` itself), merging,
and `lowbit lora` end to end on a tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F

from lowbit import api
from lowbit.cli import main
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny, tiny_model
from lowbit.nn.linear import QuantizedLinear
from lowbit.training.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRALinear,
    add_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge,
    save_adapter,
)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families. ") * 30
ALL = "q,k,v,o,gate,up,down"
HF_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

BASES = {  # name -> (method, scheme)
    "nf4-dq": ("nf4", None),
    "rtn-int4-g32": ("rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)),
    "rtn-int2-channel": ("rtn", QuantScheme(bits=2, symmetric=False, granularity="channel")),
    "hqq-int3-g16": ("hqq", QuantScheme(bits=3, symmetric=False, group_size=16, zero_point="float")),
}


def _lowbit_model(seed=0):
    t = tiny_model("llama", seed=seed)
    return api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


_CACHE = {}


def _quantized(name):
    """The tiny model quantized as BASES[name] says (quantized once per test session)."""
    if name not in _CACHE:
        m = _lowbit_model()
        if name != "float":
            method, scheme = BASES[name]
            api.quantize(m, method, scheme, progress=False)
        _CACHE[name] = m
    return _CACHE[name]


def _base_layer(name):
    layer = _quantized(name).model.model.layers[1].mlp.down_proj  # [64, 128]
    if name != "float":
        assert isinstance(layer, QuantizedLinear)
    return layer


def _randomise(lora: LoRALinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g) * 0.1)


def _reference(layer, x, A, B, scaling):
    """The naive LoRA layer on the dequantized base weight."""
    W = layer.weight_format.dequantize() if isinstance(layer, QuantizedLinear) else layer.weight
    b = layer.bias
    return F.linear(x, W, b) + (x @ A.T @ B.T) * scaling


@pytest.mark.parametrize("name", [*BASES, "float"])
def test_fresh_adapter_is_the_base_exactly(name):
    layer = _base_layer(name)
    lora = LoRALinear(layer, rank=4, alpha=8)
    assert lora.scaling == 2.0 and torch.count_nonzero(lora.lora_B.weight) == 0
    assert lora.lora_A.weight.shape == (4, 128) and lora.lora_B.weight.shape == (64, 4)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        assert torch.equal(lora(x), layer(x))
    xg = x.clone().requires_grad_(True)  # through the autograd function: the same forward
    with torch.no_grad():
        want = layer(x)
    assert torch.equal(lora(xg).detach(), want)


@pytest.mark.parametrize("name", [*BASES, "float"])
def test_forward_and_gradients_match_the_reference(name):
    layer = _base_layer(name)
    torch.manual_seed(0)
    lora = LoRALinear(layer, rank=4, alpha=8)
    _randomise(lora)
    x = torch.randn(3, 7, 128, requires_grad=True)
    g = torch.randn(3, 7, 64)
    y = lora(x)
    (y * g).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    A = lora.lora_A.weight.detach().clone().requires_grad_(True)
    B = lora.lora_B.weight.detach().clone().requires_grad_(True)
    yr = _reference(layer, xr, A, B, lora.scaling)
    (yr * g).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.lora_A.weight.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.lora_B.weight.grad, B.grad, rtol=1e-5, atol=1e-5)
    # only A and B get gradients: the base's bias and packed buffers none
    assert all(p.grad is None and not p.requires_grad for p in layer.parameters())
    assert all(b.grad is None for b in layer.buffers())


@pytest.mark.parametrize("name", ["nf4-dq", "rtn-int2-channel"])
def test_adapter_gradients_match_finite_differences(name):
    """The loss sum(g * y) is linear in A (and in B): a central difference is exact up to
    rounding even with a large step."""
    layer = _base_layer(name)
    torch.manual_seed(0)
    lora = LoRALinear(layer, rank=3, alpha=6)
    _randomise(lora)
    x, g = torch.randn(4, 128), torch.randn(4, 64)

    def loss():
        with torch.no_grad():
            return float((lora(x).double() * g.double()).sum())

    (lora(x) * g).sum().backward()
    for W in (lora.lora_A.weight, lora.lora_B.weight):
        for idx in [(0, 0), (1, 2), (W.shape[0] - 1, W.shape[1] - 1)]:
            h = 0.25
            with torch.no_grad():
                W[idx] += h
                up = loss()
                W[idx] -= 2 * h
                down = loss()
                W[idx] += h
            fd = (up - down) / (2 * h)
            assert abs(fd - float(W.grad[idx])) <= 1e-3 * max(1.0, abs(fd)), (idx, fd, float(W.grad[idx]))


def test_the_float_weight_is_never_kept_for_backward():
    """A packed base's backward dequantizes its weight again: no [out, in] float tensor is saved
    between the forward and the backward pass."""
    layer = _base_layer("rtn-int4-g32")
    lora = LoRALinear(layer, rank=4, alpha=8)
    shapes = []

    def pack(t):
        shapes.append(t.numel())
        return t

    x = torch.randn(2, 5, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora(x)
    y.sum().backward()
    assert 64 * 128 not in shapes and x.grad is not None
    plain = []  # the kernel's reference path under autograd would keep it (as Wᵀ)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t.numel()) or t, lambda t: t):
        layer(x.detach().clone().requires_grad_(True))
    assert 64 * 128 in plain


def test_add_lora_wraps_the_family_roles_and_trains_only_adapters():
    m = _lowbit_model()
    api.quantize(m, "nf4", None, progress=False)
    adapters = add_lora(m.model, 4, 8, "q,v,down")
    assert list(adapters) == [f"model.layers.{i}.{p}" for i in range(2)
                              for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert isinstance(m.model.model.layers[0].self_attn.k_proj, QuantizedLinear)  # not a target
    for a in adapters.values():
        torch.nn.init.normal_(a.lora_B.weight, std=0.02)
    params = lora_parameters(adapters)
    for p in params.values():
        p.requires_grad_(True)
    ids = torch.randint(0, 256, (2, 12))
    m.model(input_ids=ids).logits.square().mean().backward()
    with_grad = {n for n, p in m.model.named_parameters() if p.grad is not None}
    assert with_grad == set(params) and all(float(params[n].grad.abs().sum()) > 0 for n in params)
    with pytest.raises(LowbitError, match="LoRA adapter already"):
        add_lora(m.model, 4, 8, "q")


def test_add_lora_refuses_bad_input():
    m = _lowbit_model()
    with pytest.raises(LowbitError, match="rank must be a positive integer"):
        add_lora(m.model, 0, 8, ALL)
    with pytest.raises(LowbitError, match="unknown LoRA target 'query'"):
        add_lora(m.model, 4, 8, "q,query")
    with pytest.raises(LowbitError, match="alpha must be a positive"):
        add_lora(m.model, 4, -1, "q")
    m.model.model.layers[0].self_attn.q_proj = torch.nn.Identity()
    with pytest.raises(LowbitError, match="not a linear layer"):
        add_lora(m.model, 4, 8, "q")


def test_merge_folds_adapters_into_a_float_model():
    m = _lowbit_model()
    api.quantize(m, *BASES["rtn-int4-g32"], progress=False)
    adapters = add_lora(m.model, 4, 8, ALL)
    for i, a in enumerate(adapters.values()):
        _randomise(a, seed=i)
    merged = merge(m.model, adapters)
    assert not any(isinstance(x, (QuantizedLinear, LoRALinear)) for x in merged.modules())
    assert isinstance(m.model.model.layers[0].self_attn.q_proj, LoRALinear)  # the original untouched
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, m.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_peft_layout_saves_loads_bit_identically_and_peft_reads_it(tmp_path):
    torch.manual_seed(0)
    m = _lowbit_model()
    adapters = add_lora(m.model, 4, 8, ALL)
    for i, a in enumerate(adapters.values()):
        _randomise(a, seed=i)
    out = save_adapter(adapters, tmp_path / "ad", "some/base")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["target_modules"] == HF_NAMES and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "some/base" and cfg["fan_in_fan_out"] is False
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 14

    again = _lowbit_model()
    loaded = load_adapter(again.model, out)
    a, b = lora_state_dict(adapters), lora_state_dict(loaded)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    save_adapter(loaded, tmp_path / "ad2", "some/base")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        assert (out / f).read_bytes() == (tmp_path / "ad2" / f).read_bytes()

    peft = pytest.importorskip("peft", reason="peft (the reference loader of the adapter layout) is not installed")
    ids = torch.randint(0, 256, (2, 16))
    pm = peft.PeftModel.from_pretrained(_lowbit_model().model, str(out)).eval()
    with torch.no_grad():
        want = m.model(input_ids=ids).logits
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merge(m.model, adapters)(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    pm.save_pretrained(tmp_path / "by_peft")  # and what peft itself writes, lowbit reads
    third = _lowbit_model()
    load_adapter(third.model, tmp_path / "by_peft")
    with torch.no_grad():
        torch.testing.assert_close(third.model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)


def test_load_adapter_refuses_what_it_cannot_compute(tmp_path):
    m = _lowbit_model()
    out = save_adapter(add_lora(m.model, 2, 4, "q"), tmp_path / "ad", None)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(LowbitError, match="use_dora"):
        load_adapter(_lowbit_model().model, out)
    (out / CONFIG_FILE).write_text(json.dumps(dict(cfg, target_modules=["c_attn"])))
    with pytest.raises(LowbitError, match="'c_attn' is not a projection"):
        load_adapter(_lowbit_model().model, out)
    with pytest.raises(LowbitError, match="not a PEFT adapter"):
        load_adapter(_lowbit_model().model, tmp_path)


# -- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "train.txt"
    p.write_text(TEXT)
    return p


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, *capsys.readouterr()


def _flags(text, steps=20, lr=3e-3):
    # the tiny model is random: held-out numbers are measured on the text it trains on
    return ["--text", text, "--eval-text", text, "--steps", steps, "--batch-size", 4, "--seq-len", 32,
            "--lr", lr, "--eval-windows", 2, "--eval-every", 100]


def test_lora_cli_repairs_a_quantized_model_and_merges(tmp_path, capsys, tiny_dir, text):
    from transformers import AutoModelForCausalLM

    q = tmp_path / "w2"
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", 2, "--per-channel", "-o", q)
    assert code == 0, err
    out = tmp_path / "adapter"
    code, _, err = run(capsys, "lora", q, "--rank", 4, "--alpha", 8, "--objective", "kl", "--merge",
                       *_flags(text), "-o", out)
    assert code == 0, err
    rec = json.loads((out / "lowbit_train.json").read_text())
    assert rec["objective"] == "kl" and rec["kd"]["alpha"] == 1.0 and rec["steps"] == 20
    assert rec["teacher"] == str(tiny_dir) and rec["base_quantized"] and rec["adapted_layers"] == 14
    assert rec["final_eval"]["kl"] < 0.8 * rec["first_eval"]["kl"]  # the adapters repaired some of the error
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == HF_NAMES
    assert cfg["base_model_name_or_path"] == str(tiny_dir)
    assert not (tmp_path / ".adapter.resume").exists()

    ids = torch.randint(0, 256, (2, 16))
    base = api.load(str(q))  # the quantized base + the saved adapter
    load_adapter(base.model, out)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter-merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, base.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)

    peft = pytest.importorskip("peft", reason="peft (the reference loader of the adapter layout) is not installed")
    flt = api.load(str(tiny_dir))  # the float base: PEFT's adapter against lowbit's merge
    ours = merge(flt.model, load_adapter(flt.model, out))
    pm = peft.PeftModel.from_pretrained(api.load(str(tiny_dir)).model, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    code, _, err = run(capsys, "lora", q, "--rank", 4, "--alpha", 8, *_flags(text, steps=1), "-o", out)
    assert code == 0, err  # an adapter lowbit wrote is replaced without --force


def test_lora_cli_ce_objective_on_a_float_base(tmp_path, capsys, tiny_dir, text):
    out = tmp_path / "ce"
    code, _, err = run(capsys, "lora", tiny_dir, "--objective", "ce", "--targets", "q,v", "--rank", 2,
                       *_flags(text, steps=15, lr=1e-2), "-o", out)
    assert code == 0, err
    rec = json.loads((out / "lowbit_train.json").read_text())
    assert rec["kd"]["alpha"] == 0.0 and rec["targets"] == ["q", "v"] and not rec["base_quantized"]
    assert rec["final_eval"]["ppl"] < rec["first_eval"]["ppl"]
    assert json.loads((out / CONFIG_FILE).read_text())["target_modules"] == ["q_proj", "v_proj"]


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_lora_cli_bad_input_is_one_line(tmp_path, capsys, tiny_dir, text):
    o = tmp_path / "o"
    code, _, err = run(capsys, "lora", tiny_dir, "--rank", 0, "-o", o)
    assert_one_line_error(code, err, "rank")
    code, _, err = run(capsys, "lora", tiny_dir, "--targets", "q,attn", "-o", o)
    assert_one_line_error(code, err, "unknown LoRA target 'attn'")
    code, _, err = run(capsys, "lora", tiny_dir, "--objective", "kl", *_flags(text, steps=1), "-o", o)
    assert_one_line_error(code, err, "float model", "--teacher")
    code, _, err = run(capsys, "lora", tiny_dir, "--merged-output", tmp_path / "m", "-o", o)
    assert_one_line_error(code, err, "--merge")
    # a base with no linear layers lowbit can adapt: a model family without a record
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.models.tiny import tiny_tokenizer

    g = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259, n_positions=64,
                               bos_token_id=256, eos_token_id=257)).save_pretrained(g)
    tiny_tokenizer().save_pretrained(g)
    code, _, err = run(capsys, "lora", g, "--objective", "ce", *_flags(text, steps=1), "-o", o)
    assert_one_line_error(code, err, "gpt2")
    assert not o.exists()
