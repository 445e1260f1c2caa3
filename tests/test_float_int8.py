"""float16/bfloat16 weights, W8A16, and dynamic-range int8 (C kernel vs exact torch reference)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import checkpoint
from lowbit.algorithms.base import make_method
from lowbit.calibration.sequential import apply_data_free
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.dynamic_int8 import DynamicInt8Weight
from lowbit.formats.floatw import FloatWeight
from lowbit.kernels import dynamic_int8 as kdyn
from lowbit.models.tiny import save_tiny
from lowbit.nn.linear import QuantizedLinear
from tests.tiny import tiny_llama

NATIVE = kdyn.native_lib() is not None
ISA_CAPS = (None, "scalar", "avx2", "avx512vnni")  # None: the best the CPU has; a path it lacks falls back
needs_native = pytest.mark.skipif(not NATIVE, reason="native int8 kernel not built")


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _tokens(n=3, L=20, seed=4):
    return torch.randint(0, 96, (n, L), generator=torch.Generator().manual_seed(seed))


def _quantized(method, **options):
    model = tiny_llama()
    meth = make_method(method, **options)
    apply_data_free(model, meth, progress=False)
    return model, meth


def _save_load(model, meth, path):
    rec = {"method": meth.describe(), "base_model": {"kind": "test"}, "calibration": None}
    out = checkpoint.save(model, None, path, rec)
    loaded, _, _ = checkpoint.load(out)
    return loaded, out


# -- float16 / bfloat16 -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_cast_is_the_round_to_nearest_cast(dtype, torch_dtype):
    W = _rand(16, 24, scale=3.0)
    W[0, :4] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 65504.0 if dtype == "float16" else 1e30, 0.0])
    w = FloatWeight.cast(W, dtype)
    assert w.weight16.dtype == torch_dtype and w.bits_per_weight == 16
    assert torch.equal(w.dequantize(), W.to(torch_dtype).float())
    if dtype == "float16":  # ties go to the even mantissa: 1 + 2^-11 -> 1, 1 + 3·2^-11 -> 1 + 2^-9
        assert w.dequantize()[0, 0] == 1.0 and w.dequantize()[0, 1] == 1 + 2**-9
    rel = ((w.dequantize() - W).abs() / W.abs().clamp_min(1e-30))[W.abs() > 1e-4].max()
    assert rel <= (2**-11 if dtype == "float16" else 2**-8)


def test_half_cast_refuses_bad_weights():
    with pytest.raises(LowbitError, match="float16 range"):
        FloatWeight.cast(torch.tensor([[1.0, 70000.0]]), "float16")
    assert torch.isfinite(FloatWeight.cast(torch.tensor([[1.0, 70000.0]]), "bfloat16").dequantize()).all()
    with pytest.raises(LowbitError, match="NaN"):
        FloatWeight.cast(torch.tensor([[1.0, float("nan")]]), "float16")
    with pytest.raises(LowbitError, match="compute"):
        make_method("fp16", compute="fp8")
    w = FloatWeight.cast(torch.ones(2, 3), "bfloat16")
    with pytest.raises(LowbitError, match="weight16 .*bfloat16, expected .*float16"):  # the record says float16
        FloatWeight.from_tensors(w.tensors(), dict(w.meta(), dtype="float16"))


@pytest.mark.parametrize("method", ["fp16", "bf16"])
def test_half_model_save_load_identical_logits(tmp_path, method):
    ref = tiny_llama()
    model, meth = _quantized(method)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 21
    x = _tokens()
    loaded, out = _save_load(model, meth, tmp_path / "q")
    with torch.no_grad():
        y0, y1, y2 = ref(x).logits, model(x).logits, loaded(x).logits
    assert torch.equal(y1, y2)
    assert (y1 - y0).abs().max() < (2e-3 if method == "fp16" else 2e-2)
    rec = json.loads((out / "lowbit.json").read_text())
    m = rec["modules"]["model.layers.0.mlp.down_proj"]
    assert m["format"] == "half" and m["dtype"] == ("float16" if method == "fp16" else "bfloat16")
    assert m["compute"] == "fp32"
    # the weight on disk is the 16-bit type: 2 bytes per weight
    assert loaded.model.layers[0].mlp.down_proj.weight16.element_size() == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_fused_kernel_matches_widened_reference(dtype):
    """The C kernel widens in registers and accumulates in float32: the reference's float32
    product up to summation order (relative to Σ|x||w|); more rows than it handles -> reference."""
    from lowbit.kernels import halfw, linear, reference

    if halfw.native_lib() is None:
        pytest.skip("native half kernel not built or CPU lacks F16C/FMA")
    for M, K, N in [(1, 4096, 9), (3, 100, 7), (8, 576, 33), (5, 17, 3)]:
        X, W, b = _rand(M, K, seed=K), _rand(N, K, seed=N, scale=0.1), _rand(N, seed=1)
        w = FloatWeight.cast(W, dtype)
        y, r = linear(X, w, b), reference.linear(X, w, b)
        assert ((y - r).abs() <= 1e-6 * (X.abs() @ w.dequantize().abs().T) + 1e-6).all()
        assert torch.equal(halfw.fused_linear(X, w, b), y)
    X = _rand(halfw.FUSED_MAX_ROWS + 1, 64, seed=3)
    w = FloatWeight.cast(_rand(5, 64, seed=4), dtype)
    assert torch.equal(linear(X, w), reference.linear(X, w))


@pytest.mark.parametrize("method", ["fp16", "bf16"])
def test_half_native_compute_close_to_upcast(method):
    up, _ = _quantized(method)
    nat, _ = _quantized(method, compute="native")
    x = _tokens()
    with torch.no_grad():
        a, b = up(x).logits, nat(x).logits
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < (5e-3 if method == "fp16" else 5e-2)


# -- W8A16 ----------------------------------------------------------------------------------------

def test_w8a16_equals_rtn_int8_per_channel():
    from lowbit.core.scheme import QuantScheme

    w8, _ = _quantized("w8a16")
    rtn = tiny_llama()
    apply_data_free(rtn, make_method("rtn", QuantScheme(bits=8, granularity="channel", group_size=None)),
                    progress=False)
    x = _tokens()
    for (n1, m1), (n2, m2) in zip(checkpoint.quantized_modules(w8).items(), checkpoint.quantized_modules(rtn).items()):
        assert n1 == n2 and isinstance(m1.weight_format, AffineWeight)
        assert torch.equal(m1.qweight, m2.qweight) and torch.equal(m1.scales, m2.scales)
    with torch.no_grad():
        assert torch.equal(w8(x).logits, rtn(x).logits)
    with pytest.raises(LowbitError, match="8-bit"):
        make_method("w8a16", QuantScheme(bits=4))


# -- dynamic int8: the C kernel against the exact reference -----------------------------------

SHAPES = [(1, 64, 8), (3, 100, 7), (2, 576, 36), (5, 2080, 13), (4, 31, 5), (9, 200, 21)]  # (M, K, N): tails everywhere


@needs_native
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("isa", ISA_CAPS)
def test_c_gemm_int32_bit_exact(M, K, N, isa):
    g = torch.Generator().manual_seed(M * 1000 + K)
    A = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    B = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    A[0, : min(K, 40)] = 127  # extreme codes: the largest pair sums 2·127² must not saturate
    B[0, : min(K, 40)] = 127
    if N > 1:
        B[1, : min(K, 40)] = -127
    with kdyn.native_lib().isa_capped(isa):
        C = kdyn.native_gemm(A, B)
    assert C.dtype == torch.int32
    assert torch.equal(C.long(), A.long() @ B.long().T)
    if K <= 1040:  # the reference's fp32 GEMM is exact there
        assert torch.equal(C.float(), kdyn.exact_int_matmul(A.float(), B.float()))


@needs_native
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("activations", ["token", "tensor"])
@pytest.mark.parametrize("isa", ISA_CAPS)
def test_c_linear_equals_reference(M, K, N, activations, isa):
    X = _rand(M, K, seed=K, scale=2.0)
    X[0, 0] = 40.0  # one outlier: per-tensor and per-token scales now differ
    w = DynamicInt8Weight.quantize(_rand(N, K, seed=N, scale=0.1), activations)
    b = _rand(N, seed=3)
    with kdyn.native_lib().isa_capped(isa):
        q, s = kdyn.native_quantize(X, activations)
        out = torch.full((M, N), float("nan"))  # poisoned: every element must be written
        y = kdyn.native_linear(X, w, b, out=out)
    qr, sr = kdyn.quantize_activations(X, activations)
    assert torch.equal(q.float(), qr) and torch.equal(s, sr)
    yr = kdyn.reference_linear(X, w, b)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=0)
    assert torch.equal(y, yr)  # in fact bit-identical: same float32 operations in the same order


def test_activation_scales_match_hand_computed_values():
    X = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.0, -8.0], [0.0, 0.0, 0.0]])
    # per token: amax 2, 8, 0 -> inv 63.5, 15.875, (127); 63.5 and -0.5·... ties go to even
    q, s = kdyn.quantize_activations(X, "token")
    assert torch.equal(s, torch.tensor([2 / 127, 8 / 127, 0.0]))
    assert torch.equal(q, torch.tensor([[64.0, -127, 32], [64, 0, -127], [0, 0, 0]]))
    # per tensor: amax 8 everywhere -> inv 15.875: 1 -> 15.875 -> 16, 0.5 -> 7.9375 -> 8
    q, s = kdyn.quantize_activations(X, "tensor")
    assert torch.equal(s, torch.full((3,), 8 / 127))
    assert torch.equal(q, torch.tensor([[16.0, -32, 8], [64, 0, -127], [0, 0, 0]]))
    if NATIVE:
        for act in ("token", "tensor"):
            for isa in ISA_CAPS:
                with kdyn.native_lib().isa_capped(isa):
                    qn, sn = kdyn.native_quantize(X, act)
                qr, sr = kdyn.quantize_activations(X, act)
                assert torch.equal(qn.float(), qr) and torch.equal(sn, sr)


def test_activation_codes_at_rounding_ties_follow_the_true_division():
    """q = round(x · (127 / amax)) with 127 / amax a true float32 division. Computing it as
    127 · (1 / amax) rounds differently for some amax and flips the code of an x that sits at a
    tie; these rows are built so that x · (127 / amax) is exactly k + 0.5 where the two differ."""
    import numpy as np

    from tests.reference.int8_naive import quantize_row

    rng = np.random.default_rng(0)
    rows = [[0.18696871399879456, 6.7842936515808105]]  # found on SmolLM2's activations
    for a in rng.uniform(0.5, 50.0, 20000).astype(np.float32):
        inv, inv_recip = np.float32(127) / a, np.float32(127) * (np.float32(1) / a)
        if inv == inv_recip:
            continue
        for k in range(1, 60):
            x = np.float32((k + 0.5) / inv)
            if x * inv == np.float32(k + 0.5) and x < a:
                rows.append([float(x), float(a)])
                break
        if len(rows) >= 40:
            break
    assert len(rows) >= 20
    X = torch.tensor(rows, dtype=torch.float32)
    q, _ = kdyn.quantize_activations(X, "token")
    assert q.tolist() == [[float(v) for v in quantize_row(r)[0]] for r in X.tolist()]
    if NATIVE:
        for isa in ISA_CAPS:
            with kdyn.native_lib().isa_capped(isa):
                qn, _ = kdyn.native_quantize(X, "token")
            assert torch.equal(qn.float(), q)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_quantized_linear_error_bound(activations):
    """|ŷ - y| ≤ Σ_k |x̂_k|·s_w/2 + |w_k|·s_x/2 (each operand is off by at most half a step)."""
    M, K, N = 8, 512, 64
    X, W = _rand(M, K, seed=1), _rand(N, K, seed=2, scale=0.05)
    w = DynamicInt8Weight.quantize(W, activations)
    y = kdyn.linear(X, w)
    q, sx = kdyn.quantize_activations(X, activations)
    bound = (q.double().abs() * sx.double()[:, None]) @ (w.wscale.double()[:, None] / 2).expand(N, K).T \
        + (sx.double()[:, None] / 2) @ W.double().abs().sum(1)[None, :]
    err = (y.double() - X.double() @ W.double().T).abs()
    assert (err <= bound + 1e-5).all()
    rel = (y - X @ W.T).norm() / (X @ W.T).norm()
    assert rel < 0.02  # measured ~0.01 for Gaussians


@needs_native
def test_native_off_runs_the_reference(monkeypatch):
    X = _rand(3, 96, seed=5)
    w = DynamicInt8Weight.quantize(_rand(10, 96, seed=6))
    mod = QuantizedLinear(w, _rand(10, seed=7))
    with torch.no_grad():
        y_native = mod(X)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert kdyn.native_lib() is None
    calls = []
    real = kdyn.reference_linear
    monkeypatch.setattr(kdyn, "reference_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y_ref = mod(X)
    assert calls and torch.equal(y_native, y_ref)
    with pytest.raises(LowbitError, match="not available"):
        kdyn.native_gemm(torch.zeros(1, 4, dtype=torch.int8), torch.zeros(1, 4, dtype=torch.int8))


def test_bad_input_is_a_lowbit_error():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        make_method("dynamic-int8").apply("layer", lin)
    with pytest.raises(LowbitError, match="NaN"):
        DynamicInt8Weight.quantize(lin.weight.detach())
    with pytest.raises(LowbitError, match="2-D"):
        DynamicInt8Weight.quantize(torch.ones(2, 3, 4))
    w = DynamicInt8Weight.quantize(_rand(4, 8))
    with pytest.raises(LowbitError, match="features"):
        kdyn.linear(torch.ones(2, 9), w)
    bad_x = torch.ones(2, 8)
    bad_x[1, 3] = float("inf")
    with pytest.raises(LowbitError, match="NaN/Inf"):
        kdyn.linear(bad_x, w)
    with pytest.raises(LowbitError, match="NaN/Inf"):
        kdyn.reference_linear(bad_x, w)
    with pytest.raises(LowbitError, match="activation scales"):
        make_method("dynamic-int8", activations="channel")
    q = w.qweight.clone()
    q[0, 0] = -128
    with pytest.raises(LowbitError, match="-128"):
        DynamicInt8Weight.from_tensors({"qweight": q, "wscale": w.wscale}, w.meta())
    with pytest.raises(LowbitError, match="wscale"):
        DynamicInt8Weight.from_tensors({"qweight": w.qweight, "wscale": w.wscale[:3]}, w.meta())
    if NATIVE:
        with pytest.raises(LowbitError, match="-128"):
            kdyn.native_gemm(q, q)
        with pytest.raises(LowbitError, match="int8"):
            kdyn.native_gemm(q.float(), q)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_dynamic_int8_model_close_to_float_and_save_load(tmp_path, activations):
    ref = tiny_llama()
    model, meth = _quantized("dynamic-int8", activations=activations)
    x = _tokens()
    loaded, out = _save_load(model, meth, tmp_path / "q")
    with torch.no_grad():
        y0, y1, y2 = ref(x).logits, model(x).logits, loaded(x).logits
    assert torch.equal(y1, y2)
    kl = F.kl_div(y1.log_softmax(-1), y0.log_softmax(-1), log_target=True, reduction="batchmean") / x.shape[1]
    assert kl < 1e-3
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["modules"]["model.layers.1.self_attn.o_proj"]["activations"] == activations


def test_data_free_methods_work_on_any_linear_model():
    """A model outside the decoder families (no block table): every nn.Linear is replaced."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.GELU()), nn.Linear(32, 4))
    ref = copy.deepcopy(net)
    apply_data_free(net, make_method("dynamic-int8"), progress=False)
    assert sum(isinstance(m, QuantizedLinear) for m in net.modules()) == 3
    assert not any(type(m) is nn.Linear for m in net.modules())
    x = _rand(5, 16, seed=9)
    with torch.no_grad():
        assert (net(x) - ref(x)).abs().max() < 0.02


