"""Full-integer static int8: fixed-point primitives and integer layers bit-exact against a naive
Python-int reference, integer model vs its fake-quant simulation, the W8A8 LLM linear's exact
int32 path, the method through the runner and the CLI."""

import copy
import math
import random

import pytest
import torch
from torch import nn

from lowbit.algorithms.static_int8 import ALPHA_GRID, CLIP_GRID, StaticInt8Config, search_smooth_alpha, smooth_factors
from lowbit.cnn.integer import IntegerConv2d, IntegerLinear
from lowbit.cnn.ptq import prepare, quantize_static
from lowbit.core.scheme import QuantScheme
from lowbit.core.static_qparams import act_qparams, quantize_weight
from lowbit.errors import LowbitError
from lowbit.kernels import static_int8 as K
from tests.reference import static_int8_naive as naive

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# -- fixed-point primitives ---------------------------------------------------------------------


def test_quantize_multiplier_hand_values():
    assert K.quantize_multiplier(0.5) == (2**30, 0)          # 0.5 = 0.5 * 2^0
    assert K.quantize_multiplier(0.25) == (2**30, 1)         # 0.5 * 2^-1
    assert K.quantize_multiplier(0.75) == (3 * 2**29, 0)
    assert K.quantize_multiplier(1.0) == (2**30, -1)         # >= 1: left shift by 1
    assert K.quantize_multiplier(0.0) == (0, 0)
    # a mantissa that rounds up to 2^31 is halved and the exponent bumped
    M = (2**31 - 0.25) / 2**31 * 2**-3
    assert K.quantize_multiplier(M) == (2**30, 2)
    for M in [1e-6, 0.0123, 0.3, 0.999999, 3.7]:
        M0, n = K.quantize_multiplier(M)
        assert 2**30 <= M0 < 2**31
        assert abs(M0 * 2.0**(-31 - n) - M) <= 2.0**(-32 - n)  # half a Q31 step
        assert (M0, n) == naive.quantize_multiplier(M)
    with pytest.raises(LowbitError):
        K.quantize_multiplier(-1.0)


def test_srdhm_and_rdbpot_hand_values_and_naive():
    a = torch.tensor([INT32_MIN, INT32_MAX, 3, -3, 1 << 30, -(1 << 30), 5, -5, 0])
    b = torch.tensor([INT32_MIN, INT32_MAX, 1 << 30, 1 << 30, 1 << 30, 1 << 30, INT32_MIN, INT32_MIN, 7])
    got = K.saturating_rounding_doubling_high_mul(a, b).tolist()
    assert got[0] == INT32_MAX                                 # the one saturating case
    # 2 * 3 * 2^30 / 2^32 = 1.5 -> 2; -1.5 -> -1: gemmlowp's negative nudge is 1 - 2^30, not -2^30
    assert got[2] == 2 and got[3] == -1
    assert got == [naive.srdhm(x, y) for x, y in zip(a.tolist(), b.tolist())]
    x = torch.tensor([5, -5, 6, -6, 7, -7, 4, -4, 0, 1, -1])
    assert K.rounding_divide_by_pot(x, 1).tolist() == [3, -3, 3, -3, 4, -4, 2, -2, 0, 1, -1]  # ties away
    assert K.rounding_divide_by_pot(x, 2).tolist() == [1, -1, 2, -2, 2, -2, 1, -1, 0, 0, 0]
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(INT32_MIN, INT32_MAX, (2000,), generator=g, dtype=torch.int64)
    ms = torch.randint(0, INT32_MAX, (2000,), generator=g, dtype=torch.int64)
    ns = torch.randint(0, 31, (2000,), generator=g, dtype=torch.int64)
    assert K.saturating_rounding_doubling_high_mul(xs, ms).tolist() == [naive.srdhm(p, q) for p, q in zip(xs.tolist(), ms.tolist())]
    assert K.rounding_divide_by_pot(xs, ns).tolist() == [naive.rdbpot(p, q) for p, q in zip(xs.tolist(), ns.tolist())]
    ns2 = torch.randint(-4, 31, (2000,), generator=g, dtype=torch.int64)  # with left shifts (saturating)
    assert K.multiply_by_quantized_multiplier(xs, ms, ns2).tolist() == [
        naive.mbqm(p, q, r) for p, q, r in zip(xs.tolist(), ms.tolist(), ns2.tolist())]


def test_requantization_is_close_to_the_real_multiplier():
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(2**20), 2**20, (5000,), generator=g, dtype=torch.int64)
    for M in [0.0007, 0.013, 0.31, 0.97]:
        M0, n = K.quantize_multiplier(M)
        got = K.multiply_by_quantized_multiplier(acc, torch.tensor(M0), torch.tensor(n))
        # two roundings (the high half, then the shift) and the Q31 representation error of M0
        bound = 0.5 + 0.5 * 2.0**-n + 2**20 * 2.0**-32 * 2.0**-n + 1e-9
        assert (got.double() - acc.double() * M).abs().max() <= bound


