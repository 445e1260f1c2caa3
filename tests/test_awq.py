"""AWQ: exact folding, the scale and clip searches against a naive reference, end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import checkpoint
from lowbit.algorithms.awq import (AWQ, ActStats, AWQConfig, awq_quantize, fold_scales, group_errors,
                                   output_error, quantize_clipped, search_clip, search_scales, shrink_factors)
from lowbit.algorithms.base import make_method
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.core.grid import dequantize, fake_quantize
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.models.families import FAMILIES, awq_layout, find_blocks
from lowbit.nn.linear import QuantizedLinear
from tests.reference.awq_naive import search_clip_naive, search_scales_naive
from tests.tiny import tiny_gemma3, tiny_llama

INT4 = QuantScheme(4, False, "group", 64)
INT3 = QuantScheme(3, False, "group", 128)


def tiny_llama_mha(seed: int = 0):
    """Like tiny_llama but with as many key/value heads as query heads, so v_proj -> o_proj chains."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=72, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _outlier_problem(seed=0, out=96, cols=256, n=2048, channels=(3, 50, 77, 200), boost=30.0):
    g = _gen(seed)
    W = torch.randn(out, cols, generator=g)
    X = torch.randn(n, cols, generator=g)
    X[:, list(channels)] *= boost
    return W, X


def _samples(n=6, L=24, vocab=96, seed=1):
    return torch.randint(0, vocab, (n, L), generator=_gen(seed))


# -- config and table ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(n_grid=0), dict(clip_grid=-1), dict(max_tokens=0), dict(max_shrink=0.0),
                                 dict(max_shrink=1.5), dict(n_grid=2.5), dict(n_grid=True), dict(scheme="int4")])
def test_config_rejects_bad_values_in_one_line(bad):
    with pytest.raises(LowbitError) as e:
        AWQConfig(**bad)
    assert "\n" not in str(e.value)


def test_default_config_and_registration():
    m = make_method("awq")
    assert isinstance(m, AWQ) and m.needs_calibration
    assert m.config.scheme == QuantScheme(4, False, "group", 128)
    assert (m.config.n_grid, m.config.clip, m.config.clip_grid, m.config.max_shrink, m.config.max_tokens) == \
        (20, True, 20, 0.5, 4096)
    d = m.describe()
    assert d["method"] == "awq" and d["config"]["scheme"]["bits"] == 4


def test_every_family_has_an_awq_layout_naming_its_linears():
    for mt, fam in FAMILIES.items():
        assert awq_layout(mt) == fam.awq
        layout = awq_layout(mt)
        for grp in layout.groups:
            assert set(grp.linears) <= set(fam.linears)
    assert awq_layout("gemma3_text").norm_offset == 1.0 and awq_layout("llama").norm_offset == 0.0
    with pytest.raises(LowbitError, match="AWQ has no scaling groups for model family 'gpt2'"):
        awq_layout("gpt2")


# -- the pieces of the loss ------------------------------------------------------------------
def test_gram_loss_is_the_output_error():
    W, X = _outlier_problem(n=300)
    W_hat = fake_quantize(W, INT3)
    st = ActStats.of(X.reshape(3, 100, -1))  # batches flatten to tokens
    assert float(st.n) == 300
    want = float(((X @ W_hat.T - X @ W.T) ** 2).sum())
    assert float(output_error(W, W_hat, st.H)) == pytest.approx(want, rel=1e-4)
    torch.testing.assert_close(st.mean_abs, X.abs().mean(0))
    # per-group errors add up to the per-group outputs' errors
    err = group_errors(W, W_hat, st.H, INT3)
    assert err.shape == (96, 2)
    for j, c in enumerate([slice(0, 128), slice(128, 256)]):
        want_j = ((X[:, c] @ (W_hat[:, c] - W[:, c]).T) ** 2).sum(0)
        torch.testing.assert_close(err[:, j], want_j, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scheme", [INT3, QuantScheme(4, True, "group", 100), QuantScheme(3, False, "group", 96, zero_point="float"),
                                    QuantScheme(8, True, "channel", restricted_range=True), QuantScheme(4, False, "tensor"),
                                    QuantScheme(2, False, "group", 64, scale_dtype="float32")], ids=lambda s: s.short_name())