# -- dynamic int8 Conv2d -------------------------------------------------------------------------

@pytest.mark.parametrize("activations", ["token", "tensor"])
@pytest.mark.parametrize("geom", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, dilation=(1, 2))])
def test_dynamic_int8_conv2d_is_im2col_plus_the_int8_matmul(activations, geom):
    from lowbit.cnn.dynamic import DynamicInt8Conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **geom)
    x = _rand(2, 5, 11, 10, seed=2)
    q = DynamicInt8Conv2d.from_float(conv, activations)
    with torch.no_grad():
        y, y_float = q(x), conv(x)
    # naive: every output pixel's receptive field is one activation row of the reference matmul
    kh, kw = conv.kernel_size
    cols = F.unfold(x, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    w = DynamicInt8Weight.quantize(conv.weight.detach().reshape(7, -1), activations)
    ref = kdyn.reference_linear(cols.transpose(1, 2).reshape(-1, 5 * kh * kw), w, conv.bias.detach())
    assert y.shape == y_float.shape
    assert torch.equal(y, ref.reshape(2, -1, 7).transpose(1, 2).reshape(y.shape))
    assert (y - y_float).norm() / y_float.norm() < 0.02


def test_quantize_dynamic_converts_a_cnn_and_refuses_grouped_convs():
    from lowbit.cnn.dynamic import DynamicInt8Conv2d, quantize_dynamic

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 2 * 2, 10))
    x = _rand(4, 1, 8, 8, seed=1)
    with torch.no_grad():
        y0 = net(x)
        q = quantize_dynamic(copy.deepcopy(net))
        y1 = q(x)
    assert sum(isinstance(m, DynamicInt8Conv2d) for m in q.modules()) == 2
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 1
    assert (y1 - y0).norm() / y0.norm() < 0.03
    with pytest.raises(LowbitError, match="groups"):
        quantize_dynamic(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(LowbitError, match="padding"):
        quantize_dynamic(nn.Sequential(nn.Conv2d(4, 4, 3, padding="same")))
    with pytest.raises(LowbitError, match="channels"):
        q[0](torch.ones(1, 2, 8, 8))


# -- command line ----------------------------------------------------------------------------------

def test_cli_quantize_dynamic_int8(tmp_path, capsys):
    tiny = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / "q"
    code = main(["quantize", str(tiny), "--method", "dynamic-int8", "--option", "activations=tensor", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["method"] == {"method": "dynamic-int8", "config": {"activations": "tensor"}}
    assert len(rec["modules"]) == 14
    assert all(m["format"] == "dynamic-int8" and m["activations"] == "tensor" for m in rec["modules"].values())
    loaded, _, _ = checkpoint.load(out)
    mods = checkpoint.quantized_modules(loaded)
    assert all(m.qweight.dtype == torch.int8 for m in mods.values())
    code = main(["quantize", str(tiny), "--method", "dynamic-int8", "--bits", "4", "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "own number format" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method,fmt", [("fp16", "half"), ("bf16", "half"), ("w8a16", "affine")])
def test_cli_quantize_float_and_w8a16(tmp_path, capsys, method, fmt):
    tiny = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / method
    code = main(["quantize", str(tiny), "--method", method, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["method"]["method"] == method and len(rec["modules"]) == 14
    assert all(m["format"] == fmt for m in rec["modules"].values())
    loaded, _, _ = checkpoint.load(out)
    x = _tokens()
    with torch.no_grad():
        assert torch.isfinite(loaded(x).logits).all()
