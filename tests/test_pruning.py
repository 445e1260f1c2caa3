"""Pruning: exact masks (per layer / per row / N:M, "2:4" = 2 of every 4 kept), Wanda's metric on a
hand-computed example, SparseGPT's blocked solver == the naive paper reference, SparseGPT's
Hessian-weighted error below magnitude's and Wanda's, and the block runner + checkpoint round trip."""

import pytest
import torch

from lowbit import checkpoint
from lowbit.algorithms.base import make_method
from lowbit.algorithms.magnitude import MagnitudeConfig, magnitude_prune
from lowbit.algorithms.pruning import (hessian_error, lowest_k_mask, nm_mask, parse_pattern, prune_count,
                                       unstructured_mask)
from lowbit.algorithms.sparsegpt import SparseGPT, SparseGPTConfig, sparsegpt_prune
from lowbit.algorithms.wanda import Wanda, WandaConfig, wanda_prune, wanda_score
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.algorithms import get_method
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.models.families import find_blocks, linear_layers
from lowbit.nn.linear import QuantizedLinear
from lowbit.nn.replace import replacement
from tests.reference.sparsegpt_naive import sparsegpt_naive
from tests.tiny import tiny_gemma3, tiny_llama


def problem(seed: int, rows: int = 48, cols: int = 192, n: int = 400):
    """Random W and H = 2/n XᵀX of inputs with correlated, unequally scaled columns; also Σ x_j²."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = (torch.randn(n, cols, generator=g) @ mix) * (3 * torch.rand(cols, generator=g))
    X = X.double()
    return W, 2 / n * X.T @ X, (X * X).sum(0)


def assert_nm(W, n, m):
    """Every group of m consecutive columns of every row keeps exactly n nonzeros."""
    kept = (W != 0).reshape(W.shape[0], -1, m).sum(-1)
    assert torch.equal(kept, torch.full_like(kept, n)), kept.unique()


# -- masks ---------------------------------------------------------------------------------------
def test_mask_counts_are_exact():
    g = torch.Generator().manual_seed(0)
    S = torch.rand(10, 24, generator=g)
    assert int(unstructured_mask(S, 0.5).sum()) == 120
    assert int(unstructured_mask(S, 0.3).sum()) == 72                   # floor(0.3 · 240) = 72
    assert int(unstructured_mask(S, 0.29).sum()) == 69                  # floor(69.6)
    assert prune_count(10, 0.3) == 3 and prune_count(10, 0.0) == 0 and prune_count(7, 0.99) == 6
    per_row = unstructured_mask(S, 0.25, per_row=True)
    assert per_row.sum(1).tolist() == [6] * 10
    # the pruned are the lowest: every pruned score <= every kept score of its row
    for r in range(10):
        assert S[r][per_row[r]].max() <= S[r][~per_row[r]].min()
    # constant scores: still exact, earliest positions first
    assert lowest_k_mask(torch.ones(2, 4), 3).tolist() == [[True, True, True, False], [False] * 4]
    assert unstructured_mask(torch.ones(3, 8), 0.5, per_row=True).sum(1).tolist() == [4, 4, 4]
    assert int(unstructured_mask(S, 0.0).sum()) == 0


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    g = torch.Generator().manual_seed(1)
    S = torch.rand(6, 32, generator=g)
    mask = nm_mask(S, n, m)
    assert_nm(S.masked_fill(mask, 0), n, m)
    assert int(mask.sum()) == 6 * 32 * (m - n) // m
    grp_s, grp_m = S.reshape(6, -1, m), mask.reshape(6, -1, m)
    for r in range(6):                       # within each group the largest n are the kept ones
        for k in range(32 // m):
            kept, pruned = grp_s[r, k][~grp_m[r, k]], grp_s[r, k][grp_m[r, k]]
            assert pruned.max() < kept.min()
    assert nm_mask(torch.ones(1, 8), 2, 4).tolist() == [[True, True, False, False] * 2]


def test_settings_validation():
    assert parse_pattern("2:4", "x") == (2, 4) and parse_pattern(" 4 : 8 ", "x") == (4, 8)
    assert parse_pattern(None, "x") is None
    for bad in ("4:4", "0:4", "5:4", "2-4", "2:4:8", 24):
        with pytest.raises(LowbitError, match="pattern"):
            MagnitudeConfig(pattern=bad)
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(LowbitError, match="sparsity"):
            WandaConfig(sparsity=bad)
    with pytest.raises(LowbitError, match="multiple of M"):
        magnitude_prune(torch.randn(4, 10), MagnitudeConfig(pattern="2:4"))
    with pytest.raises(LowbitError, match="multiple of M"):
        SparseGPTConfig(pattern="4:8", block_size=20)
    with pytest.raises(LowbitError, match="holds 0 exactly"):
        SparseGPTConfig(quantize=True, scheme=QuantScheme(4, False, "group", 32, zero_point="float"))
    with pytest.raises(LowbitError, match="damp"):
        SparseGPTConfig(damp=0)
    with pytest.raises(LowbitError, match="only with quantize=True"):
        make_method("sparsegpt", QuantScheme(3, True, "channel"))
    assert make_method("sparsegpt", QuantScheme()).config.quantize is False   # the default scheme is fine
    with pytest.raises(LowbitError, match="does not take"):
        make_method("wanda", None, damp=0.1)


# -- magnitude -----------------------------------------------------------------------------------
def test_magnitude_per_layer_and_nm():
    W = torch.tensor([[0.1, -5.0, 0.2, 3.0], [-4.0, 0.3, 2.0, -0.05]])
    Wp, mask = magnitude_prune(W, MagnitudeConfig(sparsity=0.5))
    # per layer: the 4 smallest |w| of all 8 (0.05, 0.1, 0.2, 0.3), rows unequally sparse allowed
    assert Wp.tolist() == [[0.0, -5.0, 0.0, 3.0], [-4.0, 0.0, 2.0, 0.0]]
    Wp, _ = magnitude_prune(W, MagnitudeConfig(sparsity=0.75))
    assert Wp.tolist() == [[0.0, -5.0, 0.0, 0.0], [-4.0, 0.0, 0.0, 0.0]]
    Wp, _ = magnitude_prune(W, MagnitudeConfig(sparsity=0.1, pattern="1:4"))   # pattern wins
    assert Wp.tolist() == [[0.0, -5.0, 0.0, 0.0], [-4.0, 0.0, 0.0, 0.0]]
    W, _, _ = problem(0)
    Wp, mask = magnitude_prune(W, MagnitudeConfig(sparsity=0.6))
    assert int((Wp == 0).sum()) == int(0.6 * W.numel()) == 5529
    assert W.abs()[mask].max() <= W.abs()[~mask].min()
    assert torch.equal(Wp[~mask], W[~mask])


# -- Wanda ---------------------------------------------------------------------------------------
def test_wanda_metric_hand_computed_and_differs_from_magnitude():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-0.25, 1.0, -1.0, 2.0]])
    sq = torch.tensor([16.0, 1.0, 0.25, 100.0])               # ‖X_j‖₂ = 4, 1, 0.5, 10
    S = wanda_score(W, sq)
    assert S.tolist() == [[4.0, 2.0, 1.5, 5.0], [1.0, 1.0, 0.5, 20.0]]
    Wp, mask = wanda_prune(W, sq, WandaConfig(sparsity=0.5))  # per row: the 2 lowest scores
    assert Wp.tolist() == [[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 2.0]]  # row 2: tie 1.0/1.0 -> earlier
    # magnitude on the same weights keeps the largest |w| instead
    Wm, _ = magnitude_prune(W, MagnitudeConfig(sparsity=0.5))
    # (per layer: 0.25, 0.5, then the first two of the three 1.0s in row-major order)
    assert Wm.tolist() == [[0.0, -2.0, 3.0, 0.0], [0.0, 0.0, -1.0, 2.0]]
    assert not torch.equal(Wp, Wm)
    # with equal activation norms Wanda is per-row magnitude pruning
    Wq, _ = wanda_prune(W, torch.full((4,), 9.0), WandaConfig(sparsity=0.5))
    assert Wq.tolist() == [[0.0, -2.0, 3.0, 0.0], [0.0, 0.0, -1.0, 2.0]]   # tie 1.0/1.0 -> earlier
    # N:M within each group of a row
    Wp, _ = wanda_prune(W, sq, WandaConfig(pattern="1:2"))
    assert Wp.tolist() == [[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 2.0]]


def test_wanda_random_exact_per_row_and_nm():
    W, _, sq = problem(3)
    Wp, mask = wanda_prune(W, sq, WandaConfig(sparsity=0.7))
    assert (Wp == 0).sum(1).tolist() == [134] * 48                       # floor(0.7 · 192)
    S = wanda_score(W, sq)
    for r in range(48):
        assert S[r][mask[r]].max() <= S[r][~mask[r]].min()
    Wp, _ = wanda_prune(W, sq, WandaConfig(pattern="2:4"))
    assert_nm(Wp, 2, 4)


def test_wanda_method_accumulates_squared_norms():
    assert get_method("wanda") is Wanda and Wanda.needs_calibration
    m = make_method("wanda", None, sparsity=0.5)
    lin = torch.nn.Linear(8, 3)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 5, 8, generator=g), torch.randn(4, 8, generator=g)
    m.observe("a", lin, x1)
    m.observe("a", lin, x2)
    stats = m.statistics()
    assert sorted(stats) == ["a.count", "a.sq_norms"]
    X = torch.cat([x1.reshape(-1, 8), x2]).double()
    torch.testing.assert_close(stats["a.sq_norms"], (X ** 2).sum(0), rtol=1e-6, atol=0)
    assert stats["a.sq_norms"].dtype == torch.float64
    assert stats["a.count"].tolist() == [14]
    new = replacement(lin, m.apply("a", lin))
    assert type(new) is torch.nn.Linear and torch.equal(new.bias, lin.bias)
    ref, _ = wanda_prune(lin.weight, stats["a.sq_norms"].clone(), m.config)
    assert torch.equal(new.weight, ref) and (new.weight == 0).sum(1).tolist() == [4, 4, 4]
    d = m.describe()
    assert d["method"] == "wanda" and d["sparsity"] == 0.5 and d["layers"]["a"] == {"sparsity": 0.5, "weights": 24}
    with pytest.raises(LowbitError, match="no calibration inputs"):
        m.apply("a", lin)
    with pytest.raises(LowbitError, match="features"):
        m.observe("b", lin, torch.randn(3, 7))


# -- SparseGPT -------------------------------------------------------------------------------------
# (sparsity, pattern, block_size, scheme for joint quantization). 192 columns: block 128 leaves a
# ragged last block of 64, block 40 one of 32.
SGPT_CASES = [
    (0.5, None, 128, None),
    (0.6, None, 40, None),
    (0.5, "2:4", 32, None),
    (0.5, "4:8", 64, None),
    (0.75, "1:4", 128, None),
    (0.5, None, 64, QuantScheme(4, True, "group", 64)),
    (0.5, "2:4", 32, QuantScheme(3, False, "channel")),
]


@pytest.mark.parametrize("case", SGPT_CASES, ids=lambda c: f"{c[1] or c[0]}-B{c[2]}-{c[3].short_name() if c[3] else 'fp'}")
def test_sparsegpt_equals_naive_reference(case):
    sparsity, pattern, B, scheme = case
    W, H, _ = problem(0)
    H[5, :] = 0                                   # a dead input
    H[:, 5] = 0
    cfg = SparseGPTConfig(sparsity=sparsity, pattern=pattern, block_size=B, damp=0.01,
                          quantize=scheme is not None, scheme=scheme or QuantScheme())
    W_ref, mask_ref = sparsegpt_naive(W, H, sparsity, parse_pattern(pattern, "t"), B, 0.01, scheme)
    res = sparsegpt_prune(W, H, cfg, dtype=torch.float64)
    assert torch.equal(res.mask, mask_ref)
    torch.testing.assert_close(res.W.double(), W_ref, rtol=0, atol=1e-6 if scheme else 1e-10)
    assert res.info["error"] == pytest.approx(hessian_error(W, W_ref, H), rel=1e-8)
    assert res.info["dead_columns"] == 1
    n_pruned = int(res.mask.sum())
    if pattern is None:
        # exact per block: 48 · b · sparsity for each block
        assert n_pruned == sum(int(sparsity * 48 * (min(i + B, 192) - i) + 1e-9) for i in range(0, 192, B))
    else:
        n, m = parse_pattern(pattern, "t")
        assert_nm((~res.mask).float(), n, m)     # the mask: n kept of every m
        if scheme is None:
            assert_nm(res.W, n, m)
    assert torch.all(res.W[res.mask] == 0)
    if scheme is not None:
        assert isinstance(res.weight, AffineWeight) and res.weight.scheme == scheme
        assert torch.equal(res.weight.dequantize(), res.W)
    # float32 solve (the default): the same up to float32 rounding
    res32 = sparsegpt_prune(W, H, cfg)
    assert (res32.mask == res.mask).float().mean() >= 0.99
    assert res32.info["error"] == pytest.approx(res.info["error"], rel=1e-2)


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sparsegpt_error_below_magnitude_and_wanda(seed, pattern):
    W, H, sq = problem(seed)
    e_sgpt = sparsegpt_prune(W, H, SparseGPTConfig(sparsity=0.5, pattern=pattern)).info["error"]
    e_mag = hessian_error(W, magnitude_prune(W, MagnitudeConfig(sparsity=0.5, pattern=pattern))[0], H)
    e_wanda = hessian_error(W, wanda_prune(W, sq, WandaConfig(sparsity=0.5, pattern=pattern))[0], H)
    assert e_sgpt < 0.8 * e_wanda < 0.8 * e_mag, (e_sgpt, e_wanda, e_mag)


def test_sparsegpt_zero_sparsity_identity_hessian_keeps_weights():
    W, _, _ = problem(1, cols=64)
    res = sparsegpt_prune(W, torch.eye(64), SparseGPTConfig(sparsity=0.0), dtype=torch.float64)
    assert torch.equal(res.W, W.double()) and res.info["error"] == 0
    # H = I: no compensation is possible, SparseGPT is per-block magnitude pruning
    res = sparsegpt_prune(W, torch.eye(64), SparseGPTConfig(sparsity=0.5, block_size=64), dtype=torch.float64)
    Wm, _ = magnitude_prune(W, MagnitudeConfig(sparsity=0.5))
    assert torch.equal(res.W.float(), Wm)


def test_sparsegpt_method_and_joint_quantization():
    assert get_method("sparsegpt") is SparseGPT and SparseGPT.needs_calibration
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    x = torch.randn(64, 32, generator=g)
    m = make_method("sparsegpt", None, sparsity=0.5, block_size=16)
    m.observe("a", lin, x)
    assert sorted(m.statistics()) == ["a.count", "a.xxT"]
    H = 2.0 / 64 * (x.T @ x).double()
    new = replacement(lin, m.apply("a", lin))
    assert type(new) is torch.nn.Linear and torch.equal(new.bias, lin.bias)
    ref = sparsegpt_prune(lin.weight, H, m.config)
    assert torch.equal(new.weight, ref.W) and int((new.weight == 0).sum()) == 128
    d = m.describe()
    assert d["config"]["scheme"] is None and d["sparsity"] == 0.5 and d["layers"]["a"]["sparsity"] == 0.5
    assert d["layers"]["a"]["error"] == pytest.approx(ref.info["error"])

    scheme = QuantScheme(4, True, "group", 16)
    mq = make_method("sparsegpt", scheme, pattern="2:4", quantize=True)
    mq.observe("a", lin, x)
    q = replacement(lin, mq.apply("a", lin))
    assert isinstance(q, QuantizedLinear)
    Wq = q.weight_format.dequantize()
    kept = (Wq != 0).reshape(8, -1, 4).sum(-1)
    assert int(kept.max()) <= 2                      # ≤ 2 of 4 (a kept weight may round to 0)
    assert mq.describe()["config"]["scheme"]["group_size"] == 16


# Measured on problem(seed 0-2), 48 x 192: joint / (SparseGPT then RTN) = 0.68-0.89 for int3 per
# channel and 0.86-0.95 for int4 g64; (magnitude then RTN) is 2-5x the joint error.
@pytest.mark.parametrize("scheme", [QuantScheme(4, True, "group", 64), QuantScheme(3, True, "channel")],
                         ids=lambda s: s.short_name())
@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_quantization_beats_prune_then_round(seed, pattern, scheme):
    W, H, _ = problem(seed)
    res = sparsegpt_prune(W, H, SparseGPTConfig(pattern=pattern, quantize=True, scheme=scheme))
    pruned = sparsegpt_prune(W, H, SparseGPTConfig(pattern=pattern))
    then_rtn = hessian_error(W, AffineWeight.quantize_rtn(pruned.W, scheme).dequantize(), H)
    mag = magnitude_prune(W, MagnitudeConfig(pattern=pattern))[0]
    mag_rtn = hessian_error(W, AffineWeight.quantize_rtn(mag, scheme).dequantize(), H)
    assert pruned.info["error"] < res.info["error"] < 0.97 * then_rtn
    assert res.info["error"] < 0.5 * mag_rtn
    assert torch.all(res.W[res.mask] == 0)
    assert int(res.mask.sum()) == W.numel() // 2


# -- runner ----------------------------------------------------------------------------------------
def _samples(n, L, seed):
    return torch.randint(0, 96, (n, L), generator=torch.Generator().manual_seed(seed))


def _kl(base, model, x) -> float:
    with torch.no_grad():
        lp = base(x).logits.log_softmax(-1)
        lq = model(x).logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=lambda f: f.__name__)
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_runner_end_to_end(tmp_path, make, pattern):
    base = make()
    calib, held_out = _samples(8, 32, 1), _samples(8, 32, 2)
    kls = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        model = make()
        meth = make_method(name, None, sparsity=0.5, pattern=pattern)
        if meth.needs_calibration:
            run_sequential(model, meth, calib, batch_size=4, progress=False)
        else:
            apply_data_free(model, meth, progress=False)
        for blk in find_blocks(model):
            for lname, lin in linear_layers(blk).items():
                assert type(lin) is torch.nn.Linear
                W = lin.weight
                if pattern:
                    assert_nm(W, 2, 4)
                elif name == "wanda":
                    assert (W == 0).sum(1).tolist() == [W.shape[1] // 2] * W.shape[0]
                else:
                    assert int((W == 0).sum()) == W.numel() // 2, (name, lname)
        d = meth.describe()
        assert d["sparsity"] == 0.5 and len(d["layers"]) == 7 * len(find_blocks(model))
        kls[name] = _kl(base, model, held_out)
        rec = {"method": d, "base_model": {"kind": "test"}, "calibration": None}
        loaded, _, rec2 = checkpoint.load(checkpoint.save(model, None, tmp_path / name, rec))
        with torch.no_grad():
            assert torch.equal(model(held_out).logits, loaded(held_out).logits)
        assert rec2["method"]["sparsity"] == 0.5 and rec2["modules"] == {}
    # measured KL(SparseGPT) / min(KL(magnitude), KL(Wanda)) on held-out samples: 0.58-0.77 (random
    # tiny models have no outlier features, so Wanda is close to magnitude here)
    assert 0 < kls["sparsegpt"] < 0.85 * min(kls["magnitude"], kls["wanda"]), kls


def test_command_line_prune_and_eval(tmp_path, capsys):
    import json

    from lowbit.cli import main
    from lowbit.models.tiny import save_tiny

    tiny = save_tiny(tmp_path / "tiny", "llama")
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60)
    cases = [(["--method", "sparsegpt", "--option", "pattern=2:4"], 0.5, 0),
             (["--method", "wanda", "--option", "sparsity=0.25"], 0.25, 0),
             (["--method", "sparsegpt", "--bits", "4", "--group-size", "32", "--option", "quantize=true"], None, 14)]
    for i, (argv, sparsity, n_modules) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert main([str(a) for a in ["quantize", tiny, *argv, "--calib", text, "--samples", 4, "--seq-len", 32,
                                      "-o", out]]) == 0
        rec = json.loads((out / "lowbit.json").read_text())
        assert len(rec["modules"]) == n_modules and len(rec["method"]["layers"]) == 14
        if sparsity is not None:
            assert rec["method"]["sparsity"] == sparsity
        else:                                       # joint: kept weights may also round to 0
            assert 0.5 <= rec["method"]["sparsity"] < 0.6
        assert main([str(a) for a in ["eval", out, "--text", text, "--max-tokens", 128, "--ctx", 32,
                                      "--no-latency"]]) == 0