@pytest.mark.parametrize("positive", [False, True], ids=["signed", "positive"])
def test_search_grid_is_the_grid_bit_for_bit(scheme, positive):
    from lowbit.algorithms.awq import _grouped, _slice_range
    from lowbit.core.grid import fake_quantize_grouped, qparams_from_range

    W = torch.randn(24, 256, generator=_gen(6)) * 3
    if positive:  # a ragged last group whose real entries are all > 0: its padding must not widen it
        W = W.abs() + 1
    Wg = _grouped(W, scheme)
    lo, hi = _slice_range(Wg, scheme, 256)
    W_hat = fake_quantize_grouped(Wg, *qparams_from_range(lo, hi, scheme), scheme).reshape(24, -1)[:, :256]
    assert torch.equal(W_hat, fake_quantize(W, scheme))
    f = 0.5 + torch.rand(lo.shape, generator=_gen(7)) / 2
    q, s, z = quantize_clipped(W, f, scheme)
    W_clip = fake_quantize_grouped(Wg, *qparams_from_range(lo * f, hi * f, scheme), scheme).reshape(24, -1)[:, :256]
    assert torch.equal(W_clip, dequantize(q, s, z, scheme))


def test_shrink_factors_span_max_shrink_to_one():
    assert shrink_factors(20, 0.5) == pytest.approx([1 - i / 20 for i in range(11)])
    assert shrink_factors(4, 1.0) == [1.0]
    assert shrink_factors(10, 0.75) == pytest.approx([1.0, 0.9, 0.8])


# -- Eq. 4-5: scale search --------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [INT4, INT3, QuantScheme(4, True, "channel")], ids=lambda s: s.short_name())
def test_scales_cut_output_error_with_activation_outliers(scheme):
    W, X = _outlier_problem()
    st = ActStats.of(X)
    found = search_scales(st, [W], scheme, n_grid=20)
    Y = X @ W.T
    rtn = float(((X @ AffineWeight.quantize_rtn(W, scheme).dequantize().T - Y) ** 2).sum())
    awq = float(((X @ (fake_quantize(W * found.s, scheme) / found.s).T - Y) ** 2).sum())
    assert found.alpha > 0
    assert found.losses[0] == pytest.approx(rtn, rel=1e-3)  # α = 0 is RTN
    assert awq == pytest.approx(min(found.losses), rel=1e-3)
    assert awq < 0.5 * rtn  # measured: 0.24 (int4 g64), 0.26 (int3 g128), 0.48 (int4 per-channel)
    # the outlier channels get the largest scales
    assert set(found.s.topk(4).indices.tolist()) == {3, 50, 77, 200}


def test_alpha_zero_grid_is_rtn_exactly():
    W, X = _outlier_problem(seed=3)
    found = search_scales(ActStats.of(X), [W], INT3, n_grid=1)
    assert found.alpha == 0.0 and len(found.losses) == 1
    assert torch.equal(found.s, torch.ones(256))
    a = awq_quantize(W * found.s, None, INT3)
    b = AffineWeight.quantize_rtn(W, INT3)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales) and torch.equal(a.qzeros, b.qzeros)
    # all-ones clipping factors are RTN as well
    c = awq_quantize(W, torch.ones(96, 2), INT3)
    assert torch.equal(c.qweight, b.qweight) and torch.equal(c.scales, b.scales)


@pytest.mark.parametrize("scheme", [INT4, QuantScheme(4, True, "group", 32)], ids=lambda s: s.short_name())
def test_scale_search_matches_naive_paper_form(scheme):
    g = _gen(5)
    Ws = [torch.randn(40, 128, generator=g), torch.randn(24, 128, generator=g)]  # two linears share s
    X = torch.randn(512, 128, generator=g) * torch.exp(torch.randn(128, generator=g))
    found = search_scales(ActStats.of(X), Ws, scheme, n_grid=10)
    alpha, s, losses = search_scales_naive(X, Ws, scheme, n_grid=10)
    assert found.alpha == alpha
    torch.testing.assert_close(found.s, s, rtol=1e-5, atol=0)
    assert found.losses == pytest.approx(losses, rel=1e-3)


