"""lowbit.eval.streaming: the block-by-block forward gives the ordinary forward's logits bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.streaming import InMemory, StreamingForward
from lowbit.models.lazy import open_lazy
from lowbit.models.loading import load_hf_dir
from lowbit.models.tiny import tiny_model

FAMILIES = ["llama", "gemma3_text", "qwen2"]


def windows(n=5, ctx=24, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def ordinary(model, wins):
    with torch.inference_mode():
        return [model(w[None]).logits for w in wins]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [None, 0])  # 0: every activation goes through the spill files
def test_in_memory_adapter_is_bit_identical(family, budget, tmp_path):
    overrides = {"final_logit_softcapping": 30.0} if family == "gemma3_text" else {}
    m = tiny_model(family, seed=1, **overrides).model
    wins = windows()
    ref = ordinary(m, wins)
    sf = StreamingForward(InMemory(m), wins, dtype=None, budget_bytes=budget, spill_dir=tmp_path / "spill",
                          progress=False)
    got = list(sf)
    assert len(got) == len(ref)
    for (hidden, logits), r in zip(got, ref):
        assert hidden.shape == (1, wins.shape[1], m.config.hidden_size)
        assert logits.dtype == r.dtype and torch.equal(logits, r)
    assert sf.spilled == (budget == 0)
    assert sf.activation_bytes == wins.numel() * m.config.hidden_size * 4
    assert not os.listdir(tmp_path / "spill") if budget == 0 else True  # spill files removed
    head = m.get_output_embeddings()
    assert torch.equal(head(got[0][0]) if family != "gemma3_text" else torch.tanh(head(got[0][0]) / 30.0) * 30.0,
                       ref[0])


class Recording:
    """A lazy model that records materialize/release calls and keeps only what is materialized."""

    def __init__(self, lazy):
        self.inner, self.model, self.log = lazy, lazy.model, []

    def materialize(self, prefix="", dtype=None, device="cpu"):
        self.log.append(("+", prefix))
        return self.inner.materialize(prefix, dtype, device)

    def release(self, prefix=""):
        self.log.append(("-", prefix))
        self.inner.release(prefix)


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_model_streams_one_block_at_a_time(family, tmp_path):
    t = tiny_model(family, seed=2)
    t.model.to(torch.bfloat16)  # on disk in bf16, computed in float32 like load_model does
    d = tmp_path / family
    t.model.save_pretrained(str(d), max_shard_size="50KB")
    t.tokenizer.save_pretrained(str(d))
    full = load_hf_dir(d).model  # the ordinary loader: float32, buffers computed in float32
    wins = windows(n=3, ctx=16, seed=4)
    ref = ordinary(full, wins)

    lz = Recording(open_lazy(d))
    resident = []

    def pre(mod, args, kwargs):  # no block may run while another block's weights are in memory
        resident.append(sum(not p.is_meta for b in lz.model.model.layers for p in b.parameters()))

    hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in lz.model.model.layers]
    got = list(StreamingForward(lz, wins, dtype=torch.float32, progress=False))
    for h in hooks:
        h.remove()
    for (_, logits), r in zip(got, ref):
        assert torch.equal(logits, r)
    n_layers = len(lz.model.model.layers)
    per_block = sum(1 for _ in full.model.layers[0].parameters())
    # block 0's hook also sees each window's embedding being captured (no block weights then),
    # then each block runs every window with exactly its own weights in memory
    assert resident == [0] * len(wins) + [per_block] * (n_layers * len(wins))
    blocks = [p for op, p in lz.log if op == "+" and ".layers." in p]
    assert blocks == [f"model.layers.{i}" for i in range(n_layers)]  # each block read exactly once
    assert all(p.is_meta for p in lz.model.parameters())  # everything released at the end


def test_stopping_early_releases_everything(tmp_path):
    t = tiny_model("llama", seed=3)
    d = tmp_path / "m"
    t.model.save_pretrained(str(d))
    t.tokenizer.save_pretrained(str(d))
    lz = open_lazy(d)
    it = iter(StreamingForward(lz, windows(n=4, ctx=8), budget_bytes=0, spill_dir=tmp_path / "s", progress=False))
    next(it)
    it.close()
    assert all(p.is_meta for p in lz.model.parameters())
    assert os.listdir(tmp_path / "s") == []


def test_bad_inputs():
    m = tiny_model("llama").model
    with pytest.raises(LowbitError, match="materialize"):
        StreamingForward(m, windows())
    with pytest.raises(LowbitError, match=r"\[n, ctx\]"):
        StreamingForward(InMemory(m), torch.zeros(5, dtype=torch.long))
