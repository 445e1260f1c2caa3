"""compressed-tensors export: the on-disk layout against a naive reference written from the spec,
exact dequantization of every exported layer, config/tokenizer/atomic writing, refusals; and, when
the optional `compressed_tensors` package imports, its packer and decompressor and transformers'
loader on our files (tiny llama/qwen2 and the real SmolLM2)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lowbit import api, checkpoint
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.formats.affine import AffineWeight
from lowbit.models.tiny import tiny_model

try:
    import compressed_tensors  # noqa: F401

    HAVE_CT = True
except ImportError:
    HAVE_CT = False
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="compressed-tensors not installed (optional peer)")


# -- naive reference, written from the layout description --------------------------------------
def naive_pack_row(codes: list[int], bits: int) -> list[int]:
    """One row: code i at bits [i*bits, (i+1)*bits) of one big little-endian integer, cut into
    32-bit words (two's complement int32), ceil(n*bits/32) of them."""
    stream = 0
    for i, c in enumerate(codes):
        assert 0 <= c < 2**bits
        stream |= c << (i * bits)
    words = []
    for k in range(math.ceil(len(codes) * bits / 32)):
        w = (stream >> (32 * k)) & 0xFFFFFFFF
        words.append(w - 2**32 if w >= 2**31 else w)
    return words


def naive_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.tensor([naive_pack_row(r, bits) for r in codes.tolist()], dtype=torch.int32)


def naive_dequantize(q_signed: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, g: int) -> torch.Tensor:
    """W[r, c] = (q[r, c] - zp[r, c // g]) * scale[r, c // g], element by element (float32)."""
    rows, cols = q_signed.shape
    W = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            z = 0 if zp is None else int(zp[r, c // g])
            W[r, c] = torch.tensor(float(int(q_signed[r, c]) - z)) * scale[r, c // g].float()
    return W


def tiny_lowbit(model_type="llama", seed=0, **overrides):
    t = tiny_model(model_type, seed=seed, **overrides)
    return api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


def quantized_tiny(scheme, method="rtn", model_type="llama", tie=False, **opts):
    m = tiny_lowbit(model_type, tie_word_embeddings=tie)
    api.quantize(m, method, scheme, progress=False, **opts)
    return m


SCHEMES = {
    "w4-g16-sym": QuantScheme(bits=4, group_size=16),
    "w4-g32-asym": QuantScheme(bits=4, symmetric=False, group_size=32),
    "w8-channel-sym": QuantScheme(bits=8, granularity="channel", group_size=None),
    "w8-channel-asym": QuantScheme(bits=8, symmetric=False, granularity="channel", group_size=None),
    "w3-g16-asym": QuantScheme(bits=3, symmetric=False, group_size=16),
    "w2-g64-sym": QuantScheme(bits=2, group_size=64),
    "w5-channel-restricted": QuantScheme(bits=5, granularity="channel", group_size=None, restricted_range=True),
    "w4-tensor-asym": QuantScheme(bits=4, symmetric=False, granularity="tensor", group_size=None),
    "w6-g48-asym": QuantScheme(bits=6, symmetric=False, group_size=48),  # 64-wide rows: short last group
}


# -- (a) the packing itself ---------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_equals_naive_reference(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 3, 8, 31, 32, 33, 40, 64, 100, 129):
        codes = torch.randint(0, 2**bits, (4, n), generator=g)
        codes[0] = 0
        codes[1] = 2**bits - 1  # every bit set: sign bit of the words, straddling codes
        words = ct.pack_int32(codes, bits)
        assert words.dtype == torch.int32 and words.shape == (4, math.ceil(n * bits / 32))
        assert torch.equal(words, naive_pack(codes, bits)), (bits, n)
        assert torch.equal(ct.unpack_int32(words, bits, n), codes.to(torch.int32))


def test_unpack_int32_rejects_wrong_width():
    with pytest.raises(LowbitError, match="words"):
        ct.unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 8)
    with pytest.raises(LowbitError, match="int32"):
        ct.unpack_int32(torch.zeros(2, 1, dtype=torch.int64), 4, 8)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_convert_affine_layout_against_naive_reference(name):
    sch = SCHEMES[name]
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 64, generator=g)
    W[3] = 0.0  # an all-zero row
    w = AffineWeight.quantize_rtn(W, sch)
    tensors, scheme, fmt = ct.convert_affine(w, "layer")
    b = sch.bits
    u = w.integers() + sch.code_offset  # lowbit's unsigned codes
    assert fmt == "pack-quantized"
    assert torch.equal(tensors["weight_packed"], naive_pack(u, b))
    assert torch.equal(tensors["weight_shape"], torch.tensor([24, 64]))
    wa = scheme["weights"]
    assert (wa["num_bits"], wa["symmetric"], wa["type"], wa["dynamic"]) == (b, sch.symmetric, "int", False)
    q_signed = u - 2 ** (b - 1)
    if sch.granularity == "group":
        eg = math.gcd(sch.group_size, 64)
        assert wa["strategy"] == "group" and wa["group_size"] == eg
        idx = [(j * eg) // sch.group_size for j in range(64 // eg)]
        scale = w.scales[:, idx]
    elif sch.granularity == "channel":
        assert wa["strategy"] == "channel" and wa["group_size"] is None
        eg, scale = 64, w.scales
    else:
        assert wa["strategy"] == "tensor"
        eg, scale = 64 * 24, w.scales.expand(24, 1)
        assert tensors["weight_scale"].shape == (1,)
    assert torch.equal(tensors["weight_scale"].reshape(-1), scale.reshape(-1)[: tensors["weight_scale"].numel()])
    zp = None
    if not sch.symmetric:
        z = w.zero_points()
        if sch.granularity == "tensor":
            assert tensors["weight_zero_point"].dtype == torch.int8
            assert int(tensors["weight_zero_point"][0]) == int(z[0, 0]) - 2 ** (b - 1)
            zp = (z - 2 ** (b - 1)).expand(24, 1)
        else:
            z = z if sch.granularity == "channel" else z[:, idx]
            # packed along the output dimension: each column of [out, n_groups] is one bit stream
            assert torch.equal(tensors["weight_zero_point"], naive_pack(z.t(), b).t())
            zp = z - 2 ** (b - 1)
    else:
        assert "weight_zero_point" not in tensors
    ref = naive_dequantize(q_signed, scale, zp, eg if sch.granularity != "tensor" else 64)
    assert torch.equal(ref, w.dequantize())  # the spec's formula gives lowbit's weights exactly
    assert torch.equal(ct.dequantize_tensors(tensors, scheme), w.dequantize())


def test_export_group_size_is_exact_for_short_last_groups():
    assert ct.export_group_size(128, [576, 1536]) == 64  # SmolLM2
    assert ct.export_group_size(128, [4096, 11008]) == 128
    W = torch.randn(8, 40)
    w = AffineWeight.quantize_rtn(W, QuantScheme(bits=4, symmetric=False, group_size=16))  # groups 16, 16, 8
    tensors, scheme, _ = ct.convert_affine(w)
    assert scheme["weights"]["group_size"] == 8 and tensors["weight_scale"].shape == (8, 5)
    assert torch.equal(ct.dequantize_tensors(tensors, scheme), w.dequantize())
    with pytest.raises(LowbitError, match="must divide"):
        ct.convert_affine(w, group_size=16)


# -- (a) whole exports ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w4-g16-sym", "w4-g32-asym", "w3-g16-asym", "w8-channel-sym", "w4-tensor-asym"])
def test_export_tiny_llama_files_and_exact_weights(tmp_path, name):
    tie = name == "w4-g32-asym"
    m = quantized_tiny(SCHEMES[name], tie=tie)
    out = ct.export_compressed_tensors(m, tmp_path / "ct")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", ct.EXPORT_RECORD} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert list(qc["config_groups"]) == ["group_0"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is tie
    tensors = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in tensors) is not tie  # tied: stored once, as the embedding
    qmods = checkpoint.quantized_modules(m.model)
    assert len(qmods) == 14
    weights = ct.read_export(out)
    assert set(weights) == set(qmods)
    for n, mod in qmods.items():
        assert torch.equal(weights[n], mod.weight_format.dequantize()), n
        assert tensors[f"{n}.weight_scale"].dtype == torch.float32
        assert f"{n}.qweight" not in tensors and f"{n}.weight" not in tensors
    for k, v in m.model.state_dict().items():  # untouched float tensors are written as they are
        if not k.startswith(tuple(n + "." for n in qmods)) and not (tie and k == "lm_head.weight"):
            assert torch.equal(tensors[k], v), k
    rec = json.loads((out / ct.EXPORT_RECORD).read_text())
    assert rec["record"]["method"]["method"] == "rtn" and len(rec["modules"]) == 14


def test_export_from_saved_checkpoint_equals_in_memory(tmp_path):
    m = quantized_tiny(SCHEMES["w4-g32-asym"])
    a = ct.export_compressed_tensors(m, tmp_path / "a")
    loaded = api.load(api.save(m, str(tmp_path / "ckpt")))
    b = ct.export_compressed_tensors(loaded, tmp_path / "b")
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "config.json").read_text())["quantization_config"] == \
        json.loads((b / "config.json").read_text())["quantization_config"]