# -- clipping -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [INT3, QuantScheme(4, True, "group", 64), QuantScheme(4, False, "channel"),
                                    QuantScheme(3, False, "group", 96)], ids=lambda s: s.short_name())
def test_clip_never_increases_any_group_error(scheme):
    W, X = _outlier_problem(seed=7, cols=256)
    W[5, 10] = 12.0  # a weight outlier worth clipping around
    H = ActStats.of(X).H
    f = search_clip(H, W, scheme, clip_grid=20, max_shrink=0.5)
    rtn_err = group_errors(W, AffineWeight.quantize_rtn(W, scheme).dequantize(), H, scheme)
    q, s, z = quantize_clipped(W, f, scheme)
    err = group_errors(W, dequantize(q, s, z, scheme), H, scheme)
    assert f.shape == rtn_err.shape and float(f.min()) >= 0.5 - 1e-6 and float(f.max()) == 1.0
    assert (err <= rtn_err * (1 + 1e-5)).all()
    assert float(err.sum()) < 0.97 * float(rtn_err.sum())  # and it helps overall
    assert (f < 1).any()


@pytest.mark.parametrize("scheme", [QuantScheme(3, False, "group", 32), QuantScheme(4, True, "group", 48)],
                         ids=lambda s: s.short_name())
def test_clip_search_matches_naive_per_group_loop(scheme):
    g = _gen(11)
    W = torch.randn(12, 96, generator=g)
    X = torch.randn(256, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    f = search_clip(ActStats.of(X).H, W, scheme, clip_grid=20, max_shrink=0.5)
    f_naive = search_clip_naive(X, W, scheme, clip_grid=20, max_shrink=0.5)
    assert (f - f_naive).abs().max() < 1e-6  # same choice in every group


# -- folding is an identity of the float model ----------------------------------------------------
@pytest.mark.parametrize("make,n_groups", [(tiny_llama, 3), (tiny_gemma3, 3), (tiny_llama_mha, 4)],
                         ids=["llama-gqa", "gemma3", "llama-mha"])
def test_folding_random_scales_leaves_the_float_model_unchanged(make, n_groups):
    model = make()
    x = _samples(3, 20, seed=4)
    with torch.no_grad():
        before = model(x).logits
    layout = awq_layout(model.config.model_type)
    g = _gen(2)
    folded = 0
    for blk in find_blocks(model):
        for grp in layout.groups:
            prev = blk.get_submodule(grp.prev)
            width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.numel()
            if any(blk.get_submodule(n).in_features != width for n in grp.linears):
                continue
            fold_scales(blk, grp.prev, grp.linears, torch.exp(0.5 * torch.randn(width, generator=g)),
                        layout.norm_offset)
            folded += 1
    assert folded == n_groups * len(find_blocks(model))
    with torch.no_grad():
        after = model(x).logits
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, make().model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_gemma_norm_folds_through_one_plus_weight():
    model = tiny_gemma3()
    blk = find_blocks(model)[0]
    norm = blk.input_layernorm
    with torch.no_grad():
        norm.weight.normal_()
    w0 = norm.weight.detach().clone()
    s = torch.full((64,), 4.0)
    fold_scales(blk, "input_layernorm", ["self_attn.q_proj"], s, norm_offset=1.0)
    torch.testing.assert_close(norm.weight, (1 + w0) / 4 - 1)


def test_fold_rejects_mismatched_shapes_in_one_line():
    blk = find_blocks(tiny_llama())[0]
    with pytest.raises(LowbitError, match="cannot fold 72 scales into self_attn.v_proj with 24 outputs"):
        fold_scales(blk, "self_attn.v_proj", ["self_attn.o_proj"], torch.ones(72))
    with pytest.raises(LowbitError, match="cannot fold 10 scales into input_layernorm"):
        fold_scales(blk, "input_layernorm", [], torch.ones(10))


class FoldOnly(AWQ):
    """AWQ's observation, search and folding, but layers are left in float."""

    def apply(self, layer_name, module):
        super().apply(layer_name, module)
        return module.weight.detach()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3, tiny_llama_mha], ids=["llama-gqa", "gemma3", "llama-mha"])
