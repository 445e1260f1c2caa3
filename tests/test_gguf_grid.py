"""GPTQ onto a GGUF block type's fixed grid (lowbit.export.gguf_grid) and the GGUF-block weight
format (lowbit.formats.gguf_blocks.GGUFBlockWeight).

* block_grid: a · L[k] + b is the reader's value bit for bit, for every type, on encoded weights
  and on random bytes; codes_of / with_codes round-trip byte for byte and leave the scales alone;
* gptq_onto: never worse than the encoder's own rounding on the Hessian-weighted error, better on
  almost every case; the same codes as a naive transcription of the paper's Algorithm 1 onto the
  same fixed grid;
* a tiny llama quantized by GPTQ with gguf_type="Q4_K" (down projection: Q5_0, llama.cpp's
  fallback for rows of 352): the GGUF file holds its blocks unchanged (gguf-py and lowbit's reader
  give exactly the checkpoint's weights, q/k rows in GGUF order), the report lists them as
  carried, the checkpoint saves and loads bit for bit; tensor_types overrides and is checked.
"""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

from lowbit import api  # noqa: E402
from lowbit.algorithms.gptq import GPTQConfig  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import gguf as GW  # noqa: E402
from lowbit.export import gguf_grid as GG  # noqa: E402
from lowbit.export import gguf_imatrix as GI  # noqa: E402
from lowbit.export import gguf_quants as G  # noqa: E402
from lowbit.export.gguf_read import read_gguf  # noqa: E402
from lowbit.formats.gguf_blocks import GGUFBlockWeight  # noqa: E402
from lowbit.nn.linear import QuantizedLinear  # noqa: E402

TYPES = list(GG.SUPPORTED)
SOLVED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"]


def _weights(t: str, rows: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 2 * max(G.layout(t)[0], 256)
    x = rng.standard_normal((rows, n)) * rng.uniform(1e-3, 4, (rows, 1))
    x[1] = 0.0                                  # an all-zero row: zero scales
    x[2, : n // 2] *= 1e-6                      # tiny blocks next to ordinary ones
    return x.astype(np.float32)


def _grid_values(raw, t):
    a, b, L = GG.block_grid(raw, t)
    return a * L[GG.codes_of(raw, t)] + b


@pytest.mark.parametrize("t", TYPES)
def test_block_grid_is_the_reader_bit_for_bit(t):
    x = _weights(t)
    imatrix = np.random.default_rng(1).uniform(0, 2, x.shape[1]).astype(np.float32)
    for raw in (GW.encode_tensor(x, t), GW.encode_tensor(x, t, imatrix)):
        assert np.array_equal(_grid_values(raw, t), GI.dequantize(raw, t))
    a, b, L = GG.block_grid(raw, t)
    assert a.dtype == b.dtype == L.dtype == np.float32 and a.shape == b.shape == x.shape
    assert np.all(np.diff(L) > 0)
    if t.startswith("TQ"):
        return  # random bytes hold trit/2-bit codes outside {0, 1, 2}
    rnd = np.random.default_rng(2).integers(0, 256, raw.shape, dtype=np.uint8)  # any scales, Inf/NaN included
    with np.errstate(all="ignore"):
        want, got = GI.dequantize(rnd, t), _grid_values(rnd, t)
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), fin) and np.array_equal(got[fin], want[fin])


def test_level_tables():
    assert list(GG.block_grid(GW.encode_tensor(_weights("Q4_K"), "Q4_K"), "Q4_K")[2]) == list(range(16))
    assert list(GG.GRIDS["Q6_K"].levels) == list(range(-32, 32))
    assert list(GG.GRIDS["Q8_0"].levels) == list(range(-128, 128))
    assert list(GG.GRIDS["IQ4_NL"].levels) == list(GI.IQ4_NL_VALUES)


