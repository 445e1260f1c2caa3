"""bench/synthetic_model.py: random models with the exact shapes of real LLMs.

Writing the real sizes (2.5-16 GB) is for benchmarks; here the ``tiny`` variant of each model
(same family, RoPE settings, tying, biases and vocabulary, test-sized widths) is written, and the
full-size shapes are checked without writing anything.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit.models import builtin
from lowbit.models.spec import load_model

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "synthetic_model.py"


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("synthetic_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (the script's default) when its cache exists, else the tiny one."""
    if builtin.is_cached(builtin.DEFAULT_MODEL):
        return None
    from lowbit.models.tiny import tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(str(d))
    return str(d)


# parameters of the real models (their model cards: 1.24B, 8.03B, 7.62B), tensors, shards of 5 GB
FULL = {"llama-3.2-1b": (1_235_814_400, 146, 1), "llama-3.1-8b": (8_030_261_248, 291, 4),
        "qwen2.5-7b": (7_615_616_512, 339, 4)}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_shapes(sm, name):
    cfg = sm.model_config(name)
    specs = sm.tensor_specs(cfg)
    n_params = sum(sm.nbytes(s) for _, s in specs) // 2
    assert (n_params, len(specs), len(sm.plan_shards(specs, sm.parse_size("5GB")))) == FULL[name]
    shapes = dict(specs)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    assert shapes["model.embed_tokens.weight"] == (v, h)
    assert ("lm_head.weight" in shapes) == (not cfg["tie_word_embeddings"])
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (kv, h)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (h, cfg["intermediate_size"])
    assert ("model.layers.0.self_attn.q_proj.bias" in shapes) == (cfg["model_type"] == "qwen2")


def test_published_configs(sm):
    l1, l8, q7 = sm.MODELS["llama-3.2-1b"], sm.MODELS["llama-3.1-8b"], sm.MODELS["qwen2.5-7b"]
    assert (l1["hidden_size"], l1["num_hidden_layers"], l1["num_attention_heads"], l1["num_key_value_heads"],
            l1["intermediate_size"], l1["vocab_size"], l1["tie_word_embeddings"]) == (2048, 16, 32, 8, 8192, 128256, True)
    assert (l8["hidden_size"], l8["num_hidden_layers"], l8["num_attention_heads"], l8["num_key_value_heads"],
            l8["intermediate_size"], l8["vocab_size"], l8["tie_word_embeddings"]) == (4096, 32, 32, 8, 14336, 128256, False)
    assert (q7["hidden_size"], q7["num_hidden_layers"], q7["num_attention_heads"], q7["num_key_value_heads"],
            q7["intermediate_size"], q7["vocab_size"], q7["tie_word_embeddings"]) == (3584, 28, 28, 4, 18944, 152064, False)
    assert l1["rope_scaling"]["factor"] == 32.0 and l8["rope_scaling"]["factor"] == 8.0
    assert l1["rope_theta"] == l8["rope_theta"] == 500000.0 and q7["rope_theta"] == 1000000.0


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("name", sorted(FULL))
def test_tiny_model_is_a_loadable_sharded_hf_directory(sm, name, tmp_path, tokenizer_dir):
    out = sm.write_model(name, tmp_path / name, tiny=True, max_shard_size="8MB", tokenizer=tokenizer_dir,
                         progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == sm.model_config(name, tiny=True) and cfg["vocab_size"] == sm.MODELS[name]["vocab_size"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    tensors = _tensors(out)
    specs = sm.tensor_specs(cfg)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == dict(specs)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], torch.ones_like(tensors["model.norm.weight"]))
    emb = tensors["model.embed_tokens.weight"].float()
    assert abs(emb.std().item() - sm.STD) < 0.001 and abs(emb.mean().item()) < 0.001
    assert not list(tmp_path.glob(".*partial*"))  # the temporary directory was renamed into place
    # deterministic and independent of the sharding: one file, same bytes
    one = sm.write_model(name, tmp_path / "one", tiny=True, max_shard_size="1GB", tokenizer=tokenizer_dir,
                         progress=False)
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    again = _tensors(one)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    other = sm.write_model(name, tmp_path / "seed1", tiny=True, seed=1, tokenizer=tokenizer_dir, progress=False)
    assert not torch.equal(_tensors(other)["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    # lowbit (and so transformers) loads it with nothing missing, and runs it
    lm = load_model(str(out))
    assert lm.model.config.vocab_size == cfg["vocab_size"]
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == cfg["tie_word_embeddings"]
    assert torch.equal(lm.model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"].float())
    ids = lm.tokenizer("synthetic", return_tensors="pt").input_ids
    assert int(ids.max()) < len(lm.tokenizer) <= cfg["vocab_size"]
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and bool(torch.isfinite(logits).all())


def test_cli_and_bad_arguments(sm, tmp_path, tokenizer_dir, capsys):
    argv = ["llama-3.2-1b", "--tiny", "--out", str(tmp_path / "m"), "--quiet"]
    if tokenizer_dir:
        argv += ["--tokenizer", tokenizer_dir]
    assert sm.main(argv) == 0
    assert "20 tensors" in capsys.readouterr().out
    info = json.loads((tmp_path / "m" / "synthetic.json").read_text())
    assert info["synthetic"] and info["model"] == "llama-3.2-1b" and info["tiny"] and info["seed"] == 0
    with pytest.raises(SystemExit, match="not like 5GB"):
        sm.parse_size("five gigabytes")
    assert sm.parse_size("5GB") == 5 * 10**9 and sm.parse_size("2GiB") == 2 * 2**30 and sm.parse_size("100") == 100
    with pytest.raises(SystemExit, match="unknown model"):
        sm.model_config("llama-4")