def test_int_matmul_float_path_equals_int64():
    g = torch.Generator().manual_seed(2)
    A = torch.randint(-255, 256, (7, 3000), generator=g)
    B = torch.randint(-128, 128, (5, 3000), generator=g)
    assert torch.equal(K.int_matmul(A, B, "float"), K.int_matmul(A, B, "int"))
    A[:, :] = 255
    B[:, :] = -128
    assert torch.equal(K.int_matmul(A, B, "float"), K.int_matmul(A, B, "int"))
    assert int(K.int_matmul(A, B, "float")[0, 0]) == -255 * 128 * 3000


# -- integer layers vs the naive reference --------------------------------------------------------

GRIDS = [(True, False), (True, True), (False, False), (False, True)]  # (symmetric, restricted)


def _aq(lo, hi, sym, restr, bits=8):
    return act_qparams(torch.tensor(lo), torch.tensor(hi), bits, sym, restr)


@pytest.mark.parametrize("sym,restr", GRIDS)
@pytest.mark.parametrize("relu", [False, True])
def test_integer_linear_bit_exact_with_naive(sym, restr, relu):
    g = torch.Generator().manual_seed(3 + 2 * sym + restr)
    lin = nn.Linear(23, 9)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(9, 23, generator=g) * 0.3)
        lin.bias.copy_(torch.randn(9, generator=g))
        lin.weight[4] = 0.0  # an all-zero channel
    in_aq = _aq(-1.5, 2.5, sym, restr)
    out_aq = _aq(-3.0, 4.0, sym, restr)
    qx = torch.randint(in_aq.qmin, in_aq.qmax + 1, (6, 23), generator=g).to(torch.int8)
    qw, s_w = quantize_weight(lin.weight, 8, restr)
    mod = IntegerLinear(qw, s_w, lin.bias.detach(), in_aq, out_aq, relu)
    got = mod(qx)
    assert got.dtype == torch.int8
    ref, accs = naive.linear(qx.tolist(), in_aq.zero, qw.tolist(), lin.bias.tolist(), in_aq.scale, s_w.tolist(),
                             out_aq.scale, out_aq.zero, out_aq.qmin, out_aq.qmax, relu)
    assert got.tolist() == ref
    assert mod.accumulators(qx).tolist() == accs
    # multipliers are M = s_x s_w / s_y in Q31 with a shift
    for o in range(9):
        assert (int(mod.M0[o]), int(mod.shift[o])) == naive.quantize_multiplier(in_aq.scale * float(s_w[o]) / out_aq.scale)


@pytest.mark.parametrize("sym,restr", GRIDS)
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_integer_conv2d_bit_exact_with_naive(sym, restr, stride, padding):
    g = torch.Generator().manual_seed(11 + stride)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=g) * 0.2)
        conv.bias.copy_(torch.randn(4, generator=g) * 0.5)
    in_aq = _aq(-0.5, 2.0, sym, restr)
    out_aq = _aq(-2.0, 3.0, sym, restr)
    qx = torch.randint(in_aq.qmin, in_aq.qmax + 1, (2, 3, 6, 5), generator=g).to(torch.int8)
    qw, s_w = quantize_weight(conv.weight, 8, restr)
    mod = IntegerConv2d(qw, s_w, conv.bias.detach(), in_aq, out_aq, True, stride, padding)
    ref = naive.conv2d(qx.tolist(), in_aq.zero, qw.tolist(), conv.bias.tolist(), in_aq.scale, s_w.tolist(),
                       out_aq.scale, out_aq.zero, out_aq.qmin, out_aq.qmax, True, stride, padding)
    assert mod(qx).tolist() == ref
    mod.matmul = "float"
    assert mod(qx).tolist() == ref


def test_activation_grids():
    a = _aq(-1.0, 3.0, False, False)       # unsigned [0, 255] shifted to int8
    assert (a.qmin, a.qmax) == (-128, 127) and a.zero == round(255 / 4) - 128
    a = _aq(-1.0, 3.0, False, True)
    assert (a.qmin, a.qmax) == (-128, 126)
    a = _aq(-1.0, 3.0, True, True)
    assert (a.qmin, a.qmax, a.zero) == (-127, 127, 0) and a.scale == pytest.approx(3.0 / 127)
    a = _aq(0.0, 3.0, False, False, bits=4)
    assert (a.qmin, a.qmax, a.zero) == (-8, 7, -8)


# -- a small CNN end to end -------------------------------------------------------------------------


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 5)).eval()


