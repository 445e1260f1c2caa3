"""Streaming quantization (lowbit.models.lazy + the runner's streaming mode + ShardWriter):
the checkpoint written block by block from sharded safetensors equals, tensor for tensor, the one
the in-memory path writes (the golden digests of tests/test_golden.py), sharded output loads
back, spilled activations change nothing, and bad input fails in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lowbit import api, checkpoint
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.tiny import tiny_model
from lowbit.algorithms import head_embed
from tests.test_golden import CASES, _golden, checkpoint_digest

CASE = {c[0]: c for c in CASES}


def _source(tmp_path: Path, family: str, seed: int = 3, dtype=None, shard="50KB") -> Path:
    d = tmp_path / f"src-{family}"
    if not d.is_dir():
        t = tiny_model(family, seed=seed)
        if dtype is not None:
            t.model.to(dtype)
        t.model.save_pretrained(str(d), max_shard_size=shard)
        t.tokenizer.save_pretrained(str(d))
    return d


def _stream(src: Path, out: Path, case, **extra) -> str:
    _, method, scheme, kw, storage = case
    m = api.load(str(src), stream=True)
    torch.manual_seed(0)
    api.quantize(m, method, scheme, progress=False, output=str(out), **dict(kw, **extra))
    if storage is not None:
        from lowbit.algorithms.sparse_storage import restore_checkpoint

        restore_checkpoint(str(out), storage)
    return checkpoint_digest(out)


def _digest_all(path: Path) -> str:
    """checkpoint_digest over a sharded checkpoint's tensors (same formula)."""
    h = hashlib.sha256()
    tensors = checkpoint.read_tensors(path)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rec = json.loads((path / "lowbit.json").read_text())
    h.update(json.dumps({"modules": rec["modules"], "method": rec["method"],
                         "tied": rec.get("tied_word_embeddings")}, sort_keys=True).encode())
    return h.hexdigest()


# Every method on Gemma 3 (tied head, scaled embedding, sliding + full attention); a sample on
# the other families. The sharded source is read block by block; the result must be the golden
# in-memory checkpoint, bit for bit.
SAMPLES = [("gemma3_text", c[0]) for c in CASES] + [
    (f, c) for f in ("llama", "qwen2") for c in ("gptq-int4-g32", "rtn-int2-g16-asym-head4")]


@pytest.mark.parametrize("family,case", SAMPLES, ids=[f"{f}/{c}" for f, c in SAMPLES])
def test_streamed_checkpoint_equals_in_memory(tmp_path_factory, family, case):
    src = _source(tmp_path_factory.getbasetemp(), family)
    out = tmp_path_factory.mktemp("out") / "ckpt"
    assert _stream(src, out, CASE[case]) == _golden()[f"{family}/{case}"]
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["streaming"] is True and rec["dtype"] == "float32" and rec["shards"] == 1
    assert not list(out.parent.glob(".lowbit-activations-*"))  # offload folder removed


def test_sharded_output_and_spilled_activations_change_nothing(tmp_path):
    src = _source(tmp_path, "llama")
    out = tmp_path / "sharded"
    case = CASE["gptq-int4-g32"]
    m = api.load(str(src), stream=True)
    torch.manual_seed(0)
    rec = api.quantize(m, "gptq", case[2], progress=False, output=str(out), max_shard_size=20_000,
                       activation_budget=0, offload_dir=str(tmp_path / "off"), **case[3])
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert rec["shards"] == len(shards) > 3 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                   for t in checkpoint.read_tensors(out).values())
    assert rec["runner"]["spilled_bytes"] == 2 * rec["runner"]["activation_bytes"] > 0  # block 0's X, block 1's
    assert list((tmp_path / "off").iterdir()) == []
    assert _digest_all(out) == _golden()["llama/gptq-int4-g32"]
    # the sharded checkpoint loads and computes what the in-memory model computes
    t = tiny_model("llama", seed=3)
    ref = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    torch.manual_seed(0)
    api.quantize(ref, "gptq", case[2], progress=False, **case[3])
    q = api.load(str(out))
    ids = torch.tensor([[3, 70, 101, 9, 250, 33]])
    with torch.no_grad():
        assert torch.equal(q.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)


