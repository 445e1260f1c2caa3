"""Sparsity end to end: exact masks (global magnitude, 4:8 as well as 2:4), the sparse weight
formats' exact round trips, the native sparse kernels vs the plain-torch reference (odd shapes,
batch sizes across the kernel's 32-row tiles, AVX2 and scalar paths, poisoned output buffers),
sparse storage of pruned models with bit-identical logits after save/load, and bad input."""

import json
import math

import pytest
import torch

from lowbit import checkpoint
from lowbit.algorithms.base import make_method
from lowbit.algorithms.magnitude import MagnitudeConfig, global_magnitude_masks, magnitude_prune, model_linear_layers
from lowbit.algorithms.pruning import nm_mask, unstructured_mask
from lowbit.algorithms.sparse_storage import (AUTO_CSR_LARGE_MIN_SPARSITY, AUTO_CSR_MIN_SPARSITY, choose_format,
                                              convert_model)
from lowbit.algorithms.sparsegpt import SparseGPTConfig, sparsegpt_prune
from lowbit.algorithms.wanda import WandaConfig, wanda_prune
from lowbit.calibration.sequential import apply_data_free
from lowbit.errors import LowbitError
from lowbit.formats.sparse_csr import CSRWeight
from lowbit.formats.sparse_nm import SparseNMWeight
from lowbit.kernels import linear as dispatch_linear
from lowbit.kernels.sparse import (csr_linear_native, native_available, native_lib, nm_linear_native,
                                   reference_linear)
from lowbit.nn.linear import QuantizedLinear
from tests.tiny import tiny_llama

needs_native = pytest.mark.skipif(not native_available(), reason="native sparse library not built")


