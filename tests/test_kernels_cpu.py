"""Fast CPU kernels (lowbit.kernels.cpu, csrc/cpu_linear.c) against the reference path, and the
ternary (BitNet b1.58) format and method against a naive transcription of the paper.

Every instruction-set path the CPU has (scalar C, AVX2+FMA+F16C, AVX-512) is checked:
‖y − y_ref‖ / ‖y_ref‖ < 1e-5 with y_ref = lowbit.kernels.reference.linear (dequantize, then
F.linear) over random shapes with odd sizes, ragged last groups, group boundaries, batch 1 and
small batches, with and without bias. Kernel tests skip when the native library was not built.
"""

import ctypes
import math

import pytest
import torch

from lowbit import kernels
from lowbit.algorithms.base import make_method
from lowbit.algorithms.nf4 import NF4Config, nf4_quantize
from lowbit.algorithms.ternary import TernaryConfig, ternary_quantize
from lowbit.calibration.sequential import apply_data_free
from lowbit.core import packing
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.ternary import TernaryWeight
from lowbit.kernels import cpu, reference
from lowbit.nn.linear import QuantizedLinear

needs_native = pytest.mark.skipif(not cpu.available(), reason="native kernels not built (no C compiler at install)")
TOL = 1e-5
PATHS = cpu.library().paths if cpu.library() is not None else ("scalar",)  # the library's code paths


def rel_err(y, r):
    return ((y - r).norm() / r.norm().clamp(min=1e-30)).item()


@pytest.fixture(params=PATHS)
def isa(request):
    lib = cpu.library()
    if lib is None:
        pytest.skip("native kernels not built")
    with lib.isa_capped(request.param) as path:
        if path != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield path


SCHEMES = [
    QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32),
    QuantScheme(bits=4, symmetric=True, granularity="group", group_size=128),
    QuantScheme(bits=4, symmetric=False, granularity="group", group_size=64),
    QuantScheme(bits=4, symmetric=False, granularity="group", group_size=128),
    QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32, zero_point="float"),
    QuantScheme(bits=4, symmetric=False, granularity="group", group_size=128, zero_point="float",
                scale_dtype="float32"),
    QuantScheme(bits=4, symmetric=True, granularity="channel", group_size=None),
    QuantScheme(bits=4, symmetric=False, granularity="tensor", group_size=None),
    QuantScheme(bits=4, symmetric=True, granularity="group", group_size=48),   # not a SIMD multiple
    QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None),
    QuantScheme(bits=8, symmetric=False, granularity="channel", group_size=None, scale_dtype="float32"),
    QuantScheme(bits=8, symmetric=False, granularity="group", group_size=32),
    QuantScheme(bits=2, symmetric=False, granularity="group", group_size=64),
    QuantScheme(bits=2, symmetric=True, granularity="channel", group_size=None, restricted_range=True),
    # runs of 8 codes in 3, 5, 6, 7 bytes: SIMD steps of 8 or 16 codes, scalar for other groups
    QuantScheme(bits=3, symmetric=True, granularity="group", group_size=64),
    QuantScheme(bits=3, symmetric=False, granularity="group", group_size=32),
    QuantScheme(bits=3, symmetric=False, granularity="group", group_size=24),   # AVX2 yes, AVX-512 no
    QuantScheme(bits=3, symmetric=True, granularity="group", group_size=20),   # scalar only
    QuantScheme(bits=5, symmetric=False, granularity="group", group_size=128),
    QuantScheme(bits=5, symmetric=True, granularity="channel", group_size=None),
    QuantScheme(bits=6, symmetric=False, granularity="group", group_size=64, zero_point="float"),
    QuantScheme(bits=6, symmetric=False, granularity="tensor", group_size=None),
    QuantScheme(bits=7, symmetric=True, granularity="group", group_size=48),
]
# (out, in): odd sizes, in not a multiple of 8 (padded packed rows), ragged last groups, exact
# group boundaries, one column, and SmolLM2's shapes
SHAPES = [(1, 1), (3, 7), (37, 203), (5, 129), (64, 256), (11, 1000), (576, 576), (40, 1536)]


def _case(shape, scheme, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * (1 + torch.rand(shape[0], 1, generator=g) * 3)
    return AffineWeight.quantize_rtn(W, scheme), g


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name() + "-" + s.scale_dtype)
def test_affine_matches_reference(isa, scheme):
    for i, shape in enumerate(SHAPES):
        w, g = _case(shape, scheme, seed=i)
        for M in (1, 2, 3, 8, 13):
            x = torch.randn(M, shape[1], generator=g)
            bias = torch.randn(shape[0], generator=g) if M % 2 else None
            y = cpu.affine_linear(x, w, bias)
            assert y is not NotImplemented
            r = reference.linear(x, w, bias)
            assert y.shape == r.shape and y.dtype == torch.float32
            assert rel_err(y, r) < TOL, (isa, scheme.short_name(), shape, M)


