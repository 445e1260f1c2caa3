"""GGUF export of affine checkpoints keeps the method's codes (lowbit.export.gguf.affine_carry +
gguf_quants.encode_codes).

* RTN and GPTQ, 4 and 8 bits, symmetric, groups of 32 with float16 scales: every block linear is
  written with its own codes and scales in Q4_0 / Q8_0, and dequantizes, by gguf-py and by lowbit's
  reader, to exactly ``AffineWeight.dequantize()`` (q/k rows in GGUF's rotary order, as the float
  path writes them); 4-bit codes also fit Q8_0 and Q5_0, groups of 64 are two blocks with one scale;
* schemes whose grid a block cannot hold (groups of 16: two scales per block; asymmetric 4-bit
  codes in Q4_0; float zero-points in Q4_1; any K-quant) are re-quantized, and the report says why;
* the CLI summary counts the carried layers.
"""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

from lowbit import api  # noqa: E402
from lowbit.core.scheme import QuantScheme  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import gguf as GW  # noqa: E402
from lowbit.export import gguf_quants as G  # noqa: E402
from lowbit.export.gguf_read import read_gguf  # noqa: E402
from lowbit.models.tiny import save_tiny  # noqa: E402

# 4 heads of 32 (q/k permutation moves rows), rows of 128 and 256 (whole blocks of 32 and of 256)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_hidden_layers=2, tie_word_embeddings=True, initializer_range=0.1)
N_LINEAR = 14  # 7 per block


def _scheme(bits, group=32, **kw):
    return QuantScheme(bits=bits, group_size=group, scale_dtype="float16", **kw)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny", "llama", seed=3, **SHAPE)


_CACHE: dict = {}


def _quantized(hf, method, scheme):
    key = (method, scheme)
    if key not in _CACHE:
        m = api.load(str(hf))
        opts = dict(n_samples=4, seq_len=32) if method == "gptq" else {}
        api.quantize(m, method, scheme, progress=False, **opts)
        _CACHE[key] = m
    return _CACHE[key]


def _hf_layout(gname, t, cfg):
    if gname.endswith("attn_q.weight"):
        return GW.unpermute_qk(t, cfg.num_attention_heads)
    if gname.endswith("attn_k.weight"):
        return GW.unpermute_qk(t, cfg.num_key_value_heads)
    return t


def _assert_exact(m, rep, gtype):
    layers = GW.affine_layers(m.model)
    assert len(layers) == N_LINEAR
    assert rep.carried == {k: gtype for k in layers} and rep.requantized == {}
    _, ours = read_gguf(rep.path)
    theirs = {t.name: t for t in gguf.GGUFReader(rep.path).tensors}
    cfg = m.model.config
    for gname, (_, w) in layers.items():
        expect = w.dequantize()
        rt = theirs[gname]
        assert rt.tensor_type.name == gtype == rep.tensor_types[gname], gname
        g = torch.from_numpy(np.ascontiguousarray(gq.dequantize(np.asarray(rt.data), rt.tensor_type)))
        assert torch.equal(_hf_layout(gname, g.reshape(w.shape), cfg), expect), f"gguf-py {gname}"
        assert torch.equal(_hf_layout(gname, ours[gname], cfg), expect), f"lowbit reader {gname}"
        # and in GGUF's own row order, against the float path's layout of the same weight
        assert np.array_equal(g.reshape(w.shape).numpy(), GW.gguf_tensors(m.model)[gname].numpy()), gname


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits,gtype", [(4, "Q4_0"), (8, "Q8_0")])
def test_carried_tensors_are_exact_in_both_readers(hf, method, bits, gtype, tmp_path):
    m = _quantized(hf, method, _scheme(bits))
    rep = GW.export_gguf(m, tmp_path / "c.gguf", gtype)
    _assert_exact(m, rep, gtype)
    if bits == 4:  # the full 4-bit range is used: code -8 lands on q = 0
        q = torch.cat([w.integers().flatten() for _, w in GW.affine_layers(m.model).values()])
        assert int(q.min()) == -8


@pytest.mark.parametrize("gtype", ["Q8_0", "Q5_0"])
def test_4_bit_codes_fit_the_wider_types(hf, gtype, tmp_path):
    m = _quantized(hf, "rtn", _scheme(4))
    _assert_exact(m, GW.export_gguf(m, tmp_path / "w.gguf", gtype), gtype)


def test_restricted_range_and_groups_of_64(hf, tmp_path):
    m = _quantized(hf, "rtn", _scheme(4, group=64, restricted_range=True))
    _assert_exact(m, GW.export_gguf(m, tmp_path / "r.gguf", "Q4_0"), "Q4_0")


def test_carried_bytes_are_what_a_requantization_would_not_give(hf):
    """Q4_0's own absmax quantizer maps the largest value to q = 0 (d = max / -8): on a lowbit grid
    of d·c it finds other blocks, our blocks hold d·c."""
    m = _quantized(hf, "gptq", _scheme(4))
    gname, (_, w) = next(iter(GW.affine_layers(m.model).items()))
    ct = GW.affine_carry(w, "Q4_0", lambda t: GW._gguf_layout(gname, t, GW.family_of(m.model), 4, 2))
    raw = G.encode_codes(ct.codes.numpy(), ct.d.numpy(), "Q4_0")
    x = GW.gguf_tensors(m.model)[gname].numpy()
    assert np.array_equal(G.dequantize(raw, "Q4_0"), x)
    assert not np.array_equal(G.dequantize(G.quantize(x, "Q4_0"), "Q4_0"), x)