def test_runner_transform_with_searched_scales_keeps_float_logits(make):
    model, ref = make(), make()
    # give the activations some outliers so that the search picks α > 0 somewhere
    with torch.no_grad():
        for blk in find_blocks(model) + find_blocks(ref):
            blk.input_layernorm.weight[:4] += 5.0
    meth = FoldOnly(AWQConfig(scheme=QuantScheme(3, False, "group", 32)))
    run_sequential(model, meth, _samples(), batch_size=3, progress=False)
    assert any(a > 0 for a in meth.alphas.values())
    assert len(meth.alphas) == len(find_blocks(model)) * (4 if make is tiny_llama_mha else 3)
    assert meth.statistics() == {}  # everything was consumed by apply
    x = _samples(2, 16, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


# -- observation -----------------------------------------------------------------------------
def test_observe_keeps_at_most_max_tokens_and_shares_work_between_readers():
    meth = AWQ(AWQConfig(max_tokens=50))
    lin = torch.nn.Linear(8, 4)
    x1, x2 = torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    for x in (x1, x2):
        meth.observe("q", lin, x)
        meth.observe("k", lin, x)
    meth.observe("q", lin, torch.randn(1, 5, 8))  # budget exhausted: ignored
    X = torch.cat([x1.reshape(-1, 8), x2.reshape(-1, 8)[:10]])
    for name in ("q", "k"):
        st = meth._stats[name]
        assert float(st.n) == 50
        torch.testing.assert_close(st.H, X.T @ X)
        torch.testing.assert_close(st.abs_sum, X.abs().sum(0))
    assert meth._stats["q"].H is not meth._stats["k"].H
    assert set(meth.statistics()) == {"q.H", "q.abs_sum", "q.n", "k.H", "k.abs_sum", "k.n"}


def test_unknown_family_is_a_one_line_error():
    blk = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(LowbitError, match="AWQ has no scaling groups for model family None"):
        AWQ(AWQConfig()).transform_block(blk, "model.layers.0", [], {})


def test_apply_refuses_nan_weights():
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN/Inf"):
        AWQ(AWQConfig()).apply("model.layers.0.mlp.up_proj", lin)


# -- end to end --------------------------------------------------------------------------------
def _kl(p_logits, q_logits):
    return float(F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True,
                          reduction="batchmean"))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_end_to_end_int3_beats_rtn_and_reloads_bit_identical(tmp_path, make):
    scheme = QuantScheme(3, False, "group", 32)
    base = make()
    with torch.no_grad():  # outlier input channels, as trained LLMs have
        for blk in find_blocks(base):
            blk.input_layernorm.weight[:4] += 3.0
    awq, rtn = copy.deepcopy(base), copy.deepcopy(base)
    calib = _samples(8, 32, seed=1)
    meth = make_method("awq", scheme)
    run_sequential(awq, meth, calib, batch_size=4, progress=False)
    apply_data_free(rtn, make_method("rtn", scheme), progress=False)
    assert sum(isinstance(m, QuantizedLinear) for m in awq.modules()) == 7 * len(find_blocks(awq))
    x = _samples(8, 32, seed=2)  # same distribution as the calibration samples, other draws
    with torch.no_grad():
        ref, a, r = base(x).logits, awq(x).logits, rtn(x).logits
    kl_awq, kl_rtn = _kl(ref, a), _kl(ref, r)
    assert kl_awq < 0.8 * kl_rtn, (kl_awq, kl_rtn)

    rec = {"method": meth.describe(), "base_model": {"kind": "test"}, "calibration": None}
    out = checkpoint.save(awq, None, tmp_path / "q", rec)
    loaded, _, rec2 = checkpoint.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, a)
    assert rec2["method"]["method"] == "awq" and rec2["method"]["config"]["scheme"] == scheme.to_dict()