@pytest.mark.parametrize("t", TYPES)
def test_with_codes_replaces_the_codes_only(t):
    raw = GW.encode_tensor(_weights(t), t)
    k = GG.codes_of(raw, t)
    assert np.array_equal(GG.with_codes(raw, t, k), raw)
    L = GG.block_grid(raw, t)[2]
    k2 = np.random.default_rng(3).integers(0, len(L), k.shape)
    raw2 = GG.with_codes(raw, t, k2)
    assert np.array_equal(GG.codes_of(raw2, t), k2)
    c = G.CODE_LAYOUTS[t]
    blocks, blocks2 = raw.reshape(-1, G.layout(t)[1]), raw2.reshape(-1, G.layout(t)[1])
    keep = np.r_[0:c.start, c.stop:blocks.shape[1]]
    assert np.array_equal(blocks[:, keep], blocks2[:, keep])               # every scale byte as it was
    a, b, _ = GG.block_grid(raw2, t)
    assert np.array_equal(GI.dequantize(raw2, t), a * L[k2] + b)
    with pytest.raises(LowbitError, match=rf"{t}: level indices must lie in 0..{len(L) - 1}"):
        GG.with_codes(raw, t, k2 + len(L))


def test_types_without_a_grid_are_refused():
    raw = G.quantize(np.ones((2, 32), np.float32), "F16")
    with pytest.raises(LowbitError, match="GGUF type F16 has no fixed grid"):
        GG.block_grid(raw, "F16")
    with pytest.raises(LowbitError, match="BF16 has no fixed grid"):
        GG.gptq_onto(torch.randn(4, 64), torch.eye(64), "BF16")
    with pytest.raises(LowbitError, match="rows of 96 are not whole Q4_K blocks of 256"):
        GG.gptq_onto(torch.randn(4, 96), torch.eye(96), "Q4_K")


def problem(seed: int, rows: int = 24, cols: int = 256, n: int = 600):
    """Random W and H = 2/n XᵀX of inputs with correlated, unequally scaled columns."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = (torch.randn(n, cols, generator=g) @ mix) * (3 * torch.rand(cols, generator=g))
    return W, 2 / n * X.double().T @ X.double()


def test_gptq_onto_is_no_worse_than_the_encoder():
    ratios = {}
    for t in SOLVED:
        for seed in (0, 1):
            W, H = problem(seed)
            raw, info = GG.gptq_onto(W, H, t)
            assert raw.shape == GW.encode_tensor(W.numpy(), t).shape and raw.dtype == np.uint8
            Q = torch.from_numpy(GI.dequantize(raw, t)).double()
            D = W.double() - Q
            assert info["error"] == pytest.approx(float(((D @ H) * D).sum()), rel=1e-9)
            assert info["error"] <= info["rtn_error"] * (1 + 1e-9), (t, seed)
            ratios[t, seed] = info["error"] / info["rtn_error"]
    assert sum(r < 0.9 for r in ratios.values()) >= len(ratios) - 2, ratios
    # the encoder's scales are kept: only codes change
    W, H = problem(0)
    raw, _ = GG.gptq_onto(W, H, "Q4_K")
    rtn = GW.encode_tensor(W.numpy(), "Q4_K", torch.diagonal(H).float().numpy())
    assert np.array_equal(GG.with_codes(rtn, "Q4_K", GG.codes_of(raw, "Q4_K")), raw)


def naive_gptq_onto_grid(W, H, a, b, L, damp=0.01):
    """The paper's Algorithm 1 written plainly (no lazy batches, no act order), each weight
    rounded to the nearest level a·L + b of its own fixed grid (float32 values, as the reader's)."""
    W = W.double().clone()
    H = H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    a, b, L = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(L)
    K = torch.zeros(W.shape, dtype=torch.long)
    for i in range(W.shape[1]):
        levels = a[:, i, None] * L[None, :] + b[:, i, None]                # [out, levels] float32
        K[:, i] = (W[:, i, None] - levels.double()).abs().argmin(dim=1)      # first of equals
        q = levels.gather(1, K[:, i, None])[:, 0].double()
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
    return K


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K", "Q4_1", "IQ4_NL", "Q2_K"])
def test_gptq_onto_equals_the_naive_reference(t):
    W, H = problem(2, rows=16, cols=256)
    raw0 = GW.encode_tensor(W.numpy(), t, torch.diagonal(H).float().numpy())
    a, b, L = GG.block_grid(raw0, t)
    want = naive_gptq_onto_grid(W, H, a, b, L).numpy()
    raw, _ = GG.gptq_onto(W, H, t, act_order=False, block_size=48, dtype=torch.float64)
    got = GG.codes_of(raw, t)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, GG.codes_of(raw0, t))                     # GPTQ moved codes