@pytest.mark.parametrize("scheme,gtype,why", [
    (_scheme(4, group=16), "Q4_0", "not whole blocks"),
    (_scheme(4, symmetric=False), "Q4_0", "grid"),
    (_scheme(4, symmetric=False, zero_point="float"), "Q4_1", ""),
    (_scheme(8), "Q4_0", "grid"),
    (_scheme(4), "Q4_1", "grid"),
])
def test_schemes_that_do_not_map_are_requantized_and_reported(hf, scheme, gtype, why, tmp_path):
    m = _quantized(hf, "rtn", scheme)
    rep = GW.export_gguf(m, tmp_path / "n.gguf", gtype)
    layers = GW.affine_layers(m.model)
    assert set(rep.requantized) == set(layers) and rep.carried == {}
    assert all(v.startswith(gtype) and why in v for v in rep.requantized.values()), rep.requantized
    # what was written is the re-quantized float weight, as before
    theirs = {t.name: t for t in gguf.GGUFReader(rep.path).tensors}
    gname = next(iter(layers))
    x = GW.gguf_tensors(m.model)[gname].numpy()
    assert np.array_equal(np.asarray(theirs[gname].data).reshape(-1), G.quantize(x, gtype).reshape(-1))


def test_a_k_quant_is_requantized_its_fallback_carried(hf, tmp_path):
    """--type Q4_K: rows of 128 are not whole 256-blocks and fall back to Q5_0 (as llama.cpp), which
    holds 4-bit codes; ffn_down (rows of 256) stays Q4_K, whose sub-block scales are quantized."""
    m = _quantized(hf, "rtn", _scheme(4))
    rep = GW.export_gguf(m, tmp_path / "k.gguf", "Q4_K")
    layers = GW.affine_layers(m.model)
    down = {k for k in layers if ".ffn_down." in k}
    assert set(rep.requantized) == down and len(down) == 2
    assert all(v.startswith("Q4_K: Q4_K has no exact form") for v in rep.requantized.values())
    assert rep.carried == {k: "Q5_0" for k in layers if k not in down}
    _, ours = read_gguf(rep.path)
    for k in rep.carried:
        assert torch.equal(_hf_layout(k, ours[k], m.model.config), layers[k][1].dequantize()), k


def test_asymmetric_3_bit_codes_fit_q8_0_as_differences(hf, tmp_path):
    """u - z of 3-bit codes lies in -7..7: Q8_0 holds (u - z)·s exactly."""
    m = _quantized(hf, "rtn", _scheme(3, symmetric=False))
    _assert_exact(m, GW.export_gguf(m, tmp_path / "a.gguf", "Q8_0"), "Q8_0")


@pytest.mark.parametrize("bits,gtype", [(4, "Q4_1"), (5, "Q5_1"), (3, "Q4_1")])
def test_offset_types_carry_zero_points_whose_offset_is_a_float16(bits, gtype):
    """d·u + m holds (u - z)·s when m = -s·z is a float16 (here z a power of two): carried, exact
    in gguf-py; one zero-point that breaks it sends the layer back to re-quantization."""
    from lowbit.formats.affine import AffineWeight

    g = torch.Generator().manual_seed(bits)
    scheme = _scheme(bits, group=64, symmetric=False)
    u = torch.randint(0, 2**bits, (8, 128), generator=g)
    s = (torch.rand(8, 2, generator=g) * 0.05 + 0.01).half().float()
    z = torch.full((8, 2), 2 ** (bits - 1), dtype=torch.int32)
    w = AffineWeight.from_integers(u, s, z, scheme)
    ct = GW.affine_carry(w, gtype)
    assert not isinstance(ct, str), ct
    raw = G.encode_codes(ct.codes.numpy(), ct.d.numpy(), gtype, ct.m.numpy())
    qt = gguf.GGMLQuantizationType[gtype]
    assert torch.equal(torch.from_numpy(gq.dequantize(raw, qt)), w.dequantize())
    s[0, 0] = 2.0**-6 * (2 - 2.0**-10)  # a float16 with all 11 significant bits set
    z[0, 0] = 3  # 3 · s needs 12 significant bits: not a float16
    assert "float16" in GW.affine_carry(AffineWeight.from_integers(u, s, z, scheme), gtype)


def test_encode_codes_refuses_what_a_block_cannot_hold():
    c = np.zeros((1, 32), np.int32)
    d = np.array([[0.5]], np.float32)
    with pytest.raises(LowbitError, match="-8..7"):
        G.encode_codes(c + 8, d, "Q4_0")
    with pytest.raises(LowbitError, match="float16"):
        G.encode_codes(c, np.array([[0.1]], np.float32), "Q8_0")
    with pytest.raises(LowbitError, match="not Q4_K"):
        G.encode_codes(c, d, "Q4_K")


def test_cli_names_the_carried_count(hf, tmp_path, capsys):
    from lowbit.cli import main

    m = _quantized(hf, "rtn", _scheme(4))
    api.save(m, str(tmp_path / "ck"))
    assert main(["export", str(tmp_path / "ck"), "--type", "Q4_0", "-o", str(tmp_path / "c.gguf")]) == 0
    err = capsys.readouterr().err
    assert f"{N_LINEAR} quantized layers with their codes and scales unchanged: Q4_0 x{N_LINEAR}, 0 re-quantized" in err
    assert main(["export", str(tmp_path / "ck"), "--type", "Q4_K", "-o", str(tmp_path / "k.gguf")]) == 0
    err = capsys.readouterr().err
    assert "12 quantized layers with their codes and scales unchanged: Q5_0 x12, 2 re-quantized (Q4_K: " in err