def test_affine_leading_dims_and_large_batch(isa):
    """x [..., in] keeps its leading dims; above FUSED_MAX_ROWS rows the weight is dequantized in
    C and multiplied with the float GEMM."""
    w, g = _case((45, 200), QuantScheme(bits=4, symmetric=False, group_size=64), seed=3)
    for lead in ((2, 3), (1, 1), (cpu.FUSED_MAX_ROWS + 7,), (3, 40)):
        x = torch.randn(*lead, 200, generator=g)
        b = torch.randn(45, generator=g)
        y = cpu.affine_linear(x, w, b)
        r = reference.linear(x, w, b)
        assert y.shape == (*lead, 45) and rel_err(y, r) < TOL


def test_dequantize_in_c_matches_format(isa):
    lib = cpu.library()
    for scheme in SCHEMES:
        w, _ = _case((19, 203), scheme, seed=7)
        W = cpu._affine_dequant(lib, w, cpu.affine_struct(w))
        assert torch.equal(W, w.dequantize()), scheme.short_name()  # same fp32 operations


def _poisoned_call(fn, M, N, *args):
    """Call a C kernel writing y [M, N] into a NaN-filled buffer with NaN guards on both sides."""
    buf = torch.full((M * N + 64,), float("nan"))
    y = buf[32:32 + M * N]
    fn(*args, y.data_ptr())
    assert torch.isnan(buf[:32]).all() and torch.isnan(buf[32 + M * N:]).all(), "wrote outside y"
    assert torch.isfinite(y).all(), "left part of y unwritten"
    return y.view(M, N)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_poisoned_output_fully_written(isa, threads):
    lib = cpu.library()
    lib.lb_cpu_linear_set_min_parallel_bytes(0)  # split even tiny layers across threads
    try:
        for scheme in SCHEMES[:4] + SCHEMES[9:]:
            for shape in ((3, 7), (37, 203), (65, 256)):
                w, g = _case(shape, scheme, seed=11)
                N, K = shape
                st = cpu.affine_struct(w)
                for M in (1, 2, 5, 9):
                    x = torch.randn(M, K, generator=g)
                    b = torch.randn(N, generator=g)
                    y = _poisoned_call(lambda yp: lib.lb_affine_linear_w(ctypes.addressof(st), x.data_ptr(), M,
                                                                        b.data_ptr(), yp, threads), M, N)
                    assert rel_err(y, reference.linear(x, w, b)) < TOL
                    wn = nf4_quantize(torch.randn(N, 128, generator=g), NF4Config())
                    xn = torch.randn(M, 128, generator=g)
                    lut, dyn = cpu._nf4_constants()
                    yn = _poisoned_call(lambda yp: lib.lb_nf4_linear(
                        xn.data_ptr(), M, 128, N, wn.qweight.data_ptr(), wn.absmax.data_ptr(), 1,
                        wn.nested_absmax.data_ptr(), 256, float(wn.offset), 64, dyn.data_ptr(), lut.data_ptr(),
                        None, yp, threads), M, N)
                    assert rel_err(yn, reference.linear(xn, wn)) < TOL
    finally:
        lib.lb_cpu_linear_set_min_parallel_bytes(48 * 1024)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_matches_reference(isa, double_quant, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for shape in ((1, 128), (7, 256), (33, 640), (576, 576), (20, 1536)):
        if shape[1] % blocksize:
            continue
        w = nf4_quantize(torch.randn(shape, generator=g), NF4Config(blocksize=blocksize, double_quant=double_quant,
                                                                   dq_blocksize=16))
        for M in (1, 2, 5, 8, 12):
            x = torch.randn(M, shape[1], generator=g)
            b = torch.randn(shape[0], generator=g) if M % 2 else None
            y = cpu.nf4_linear(x, w, b)
            assert y is not NotImplemented
            assert rel_err(y, reference.linear(x, w, b)) < TOL, (isa, shape, M)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_matches_reference(isa, granularity):
    g = torch.Generator().manual_seed(5)
    for shape in SHAPES:
        w = ternary_quantize(torch.randn(shape, generator=g), TernaryConfig(granularity=granularity))
        for M in ((1, 2, 4, 9, cpu.FUSED_MAX_ROWS + 1) if shape[0] * shape[1] < 50000 else (1, 2, 9)):
            x = torch.randn(M, shape[1], generator=g)
            b = torch.randn(shape[0], generator=g) if M % 2 else None
            y = cpu.ternary_linear(x, w, b)
            assert y is not NotImplemented
            assert rel_err(y, reference.linear(x, w, b)) < TOL, (isa, shape, M)


@needs_native
def test_not_implemented_where_the_reference_must_run():
    w, g = _case((16, 64), QuantScheme(bits=4, group_size=32), seed=0)
    x = torch.randn(2, 64, generator=g)
    assert cpu.affine_linear(x.to(torch.bfloat16), w) is NotImplemented         # activations not fp32
    assert cpu.affine_linear(x.double(), w) is NotImplemented
    xg = x.clone().requires_grad_()
    assert cpu.affine_linear(xg, w) is NotImplemented                          # autograd through x
    y = kernels.linear(xg, w)
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    with torch.no_grad():
        assert cpu.affine_linear(xg, w) is not NotImplemented
    for bits in (3, 5, 6, 7):                                                  # every width has a C path
        w3, _ = _case((16, 64), QuantScheme(bits=bits, group_size=32), seed=bits)
        y3 = cpu.affine_linear(x, w3)
        assert y3 is not NotImplemented and torch.equal(kernels.linear(x, w3), y3)
        assert rel_err(y3, reference.linear(x, w3)) < TOL
    wn = nf4_quantize(torch.randn(6, 100, generator=g), NF4Config())            # blocks straddle rows
    assert cpu.nf4_linear(torch.randn(2, 100), wn) is NotImplemented
    wn = nf4_quantize(torch.randn(6, 128, generator=g), NF4Config())
    assert cpu.nf4_linear(torch.randn(cpu.FUSED_MAX_ROWS + 1, 128), wn) is NotImplemented  # prefill: reference
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(kernels.linear(x, w), cpu.affine_linear(x, w))          # dispatch takes the fast path


@needs_native
def test_lowbit_native_0_forces_reference(monkeypatch):
    w, g = _case((24, 96), QuantScheme(bits=4, symmetric=False, group_size=32), seed=1)
    x = torch.randn(1, 96, generator=g)
    assert cpu.affine_linear(x, w) is not NotImplemented
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert cpu.library() is None
    assert cpu.affine_linear(x, w) is NotImplemented
    assert cpu.ternary_linear(x, ternary_quantize(torch.randn(4, 96), TernaryConfig())) is NotImplemented
    assert torch.equal(kernels.linear(x, w), reference.linear(x, w))


@needs_native
def test_weight_cache_follows_the_tensors():
    """The C view of a weight is cached per qweight; replacing any stored tensor rebuilds it."""
    w, g = _case((8, 64), QuantScheme(bits=4, symmetric=False, group_size=32), seed=2)
    x = torch.randn(1, 64, generator=g)
    y1 = cpu.affine_linear(x, w)
    w2 = AffineWeight(qweight=w.qweight, scales=w.scales * 2, qzeros=w.qzeros, shape=w.shape, scheme=w.scheme)
    y2 = cpu.affine_linear(x, w2)
    assert rel_err(y2, reference.linear(x, w2)) < TOL and not torch.allclose(y1, y2)
    q = QuantizedLinear(w, None)
    with torch.no_grad():
        assert rel_err(q(x), reference.linear(x, w)) < TOL
        q.scales.mul_(3)  # in place: same tensor, the kernel reads the new values
        assert rel_err(q(x), reference.linear(x, q.weight_format)) < TOL


# -- ternary format and method ------------------------------------------------------------------
def naive_b158(W: torch.Tensor, per_channel: bool, eps: float = 1e-5):
    """BitNet b1.58 eq. (1)-(3), element by element in float64:
    gamma = mean |W|, W~ = RoundClip(W / (gamma + eps), -1, 1)."""
    rows, cols = W.shape
    Wd = W.double().tolist()
    slices = [[r] for r in range(rows)] if per_channel else [list(range(rows))]
    T = [[0] * cols for _ in range(rows)]
    gammas = []
    for rs in slices:
        vals = [abs(Wd[r][c]) for r in rs for c in range(cols)]
        gamma = float(torch.tensor(sum(vals) / len(vals), dtype=torch.float32))  # stored in fp32
        gammas.append(gamma)
        for r in rs:
            for c in range(cols):
                v = Wd[r][c] / (gamma + eps)
                T[r][c] = max(-1, min(1, round(v)))
    return torch.tensor(T, dtype=torch.int8), torch.tensor(gammas, dtype=torch.float32)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_solver_matches_paper_formula(granularity):
    g = torch.Generator().manual_seed(0)
    for shape in ((5, 7), (12, 33), (3, 64)):
        W = torch.randn(shape, generator=g) * 0.05
        w = ternary_quantize(W, TernaryConfig(granularity=granularity))
        T, gammas = naive_b158(W, granularity == "channel")
        # gamma: same value up to the fp32 rounding of a different summation order
        assert torch.allclose(w.scales, gammas, rtol=1e-6, atol=0)
        # codes: equal, except where W/(gamma+eps) lies within float rounding of a .5 boundary
        v = W.double() / (w.scales.double().reshape(-1, 1) + 1e-5)
        near_tie = ((v.abs() - 0.5).abs() < 1e-5)
        assert torch.equal(w.ternary()[~near_tie], T[~near_tie])
        assert torch.equal(w.dequantize(), T.float() * (w.scales[:, None] if granularity == "channel" else w.scales))


def test_ternary_pack_unpack_round_trip_exact():
    g = torch.Generator().manual_seed(1)
    for rows, cols in ((1, 1), (3, 5), (7, 8), (4, 33), (2, 1001)):
        T = torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)
        w = TernaryWeight.from_ternary(T, torch.rand(1, generator=g) + 0.1)
        assert torch.equal(w.ternary(), T)
        assert tuple(w.qweight.shape) == (rows, packing.packed_row_bytes(cols, 2))
        # byte layout: code u = t + 1 of column c at bits 2(c mod 4) of byte c // 4
        u = (T.to(torch.int64) + 1)
        assert int(w.qweight[0, 0]) == sum(int(u[0, c]) << (2 * c) for c in range(min(4, cols)))
        back = TernaryWeight.from_tensors(w.tensors(), w.meta())
        assert torch.equal(back.ternary(), T) and torch.equal(back.scales, w.scales)
    assert w.bits_per_weight == pytest.approx(8 * (2 * math.ceil(1001 / 8) * 2 + 4) / (2 * 1001))


