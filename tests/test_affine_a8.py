"""The int8-activation affine kernel (lowbit.kernels.a8, csrc/affine_a8.c) against a plain-torch
float64 transcription of its rule, on every instruction-set path the CPU has.

Rule (per activation row and block of 32 columns): amax = max|x|; amax == 0 -> codes 0, scale 0;
else inv = 127/amax and sx = amax/127 (float32 divisions), q = clamp(round_half_even(x*inv),
-127, 127) (float32 product). y = bias + sum_g s_g (sum_{b in g} sx_b D_b - z_g sum_{b in g} sx_b Q_b)
with D_b = sum u q, Q_b = sum q exact. Checks: the codes and block scales bit for bit, the output
to ||y - ref|| / ||ref|| < 1e-5 over odd N, ragged last groups, int / float (fp16, fp32) /
symmetric zero-points, bits 2/4/8, bias, batch 1..8 and two threads; every output written over a
NaN-filled buffer; and the W4A8 result within 2e-2 of the float-activation product.
"""

import ctypes

import pytest
import torch

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.kernels import a8, reference
from lowbit.kernels.cpu import affine_struct, affine_weight_struct

TOL = 1e-5
PATHS = a8.library().paths if a8.library() is not None else ("scalar",)  # the library's code paths


def rel_err(y, r):
    return ((y.double() - r.double()).norm() / r.double().norm().clamp(min=1e-30)).item()


def test_library_is_built_whenever_the_float_kernels_are():
    # every test below skips without the library; this one keeps a failed build from hiding
    from lowbit.kernels import cpu

    if cpu.available():
        assert a8.available()


@pytest.fixture(params=PATHS)
def path(request):
    lib = a8.library()
    if lib is None:
        pytest.skip("native affine_a8 library not built (no C compiler at install)")
    with lib.isa_capped(request.param) as got:
        if got != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield got


