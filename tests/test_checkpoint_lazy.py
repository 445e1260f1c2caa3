"""lowbit.checkpoint.LazyCheckpoint: a quantized checkpoint streamed block by block gives the
loaded checkpoint's logits bit for bit, with one block's modules in memory at a time."""

from __future__ import annotations

import pytest
import torch

from lowbit import api, checkpoint
from lowbit.core.scheme import QuantScheme
from lowbit.eval.streaming import StreamingForward
from lowbit.models.tiny import tiny_model
from lowbit.eval import size


def quantized(tmp_path, family, head=None, **overrides):
    t = tiny_model(family, seed=5, **overrides)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=family, source={"kind": "test"})
    api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32), progress=False, head=head)
    return api.save(m, str(tmp_path / family))


@pytest.mark.parametrize("family,head", [("llama", None), ("gemma3_text", "int8"), ("qwen2", None)])
def test_streamed_checkpoint_gives_the_loaded_logits(tmp_path, family, head):
    out = quantized(tmp_path, family, head)
    loaded, _, _ = checkpoint.load(out)
    wins = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = [loaded(w[None]).logits for w in wins]
    lz = checkpoint.open_lazy(out)
    assert all(p.is_meta for p in lz.model.parameters())
    seen = []
    blocks = lz.model.model.layers

    def pre(mod, args, kwargs):  # quantized modules present only in the block that runs
        seen.append(sum(type(m).__name__ == "QuantizedLinear" for b in blocks for m in b.modules()))

    hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    got = list(StreamingForward(lz, wins, progress=False))
    for h in hooks:
        h.remove()
    for (_, logits), r in zip(got, ref):
        assert torch.equal(logits, r)
    assert set(seen[len(wins):]) == {7}  # the 7 projections of the one block in memory
    assert all(p.is_meta for p in lz.model.parameters())
    assert not any(type(m).__name__ == "QuantizedLinear" for m in lz.model.modules())  # all released


def test_tied_embedding_materializes_once(tmp_path):
    out = quantized(tmp_path, "llama", tie_word_embeddings=True)
    lz = checkpoint.open_lazy(out)
    assert checkpoint.read_record(out)["tied_word_embeddings"] is True
    emb = lz.materialize("model.embed_tokens")
    assert lz.model.lm_head.weight is emb.weight and not emb.weight.is_meta
    loaded, _, _ = checkpoint.load(out)
    assert torch.equal(emb.weight, loaded.model.embed_tokens.weight)
    lz.release("lm_head")
    assert lz.model.model.embed_tokens.weight.is_meta and lz.model.lm_head.weight is lz.model.model.embed_tokens.weight


@pytest.mark.parametrize("method,scheme", [("rtn", QuantScheme(bits=3, group_size=48, symmetric=False)),
                                           ("nf4", None), ("hqq", None)])
def test_bits_per_weight_from_the_headers(tmp_path, method, scheme):
    t = tiny_model("llama", seed=6)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name="t", source={"kind": "test"})
    api.quantize(m, method, scheme, progress=False)
    out = api.save(m, str(tmp_path / method))
    assert checkpoint.open_lazy(out).linear_bits() == size.linear_bits(checkpoint.load(out)[0])


def test_bf16_output_layer_is_not_held_in_float32_when_streamed(tmp_path):
    # a bf16 model's checkpoint keeps its head in bf16; streamed, the head is materialized as
    # stored and widened per window only (an 8B model's float32 head is 2 GB), same logits
    t = tiny_model("llama", seed=5)
    t.model.to(torch.bfloat16)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name="bf16", source={"kind": "test"})
    api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32), progress=False)
    out = api.save(m, str(tmp_path / "bf16"))
    loaded, _, _ = checkpoint.load(out)
    wins = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = [loaded(w[None]).logits for w in wins]
    lz = checkpoint.open_lazy(out)
    head_dtypes, materialize = [], lz.materialize

    def spy(prefix="", dtype=None, device="cpu"):
        mod = materialize(prefix, dtype, device)
        if prefix == "lm_head":
            head_dtypes.append(mod.weight.dtype)
        return mod

    lz.materialize = spy
    got = list(StreamingForward(lz, wins, progress=False))
    assert head_dtypes == [torch.bfloat16]
    for (_, logits), r in zip(got, ref):
        assert logits.dtype == torch.float32 and torch.equal(logits, r)
    assert lz.materialize("model.norm", None).weight.dtype == torch.bfloat16  # None: as stored
    lz.release("model.norm")
    assert lz.materialize("model.norm", torch.float32).weight.dtype == torch.float32