def _images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


@pytest.mark.parametrize("observer", ["minmax", "moving-minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("sym", [False, True])
def test_integer_model_close_to_fake_quant_and_float(observer, sym):
    model = _cnn()
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    cfg = StaticInt8Config(scheme=QuantScheme(bits=8, symmetric=sym, granularity="channel", scale_dtype="float32"),
                           observer=observer)
    X = _images(200)
    qm, fq = quantize_static(model, X, cfg)
    T = _images(64, seed=5)
    with torch.no_grad():
        y_float = model(T)
        y_fq = fq(T)
        y_int = qm(T)
        q_int = qm.int_forward(T)
    assert q_int.dtype == torch.int8
    out = qm[-1].aq
    lsb = out.scale
    # integer pipeline vs the float simulation of the same quantizers: rounding of the fixed-point
    # multiplier and the int32 bias can move a code by one step, which can ripple through layers
    diff = (y_int - y_fq).abs() / lsb
    assert float(diff.max()) <= 4 and float(diff.mean()) <= 0.25
    # and both close to float
    rel = float((y_int - y_float).norm() / y_float.norm())
    assert rel < 0.08, rel


def test_unsupported_layers_refused():
    with pytest.raises(LowbitError, match="Sigmoid"):
        prepare(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), StaticInt8Config())
    with pytest.raises(LowbitError, match="nn.Sequential"):
        prepare(nn.Linear(3, 3), StaticInt8Config())
    with pytest.raises(LowbitError, match="observer"):
        StaticInt8Config(observer="nope")
    with pytest.raises(LowbitError, match="grouped"):
        StaticInt8Config(scheme=QuantScheme(bits=8, granularity="group", group_size=32))


def test_integer_module_refuses_float_input():
    model = nn.Sequential(nn.Linear(4, 3))
    qm, _ = quantize_static(model, torch.randn(20, 4))
    with pytest.raises(LowbitError, match="int8"):
        qm[1](torch.randn(2, 4))


# -- W8A8 LLM linears ---------------------------------------------------------------------------------


def _tiny():
    from tests.tiny import tiny_llama

    return tiny_llama()


@pytest.mark.parametrize("alpha,search,clip", [(0.0, False, False), (0.5, False, False), (0.0, True, True)])
def test_llm_method_exact_int32_and_fake_quant(alpha, search, clip):
    from lowbit.algorithms.base import make_method
    from lowbit.calibration.sequential import run_sequential
    from lowbit.formats.static_int8 import StaticInt8Weight
    from lowbit.nn.linear import QuantizedLinear

    model = _tiny()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 96, (4, 32), generator=g)
    meth = make_method("static-int8", observer="percentile", smooth_alpha=alpha, smooth_search=search,
                       clip_search=clip)
    run_sequential(model, meth, samples, progress=False)
    if search:
        assert set(meth.describe()["smooth_alpha_per_layer"].values()) <= set(ALPHA_GRID)
        assert set(meth.describe()["clip_per_layer"].values()) <= set(CLIP_GRID)
    qls = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert qls and all(isinstance(q.weight_format, StaticInt8Weight) for q in qls)
    w = qls[0].weight_format
    assert (w.smooth is not None) == (alpha > 0 or search)
    x = torch.randn(3, 5, w.shape[1], generator=g)
    b = torch.randn(w.shape[0], generator=g)
    # exact int32: the chunked float GEMM path equals int64 matmul and the naive loops
    acc_f = K.accumulators(w, x, b, "float")
    acc_i = K.accumulators(w, x, b, "int")
    assert torch.equal(acc_f, acc_i)
    qx = K.quantize_input(w, x).reshape(-1, w.shape[1])
    naive_acc = [[naive.bias_q(float(b[o]), w.s_x, float(w.w_scale[o]))
                  + sum((int(qx[r, k]) - w.z_x) * int(w.qweight[o, k]) for k in range(w.shape[1]))
                  for o in range(w.shape[0])] for r in range(2)]
    assert acc_i.reshape(-1, w.shape[0])[:2].tolist() == naive_acc
    # the float output is the accumulator times s_x s_w; close to the fake-quant float product
    y = qls[0](x)
    xs = x / w.smooth if w.smooth is not None else x
    xq = (torch.round(xs / w.s_x) + w.z_x).clamp(w.act_qmin, w.act_qmax)
    y_fq = torch.nn.functional.linear((xq - w.z_x) * w.s_x, w.qweight.float() * w.w_scale[:, None])
    assert torch.allclose(y, y_fq, rtol=1e-5, atol=1e-5)
    # the quantized model stays close to the float one
    ids = torch.randint(0, 96, (1, 24), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(ref(ids).logits, -1)
        lq = torch.log_softmax(model(ids).logits, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert kl < 0.05, kl


def test_smooth_search_prefers_migration_for_an_outlier_channel():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(512, 64, generator=g)
    X[:, 3] *= 80.0  # one outlier feature, as in LLM activations
    W = torch.randn(32, 64, generator=g) * 0.05
    cfg = StaticInt8Config()
    (alpha, clip), errs = search_smooth_alpha(X, W, cfg)
    assert clip == 1.0 and alpha > 0 and errs[(alpha, 1.0)] < 0.5 * errs[(0.0, 1.0)]
    (alpha2, clip2), errs2 = search_smooth_alpha(X, W, cfg, clips=(1.0, 0.8, 0.5))
    assert errs2[(alpha2, clip2)] <= errs[(alpha, 1.0)]
    s = smooth_factors(X.abs().amax(0), W, 0.5)
    # migration is exact in float: (X / s) (W s)^T = X W^T
    assert torch.allclose((X / s) @ (W * s).T, X @ W.T, rtol=1e-4, atol=1e-3)


def test_llm_checkpoint_round_trip(tmp_path):
    from lowbit import checkpoint
    from lowbit.algorithms.base import make_method
    from lowbit.calibration.sequential import run_sequential

    model = _tiny()
    samples = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    meth = make_method("static-int8", observer="minmax", smooth_alpha=0.5)
    run_sequential(model, meth, samples, progress=False)
    checkpoint.save(model, None, tmp_path / "ck", {"method": meth.describe(), "base_model": {}})
    m2, _, rec = checkpoint.load(tmp_path / "ck")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    assert rec["method"]["config"]["observer"] == "minmax"


def test_cli_quantize_static_int8_with_observer(tmp_path, capsys):
    import json

    from lowbit.cli import main
    from lowbit.models.tiny import save_tiny

    d = save_tiny(tmp_path / "m", "llama")
    out = tmp_path / "q"
    code = main(["quantize", str(d), "--method", "static-int8", "--observer", "percentile", "--restricted",
                 "--samples", "2", "--seq-len", "32", "-o", str(out)])
    assert code == 0
    rec = json.loads((out / "lowbit.json").read_text())
    cfg = rec["method"]["config"]
    assert rec["method"]["method"] == "static-int8" and cfg["observer"] == "percentile"
    assert cfg["scheme"]["restricted_range"] is True
    mod = next(iter(rec["modules"].values()))
    assert mod["format"] == "static-int8" and mod["observer"] == "percentile"
    assert (mod["act_qmin"], mod["act_qmax"]) == (-128, 126)  # asymmetric restricted, shifted to int8
    capsys.readouterr()
    assert main(["quantize", str(d), "--method", "static-int8", "--observer", "entropy", "--group-size", "32",
                 "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grouped" in err[0]


def test_quantize_linears_static_any_model():
    from lowbit.algorithms.static_int8 import quantize_linears_static
    from lowbit.nn.linear import QuantizedLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    X = torch.randn(4, 50, 16)
    X[..., 2] *= 30.0
    ref = model(X).detach()
    errs = {}
    for opts in ({"observer": "minmax"}, {"observer": "minmax", "smooth_search": True}):
        m = copy.deepcopy(model)
        meth = quantize_linears_static(m, lambda mm: mm(X), **opts)
        assert all(isinstance(m[i], QuantizedLinear) for i in (0, 2))
        errs[bool(opts.get("smooth_search"))] = float((m(X) - ref).norm() / ref.norm())
    assert errs[True] <= errs[False] and errs[True] < 0.02, errs
    with pytest.raises(LowbitError, match="no calibration data"):
        quantize_linears_static(copy.deepcopy(model), lambda mm: None)


def test_native_int8_gemm_path_equals_exact_torch_path():
    from lowbit.algorithms.static_int8 import quantize_linears_static
    from lowbit.kernels.dynamic_int8 import native_lib

    if native_lib() is None:
        pytest.skip("native int8 GEMM not built")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 24))
    X = torch.randn(3, 20, 40)
    scheme = QuantScheme(bits=8, symmetric=True, granularity="channel", restricted_range=True, scale_dtype="float32")
    quantize_linears_static(model, lambda mm: mm(X), scheme=scheme, observer="minmax")
    w = model[0].weight_format
    assert K.native_ok(w)
    b = torch.randn(24)
    assert torch.equal(K.accumulators(w, X, b, "native"), K.accumulators(w, X, b, "int"))
    asym = nn.Sequential(nn.Linear(40, 24))
    quantize_linears_static(asym, lambda mm: mm(X), observer="minmax")
    assert not K.native_ok(asym[0].weight_format)
    with pytest.raises(LowbitError, match="native"):
        K.accumulators(asym[0].weight_format, X, None, "native")