# -- the reference -------------------------------------------------------------------------------
def ref_quantize(x: torch.Tensor):
    """x [M, K] float32 -> (q int32 [M, K], sx float32 [M, K/32]) by the rule above."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    amax = xb.abs().amax(-1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.tensor(127.0, dtype=torch.float32) / safe           # float32 division
    sx = torch.where(amax > 0, safe / torch.tensor(127.0, dtype=torch.float32), torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127)          # float32 product, half to even
    q = torch.where(amax[..., None] > 0, q, torch.zeros_like(q))
    return q.reshape(M, K).to(torch.int32), sx


def ref_a8_linear(x: torch.Tensor, w: AffineWeight, bias=None) -> torch.Tensor:
    """Float64 transcription of y = bias + sum_g s (sum_b sx D - z sum_b sx Q), exact int sums."""
    N, K = w.shape
    X = x.reshape(-1, K)
    q, sx = ref_quantize(X)
    M, nb = sx.shape
    from lowbit.core import packing
    u = packing.unpack_u8(w.qweight, w.scheme.bits, K).to(torch.int64)          # [N, K]
    D = torch.einsum("nbc,mbc->mnb", u.reshape(N, nb, 32), q.to(torch.int64).reshape(M, nb, 32))  # exact
    Q = q.to(torch.int64).reshape(M, nb, 32).sum(-1)                              # [M, nb]
    sch = w.scheme
    ng = w.scales.shape[-1]
    bpg = nb if ng == 1 else sch.group_size // 32
    grp = torch.arange(nb) // bpg                                                  # block -> group
    s = w.scales.double().reshape(-1, ng).expand(N, ng)
    z = w.zero_points()
    z = torch.full((N, ng), float(sch.code_offset), dtype=torch.float64) if z is None \
        else z.double().reshape(-1, ng).expand(N, ng)
    sxd = sx.double()
    A = torch.zeros(M, N, ng, dtype=torch.float64).index_add_(2, grp, D.double() * sxd[:, None, :])
    B = torch.zeros(M, ng, dtype=torch.float64).index_add_(1, grp, Q.double() * sxd)
    y = (s[None] * (A - z[None] * B[:, None, :])).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], N)


# -- cases ---------------------------------------------------------------------------------------
def S(bits, sym=True, g=32, zp="int", sd="float16", gran="group"):
    return QuantScheme(bits=bits, symmetric=sym, granularity=gran, group_size=g if gran == "group" else None,
                       zero_point=zp, scale_dtype=sd)


SCHEMES = [
    S(4, True, 32), S(4, True, 128), S(4, False, 64), S(4, False, 128), S(4, False, 32, zp="float"),
    S(4, False, 128, zp="float", sd="float32"), S(4, True, gran="channel"), S(4, False, gran="tensor"),
    S(4, True, 96), S(8, True, gran="channel"), S(8, False, gran="channel", sd="float32"), S(8, False, 32),
    S(8, True, 128), S(2, False, 64), S(2, True, 32), S(2, True, gran="channel"),
]
SHAPES = [(1, 32), (7, 96), (37, 576), (64, 256), (33, 1536), (3, 224)]  # (out, in): odd N, ragged groups


def _weight(shape, scheme, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * (1 + torch.rand(shape[0], 1, generator=g) * 3)
    return AffineWeight.quantize_rtn(W, scheme), g


def _run(x, w, bias=None):
    y = a8.affine_a8_linear(x, w, bias)
    assert y is not NotImplemented
    return y


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name() + "-" + s.scale_dtype)
def test_matches_reference(path, scheme):
    for i, (N, K) in enumerate(SHAPES):
        w, g = _weight((N, K), scheme, 10 * i + scheme.bits)
        for M in (1, 3, 8):
            x = torch.randn(M, K, generator=g) * 2
            bias = torch.randn(N, generator=g) if M != 3 else None
            y = _run(x, w, bias)
            r = ref_a8_linear(x, w, bias)
            assert rel_err(y, r) < TOL, (path, scheme.short_name(), N, K, M, rel_err(y, r))


@pytest.mark.parametrize("K,G", [(576, 128), (576, 64), (1536, 128), (544, 96)])
def test_ragged_last_group_and_poisoned_output(path, K, G):
    """K % G != 0: the last group is shorter. The output buffer starts as NaN: every element of
    it must be written (the C function is called directly on a NaN-filled y)."""
    for bits, sym in ((4, True), (4, False), (8, False), (2, False)):
        w, g = _weight((41, K), S(bits, sym, G), K + bits)
        x = torch.randn(2, K, generator=g)
        bias = torch.randn(41, generator=g)
        st = affine_weight_struct(w)
        addr = ctypes.addressof(st)
        y = torch.full((2, 41), float("nan"))
        rc = a8.library().lb_affine_a8_linear_w(addr, x.data_ptr(), 2, bias.data_ptr(), y.data_ptr(), 1)
        assert rc == 0
        assert torch.isfinite(y).all()
        assert rel_err(y, ref_a8_linear(x, w, bias)) < TOL


def test_quantizer_bit_exact(path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 320, generator=g) * torch.rand(5, 1, generator=g) * 10
    x[0, :32] = 0.0                                  # an all-zero block: codes 0, scale 0
    x[1, 32:64] = torch.arange(32) * 0.5 - 7.75      # ties after scaling are rare; exercise ranges
    x[2, 64:96] = 1e-30                              # tiny but non-zero
    x[3, 96:128] = -4.0                              # constant block: every code -127
    q, sx = a8.quantize_activations(x)
    rq, rsx = ref_quantize(x)
    assert torch.equal(q.to(torch.int32), rq)
    assert torch.equal(sx, rsx)
    assert (q[0, :32] == 0).all() and sx[0, 0] == 0
    assert (q[3, 96:128] == -127).all()
    assert q.abs().max() <= 127


def test_two_threads_and_large_layer(path):
    """Above the one-thread threshold (48 KiB of weights), with 2 threads: same result as 1."""
    w, g = _weight((1001, 576), S(4, True, 32), 5)
    x = torch.randn(1, 576, generator=g)
    st = affine_weight_struct(w)
    addr = ctypes.addressof(st)
    lib = a8.library()
    ys = []
    for nt in (1, 2):
        y = torch.full((1, 1001), float("nan"))
        assert lib.lb_affine_a8_linear_w(addr, x.data_ptr(), 1, None, y.data_ptr(), nt) == 0
        ys.append(y)
    assert torch.isfinite(ys[1]).all()
    assert rel_err(ys[0], ref_a8_linear(x, w)) < TOL
    assert rel_err(ys[1], ys[0]) < 1e-6


def test_paths_agree_closely():
    """Every path computes the same integers; only float summation order differs."""
    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    w, g = _weight((77, 1536), S(4, False, 64), 9)
    x = torch.randn(1, 1536, generator=g)
    outs = {}
    for p in PATHS:
        with a8.library().isa_capped(p) as got:
            if got == p:
                outs[p] = _run(x, w)
    base = outs["scalar"]
    for p, y in outs.items():
        assert rel_err(y, base) < 1e-6, p


@pytest.mark.parametrize("scheme", [S(4, True, 32), S(4, True, 128), S(4, False, 128), S(8, True, gran="channel")],
                         ids=lambda s: s.short_name())
def test_close_to_float_activation_kernel(path, scheme):
    """The int8 activation rounding costs well under 2% on random normal data: compare with the
    float-activation reference product (dequantize, then F.linear)."""
    w, g = _weight((576, 576), scheme, 11)
    x = torch.randn(1, 576, generator=g)
    y = _run(x, w)
    r = reference.linear(x, w)
    e = rel_err(y, r)
    assert e < 2e-2, e
    assert e > 0  # it is not the float product (nobody should mistake one for the other)


def test_unsupported_and_garbage_inputs():
    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    w, g = _weight((16, 64), S(4, True, 32), 1)
    assert a8.affine_a8_linear(torch.randn(1, 63), w) is NotImplemented            # wrong K
    assert a8.affine_a8_linear(torch.randn(1, 64, dtype=torch.float64), w) is NotImplemented
    assert a8.affine_a8_linear(torch.randn(1, 64).half(), w) is NotImplemented
    assert a8.affine_a8_linear(torch.randn(1, 64), w, bias=torch.randn(5)) is NotImplemented
    w48, _ = _weight((16, 48), S(4, True, 16), 2)                                   # K % 32 != 0
    assert a8.affine_a8_linear(torch.randn(2, 48), w48) is NotImplemented
    w3, _ = _weight((16, 64), S(3, True, 32), 2)                                     # 3-bit: not handled
    assert a8.affine_a8_linear(torch.randn(1, 64), w3) is NotImplemented
    # group 16 with K = 64: blocks of 32 would straddle groups -> the C code says "unsupported"
    w16, _ = _weight((16, 64), S(4, True, 16), 4)
    assert a8.affine_a8_linear(torch.randn(1, 64), w16) is NotImplemented
    st = affine_weight_struct(w16)
    addr = ctypes.addressof(st)
    y = torch.empty(1, 16)
    assert a8.library().lb_affine_a8_linear_w(addr, torch.randn(1, 64).data_ptr(), 1, None, y.data_ptr(), 1) == 4
    with pytest.raises(LowbitError, match="multiple of 32"):
        a8.quantize_activations(torch.randn(1, 33))
    # empty batch: nothing to do, no crash
    assert a8.affine_a8_linear(torch.randn(0, 64), w).shape == (0, 16)
    # a corrupt struct (K not matching groups) is refused, not read out of bounds
    bad = affine_struct(w)
    bad.K = 4096
    assert a8.library().lb_affine_a8_linear_w(ctypes.addressof(bad), None, 1, None, None, 1) == 2


def test_function_pointer_and_struct():
    """The exported address calls the same function the wrapper calls."""
    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    w, g = _weight((24, 128), S(4, False, 64), 6)
    x = torch.randn(1, 128, generator=g)
    fn_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int)
    fn = fn_t(a8.library().address("lb_affine_a8_linear_w"))
    st = affine_weight_struct(w)
    addr = ctypes.addressof(st)
    assert st.K == 128 and st.N == 24 and st.bits == 4 and st.G == 64 and st.n_groups == 2
    y = torch.full((1, 24), float("nan"))
    assert fn(addr, x.data_ptr(), 1, None, y.data_ptr(), 1) == 0
    assert torch.equal(y, _run(x, w))
    assert ctypes.sizeof(st) == 4 * 8 + 7 * 8 + 4 * 4
    assert a8.supports(w)


def test_supports_matches_the_c_side():
    """supports(w) is True exactly when the C function accepts the weight (return code 0)."""
    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    lib = a8.library()
    for (N, K), sch in [((8, 64), S(4, True, 16)), ((8, 96), S(4, True, 32)), ((8, 48), S(8, True, gran="channel")),
                        ((8, 64), S(3, True, 32)), ((8, 576), S(4, False, 128)), ((8, 160), S(2, True, 96)),
                        ((8, 192), S(8, False, gran="tensor"))]:
        w, g = _weight((N, K), sch, K)
        x = torch.randn(1, K, generator=g)
        y = torch.empty(1, N)
        ok = a8.supports(w)
        if sch.bits == 3:
            assert not ok
            continue
        st = affine_weight_struct(w)
        rc = lib.lb_affine_a8_linear_w(ctypes.addressof(st), x.data_ptr(), 1, None, y.data_ptr(), 1)
        assert ok == (rc == 0), (sch.short_name(), K, rc)


# -- several activation rows: the register-blocked GEMM ---------------------------------------
@pytest.fixture
def gemm_from():
    """Set the row count from which a call runs the GEMM; restored afterwards."""
    lib = a8.library()
    yield lib.lb_affine_a8_set_gemm_min_rows
    lib.lb_affine_a8_set_gemm_min_rows(8)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name() + "-" + s.scale_dtype)
def test_gemm_matches_reference(path, gemm_from, scheme):
    """Prompts (many rows) through the GEMM: the same rule as one row at a time, every output
    written (NaN-poisoned buffer), N not a multiple of a panel (32 / 8 rows), M not a multiple of
    a tile (4 rows), one and two threads."""
    gemm_from(1)
    lib = a8.library()
    for i, (N, K) in enumerate(SHAPES + [(200, 576)]):
        w, g = _weight((N, K), scheme, 10 * i + scheme.bits + 1)
        addr = ctypes.addressof(affine_weight_struct(w))
        for M, nt in ((1, 1), (5, 1), (13, 2), (64, 2)):
            x = torch.randn(M, K, generator=g) * 2
            bias = torch.randn(N, generator=g) if M != 5 else None
            y = torch.full((M, N), float("nan"))
            assert lib.lb_affine_a8_linear_w(addr, x.data_ptr(), M, None if bias is None else bias.data_ptr(),
                                             y.data_ptr(), nt) == 0
            assert torch.isfinite(y).all()
            r = ref_a8_linear(x, w, bias)
            assert rel_err(y, r) < TOL, (path, scheme.short_name(), N, K, M, nt, rel_err(y, r))


def test_gemm_rows_equal_one_row_calls(path, gemm_from):
    """A prompt's row m is the row kernel's answer for that row alone (activations are rounded per
    row), to float summation order: what lets a decoder run prompts through the GEMM and decode
    steps through the row kernel with the same numbers."""
    for scheme in (S(4, False, 128), S(8, True, gran="channel"), S(2, False, 64)):
        w, g = _weight((300, 576), scheme, 21)
        x = torch.randn(37, 576, generator=g)
        gemm_from(8)
        y = _run(x, w)
        rows = torch.cat([_run(x[m:m + 1], w) for m in range(37)])
        assert rel_err(y, rows) < 1e-6, (path, scheme.short_name())
        assert (y - rows).abs().max() <= 1e-5 * rows.abs().max()