def test_in_memory_save_shards_past_the_limit(tmp_path):
    t = tiny_model("qwen2", seed=3)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    api.quantize(m, "rtn", CASE["rtn-int4-g32"][2], progress=False)
    api.save(m, str(tmp_path / "one"))
    api.save(m, str(tmp_path / "many"), max_shard_size=30_000)
    assert (tmp_path / "one" / "model.safetensors").is_file()
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 2
    assert _digest_all(tmp_path / "many") == checkpoint_digest(tmp_path / "one") == _golden()["qwen2/rtn-int4-g32"]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_source_streamed_equals_in_memory_and_keeps_bf16_outside_blocks(tmp_path, family):
    """bf16 files, float32 compute on the CPU: both paths read the same bf16 values and agree;
    the unquantized embedding / norm / head stay bf16 on disk, a quantized embedding is packed."""
    src = _source(tmp_path, family, dtype=torch.bfloat16)
    scheme = CASE["gptq-int4-g32"][2]
    kw = dict(n_samples=4, seq_len=32, progress=False)
    ref = api.load(str(src))
    assert ref.source["dtype"] == "bfloat16" and ref.extra["dtype"] == torch.float32
    torch.manual_seed(0)
    api.quantize(ref, "gptq", scheme, head="int8", **kw)
    api.save(ref, str(tmp_path / "mem"))
    m = api.load(str(src), stream=True)
    torch.manual_seed(0)
    api.quantize(m, "gptq", scheme, head="int8", output=str(tmp_path / "st"), **kw)
    assert checkpoint_digest(tmp_path / "st") == checkpoint_digest(tmp_path / "mem")
    stored = checkpoint.read_tensors(tmp_path / "st")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    assert stored["model.layers.0.input_layernorm.weight"].dtype == torch.float32  # computed in float32
    assert "lm_head.qweight" in stored and "lm_head.weight" not in stored
    # quantized embedding, float head (untied)
    m = api.load(str(src), stream=True)
    rec = api.quantize(m, "rtn", scheme, embed="int4", output=str(tmp_path / "emb"), progress=False)
    stored = checkpoint.read_tensors(tmp_path / "emb")
    assert "model.embed_tokens.qweight" in stored and stored["lm_head.weight"].dtype == torch.bfloat16
    assert rec["embed"]["name"] == "int4" and rec["tied_word_embeddings"] is False if "tied_word_embeddings" in rec else True
    assert json.loads((tmp_path / "emb" / "lowbit.json").read_text())["tied_word_embeddings"] is False


def test_bf16_compute_streamed_equals_in_memory(tmp_path):
    src = _source(tmp_path, "llama", dtype=torch.bfloat16)
    scheme = CASE["rtn-int4-g32"][2]
    ref = api.load(str(src), dtype="bfloat16")
    assert next(ref.model.parameters()).dtype == torch.bfloat16
    api.quantize(ref, "gptq", scheme, n_samples=4, seq_len=32, progress=False)
    api.save(ref, str(tmp_path / "mem"))
    m = api.load(str(src), dtype="bfloat16", stream=True)
    rec = api.quantize(m, "gptq", scheme, n_samples=4, seq_len=32, progress=False, output=str(tmp_path / "st"))
    assert rec["dtype"] == "bfloat16" and rec["runner"]["dtype"] == "bfloat16"
    assert checkpoint_digest(tmp_path / "st") == checkpoint_digest(tmp_path / "mem")


def test_quantized_embedding_rows_and_round_trip(tmp_path):
    from lowbit.nn.embedding import QuantizedEmbedding

    t = tiny_model("gemma3_text", seed=5)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    emb = t.model.get_input_embeddings()
    q = QuantizedEmbedding.quantize(emb, head_embed.HEAD_SCHEMES["int6"])
    ids = torch.tensor([[0, 258, 7, 7], [100, 3, 64, 1]])
    W = q.weight_format.dequantize()
    assert torch.equal(q(ids), W[ids] * float(emb.embed_scale))
    assert (W - emb.weight).abs().max() <= q.scales.float().max() / 2 + 1e-6  # RTN: half a step per row group
    api.quantize(m, "rtn", CASE["rtn-int4-g32"][2], embed="int8", progress=False)
    api.save(m, str(tmp_path / "ck"))
    back = api.load(str(tmp_path / "ck"))
    assert type(back.model.get_input_embeddings()).__name__ == "QuantizedEmbedding"
    x = torch.tensor([[1, 2, 3, 200, 5]])
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=x).logits, m.model(input_ids=x).logits)


