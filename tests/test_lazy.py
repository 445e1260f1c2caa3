"""lowbit.models.lazy: an HF directory opened from its headers, one module materialized at a time."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.lazy import open_lazy
from lowbit.models.loading import load_hf_dir
from lowbit.models.tiny import tiny_model


def _save(tmp_path, family="llama", shard="50KB", dtype=None, seed=3):
    t = tiny_model(family, seed=seed)
    if dtype is not None:
        t.model.to(dtype)
    d = tmp_path / f"{family}-{shard}"
    t.model.save_pretrained(str(d), max_shard_size=shard)
    t.tokenizer.save_pretrained(str(d))
    return d, t.model


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
def test_skeleton_has_no_weights_and_materializes_each_module_exactly(tmp_path, family):
    d, ref = _save(tmp_path, family)
    assert (d / "model.safetensors.index.json").is_file()
    lz = open_lazy(d)
    assert lz.dtype == torch.float32 and lz.source["dtype"] == "float32"
    assert all(p.is_meta for p in lz.model.parameters())
    ref_buffers = dict(ref.named_buffers())
    for n, b in lz.model.named_buffers():  # rotary frequencies, Gemma's embedding scale: real and equal
        assert not b.is_meta and torch.equal(b, ref_buffers[n]), n
    sd = ref.state_dict()
    for prefix in ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]:
        mod = lz.materialize(prefix)
        for n, p in mod.named_parameters():
            assert torch.equal(p, sd[f"{prefix}.{n}"]), n
        lz.release(prefix)
        assert all(p.is_meta for p in mod.parameters())
    assert all(p.is_meta for p in lz.model.parameters())
    assert lz.nbytes() == sum(t.numel() * 4 for t in ref.parameters())


def test_tied_head_reads_the_embedding_and_stays_tied(tmp_path):
    d, ref = _save(tmp_path, "gemma3_text")
    lz = open_lazy(d)
    assert lz.tensor_names("lm_head") == ["lm_head.weight"]
    lz.materialize("lm_head")
    assert lz.model.lm_head.weight is lz.model.model.embed_tokens.weight
    assert torch.equal(lz.model.lm_head.weight, ref.model.embed_tokens.weight)
    lz.release("model.embed_tokens")
    assert lz.model.lm_head.weight.is_meta and lz.model.lm_head.weight is lz.model.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])  # gemma: tied, scaled, a padding row
def test_embedding_rows_give_the_full_tables_vectors(tmp_path, family, monkeypatch):
    from lowbit.models import lazy as lazy_mod

    d, ref = _save(tmp_path, family, dtype=torch.bfloat16)
    lz = open_lazy(d)
    monkeypatch.setattr(lazy_mod.LazyModel, "read_parts",  # many small parts: rows cross part boundaries
                        lambda self, name, max_bytes=64 << 20, _f=lazy_mod.LazyModel.read_parts: _f(self, name, 300))
    tokens = torch.tensor([[5, 3, 90, 3], [0, 257, 41, 5]])  # 257: the padding row
    ids = torch.unique(tokens)
    emb = lz.materialize_rows("model.embed_tokens", ids, torch.float32)
    assert tuple(emb.weight.shape) == (len(ids), ref.config.hidden_size) and emb.weight.dtype == torch.float32
    assert lz.model.lm_head.weight.is_meta  # a tied head is not given the compact table
    full = ref.model.embed_tokens.float()
    with torch.no_grad():
        assert torch.equal(emb(torch.searchsorted(ids, tokens)), full(tokens))  # Gemma's scale included
    pad = getattr(full, "padding_idx", None)
    lz.release("model.embed_tokens")
    vocab = ref.config.vocab_size
    assert lz.model.model.embed_tokens.weight.is_meta and lz.model.model.embed_tokens.weight.shape[0] == vocab
    assert lz.model.model.embed_tokens.padding_idx == pad
    if family == "gemma3_text":
        assert lz.model.lm_head.weight is lz.model.model.embed_tokens.weight
    with pytest.raises(LowbitError, match="out of range"):
        lz.materialize_rows("model.embed_tokens", torch.tensor([3, vocab]))
    with pytest.raises(LowbitError, match="sorted"):
        lz.materialize_rows("model.embed_tokens", torch.tensor([5, 3]))


def test_whole_model_materialized_gives_the_same_logits(tmp_path):
    d, ref = _save(tmp_path, "qwen2", dtype=torch.bfloat16)
    lz = open_lazy(d)
    assert lz.dtype == torch.bfloat16
    lz.materialize("", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    full = load_hf_dir(d).model  # transformers' own loading, converted to float32
    with torch.no_grad():
        assert torch.equal(lz.model(input_ids=ids).logits, full(input_ids=ids).logits)


def test_missing_index_entry_is_one_line(tmp_path):
    d, _ = _save(tmp_path)
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    del data["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    idx.write_text(json.dumps(data))
    with pytest.raises(LowbitError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing from model\.safetensors\.index\.json") as e:
        open_lazy(d)
    assert "\n" not in str(e.value)


def test_index_entry_not_in_its_shard(tmp_path):
    d, _ = _save(tmp_path)
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    wm = data["weight_map"]
    other = next(s for s in sorted(set(wm.values())) if s != wm["model.norm.weight"])
    wm["model.norm.weight"] = other
    idx.write_text(json.dumps(data))
    with pytest.raises(LowbitError, match=rf"{other}: tensor model\.norm\.weight listed in"):
        open_lazy(d)


def test_truncated_and_corrupt_shards_are_one_line(tmp_path):
    d, _ = _save(tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    raw = shards[2].read_bytes()
    shards[2].write_bytes(raw[:-10])
    with pytest.raises(LowbitError, match=rf"truncated safetensors file .*{shards[2].name}: tensor .* needs") as e:
        open_lazy(d)
    assert "\n" not in str(e.value)
    shards[2].write_bytes(raw)
    n = struct.unpack("<Q", raw[:8])[0]
    shards[3].write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    with pytest.raises(LowbitError, match=rf"corrupt safetensors file .*{shards[3].name}: its header is not JSON"):
        open_lazy(d)
    shards[3].write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    with pytest.raises(LowbitError, match=r"header of 1000000000 bytes does not fit"):
        open_lazy(d)
    shards[3].unlink()
    with pytest.raises(LowbitError, match=r"weight shard model-00004-of-\d+\.safetensors listed in .* is missing"):
        open_lazy(d)


def test_nan_weight_reported_when_materialized(tmp_path):
    t = tiny_model("llama", seed=1)
    with torch.no_grad():
        t.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    t.model.save_pretrained(str(tmp_path))
    t.tokenizer.save_pretrained(str(tmp_path))
    lz = open_lazy(tmp_path)
    lz.materialize("model.layers.0")
    with pytest.raises(LowbitError, match=r"weight model\.layers\.1\.mlp\.down_proj\.weight .* has 1 NaN/Inf"):
        lz.materialize("model.layers.1")