def test_gptq_config_checks_gguf_type():
    assert GPTQConfig(gguf_type="Q4_K").gguf_type == "Q4_K"
    with pytest.raises(LowbitError, match="gguf_type must be one of"):
        GPTQConfig(gguf_type="F16")
    with pytest.raises(LowbitError, match="incoherent"):
        GPTQConfig(gguf_type="Q4_K", incoherent=True)


def test_the_cli_passes_gguf_type_as_an_option():
    from argparse import Namespace

    from lowbit.algorithms import get_method
    from lowbit.commands._args import options_from_flags

    args = Namespace(option=["gguf_type=Q6_K"], observer=None, bits=None)
    assert options_from_flags(args, get_method("gptq")) == {"gguf_type": "Q6_K"}


def test_format_refuses_corrupt_input():
    W = torch.randn(4, 256)
    w = GGUFBlockWeight.from_raw(GW.encode_tensor(W.numpy(), "Q4_K"), "Q4_K", (4, 256))
    t, meta = w.to_state_dict()
    assert meta == {"format": "gguf_blocks", "shape": [4, 256], "type": "Q4_K"} and t["raw"].shape == (4, 144)
    with pytest.raises(LowbitError, match=r"^gguf_blocks raw has shape \(4, 140\)/uint8, expected \(4, 144\)/uint8$"):
        GGUFBlockWeight.from_tensors({"raw": t["raw"][:, :140]}, meta)
    with pytest.raises(LowbitError, match=r"^gguf_blocks gguf_type: unknown GGUF block type 'Q4_X'"):
        GGUFBlockWeight.from_tensors(t, dict(meta, type="Q4_X"))
    with pytest.raises(LowbitError, match="rows of 200 are not whole Q4_K blocks of 256"):
        GGUFBlockWeight.from_tensors(t, dict(meta, shape=[4, 200]))
    x = torch.randn(3, 256)
    assert torch.equal(QuantizedLinear(w)(x), x @ w.dequantize().T)


# -- a tiny llama, end to end ----------------------------------------------------------------------
# 4 heads of 64 (the q/k permutation moves rows); q/k/v/o/gate/up rows of 256 (Q4_K), down rows of
# 352 (not whole 256-blocks: Q5_0, as llama.cpp falls back)
SHAPE = dict(hidden_size=256, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=2, tie_word_embeddings=True, initializer_range=0.1)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from lowbit.data.texts import load_text
    from lowbit.models.tiny import save_tiny

    d = tmp_path_factory.mktemp("gguf_grid")
    hf = save_tiny(d / "tiny", "llama", seed=5, **SHAPE)
    text = d / "calib.txt"
    text.write_text(load_text("calibration")[:6000], encoding="utf-8")
    m = api.load(str(hf))
    api.quantize(m, "gptq", None, progress=False, n_samples=4, seq_len=64, calibration_text=str(text),
                 gguf_type="Q4_K")
    return m


def _gguf_order(m, gname, t):
    fam = GW.family_of(m.model)
    cfg = m.model.config
    return GW._gguf_layout(gname, t, fam, cfg.num_attention_heads, cfg.num_key_value_heads)


