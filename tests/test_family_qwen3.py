"""Qwen3, added as one record in lowbit.models.families and nothing else: per-head q/k RMSNorms
(as Gemma 3's, without its 1 + w), no biases, SiLU MLP, optional sliding-window layers. On a tiny
random Qwen3ForCausalLM: RTN, GPTQ and AWQ quantize it and the checkpoint loads back bit-exactly;
the lean decoder's Python step matches transformers and its C step matches the Python step, float
and quantized; the GGUF export (llama.cpp architecture "qwen3") loads back into transformers and
into lowbit with the same logits."""

import pytest
import torch

from lowbit import api
from lowbit.core.scheme import QuantScheme
from lowbit.kernels import cpu
from lowbit.models.families import FAMILIES, awq_layout, family_of
from lowbit.models.tiny import save_tiny, tiny_model
from lowbit.nn.linear import QuantizedLinear
from lowbit.runtime import LeanDecoder
from lowbit.runtime.native import _library

CALIB = dict(n_samples=4, seq_len=32)
METHODS = {
    "rtn": (QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32), {}),
    "gptq": (QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32), CALIB),
    "awq": (QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32), CALIB),
}
SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)  # layer 1 local
NATIVE = _library() is not None and cpu.available()  # the C step is built (else: Python step only)


def qwen3(seed=0, **overrides) -> api.Model:
    """A tiny Qwen3 whose norm gains are random (they start at 1), so that every norm matters."""
    t = tiny_model("qwen3", seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


def ids(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.inference_mode():
        return model(x[None]).logits[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def decode(model, x, n_prefill, native):
    """Prefill x[:n_prefill], then one position at a time; every position's logits [T, vocab]."""
    dec = LeanDecoder(model, max_len=len(x), native=native)
    assert (dec.native_step is not None) == native, dec.native_reason
    out = [dec.forward(x[:n_prefill], all_logits=True)]
    out += [dec.forward(x[t:t + 1])[None] for t in range(n_prefill, len(x))]
    return torch.cat(out)


def test_the_record():
    m = qwen3().model
    fam = family_of(m)
    assert fam is FAMILIES["qwen3"] and fam.gguf.name == "qwen3" and not fam.gguf.permute_qk
    blk = m.model.layers[0]
    assert fam.norms == {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                         "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    assert blk.self_attn.q_norm.weight.shape == (m.config.head_dim,)
    assert m.model.layers[0].self_attn.q_proj.bias is None


def test_awq_folding_through_the_record_leaves_the_float_model_unchanged():
    from lowbit.algorithms.awq import fold_scales

    m = qwen3(seed=4).model
    x = ids(20)
    before = hf_logits(m, x)
    layout = awq_layout("qwen3")
    g = torch.Generator().manual_seed(5)
    folded = []
    for blk in m.model.layers:
        for grp in layout.groups:
            prev = blk.get_submodule(grp.prev)
            width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.numel()
            if any(blk.get_submodule(n).in_features != width for n in grp.linears):
                continue  # v_proj -> o_proj under grouped-query attention
            fold_scales(blk, grp.prev, grp.linears, torch.exp(0.5 * torch.randn(width, generator=g)), layout.norm_offset)
            folded.append(grp.prev)
    assert folded == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"] * 2
    assert rel(hf_logits(m, x), before) < 1e-5


@pytest.mark.parametrize("window", [False, True], ids=["full", "sliding"])
def test_decoder_float_parity_with_transformers(window):
    m = qwen3(seed=1, **(SLIDING if window else {})).model
    if window:
        assert m.config.layer_types == ["full_attention", "sliding_attention"]
    x = ids(30)
    ref = hf_logits(m, x)
    py = decode(m, x, 12, native=False)
    assert rel(py, ref) < 1e-4
    if NATIVE:
        nat = decode(m, x, 12, native=True)
        assert torch.equal(nat[:12], py[:12])  # prefill runs the Python path in both
        assert rel(nat[12:], py[12:]) < 2e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantize_save_load_and_decode(method, tmp_path):
    m = qwen3(seed=2)
    x = ids(24)
    before = hf_logits(m.model, x)
    scheme, kw = METHODS[method]
    torch.manual_seed(0)
    api.quantize(m, method, scheme, progress=False, **kw)
    q = hf_logits(m.model, x)
    err = rel(q, before)
    assert 0 < err < 0.3, err  # 4-bit g32 of random weights: 0.11-0.21 (a mis-wired block: ~1)
    quantized = [n for n, mod in m.model.named_modules() if isinstance(mod, QuantizedLinear)]
    assert quantized == [f"model.layers.{i}.{p}" for i in range(2) for p in FAMILIES["qwen3"].linears]
    api.save(m, str(tmp_path / "q"))
    back = api.load(str(tmp_path / "q"))
    assert family_of(back.model) is FAMILIES["qwen3"]
    assert torch.equal(hf_logits(back.model, x), q)
    py = decode(back.model, x, 8, native=False)
    assert rel(py, q) < 1e-4
    if NATIVE:
        nat = decode(back.model, x, 8, native=True)
        assert rel(nat, py) < 2e-6


def test_gguf_export_loads_back_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.export.gguf import export_gguf
    from lowbit.export.gguf_read import read_gguf

    # head_dim 128: transformers' GGUF reader does not read Qwen3's key_length and takes the config
    # default (128, as every published Qwen3 has); llama.cpp reads the key_length we write
    save_tiny(tmp_path / "hf", "qwen3", seed=3, head_dim=128)
    m = api.load(str(tmp_path / "hf"))
    with torch.no_grad():
        m.model.load_state_dict(qwen3(seed=3, head_dim=128).model.state_dict())  # random norm gains
    rep = export_gguf(m, tmp_path / "m.gguf", "F32")
    md, ts = read_gguf(tmp_path / "m.gguf")
    assert md["general.architecture"] == "qwen3" and rep.arch == "qwen3"
    assert md["qwen3.attention.key_length"] == md["qwen3.attention.value_length"] == 128
    blk0 = sorted(n[len("blk.0."):] for n in ts if n.startswith("blk.0."))
    assert blk0 == sorted(f"{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                    "attn_q_norm", "attn_k_norm", "ffn_norm", "ffn_gate",
                                                    "ffn_up", "ffn_down"))
    assert torch.equal(ts["blk.1.attn_k_norm.weight"], m.model.model.layers[1].self_attn.k_norm.weight)
    assert torch.equal(ts["blk.0.attn_q.weight"], m.model.model.layers[0].self_attn.q_proj.weight)  # not permuted
    x = ids(40)
    ref = hf_logits(m.model, x)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    torch.testing.assert_close(hf_logits(hf, x), ref, rtol=0, atol=1e-5)
    g = api.load(str(tmp_path / "m.gguf"))  # lowbit's own GGUF loading knows the architecture
    assert family_of(g.model) is FAMILIES["qwen3"]
    torch.testing.assert_close(hf_logits(g.model, x), ref, rtol=0, atol=1e-5)