def test_dtype_float16_halves_the_float_tensors(tmp_path):
    m = quantized_tiny(SCHEMES["w4-g16-sym"])
    out = ct.export_compressed_tensors(m, tmp_path / "h", dtype="float16")
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    for n, mod in checkpoint.quantized_modules(m.model).items():  # float16 scales stay exact
        assert torch.equal(ct.read_export(out)[n], mod.weight_format.dequantize())
        break


def test_w8a8_from_affine_and_from_dynamic_int8(tmp_path):
    m = quantized_tiny(SCHEMES["w8-channel-sym"])
    out = ct.export_compressed_tensors(m, tmp_path / "a", activations="int8-dynamic")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    grp = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized"
    assert grp["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                        "strategy": "token", "dynamic": True, "actorder": None}
    assert grp["weights"]["strategy"] == "channel" and grp["weights"]["num_bits"] == 8
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj"
    w = checkpoint.quantized_modules(m.model)[name].weight_format
    assert torch.equal(tensors[f"{name}.weight"], w.integers().to(torch.int8))
    assert tensors[f"{name}.weight_scale"].shape == (64, 1)

    d = tiny_lowbit()
    api.quantize(d, "dynamic-int8", progress=False)
    out = ct.export_compressed_tensors(d, tmp_path / "d")
    tensors = load_file(str(out / "model.safetensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    for n, mod in checkpoint.quantized_modules(d.model).items():
        f = mod.weight_format
        assert torch.equal(tensors[f"{n}.weight"], f.qweight)
        assert torch.equal(tensors[f"{n}.weight_scale"], f.wscale.reshape(-1, 1))
        assert torch.equal(ct.read_export(out)[n], f.dequantize())


def test_mixed_schemes_get_disjoint_config_groups(tmp_path):
    from lowbit.nn.linear import QuantizedLinear

    m = tiny_lowbit()
    sym4, asym8 = QuantScheme(bits=4, group_size=32), QuantScheme(bits=8, symmetric=False, granularity="channel",
                                                                 group_size=None)
    for name, lin in [(n, mod) for n, mod in m.model.named_modules() if isinstance(mod, torch.nn.Linear)]:
        if name == "lm_head":
            continue
        sch = asym8 if name.endswith("down_proj") else sym4
        parent, _, child = name.rpartition(".")
        setattr(m.model.get_submodule(parent), child, QuantizedLinear(AffineWeight.quantize_rtn(lin.weight, sch)))
    out = ct.export_compressed_tensors(m.model, tmp_path / "mixed", tokenizer=m.tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    assert len(groups) == 2 and qc["format"] == "pack-quantized"
    targets = sorted(t for g in groups.values() for t in g["targets"])
    assert targets == sorted(f"re:(.*\\.)?{leaf}$" for leaf in
                             ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    for n, mod in checkpoint.quantized_modules(m.model).items():
        assert torch.equal(ct.read_export(out)[n], mod.weight_format.dequantize())


def test_refusals(tmp_path):
    with pytest.raises(LowbitError, match="no quantized layers"):
        ct.export_compressed_tensors(tiny_lowbit(), tmp_path / "x")
    hqq = quantized_tiny(QuantScheme(bits=4, symmetric=False, group_size=32, zero_point="float"))
    with pytest.raises(LowbitError, match="float zero-points"):
        ct.export_compressed_tensors(hqq, tmp_path / "x")
    nf4 = tiny_lowbit()
    api.quantize(nf4, "nf4", progress=False)
    with pytest.raises(LowbitError, match="'nf4' has no compressed-tensors form"):
        ct.export_compressed_tensors(nf4, tmp_path / "x")
    four = quantized_tiny(SCHEMES["w4-g16-sym"])
    with pytest.raises(LowbitError, match="W8A8 export needs 8-bit"):
        ct.export_compressed_tensors(four, tmp_path / "x", activations="int8-dynamic")
    with pytest.raises(LowbitError, match="activation quantization"):
        ct.export_compressed_tensors(four, tmp_path / "x", activations="int4")
    with pytest.raises(LowbitError, match="dtype must be"):
        ct.export_compressed_tensors(four, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="refusing to replace"):
        ct.export_compressed_tensors(four, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_overwrite_previous_export_and_no_partial_on_failure(tmp_path, monkeypatch):
    m = quantized_tiny(SCHEMES["w4-g16-sym"])
    out = ct.export_compressed_tensors(m, tmp_path / "o")
    def contents():
        # tensors and metadata, not raw bytes: safetensors writes its metadata map in hash order,
        # which differs from one call to the next
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    meta, before = contents()
    ct.export_compressed_tensors(m, tmp_path / "o")  # an earlier export may be replaced
    meta2, after = contents()
    assert meta2 == meta and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    raw = (out / "model.safetensors").read_bytes()

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ct.export_compressed_tensors(m, tmp_path / "o")
    assert (out / "model.safetensors").read_bytes() == raw  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no partial directory left


# -- (b) the peer: compressed-tensors' packer/decompressor, transformers' loader ----------------
@needs_ct
@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_identical_to_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(10 + bits)
    for n in (1, 7, 32, 33, 100, 576):
        u = torch.randint(0, 2**bits, (6, n), generator=g)
        signed = (u - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_to_int32(signed, bits), ct.pack_int32(u, bits))
        assert torch.equal(pack_to_int32(signed, bits, packed_dim=0), ct.pack_int32(u.t().contiguous(), bits).t())
        back = unpack_from_int32(ct.pack_int32(u, bits), bits, torch.Size([6, n]))
        assert torch.equal(back.to(torch.int32), u.to(torch.int32) - 2 ** (bits - 1))


@needs_ct
@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_decompressor_gives_our_weights(name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = AffineWeight.quantize_rtn(torch.randn(24, 64, generator=torch.Generator().manual_seed(2)), SCHEMES[name])
    tensors, scheme, fmt = ct.convert_affine(w)
    tensors["weight_scale"] = tensors["weight_scale"].float()  # as the export writes them (model dtype)
    qs = QuantizationScheme.model_validate({"targets": ["Linear"], **scheme, "format": fmt})
    dense = BaseCompressor.get_value_from_registry(fmt).decompress(tensors, qs)["weight"]
    assert dense.dtype == torch.float32 and torch.equal(dense, w.dequantize())


def _load_hf(out, dequantize):
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": intended
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(str(out), **kw).eval()


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@needs_ct
@pytest.mark.parametrize("name,model_type", [("w4-g16-sym", "llama"), ("w4-g32-asym", "llama"),
                                             ("w8-channel-sym", "llama"), ("w3-g16-asym", "qwen2"),
                                             ("w6-g48-asym", "llama")])
def test_transformers_loads_tiny_export(tmp_path, name, model_type):
    from compressed_tensors.quantization import QuantizationConfig

    sch = SCHEMES[name]
    m = quantized_tiny(sch, model_type=model_type)
    out = ct.export_compressed_tensors(m, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    x = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = m.model(x).logits
    # symmetric exports load compressed (decompressed on the first call); asymmetric ones need
    # dequantize=True with compressed-tensors 0.20 (see the module docstring)
    for dequantize in ([False, True] if sch.symmetric else [True]):
        hf = _load_hf(out, dequantize)
        with torch.no_grad():
            theirs = hf(x).logits
        assert _rel(ours, theirs) < 1e-3  # measured 0 (same float32 weights; a fast lowbit kernel may reorder sums)
        for n, mod in checkpoint.quantized_modules(m.model).items():
            assert torch.equal(hf.get_submodule(n).weight, mod.weight_format.dequantize()), n


@needs_ct
def test_transformers_w8a8_dynamic_int8(tmp_path):
    """W8A8 from lowbit's dynamic-int8: transformers decompresses the weights to exactly ours and
    emulates the per-token int8 activations (amax/127.5, [-128, 127]); lowbit's kernel uses
    amax/127 like vLLM's, so logits agree to the activation rounding only. A naive emulation of
    transformers' rule on lowbit's weights matches it to float rounding."""
    m = tiny_lowbit()
    api.quantize(m, "dynamic-int8", progress=False)
    out = ct.export_compressed_tensors(m, tmp_path / "w8a8")
    hf = _load_hf(out, dequantize=False)
    x = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = m.model(x).logits, hf(x).logits
    assert _rel(ours, theirs) < 2e-2
    qmods = checkpoint.quantized_modules(m.model)
    for n, mod in qmods.items():
        assert torch.equal(hf.get_submodule(n).weight, mod.weight_format.dequantize()), n

    # naive reference of the loader's arithmetic: fake-quantize each linear's input per token
    ref = tiny_lowbit()
    for n, mod in qmods.items():
        lin = ref.model.get_submodule(n)
        lin.weight.data = mod.weight_format.dequantize()

        def fq(module, args):
            (x,) = args
            s = x.abs().amax(dim=-1, keepdim=True) / 127.5
            s = torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).eps), s)
            return (torch.clamp(torch.round(x / s), -128, 127) * s,)

        lin.register_forward_pre_hook(fq)
    with torch.no_grad():
        emulated = ref.model(x).logits
    assert _rel(emulated, theirs) < 1e-5


@needs_ct
@pytest.mark.slow
def test_transformers_loads_smollm2_export(tmp_path):
    m = api.load()
    api.quantize(m, "rtn", QuantScheme(bits=4, symmetric=False, group_size=128), progress=False)
    out = ct.export_compressed_tensors(m, tmp_path / "smollm2")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64  # 576 = 4 x 128 + 64
    hf = _load_hf(out, dequantize=True)
    x = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = m.model(x).logits, hf(x).logits
    assert _rel(ours, theirs) < 1e-3
    qmods = checkpoint.quantized_modules(m.model)
    assert len(qmods) == 210
    for n, mod in qmods.items():
        assert torch.equal(hf.get_submodule(n).weight, mod.weight_format.dequantize()), n
