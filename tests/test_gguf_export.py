"""GGUF export and reader (lowbit.export.gguf, gguf_read, gguf_imatrix).

* tensor bytes in written files identical to gguf-py's quantizer for the types it has, and (where
  llama.cpp's library is installed) to llama.cpp's own quantizer: block level with and without an
  importance matrix, and whole files (llama_model_quantize of our F16 file == our Q*_K_M);
* our dequantization (reader) equal to gguf.quants.dequantize for every type, incl. IQ4_NL;
* writer round trip: GGUFReader parses it, transformers loads it (logits vs the original: F32
  exact to float rounding, Q8_0 close), llama.cpp runs it;
* the per-tensor type rules of the mixes; the importance matrix; bad / hostile files only ever
  raise LowbitError, with bounded memory.
"""

import ctypes
import glob
import os
import tracemalloc

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants as gq  # noqa: E402

from lowbit import api  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import gguf as GW  # noqa: E402
from lowbit.export import gguf_imatrix as GI  # noqa: E402
from lowbit.export import gguf_quants as G  # noqa: E402
from lowbit.export.gguf_read import read_gguf, read_metadata  # noqa: E402
from lowbit.integrations import llama_cpp as LC  # noqa: E402
from lowbit.models.tiny import save_tiny  # noqa: E402

CALIB = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife. ") * 8
GGUF_PY_QUANTIZES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0"]
# a tiny llama whose rows are multiples of 256, so that every K-quant applies without fallback
WIDE = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2)


def _f16_exact(model):
    """Round every parameter to float16 and back (llama.cpp quantizes from an F16 file)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny(d / "hf", "llama", seed=3)
    return api.load(str(d / "hf"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    save_tiny(d / "hf", "llama", seed=4, **WIDE)
    m = api.load(str(d / "hf"))
    _f16_exact(m.model)
    return m


@pytest.fixture(scope="module")
def wide_files(wide, tmp_path_factory):
    d = tmp_path_factory.mktemp("wide-gguf")
    return {t: GW.export_gguf(wide, d / f"{t}.gguf", t) for t in GW.EXPORT_TYPES}


def _hf_names(model):
    """GGUF name -> HF weight in GGUF row order (q/k permuted), float32 numpy."""
    return {k: v.numpy() for k, v in GW.gguf_tensors(model).items()}


# -- bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", GGUF_PY_QUANTIZES)
def test_file_tensor_bytes_identical_to_gguf_py(wide, wide_files, t):
    reader = gguf.GGUFReader(wide_files[t].path)
    src = _hf_names(wide.model)
    checked = 0
    for rt in reader.tensors:
        if rt.tensor_type.name != t:
            continue
        ref = np.ascontiguousarray(gq.quantize(src[rt.name], GT[t])).view(np.uint8).reshape(-1)
        assert np.array_equal(np.asarray(rt.data).view(np.uint8).reshape(-1), ref), rt.name
        checked += 1
    assert checked >= 7  # at least the block linears


def _extreme_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, n)) * rng.uniform(1e-3, 10, (24, 1))).astype(np.float32)
    x[0] = 0
    x[1, : n // 2] = 0
    x[2] = rng.standard_normal(n) * 1e-30
    x[3] = np.clip(rng.standard_normal(n) * 3e4, -6e4, 6e4)
    x[4, ::7] = 1e3
    x[5] = 0.7
    x[6] = np.abs(x[6])
    x[7] = -np.abs(x[7])
    return x


@pytest.mark.parametrize("t", GW.PURE_TYPES[1:] + ("IQ4_NL",))
def test_reader_dequantization_equals_gguf_py(t, tmp_path):
    """read_gguf's dequantization == gguf.quants.dequantize for every type, on quantized extreme
    rows and on random bytes (any bit pattern, incl. Inf/NaN scales)."""
    n = 512
    x = _extreme_rows(n, 1)
    bs, bpb = (32, 18) if t == "IQ4_NL" else G.BLOCK_LAYOUTS[t]
    q = GI.quantize(x, t, None) if t == "IQ4_NL" else G.quantize(x, t)
    rnd = np.random.default_rng(2).integers(0, 256, (8, n // bs * bpb), dtype=np.uint8)
    for raw in (q, rnd):
        w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
        w.add_tensor("t", raw, raw_dtype=GT[t])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        ours = read_gguf(tmp_path / "t.gguf")[1]["t"].numpy()
        ref = gq.dequantize(raw, GT[t]).astype(np.float32)
        np.testing.assert_array_equal(ours, ref)


def _ggml_lib():
    """llama.cpp's ggml library from the llama-cpp-python peer, if installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    so = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    if not so:
        return None
    lib = ctypes.CDLL(so[0])
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    return f


WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"]
GGML_IDS = dict(Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q2_K=10, Q3_K=11, Q4_K=12, Q5_K=13, Q6_K=14, IQ4_NL=20)


@pytest.mark.parametrize("t", WEIGHTED)
def test_importance_weighted_bytes_identical_to_llama_cpp(t):
    """ggml_quantize_chunk with quant_weights (what llama-quantize --imatrix calls) == ours; for
    IQ4_NL also without weights (llama.cpp's quantizer searches its scale either way)."""
    f = _ggml_lib()
    if f is None:
        pytest.skip("llama-cpp-python (llama.cpp's ggml library) is not installed")
    n = 512
    x = _extreme_rows(n, 5)[[0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    rng = np.random.default_rng(6)
    im = (rng.standard_normal(n) ** 2 * 3 + 1e-3).astype(np.float32)
    im[7] = 0
    bs, bpb = (32, 18) if t == "IQ4_NL" else G.BLOCK_LAYOUTS[t]
    for imx in (im, None) if t == "IQ4_NL" else (im,):
        ref = np.zeros((x.shape[0], n // bs * bpb), np.uint8)
        f(GGML_IDS[t], x.ctypes.data, ref.ctypes.data, 0, x.shape[0], n, None if imx is None else imx.ctypes.data)
        np.testing.assert_array_equal(GI.quantize(x, t, imx), ref)


def test_importance_matrix_lowers_the_weighted_error():
    """Where a few input columns carry most of the activation energy, weighting the scale search
    by it lowers sum_j w_j (W - Q(W))_ij^2 for every K-quant (by a clear margin)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 512)).astype(np.float32)
    w = np.full(512, 0.01, np.float32)
    w[rng.choice(512, 24, replace=False)] = 100.0
    for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_1"]:
        plain = G.dequantize(G.quantize(W, t), t)
        weighted = G.dequantize(GI.quantize(W, t, w), t)
        e_plain = float((((W - plain) ** 2) * w).sum())
        e_weighted = float((((W - weighted) ** 2) * w).sum())
        assert e_weighted < 0.8 * e_plain, (t, e_weighted, e_plain)


# -- type rules ---------------------------------------------------------------------------------
def _llama_shapes(n_layer, d, ff, kv, tied=True, vocab=1000):
    s = {"token_embd.weight": (vocab, d)}
    for i in range(n_layer):
        s.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv, d),
                  f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, d),
                  f"blk.{i}.ffn_norm.weight": (d,), f"blk.{i}.ffn_gate.weight": (ff, d),
                  f"blk.{i}.ffn_up.weight": (ff, d), f"blk.{i}.ffn_down.weight": (d, ff)})
    s["output_norm.weight"] = (d,)
    if not tied:
        s["output.weight"] = (vocab, d)
    return s


def test_mix_rules_on_a_32_block_model():
    """llama.cpp's choices for a Llama-7B-like shape (every row a multiple of 256)."""
    s = _llama_shapes(32, 4096, 11008, 4096, tied=False)
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}  # i < 4, i >= 28, (i - 4) % 3 == 2
    t = GW.choose_types(s, "Q4_K_M", 32)
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K" and t["output_norm.weight"] == "F32"
    for i in range(32):
        want = "Q6_K" if i in more else "Q4_K"
        assert t[f"blk.{i}.attn_v.weight"] == want and t[f"blk.{i}.ffn_down.weight"] == want
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{n}.weight"] == "Q4_K"
    t5 = GW.choose_types(s, "Q5_K_M", 32)
    assert [t5[f"blk.{i}.ffn_down.weight"] for i in range(32)] == ["Q6_K" if i in more else "Q5_K" for i in range(32)]
    t3 = GW.choose_types(s, "Q3_K_M", 32)
    assert [t3[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [t3[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]  # i < 32/16
    assert t3["blk.5.attn_output.weight"] == "Q4_K" and t3["blk.5.attn_q.weight"] == "Q3_K"
    assert t3["output.weight"] == "Q6_K"


def test_mix_rules_on_smollm2_shapes():
    """576-wide rows are not multiples of 256: llama.cpp's fallbacks. Tied embedding = output."""
    s = _llama_shapes(30, 576, 1536, 192, tied=True, vocab=49152)
    t = GW.choose_types(s, "Q4_K_M", 30)
    assert t["token_embd.weight"] == "Q8_0"  # output role, 576 % 256 != 0
    more = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    for i in range(30):
        assert t[f"blk.{i}.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
        assert t[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more else "Q5_0")  # Q6_K -> Q8_0
        assert t[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")  # 1536 = 6 * 256
    t3 = GW.choose_types(s, "Q3_K_M", 30)
    assert t3["blk.5.attn_q.weight"] == "IQ4_NL" and t3["blk.5.ffn_down.weight"] == "Q4_K"
    assert GW.choose_types(s, "TQ1_0", 30)["blk.0.attn_q.weight"] == "Q4_0"
    assert GW.choose_types(s, "Q8_0", 30)["token_embd.weight"] == "Q8_0"
    assert set(GW.choose_types(s, "F16", 30).values()) == {"F16", "F32"}
    with pytest.raises(LowbitError, match="unknown GGUF export type"):
        GW.choose_types(s, "Q4_K_L", 30)


@pytest.mark.parametrize("t", GW.EXPORT_TYPES)
def test_written_types_follow_the_rules(wide, wide_files, t):
    reader = gguf.GGUFReader(wide_files[t].path)
    got = {rt.name: rt.tensor_type.name for rt in reader.tensors}
    src = GW.gguf_tensors(wide.model)
    assert got == GW.choose_types({k: tuple(v.shape) for k, v in src.items()}, t, 2)
    assert reader.fields["general.file_type"].contents() == GW.FILE_TYPES[t]


# -- round trips --------------------------------------------------------------------------------
def test_permutation_is_inverted_exactly():
    w = torch.randn(12 * 8, 5)
    for heads in (1, 3, 12):
        p = GW.permute_qk(w, heads)
        assert not torch.equal(p, w)
        assert torch.equal(GW.unpermute_qk(p, heads), w)


@pytest.mark.parametrize("t", GW.EXPORT_TYPES)
def test_read_back_close_to_the_weights(wide, wide_files, t):
    """read_gguf returns every tensor with the model's shape; values within the type's error."""
    md, ts = read_gguf(wide_files[t].path)
    src = GW.gguf_tensors(wide.model)
    assert set(ts) == set(src) and md["general.architecture"] == "llama"
    tol = {"F32": 0, "F16": 0, "BF16": 4e-3, "Q8_0": 8e-3, "Q6_K": 0.02, "Q5_0": 0.05, "Q5_1": 0.05, "Q5_K": 0.04,
           "Q4_0": 0.1, "Q4_1": 0.1, "Q4_K": 0.08, "Q3_K": 0.2, "Q2_K": 0.4, "TQ1_0": 1.0, "TQ2_0": 1.0}
    types = wide_files[t].tensor_types
    for name, w in src.items():
        r = ts[name]
        assert r.shape == w.shape and r.dtype == torch.float32
        rel = float((r - w).norm() / w.norm())
        limit = tol.get(types[name], 0.1)
        assert rel <= limit, (name, types[name], rel)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_transformers_loads_our_files(tiny, tmp_path):
    """from_pretrained(dir, gguf_file=...) of our F32 file reproduces the model's logits (float
    rounding only), Q8_0 stays close; the converted tokenizer encodes as the original."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny.model, ids)
    errs = {}
    for t in ("F32", "Q8_0"):
        GW.export_gguf(tiny, tmp_path / f"{t}.gguf", t)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{t}.gguf", dtype=torch.float32)
        errs[t] = float((_logits(hf, ids) - ref).abs().max() / ref.abs().max())
    assert errs["F32"] < 1e-5
    assert errs["Q8_0"] < 0.03
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="F32.gguf")
    text = "Persuasion, chapter 1: Sir Walter Elliot, of Kellynch-hall."
    assert tok(text, add_special_tokens=False)["input_ids"] == tiny.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_round_trip_through_transformers(family, tmp_path):
    """qwen2 (biases on q/k/v, no permutation) and mistral (written as llama): F32 logits exact."""
    from transformers import AutoModelForCausalLM

    save_tiny(tmp_path / "hf", family, seed=2)
    m = api.load(str(tmp_path / "hf"))
    if family == "qwen2":
        with torch.no_grad():  # make the biases matter
            for layer in m.model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    GW.export_gguf(m, tmp_path / "m.gguf", "F32")
    assert read_metadata(tmp_path / "m.gguf")["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(hf, ids), _logits(m.model, ids), rtol=0, atol=1e-5)


def test_tied_embeddings_and_tokenizer_copied_from_a_gguf_source(tmp_path):
    """A tied model writes no output.weight; a model loaded from a GGUF gets its tokenizer keys
    copied verbatim; the F32 re-export reproduces the logits."""
    save_tiny(tmp_path / "hf", "llama", seed=5, tie_word_embeddings=True)
    m = api.load(str(tmp_path / "hf"))
    GW.export_gguf(m, tmp_path / "a.gguf", "F32")
    md_a, ts = read_gguf(tmp_path / "a.gguf")
    assert "output.weight" not in ts
    m2 = api.load(str(tmp_path / "a.gguf"))
    rep = GW.export_gguf(m2, tmp_path / "b.gguf", "F32")
    assert rep.tokenizer.startswith("copied from a.gguf")
    md_b = read_metadata(tmp_path / "b.gguf")
    for k, v in md_a.items():
        if k.startswith("tokenizer."):
            assert md_b[k] == v, k
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(m2.model, ids), _logits(m.model, ids), rtol=0, atol=1e-5)


def test_lowbit_checkpoint_exports_its_dequantized_weights(tiny, tmp_path):
    """GGUF F32 of a lowbit RTN checkpoint holds exactly its dequantized weights."""
    from lowbit.core.scheme import QuantScheme

    save_tiny(tmp_path / "hf", "llama", seed=3)
    m = api.load(str(tmp_path / "hf"))
    api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32, symmetric=False))
    api.save(m, str(tmp_path / "q"))
    q = api.load(str(tmp_path / "q"))
    GW.export_gguf(q, tmp_path / "q.gguf", "F32")
    _, ts = read_gguf(tmp_path / "q.gguf")
    deq = q.model.model.layers[1].mlp.down_proj.weight_format.dequantize()
    assert torch.equal(ts["blk.1.ffn_down.weight"], deq)
    heads = q.model.config.num_attention_heads
    assert torch.equal(GW.unpermute_qk(ts["blk.0.attn_q.weight"], heads),
                       q.model.model.layers[0].self_attn.q_proj.weight_format.dequantize())


def test_collect_imatrix_is_the_mean_square_of_each_linear_input(tiny):
    from lowbit.data.texts import calibration_samples

    im = GW.collect_imatrix(tiny, n_samples=2, seq_len=32, text=CALIB, batch_size=1)
    assert set(im) == {f"blk.{i}.{n}.weight" for i in range(2) for n in
                       ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    samples = calibration_samples(tiny.tokenizer, n_samples=2, seq_len=32, text=CALIB)
    captured = []
    h = tiny.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: captured.append(a[0]))
    with torch.no_grad():
        tiny.model(samples)
    h.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1]).double()
    np.testing.assert_allclose(im["blk.1.ffn_down.weight"], (x * x).mean(0).float().numpy(), rtol=1e-5)


def test_export_with_imatrix_and_atomic_write(tiny, tmp_path):
    im = GW.collect_imatrix(tiny, n_samples=2, seq_len=32, text=CALIB)
    rep = GW.export_gguf(tiny, tmp_path / "m.gguf", "Q4_K_M", imatrix=im)
    assert rep.imatrix and os.listdir(tmp_path) == ["m.gguf"]
    bad = {**im, "blk.0.attn_q.weight": np.ones(3, np.float32)}
    with pytest.raises(LowbitError, match="importance matrix"):
        GW.export_gguf(tiny, tmp_path / "m.gguf", "Q4_K_M", imatrix=bad)
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary left, the old file untouched
    assert read_metadata(tmp_path / "m.gguf")["general.file_type"] == 15


def test_cli_export(tiny, tmp_path):
    from lowbit.cli import main

    save_tiny(tmp_path / "hf", "llama", seed=3)
    assert main(["export", str(tmp_path / "hf"), "--format", "gguf", "--type", "Q5_K_M", "-o",
                 str(tmp_path / "m.gguf")]) == 0
    assert read_metadata(tmp_path / "m.gguf")["general.file_type"] == 17
    assert main(["export", str(tmp_path / "hf"), "--type", "Q9_K", "-o", str(tmp_path / "x.gguf")]) == 2
    assert main(["export", str(tmp_path / "hf"), "--format", "onnx", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x.gguf").exists()
    assert main(["export", str(tmp_path / "hf"), "--type", "Q8_0", "--dtype", "float16", "-o", str(tmp_path / "y.gguf")]) == 2


def test_cli_export_dispatches_compressed_tensors(tmp_path):
    """--format compressed-tensors goes to lowbit.export.compressed_tensors (its own tests cover it)."""
    import json

    from lowbit.cli import main
    from lowbit.core.scheme import QuantScheme

    pytest.importorskip("lowbit.export.compressed_tensors")
    save_tiny(tmp_path / "hf", "llama", seed=3)
    m = api.load(str(tmp_path / "hf"))
    api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32, symmetric=False))
    api.save(m, str(tmp_path / "q"))
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    assert "quantization_config" in json.loads((tmp_path / "ct" / "config.json").read_text())
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--type", "Q4_K_M",
                 "-o", str(tmp_path / "ct2")]) == 2


def test_name_and_tokenizer_errors():
    with pytest.raises(LowbitError, match="no GGUF tensor name"):
        GW.gguf_name("model.layers.0.mlp.experts.0.weight")
    with pytest.raises(LowbitError, match="pre-tokenizer"):
        GW._pre_tokenizer_name({"type": "Metaspace"})


GEMMA = dict(num_hidden_layers=6, head_dim=256,  # llama.cpp: every 6th layer global, scale 1/sqrt(head_dim)
             layer_types=["sliding_attention"] * 5 + ["full_attention"])


def test_gemma3_round_trip(tmp_path):
    """Gemma 3: its extra norms named as llama.cpp's, RMSNorm gains stored as 1 + w; transformers
    and (where installed) llama.cpp reproduce the model's logits from our F32 file."""
    from transformers import AutoModelForCausalLM

    save_tiny(tmp_path / "hf", "gemma3_text", seed=1, **GEMMA)
    m = api.load(str(tmp_path / "hf"))
    rep = GW.export_gguf(m, tmp_path / "g.gguf", "F32")
    md, ts = read_gguf(tmp_path / "g.gguf")
    assert md["general.architecture"] == "gemma3" and md["gemma3.attention.sliding_window"] == 32
    assert "output.weight" not in ts and "blk.0.post_ffw_norm.weight" in ts and rep.n_tensors == len(ts)
    torch.testing.assert_close(ts["blk.0.attn_q_norm.weight"], m.model.model.layers[0].self_attn.q_norm.weight + 1)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = _logits(m.model, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(hf, ids), ref, rtol=0, atol=1e-5)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    llm = LC.load(tmp_path / "g.gguf", n_ctx=64, n_threads=1, logits_all=True)
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[:40])
    assert float(np.abs(got - ref[0].numpy()).max() / ref.abs().max()) < 3e-3
    llm.close()
    save_tiny(tmp_path / "bad", "gemma3_text", seed=1, num_hidden_layers=2)  # local/global pattern llama.cpp lacks
    with pytest.raises(LowbitError, match="every 6th layer"):
        GW.export_gguf(api.load(str(tmp_path / "bad")), tmp_path / "b.gguf", "F32")


# -- llama.cpp runs our file --------------------------------------------------------------------
def test_llama_cpp_runs_our_tiny_gguf(tiny, tmp_path):
    """llama.cpp loads our F32 and Q8_0 files; its logits agree with the model's; greedy
    generation runs."""
    pytest.importorskip("llama_cpp")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = _logits(tiny.model, ids)[0].numpy()
    for t, tol in (("F32", 1e-3), ("Q8_0", 0.05)):
        GW.export_gguf(tiny, tmp_path / f"{t}.gguf", t)
        llm = LC.load(tmp_path / f"{t}.gguf", n_ctx=64, n_threads=1, logits_all=True)
        llm.eval(ids[0].tolist())
        got = np.array(llm.scores[: ids.shape[1]])
        assert float(np.abs(got - ref).max() / np.abs(ref).max()) < tol, t
        out = llm.create_completion("Anne", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["text"] is not None
        llm.close()


def test_llama_cpp_quantizer_gives_our_bytes(wide, wide_files, tmp_path):
    """llama.cpp's llama_model_quantize applied to our F16 file writes, tensor for tensor, the
    same types and bytes as our own Q4_K_M / Q5_K_M / Q3_K_M (the model's weights are F16-exact)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ftypes = {"Q4_K_M": 15, "Q5_K_M": 17, "Q3_K_M": 12, "Q8_0": 7}
    for t, ft in ftypes.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ft
        params.nthread = 1
        out = tmp_path / f"ll-{t}.gguf"
        rc = llama_cpp.llama_model_quantize(str(wide_files["F16"].path).encode(), str(out).encode(), ctypes.byref(params))
        assert rc == 0
        theirs = {rt.name: rt for rt in gguf.GGUFReader(str(out)).tensors}
        ours = {rt.name: rt for rt in gguf.GGUFReader(wide_files[t].path).tensors}
        assert set(theirs) == set(ours)
        for name, rt in ours.items():
            assert rt.tensor_type == theirs[name].tensor_type, (t, name)
            assert np.array_equal(np.asarray(rt.data).view(np.uint8), np.asarray(theirs[name].data).view(np.uint8)), (t, name)


# -- hostile files ------------------------------------------------------------------------------
def test_fuzzed_files_give_only_clean_errors(tiny, tmp_path):
    """300 seeded mutations of a real file (byte flips, random 8-byte overwrites of the header,
    truncations): read_gguf either succeeds or raises LowbitError, never anything else, and
    never allocates more than a few MB."""
    GW.export_gguf(tiny, tmp_path / "ok.gguf", "Q4_K_M")
    good = (tmp_path / "ok.gguf").read_bytes()
    layout_end = good.index(b"blk.1.ffn_norm.weight") + 200  # roughly the end of the header
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "error": 0}
    bad = tmp_path / "bad.gguf"
    tracemalloc.start()
    try:
        for i in range(300):
            data = bytearray(good)
            kind = i % 3
            if kind == 0:
                for _ in range(int(rng.integers(1, 8))):
                    data[int(rng.integers(0, layout_end))] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1:
                pos = int(rng.integers(8, layout_end))
                data[pos : pos + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            else:
                data = data[: int(rng.integers(0, len(data)))]
            bad.write_bytes(bytes(data))
            tracemalloc.reset_peak()
            try:
                read_gguf(bad)
                outcomes["ok"] += 1
            except LowbitError as e:
                assert "\n" not in str(e)
                outcomes["error"] += 1
            assert tracemalloc.get_traced_memory()[1] < 64 * 2**20, i
    finally:
        tracemalloc.stop()
    assert outcomes["error"] > 100 and sum(outcomes.values()) == 300


def test_reader_errors_name_the_problem(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(LowbitError, match="truncated"):
        read_gguf(p)
    p.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(LowbitError, match="not a GGUF file"):
        read_gguf(p)
    with pytest.raises(LowbitError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_cli_tensor_type_patterns(tmp_path, capsys):
    """--tensor-type PATTERN=TYPE (llama.cpp's flag): every tensor whose GGUF name matches the
    regular expression gets TYPE, later flags win, the rest keep the mix's types; a pattern that
    matches nothing, an invalid one, a bad spec or a type the rows cannot hold is a one-line error."""
    gguf = pytest.importorskip("gguf")
    from lowbit.cli import main

    save_tiny(tmp_path / "hf", "llama", seed=3)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "hf"), "--type", "Q4_0", "--tensor-type", "ffn_.*=Q8_0",
                 "--tensor-type", r"blk\.0\.ffn_down=f16", "-o", str(out)]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    capsys.readouterr()
    for spec, needle in (("nothing_here=Q8_0", "matches no weight matrix"), ("blk[=Q8_0", "not a regular expression"),
                         ("Q8_0", "PATTERN=TYPE"), ("attn_q=Q6_K", "not whole Q6_K blocks")):
        assert main(["export", str(tmp_path / "hf"), "--type", "Q4_0", "--tensor-type", spec,
                     "-o", str(tmp_path / "bad.gguf")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (spec, err)
    assert not (tmp_path / "bad.gguf").exists()
    assert main(["export", str(tmp_path / "hf"), "--format", "compressed-tensors", "--tensor-type", "x=Q8_0",
                 "-o", str(tmp_path / "ct")]) == 2