def test_tiny_model_is_written_with_its_blocks_unchanged(quantized, tmp_path):
    m = quantized
    layers = GW.block_layers(m.model)
    assert len(layers) == 14
    types = {k: w.gguf_type for k, (_, w) in layers.items()}
    assert types == {k: "Q5_0" if ".ffn_down." in k else "Q4_K" for k in layers}
    rep = GW.export_gguf(m, tmp_path / "q.gguf", "Q8_0")
    assert rep.carried == types and rep.requantized == {}
    assert rep.tensor_types["token_embd.weight"] == "Q8_0"                   # qtype's rule for the rest
    theirs = {t.name: t for t in gguf.GGUFReader(rep.path).tensors}
    _, ours = read_gguf(rep.path)
    for gname, (_, w) in layers.items():
        expect = _gguf_order(m, gname, w.dequantize())
        rt = theirs[gname]
        assert rt.tensor_type.name == w.gguf_type
        assert np.array_equal(np.asarray(rt.data).reshape(w.raw.shape), _gguf_order(m, gname, w.raw).numpy())
        g = torch.from_numpy(np.ascontiguousarray(gq.dequantize(np.asarray(rt.data), rt.tensor_type)))
        assert torch.equal(g.reshape(w.shape), expect), f"gguf-py {gname}"
        assert torch.equal(ours[gname], expect), f"lowbit reader {gname}"
    assert not torch.equal(_gguf_order(m, "blk.0.attn_q.weight", layers["blk.0.attn_q.weight"][1].dequantize()),
                           layers["blk.0.attn_q.weight"][1].dequantize())  # the permutation did move rows


def test_checkpoint_saves_and_loads_bit_for_bit(quantized, tmp_path):
    out = api.save(quantized, str(tmp_path / "ck"))
    back = api.load(str(out))
    a, b = GW.block_layers(quantized.model), GW.block_layers(back.model)
    assert a.keys() == b.keys()
    for k in a:
        wa, wb = a[k][1], b[k][1]
        assert type(wb) is GGUFBlockWeight and wb.meta() == wa.meta()
        assert torch.equal(wb.raw, wa.raw) and torch.equal(wb.dequantize(), wa.dequantize())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, quantized.model(ids).logits)


def test_tensor_types_override_and_are_checked(quantized, tmp_path):
    m = quantized
    over = {"blk.0.ffn_up.weight": "Q6_K", "token_embd.weight": "Q5_0", "blk.1.attn_v.weight": "Q4_K"}
    rep = GW.export_gguf(m, tmp_path / "t.gguf", "Q8_0", tensor_types=over)
    for k, t in over.items():
        assert rep.tensor_types[k] == t
    assert rep.requantized == {"blk.0.ffn_up.weight": "Q6_K: its blocks are Q4_K"}
    assert rep.carried["blk.1.attn_v.weight"] == "Q4_K" and "blk.0.ffn_up.weight" not in rep.carried
    theirs = {t.name: t for t in gguf.GGUFReader(rep.path).tensors}
    assert {k: theirs[k].tensor_type.name for k in over} == over
    x = GW.gguf_tensors(m.model)["blk.0.ffn_up.weight"].numpy()
    assert np.array_equal(np.asarray(theirs["blk.0.ffn_up.weight"].data).reshape(-1), G.quantize(x, "Q6_K").reshape(-1))
    for bad, why in [({"blk.0.ffn_down.weight": "Q4_K"}, "rows of 352 in blk.0.ffn_down.weight are not whole Q4_K"),
                     ({"blk.0.ffn_up.weight": "Q4_X"}, "unknown GGUF type 'Q4_X'"),
                     ({"blk.0.attn_norm.weight": "Q8_0"}, "1-D"),
                     ({"blk.9.ffn_up.weight": "Q8_0"}, "does not have")]:
        with pytest.raises(LowbitError, match=why):
            GW.export_gguf(m, tmp_path / "bad.gguf", "Q8_0", tensor_types=bad)
    assert not (tmp_path / "bad.gguf").exists()