def test_ternary_bad_input():
    with pytest.raises(LowbitError):
        TernaryWeight.from_ternary(torch.tensor([[2, 0]]), torch.ones(1))
    w = TernaryWeight.from_ternary(torch.zeros(2, 4, dtype=torch.int8), torch.ones(1))
    bad = dict(w.tensors(), qweight=torch.full_like(w.qweight, 0xFF))  # code 3 everywhere
    with pytest.raises(LowbitError, match="code 3"):
        TernaryWeight.from_tensors(bad, w.meta())
    with pytest.raises(LowbitError):
        TernaryWeight.from_tensors(dict(w.tensors(), scales=torch.ones(2)), w.meta())
    with pytest.raises(LowbitError):
        TernaryConfig(granularity="group")
    with pytest.raises(LowbitError):
        ternary_quantize(torch.tensor([[float("nan"), 1.0]]), TernaryConfig())
    zero = ternary_quantize(torch.zeros(3, 4), TernaryConfig())  # eps guards the all-zero tensor
    assert torch.equal(zero.dequantize(), torch.zeros(3, 4))


def test_ternary_method_on_tiny_model_save_load(tmp_path):
    from lowbit import checkpoint
    from tests.tiny import tiny_llama

    model = tiny_llama()
    meth = make_method("ternary", granularity="channel")
    apply_data_free(model, meth, progress=False)
    qmods = checkpoint.quantized_modules(model)
    assert len(qmods) == 3 * 7 and all(isinstance(m.weight_format, TernaryWeight) for m in qmods.values())
    rec = {"method": meth.describe(), "base_model": {"kind": "test"}, "calibration": None}
    out = checkpoint.save(model, None, tmp_path / "t", rec)
    loaded, _, rec2 = checkpoint.load(out)
    x = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert rec2["method"] == {"method": "ternary", "config": {"granularity": "channel", "eps": 1e-5}}


def test_struct_cache_never_keeps_a_weight_alive():
    # the C view of a weight is cached per stored tensors, by weak reference: a streamed model's
    # blocks must be freed when released (a strong reference kept every block of an 8B model)
    import gc
    import weakref

    from lowbit.kernels import _native

    if _native.library("cpu_linear") is None:
        pytest.skip("native kernels not built")
    w = AffineWeight.quantize_rtn(torch.randn(64, 256), QuantScheme(bits=4, group_size=64))
    st = cpu.affine_weight_struct(w)
    assert st is not None and cpu.affine_weight_struct(w) is st  # cached while the tensors live
    x = torch.randn(3, 256)
    torch.testing.assert_close(kernels.linear(x, w), reference.linear(x, w), rtol=1e-5, atol=1e-5)
    refs = [weakref.ref(t) for t in w.tensors().values()]
    before = len(_native._STRUCTS)
    del w, st
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(_native._STRUCTS) == before - 1