def nm_weight(rows, cols, n, m, seed=0, extra_zeros=0.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W = W.masked_fill(nm_mask(W.abs(), n, m), 0.0)
    if extra_zeros:  # groups with fewer than n nonzeros too
        W = W.masked_fill(torch.rand(rows, cols, generator=g) < extra_zeros, 0.0)
    return W


def sparse_weight(rows, cols, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    return W.masked_fill(unstructured_mask(W.abs(), sparsity), 0.0)


def rel_err(y, ref):
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# -- masks -----------------------------------------------------------------------------------------
def test_global_magnitude_one_threshold_exact_count():
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(6, 10, generator=g) * s for s in (0.1, 1.0, 3.0)]  # unequal scales
    for sparsity in (0.0, 0.3, 0.5, 0.77, 0.999):
        masks = global_magnitude_masks(Ws, sparsity)
        assert sum(int(m.sum()) for m in masks) == math.floor(sparsity * 180 + 1e-9)
        pruned = torch.cat([W.abs()[m] for W, m in zip(Ws, masks)])
        kept = torch.cat([W.abs()[~m] for W, m in zip(Ws, masks)])
        if pruned.numel() and kept.numel():
            assert pruned.max() <= kept.min()
    # one threshold, so layers end up unequally sparse: the small-scale layer loses the most
    m = global_magnitude_masks(Ws, 0.5)
    assert int(m[0].sum()) > int(m[1].sum()) > int(m[2].sum())
    # ties at the threshold: earlier tensor, then earlier position
    masks = global_magnitude_masks([torch.ones(2, 3), torch.ones(2, 3)], 0.5)
    assert masks[0].all() and not masks[1].any()


def test_global_magnitude_on_a_model_and_errors():
    model = tiny_llama()
    before = {n: lin.weight.detach().clone() for n, lin in model_linear_layers(model)}
    meth = make_method("magnitude", sparsity=0.6, scope="global")
    apply_data_free(model, meth, progress=False)
    total = sum(W.numel() for W in before.values())
    zeros = sum(int((lin.weight == 0).sum()) for _, lin in model_linear_layers(model))
    assert zeros == math.floor(0.6 * total)
    layer_sp = [v["sparsity"] for v in meth.describe()["layers"].values()]
    assert len(layer_sp) == len(before) and len(set(layer_sp)) > 1            # not per-layer
    kept_min = min(float(lin.weight.detach().abs()[lin.weight != 0].min()) for _, lin in model_linear_layers(model))
    pruned_max = max(float(before[n].abs()[lin.weight == 0].max()) for n, lin in model_linear_layers(model))
    assert pruned_max <= kept_min
    with pytest.raises(LowbitError, match="scope"):
        MagnitudeConfig(scope="model")
    with pytest.raises(LowbitError, match="per layer"):
        MagnitudeConfig(scope="global", pattern="2:4")
    with pytest.raises(LowbitError, match="whole model"):
        make_method("magnitude", scope="global").apply("x", torch.nn.Linear(4, 4))
    with pytest.raises(LowbitError, match="NaN"):
        global_magnitude_masks([torch.tensor([[1.0, float("nan")]])], 0.5)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_patterns_exact_for_every_pruner(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(2)
    W = torch.randn(12, 64, generator=g)
    X = torch.randn(256, 64, generator=g).double()
    H = 2 / 256 * X.T @ X
    outs = [magnitude_prune(W, MagnitudeConfig(pattern=pattern))[0],
            wanda_prune(W, (X * X).sum(0), WandaConfig(pattern=pattern))[0],
            sparsegpt_prune(W, H, SparseGPTConfig(pattern=pattern, block_size=32)).W]
    for Wp in outs:
        kept = (Wp != 0).reshape(12, -1, m).sum(-1)
        assert torch.equal(kept, torch.full_like(kept, n))
        SparseNMWeight.from_dense(Wp, n, m)       # and it stores


# -- formats ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2), (4, 8), (3, 8), (2, 16)])
def test_nm_format_round_trip_exact(n, m):
    W = nm_weight(9, 4 * m, n, m, seed=n * m, extra_zeros=0.3)
    W[0, 0], W[0, 1] = -0.0, 0.0       # -0.0 is kept (bit pattern), +0.0 may be dropped
    if n >= 1 and (W[0, :m] != 0).sum() + 1 > n:
        W[0, 1:m] = 0.0
    f = SparseNMWeight.from_dense(W, n, m)
    D = f.dequantize()
    assert torch.equal(D.view(torch.int32), W.view(torch.int32))              # bit for bit
    bits = max(1, math.ceil(math.log2(m)))
    assert f.values.shape == (9, 4 * n) and f.indices.dtype == torch.uint8
    K = 4 * n                                          # kept per row; codes padded to runs of 8
    assert f.nbytes == 9 * (4 * K + math.ceil(K / 8) * bits)
    g = SparseNMWeight.from_tensors({k: t.clone() for k, t in f.tensors().items()}, json.loads(json.dumps(f.meta())))
    assert torch.equal(g.dequantize(), W)


def test_2_4_storage_is_17_bits_per_weight():
    f = SparseNMWeight.from_dense(nm_weight(64, 128, 2, 4), 2, 4)
    assert f.bits_per_weight == 17.0 and f.indices.shape == (64, 16)


def test_csr_format_round_trip_exact():
    for W in (sparse_weight(13, 37, 0.9), sparse_weight(5, 8, 0.0), torch.zeros(4, 6), sparse_weight(1, 1, 0.0)):
        W = W.clone()
        if W.numel() > 3:
            W.view(-1)[3] = -0.0
        f = CSRWeight.from_dense(W)
        assert torch.equal(f.dequantize().view(torch.int32), W.view(torch.int32))
        g = CSRWeight.from_tensors({k: t.clone() for k, t in f.tensors().items()}, f.meta())
        assert torch.equal(g.dequantize(), W)
    W = sparse_weight(30, 50, 0.8)
    f = CSRWeight.from_dense(W)
    assert f.nnz == int((W != 0).sum()) == 300 and f.col_idx.dtype == torch.int16
    assert f.nbytes == 300 * 6 + 31 * 4
    wide = torch.zeros(2, 40000)
    wide[0, 39999], wide[1, 7] = 1.5, -2.0
    fw = CSRWeight.from_dense(wide)
    assert fw.col_idx.dtype == torch.int32 and torch.equal(fw.dequantize(), wide)


def test_format_bad_input():
    with pytest.raises(LowbitError, match="multiple of M=4"):
        SparseNMWeight.from_dense(torch.zeros(3, 6), 2, 4)
    with pytest.raises(LowbitError, match="not 2:4 sparse"):
        SparseNMWeight.from_dense(torch.ones(2, 8), 2, 4)
    with pytest.raises(LowbitError, match="NaN"):
        SparseNMWeight.from_dense(torch.full((2, 4), float("nan")), 2, 4)
    with pytest.raises(LowbitError, match="NaN"):
        CSRWeight.from_dense(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(LowbitError, match="1 <= N < M"):
        SparseNMWeight.from_dense(torch.zeros(2, 4), 4, 4)
    f = SparseNMWeight.from_dense(nm_weight(4, 16, 2, 4), 2, 4)
    t = {k: v.clone() for k, v in f.tensors().items()}
    t["indices"][0, 0] = 0b00000101          # positions 1, 1 in one group: not increasing
    with pytest.raises(LowbitError, match="corrupt"):
        SparseNMWeight.from_tensors(t, f.meta())
    c = CSRWeight.from_dense(sparse_weight(4, 16, 0.5))
    t = {k: v.clone() for k, v in c.tensors().items()}
    t["row_ptr"][2] = 100
    with pytest.raises(LowbitError, match="row_ptr"):
        CSRWeight.from_tensors(t, c.meta())
    t = {k: v.clone() for k, v in c.tensors().items()}
    t["col_idx"][0] = 16
    with pytest.raises(LowbitError, match="col_idx"):
        CSRWeight.from_tensors(t, c.meta())


# -- kernels ---------------------------------------------------------------------------------------
BATCHES = (1, 2, 7, 9, 16, 31, 33, 40)


def _paths():
    """The code paths this CPU runs: "scalar", and "avx2" where it has AVX2 + FMA + F16C."""
    return ["scalar", "avx2"] if native_lib().isa_max() == "avx2" else ["scalar"]


@needs_native
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_kernel_matches_reference(n, m):
    for out_f, in_f in ((1, 16), (7, 4 * m), (33, 100 if m == 4 else 104), (5, 1544)):
        W = nm_weight(out_f, in_f, n, m, seed=out_f, extra_zeros=0.1)
        f = SparseNMWeight.from_dense(W, n, m)
        bias = torch.randn(out_f)
        for B in BATCHES:
            x = torch.randn(B, in_f)
            for b in (None, bias):
                ref = reference_linear(x, f, b)
                for path in _paths():
                    y = torch.full((B, out_f), float("nan"))          # poisoned
                    with native_lib().isa_capped(path):
                        nm_linear_native(x, f, b, out=y)
                    assert torch.isfinite(y).all()
                    assert rel_err(y, ref) < 1e-5, (n, m, out_f, in_f, B, path)


@needs_native
def test_csr_kernel_matches_reference():
    for out_f, in_f, s in ((1, 1, 0.0), (7, 13, 0.5), (33, 100, 0.7), (19, 257, 0.9), (6, 600, 0.99), (3, 40000, 0.999)):
        W = sparse_weight(out_f, in_f, s, seed=in_f)
        W[0] = 0.0                                                     # an empty row
        f = CSRWeight.from_dense(W)
        bias = torch.randn(out_f)
        for B in BATCHES:
            x = torch.randn(B, in_f)
            ref = reference_linear(x, f, bias)
            for path in _paths():
                y = torch.full((B, out_f), float("nan"))
                with native_lib().isa_capped(path):
                    csr_linear_native(x, f, bias, out=y)
                assert torch.isfinite(y).all()
                assert rel_err(y, ref) < 1e-5, (out_f, in_f, s, B, path)


@needs_native
def test_dispatch_shapes_and_fallbacks():
    f = SparseNMWeight.from_dense(nm_weight(10, 32, 2, 4), 2, 4)
    x = torch.randn(2, 3, 32)
    y = dispatch_linear(x, f)
    assert y.shape == (2, 3, 10) and rel_err(y, reference_linear(x, f)) < 1e-5
    assert dispatch_linear(torch.randn(0, 32), f).shape == (0, 10)
    xd = torch.randn(4, 32, dtype=torch.float64)                        # not float32: reference path
    assert nm_linear_native(xd, f) is NotImplemented
    assert dispatch_linear(xd, f).dtype == torch.float64
    with pytest.raises(LowbitError, match="features"):
        dispatch_linear(torch.randn(2, 31), f)
    threads = torch.get_num_threads()                                   # same result for any threads
    a = csr_linear_native(x, CSRWeight.from_dense(sparse_weight(10, 32, 0.6)), threads=1)
    b = csr_linear_native(x, CSRWeight.from_dense(sparse_weight(10, 32, 0.6)), threads=max(2, threads))
    assert torch.equal(a, b)


# -- pruned models: storage, save, load ------------------------------------------------------------
def _pruned_tiny(**opts):
    model = tiny_llama()
    apply_data_free(model, make_method("magnitude", **opts), progress=False)
    return model


@pytest.mark.parametrize("storage,opts,formats", [
    ("nm", dict(pattern="2:4"), {"sparse-nm"}),
    ("csr", dict(sparsity=0.5), {"sparse-csr"}),
    ("auto", dict(sparsity=0.95), {"sparse-csr"}),
    ("auto", dict(sparsity=0.85), {"dense"}),       # small layers: CSR pays only from 90 %
    ("auto", dict(pattern="2:4"), {"dense"}),       # small layers: 2:4 did not beat dense at batch 1
])
def test_sparse_storage_save_load_bit_identical(tmp_path, storage, opts, formats):
    model = _pruned_tiny(**opts)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits
    info = convert_model(model, storage, opts.get("pattern"))
    assert set(info["layers"].values()) == formats
    with torch.no_grad():
        logits = model(ids).logits
    assert rel_err(logits, dense_logits) < 1e-5
    rec = {"method": {"method": "magnitude", "config": opts}, "base_model": {"kind": "test"}, "calibration": None}
    loaded, _, rec2 = checkpoint.load(checkpoint.save(model, None, tmp_path / "ck", rec))
    n_sparse = sum(f != "dense" for f in info["layers"].values())
    assert len(rec2["modules"]) == n_sparse
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for name, lin in model_linear_layers(loaded):
        if isinstance(lin, QuantizedLinear):
            assert torch.equal(lin.weight_format.dequantize(), dict(model_linear_layers(model))[name].weight_format.dequantize())


def test_storage_errors():
    model = _pruned_tiny(sparsity=0.5)
    with pytest.raises(LowbitError, match="--pattern"):
        convert_model(model, "nm", None)
    with pytest.raises(LowbitError, match="not 2:4 sparse"):
        convert_model(model, "nm", "2:4")
    with pytest.raises(LowbitError, match="unknown storage"):
        convert_model(model, "coo", None)
    assert AUTO_CSR_MIN_SPARSITY > AUTO_CSR_LARGE_MIN_SPARSITY > 0.5
    big = torch.randn(1024, 1024)
    assert choose_format(big.masked_fill(nm_mask(big.abs(), 2, 4), 0.0), "auto", (2, 4)).name == "sparse-nm"
    assert choose_format(big.masked_fill(unstructured_mask(big.abs(), 0.75), 0.0), "auto", None).name == "sparse-csr"
    assert choose_format(big.masked_fill(unstructured_mask(big.abs(), 0.6), 0.0), "auto", None) is None


def test_prune_bad_input():
    W = torch.randn(4, 6)
    with pytest.raises(LowbitError, match="multiple of M=4"):
        magnitude_prune(W, MagnitudeConfig(pattern="2:4"))
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(LowbitError, match=r"\[0, 1\)"):
            MagnitudeConfig(sparsity=bad)
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        make_method("magnitude", sparsity=0.5).apply("layer", lin)


def test_command_line_prune_with_storage(tmp_path):
    from lowbit.cli import main
    from lowbit.models.tiny import save_tiny

    tiny = save_tiny(tmp_path / "tiny", "llama")
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60)
    out = tmp_path / "o"
    assert main([str(a) for a in ["prune", tiny, "--method", "magnitude", "--pattern", "2:4", "--storage", "nm",
                                  "-o", out]]) == 0
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["storage"]["mode"] == "nm" and {m["format"] for m in rec["modules"].values()} == {"sparse-nm"}
    assert len(rec["modules"]) == 14
    assert main([str(a) for a in ["eval", out, "--text", text, "--max-tokens", 128, "--ctx", 32, "--no-latency"]]) == 0
    out2 = tmp_path / "g"
    assert main([str(a) for a in ["prune", tiny, "--method", "magnitude", "--sparsity", "0.9", "--option",
                                  "scope=global", "--storage", "auto", "-o", out2]]) == 0
    rec = json.loads((out2 / "lowbit.json").read_text())
    assert rec["method"]["sparsity"] == pytest.approx(0.9, abs=1e-5) and rec["method"]["config"]["scope"] == "global"
    assert main(["prune", str(tiny), "--sparsity", "0.5", "--storage", "nm", "-o", str(tmp_path / "x")]) == 2