def test_shard_writer_round_trips_every_dtype(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(7, 3, generator=g).bfloat16(), "b.u8": torch.randint(0, 255, (13,), dtype=torch.uint8),
               "c.f32": torch.randn(5, generator=g), "d.scalar": torch.tensor(2.5), "e.empty": torch.zeros(0, 4),
               "f.i64": torch.arange(9), "g.f16": torch.randn(3, 3, generator=g).half(), "h.big": torch.randn(400, generator=g)}
    w = checkpoint.ShardWriter(tmp_path, max_shard_size=200)
    for k, t in tensors.items():
        w.add({k: t})
    files = w.close()
    assert len(files) == 2 and not list(tmp_path.glob(".shard-*"))  # 169 bytes, then 1600 alone
    back = checkpoint.read_tensors(tmp_path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert set(load_file(str(tmp_path / files[1]))) == {"h.big"}  # larger than a shard: alone
    w2 = checkpoint.ShardWriter(tmp_path / "x")
    (tmp_path / "x").mkdir()
    w2.add({"a": torch.ones(1)})
    with pytest.raises(LowbitError, match="tensor a written twice"):
        w2.add({"a": torch.ones(1)})
    w3 = checkpoint.ShardWriter(tmp_path / "y")  # below the limit: one model.safetensors, no index
    (tmp_path / "y").mkdir()
    w3.add(tensors)
    assert w3.close() == ["model.safetensors"] and not (tmp_path / "y" / "model.safetensors.index.json").exists()
    assert all(torch.equal(load_file(str(tmp_path / "y" / "model.safetensors"))[k], t) for k, t in tensors.items())


def _cli(capsys, *argv):
    capsys.readouterr()  # drop what building the source printed
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_cli_stream_flags_and_record(tmp_path, capsys):
    src = _source(tmp_path, "qwen2", dtype=torch.bfloat16)
    out = tmp_path / "out"
    rc, err = _cli(capsys, "quantize", str(src), "--stream", "--method", "rtn", "--group-size", "32",
                   "--max-shard-size", "40KB", "--embed", "int8", "--head", "int6", "-o", str(out))
    assert rc == 0, err
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["streaming"] is True and rec["dtype"] == "float32" and rec["shards"] == len(list(out.glob("model-*")))
    assert rec["base_model"]["dtype"] == "bfloat16" and rec["peak_rss_bytes"] > 0
    assert "(float32, streamed)" in err and "shard(s)" in err
    q = api.load(str(out))
    with torch.no_grad():
        assert torch.isfinite(q.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_cli_streams_automatically_when_memory_is_short(tmp_path, capsys, monkeypatch):
    src = _source(tmp_path, "llama")
    monkeypatch.setattr(api, "available_memory", lambda: 1000)
    rc, err = _cli(capsys, "quantize", str(src), "--group-size", "32", "-o", str(tmp_path / "a"))
    assert rc == 0 and "streaming them block by block" in err
    assert json.loads((tmp_path / "a" / "lowbit.json").read_text())["streaming"] is True
    rc, err = _cli(capsys, "quantize", str(src), "--group-size", "32", "--no-stream", "-o", str(tmp_path / "b"))
    assert rc == 0 and json.loads((tmp_path / "b" / "lowbit.json").read_text())["streaming"] is False
    assert checkpoint_digest(tmp_path / "a") == checkpoint_digest(tmp_path / "b")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    src = _source(tmp_path, "llama")
    shards = sorted(src.glob("model-*.safetensors"))
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])
    rc, err = _cli(capsys, "quantize", str(src), "--stream", "-o", str(tmp_path / "o"))
    assert rc == 2 and err.startswith("lowbit: error: truncated safetensors file") and err.count("\n") == 1
    assert shards[1].name in err and not (tmp_path / "o").exists()
    shards[1].write_bytes(raw)
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    del data["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    idx.write_text(json.dumps(data))
    rc, err = _cli(capsys, "quantize", str(src), "--stream", "-o", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1
    assert "tensor model.layers.0.self_attn.k_proj.weight is missing from model.safetensors.index.json" in err
    for flag, value, msg in (("--max-shard-size", "5 parsecs", "--max-shard-size expects a size"),
                             ("--activation-budget", "-1", "--activation-budget expects a size")):
        rc, err = _cli(capsys, "quantize", str(src), flag, value, "-o", str(tmp_path / "o"))
        assert rc == 2 and msg in err


def test_global_magnitude_cannot_stream(tmp_path):
    src = _source(tmp_path, "llama")
    m = api.load(str(src), stream=True)
    with pytest.raises(LowbitError, match="scope=global .* cannot run streamed"):
        api.quantize(m, "magnitude", None, sparsity=0.5, scope="global", output=str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_stream_needs_an_output_and_refuses_gguf(tmp_path):
    src = _source(tmp_path, "llama")
    m = api.load(str(src), stream=True)
    with pytest.raises(LowbitError, match="give the output directory"):
        api.quantize(m, "rtn", None, progress=False)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(LowbitError, match="only Hugging Face safetensors directories can be streamed"):
        api.load(str(tmp_path / "x.gguf"), stream=True)


def test_transformers_loads_a_sharded_streamed_checkpoint_with_quantized_embedding(tmp_path):
    import lowbit  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    src = _source(tmp_path, "gemma3_text")
    m = api.load(str(src), stream=True)
    api.quantize(m, "rtn", CASE["rtn-int4-g32"][2], embed="int8", head="int4", max_shard_size=30_000,
                 output=str(tmp_path / "o"), progress=False)
    assert len(list((tmp_path / "o").glob("model-*-of-*.safetensors"))) > 1
    ours = api.load(str(tmp_path / "o")).model
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))
    ids = torch.tensor([[256, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["rtn-int4-g32", "hqq-int4-g32", "nf4", "ternary", "magnitude-50", "fp16"])
def test_bf16_source_data_free_streamed_equals_in_memory(tmp_path, name):
    """Data-free methods stream a bf16 block with its linears still in bf16, each converted to
    float32 just before it is solved: the same checkpoint as converting the whole model first."""
    case = CASE[name]
    src = _source(tmp_path, "llama", dtype=torch.bfloat16)
    ref = api.load(str(src))
    api.quantize(ref, case[1], case[2], progress=False, **case[3])
    api.save(ref, str(tmp_path / "mem"))
    m = api.load(str(src), stream=True)
    api.quantize(m, case[1], case[2], progress=False, output=str(tmp_path / "st"), **case[3])
    assert checkpoint_digest(tmp_path / "st") == checkpoint_digest(tmp_path / "mem")
    stored = checkpoint.read_tensors(tmp_path / "st")
    assert stored["model.layers.0.input_layernorm.weight"].dtype == torch.float32  # computed in float32


def test_large_tensors_are_copied_a_slice_of_rows_at_a_time(tmp_path):
    """Pass-through tensors (the embedding as on disk) go from the files to the checkpoint in row
    slices: the same bytes as writing the whole tensor, and a short or corrupt part is an error."""
    from safetensors.torch import save_file

    from lowbit.models.lazy import open_lazy

    src = _source(tmp_path, "llama", dtype=torch.bfloat16)
    lazy = open_lazy(str(src))
    name = "model.embed_tokens.weight"
    whole = lazy.read(name)
    dtype, shape, parts = lazy.read_parts(name, max_bytes=1000)
    parts = list(parts)
    assert dtype == torch.bfloat16 and shape == tuple(whole.shape) and len(parts) > 10
    assert torch.equal(torch.cat(parts), whole)
    a, b = checkpoint.ShardWriter(tmp_path / "a"), checkpoint.ShardWriter(tmp_path / "b")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a.add({name: whole})
    b.add_parts(name, *lazy.read_parts(name, max_bytes=1000))
    a.close(), b.close()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    c = checkpoint.ShardWriter(tmp_path / "c")
    (tmp_path / "c").mkdir()
    with pytest.raises(LowbitError, match="parts hold"):
        c.add_parts(name, dtype, shape, parts[:-1])
    bad = whole.clone()
    bad[-1, 0] = float("nan")
    save_file({"x": bad}, str(tmp_path / "bad.safetensors"))
    lazy.tensors["x"] = lazy.tensors[name].__class__(tmp_path / "bad.safetensors", bad.dtype, tuple(bad.shape),
                                                     bad.numel() * 2)
    with pytest.raises(LowbitError, match="NaN"):
        list(lazy.read_parts("x", max_bytes=1000)[2])


def test_a_streamed_run_keeps_no_block_in_memory(tmp_path):
    """Once a streamed block is written nothing holds its tensors: parameters, buffers and any
    format a quantized module has cached are all on the meta device."""
    src = _source(tmp_path, "llama")
    m = api.load(str(src), stream=True)
    api.quantize(m, "rtn", CASE["rtn-int4-g32"][2], progress=False, output=str(tmp_path / "st"))
    blocks = m.model.get_submodule("model.layers")
    held = [n for n, t in list(blocks.named_parameters()) + list(blocks.named_buffers()) if not t.is_meta]
    for mod in blocks.modules():
        cached = mod.__dict__.get("_fmt_cache")
        if cached is not None:
            held += [k for k, t in cached[1].tensors().items() if not t.is_meta]
    assert held == []


@pytest.mark.parametrize("src, dst", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                      (torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_tensors_are_converted_a_slice_of_rows_at_a_time(tmp_path, src, dst):
    """Reading a float tensor in another dtype goes through row slices (no whole copy in the file's
    dtype beside the result) and gives exactly get_tensor().to(dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.models.files import read_converted

    t = (torch.randn(300, 7, generator=torch.Generator().manual_seed(1)) * 1e3).to(src)
    t[5, 3] = 7e4 if src != torch.float16 else 6e4  # beyond float16's range when converted from float32
    save_file({"w": t, "v": t[0].clone()}, str(tmp_path / "x.safetensors"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for name in ("w", "v"):
            want = f.get_tensor(name).to(dst)
            got = read_converted(f, name, dst, max_bytes=100)
            assert got.dtype == dst and torch.equal(got.isnan(), want.isnan())
            assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
