"""LLM.int8(): row-wise int8 format, the outlier-decomposed matmul vs a naive reference, the method."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit import checkpoint
from lowbit.algorithms.base import make_method
from lowbit.algorithms.llm_int8 import LLMInt8Config
from lowbit.calibration.sequential import run_sequential
from lowbit.errors import LowbitError
from lowbit.formats.int8 import Int8Weight
from lowbit.kernels import int8 as kint8
from lowbit.kernels import reference
from lowbit.models.families import find_blocks, linear_layers
from lowbit.nn.linear import QuantizedLinear
from tests.reference import int8_naive
from tests.tiny import tiny_llama


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _weight(out_f, in_f, threshold, seed=1):
    W = _rand(out_f, in_f, seed=seed, scale=0.05)
    W[1] = 0.0  # an all-zero row: s_w = 0, codes 0
    return Int8Weight.quantize(W, threshold)


# -- format -----------------------------------------------------------------------------------

def test_weight_codes_and_dequantization_match_naive():
    W = _rand(9, 37, seed=3)
    W[2] = 0.0
    W[4, 5] = 10.0  # a row dominated by one value
    w = Int8Weight.quantize(W)
    q, s = int8_naive.quantize_weight(W)
    assert w.qweight.dtype == torch.int8 and w.qweight.tolist() == q
    assert w.absmax.tolist() == [float(v) for v in s]
    assert int(w.qweight.abs().max()) == 127 and w.qweight[2].abs().sum() == 0
    W_hat = torch.tensor([[float(v) for v in row] for row in int8_naive.dequantize_weight(q, s)])
    assert torch.equal(w.dequantize(), W_hat)
    assert w.nbytes == 9 * 37 + 4 * 9 and w.meta() == {"format": "llm-int8", "shape": [9, 37], "threshold": 6.0}
    # round-to-nearest: error at most half a step of the row's grid
    step = (w.absmax / 127).unsqueeze(1)
    assert ((w.dequantize() - W).abs() <= step / 2 + 1e-7).all()


# -- the matmul -------------------------------------------------------------------------------

def test_threshold_zero_is_the_float_matmul_with_dequantized_weight():
    w = _weight(24, 40, threshold=0.0)
    x = _rand(2, 5, 40, seed=4)
    y = kint8.linear(x, w)
    assert y.shape == (2, 5, 24)
    assert torch.equal(y, F.linear(x, w.dequantize()))  # every dim is an outlier: no int8 part at all
    parts = kint8.decompose(x.reshape(-1, 40), w)
    assert parts.y_int8 is None and parts.outliers.tolist() == list(range(40))


@pytest.mark.parametrize("N,K,M,positive", [(6, 40, 7, False), (3, 2100, 4, False), (3, 3000, 3, True)],
                         ids=["small", "chunked", "acc-above-2^24"])
def test_threshold_inf_equals_naive_integer_reference_bit_exactly(N, K, M, positive):
    X = _rand(N, K, seed=5)
    W = _rand(M, K, seed=6, scale=0.05)
    if positive:  # codes 64..127: sums ~2.7e7 > 2^24: the float32 rounding of the int32 sum
        g = torch.Generator().manual_seed(13)
        X, W = 1 + torch.rand(N, K, generator=g), 0.1 + 0.1 * torch.rand(M, K, generator=g)
    X[0] = 0.0  # an all-zero token row: s_x = 0
    if not positive:
        X[1, 3] = 1000.0  # huge values do not matter: nothing is an outlier with threshold inf
    w = Int8Weight.quantize(W, math.inf)
    O, Y_int, Y_out = int8_naive.llm_int8(X, *int8_naive.quantize_weight(W), math.inf)
    assert O == [] and not Y_out.any()
    acc = kint8.exact_int_matmul(kint8.absmax_quantize_rows(X)[0], w.qweight.float())
    assert (float(acc.max()) > 2 ** 24) == positive
    y = kint8.linear(X, w)
    assert torch.equal(y, Y_int)
    bias = _rand(M, seed=7)
    assert torch.equal(kint8.linear(X, w, bias), Y_int + bias)


def test_mixed_case_equals_naive_decomposition():
    X = _rand(12, 64, seed=8)
    X[3, 10] = 9.0      # outlier dim 10 (one token suffices)
    X[:, 20] *= 30.0    # outlier dim 20 (systematic)
    X[5, 33] = -6.0     # exactly at the threshold counts (|x| >= threshold)
    X[6, 40] = 5.99     # just below does not
    w = _weight(16, 64, threshold=6.0)
    parts = kint8.decompose(X, w)
    O, Y_int, Y_out = int8_naive.llm_int8(X, *int8_naive.quantize_weight(w.dequantize()), 6.0)
    assert parts.outliers.tolist() == O == [10, 20, 33]
    assert torch.equal(parts.y_int8, Y_int)  # int8 part: bit-exact
    torch.testing.assert_close(parts.y_outlier.double(), Y_out, rtol=1e-6, atol=1e-7)  # float part
    y = kint8.linear(X, w)
    assert torch.equal(y, parts.y_int8 + parts.y_outlier)
    torch.testing.assert_close(y.double(), Y_int.double() + Y_out, rtol=1e-6, atol=1e-6)


def test_quantized_linear_dispatches_to_the_int8_kernel():
    w = _weight(8, 32, threshold=math.inf)
    x = _rand(4, 32, seed=9)
    bias = _rand(8, seed=10)
    mod = QuantizedLinear(w, bias)
    assert torch.equal(mod(x), kint8.linear(x, w, bias))
    assert not torch.equal(mod(x), reference.linear(x, w, bias))  # activations are quantized too


def test_planted_outlier_dims_are_detected_and_keep_the_error_low():
    N, K, M = 64, 256, 96
    X = _rand(N, K, seed=11)
    planted = [7, 100, 201]
    X[:, planted] *= 40.0  # systematic outlier features (§4): large in every token
    W = _rand(M, K, seed=12, scale=0.05)
    Y = X.double() @ W.double().T                                   # float weights
    Y_hat = X.double() @ Int8Weight.quantize(W).dequantize().double().T  # the same int8 weights Ŵ

    def rel_err(threshold, ref):
        y = kint8.linear(X, Int8Weight.quantize(W, threshold)).double()
        return float((y - ref).norm() / ref.norm())

    assert kint8.outlier_dims(X, 6.0).tolist() == planted
    # error from quantizing the activations (vs X·Ŵᵀ); measured: LLM.int8 0.0015, int8 0.0288
    act_llm, act_int8 = rel_err(6.0, Y_hat), rel_err(math.inf, Y_hat)
    assert act_llm < 0.002 and act_int8 > 0.025 and act_llm < act_int8 / 10
    # total error (vs X·Wᵀ); measured: float X·Ŵᵀ 0.0066, LLM.int8 0.0068, int8 0.0295
    e_float, e_llm, e_int8 = rel_err(0.0, Y), rel_err(6.0, Y), rel_err(math.inf, Y)
    assert e_llm < 1.05 * e_float and e_int8 > 4 * e_llm


def test_kernel_rejects_wrong_input_width():
    with pytest.raises(LowbitError, match="expects 32"):
        kint8.linear(torch.zeros(2, 31), _weight(8, 32, threshold=6.0))


# -- the method -------------------------------------------------------------------------------

def _samples(n=6, L=16, vocab=96, seed=1):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def _planted_tiny():
    model = tiny_llama()
    with torch.no_grad():  # plant two outlier features in block 0's attention inputs
        model.model.layers[0].input_layernorm.weight[[5, 40]] = 30.0
    return model


def _quantized_tiny(threshold, batch_size=3):
    model = _planted_tiny()
    meth = make_method("llm-int8", threshold=threshold)
    run_sequential(model, meth, _samples(), batch_size=batch_size, progress=False)
    return model, meth


@pytest.mark.parametrize("threshold", [6.0, 1.5])
def test_outlier_fractions_recorded_on_tiny_model(threshold):
    model, meth = _quantized_tiny(threshold)
    float_blocks = find_blocks(_planted_tiny())
    assert set(meth.outliers) == {f"model.layers.{i}.{n}" for i in range(3) for n in linear_layers(float_blocks[0])}
    # Independent count. The runner observes block i while blocks < i are already quantized and
    # block i is still float: rebuild exactly that model for each block and hook its inputs.
    colmax, hits, tokens = {}, {}, {}
    for i in range(3):
        hybrid = copy.deepcopy(model)
        hybrid.model.layers[i] = copy.deepcopy(float_blocks[i])
        seen = {}
        hooks = [lin.register_forward_hook(lambda m, a, o, n=f"model.layers.{i}.{name}": seen.setdefault(n, []).append(a[0]))
                 for name, lin in linear_layers(hybrid.model.layers[i]).items()]
        with torch.no_grad():
            s = _samples()
            for b in range(0, 6, 3):  # the runner's batches
                hybrid(s[b:b + 3])
        for h in hooks:
            h.remove()
        for n, xs in seen.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).abs()
            colmax[n], hits[n], tokens[n] = x.amax(0), int((x >= threshold).sum()), x.shape[0]
            assert ((x - threshold).abs() > 1e-5).all()  # nothing so close that rounding could flip it
    for n, rep in meth.outliers.items():
        dims = int((colmax[n] >= threshold).sum())
        assert rep["dims"] == dims and rep["in_features"] == colmax[n].numel()
        assert rep["fraction"] == dims / colmax[n].numel()
        assert rep["value_fraction"] == pytest.approx(int(hits[n]) / (tokens[n] * colmax[n].numel()), rel=1e-12)
    d = meth.describe()
    assert d["method"] == "llm-int8" and d["config"] == {"threshold": threshold}
    fr = {n: r["fraction"] for n, r in meth.outliers.items()}
    assert d["outliers"]["mean_fraction"] == pytest.approx(sum(fr.values()) / len(fr))
    assert d["outliers"]["max_fraction"] == max(fr.values()) == fr[d["outliers"]["max_layer"]]
    if threshold == 6.0:  # only the two planted dims, only where they are planted
        qkv = {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}
        assert {n: f for n, f in fr.items() if f} == {n: 2 / 72 for n in qkv}
        assert all(torch.nonzero(colmax[n] >= threshold).flatten().tolist() == [5, 40] for n in qkv)
        assert d["outliers"]["layers_with_outliers"] == 3
    else:  # measured: q/k/v of block 0 all 72 dims, o_proj 25 dims, down_proj none
        assert fr["model.layers.0.self_attn.q_proj"] == 1.0 and fr["model.layers.0.self_attn.o_proj"] == 25 / 72
        assert fr["model.layers.0.mlp.down_proj"] == 0.0


def test_save_load_round_trip_identical_logits(tmp_path):
    model, meth = _quantized_tiny(threshold=2.0)
    rec = {"method": meth.describe(), "base_model": {"kind": "test"}, "calibration": None}
    out = checkpoint.save(model, None, tmp_path / "q", rec)
    loaded, _, rec2 = checkpoint.load(out)
    x = _samples(3, 20, seed=4)
    with torch.no_grad():
        y1, y2 = model(x).logits, loaded(x).logits
    assert torch.equal(y1, y2)
    mods = checkpoint.quantized_modules(loaded)
    assert len(mods) == 21 and all(isinstance(m.weight_format, Int8Weight) for m in mods.values())
    assert all(m.weight_format.threshold == 2.0 for m in mods.values())
    saved = json.loads((out / "lowbit.json").read_text())
    assert saved["modules"]["model.layers.0.mlp.down_proj"]["threshold"] == 2.0
    assert saved["method"]["outliers"]["per_layer"] == meth.outliers
    # the decomposition is live after reloading: a different threshold changes the logits
    for m in mods.values():
        m.set_field("threshold", math.inf)
    with torch.no_grad():
        assert not torch.equal(loaded(x).logits, y1)


def test_bad_settings_are_one_line_errors():
    for bad in (-1.0, float("nan"), "six"):
        with pytest.raises(LowbitError, match="threshold"):
            LLMInt8Config(threshold=bad)
    assert LLMInt8Config(threshold=math.inf).threshold == math.inf
    with pytest.raises(LowbitError, match="does not take"):
        make_method("llm-int8", bits=4)
    w = _weight(4, 8, threshold=6.0)
    with pytest.raises(LowbitError, match="qweight"):
        Int8Weight.from_tensors({"qweight": w.qweight.to(torch.uint8), "absmax": w.absmax}, w.meta())
    with pytest.raises(LowbitError, match="absmax"):
        Int8Weight.from_tensors({"qweight": w.qweight, "absmax": w.absmax[:3]}, w.meta())
    with pytest.raises(LowbitError, match="threshold"):
        Int8Weight.from_tensors(w.tensors(), dict(w.meta(), threshold=-2))
    with pytest.raises(LowbitError, match="NaN"):
        Int8Weight.quantize(torch.tensor([[1.0, float("inf")]]))
