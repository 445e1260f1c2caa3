"""The codebook formats' C kernels (csrc/codebook.c, lowbit.kernels.codebook) against the
reference (dequantize, then F.linear): E8P at 2, 3 and 4 bits, with and without tuned sign
vectors, Hadamard widths with a power-of-two, Paley I and Paley II base and the stored orthogonal
fallback, 1 to 40 activation rows, every instruction-set path; the C decode of W~ bit for bit;
the C decode step on a QuIP#-quantized model against the Python path. AQLM with 1, 2, 3 and 4
codebooks of 2^8 (the lookup-table kernel, several chunks of groups and tiles of rows), 2^4,
2^12 and 2^16 vectors (the decode kernel), groups of 4, 8, 12 and 16, float16 / bfloat16 /
float32 codebooks. The opt-in int8 rows (aqlm-lut8, e8p-a8) against plain-torch references of
their own arithmetic and within stated bounds of the float product."""

import ctypes
import dataclasses

import pytest
import torch

from lowbit import api, kernels
from lowbit.core.hadamard import hadamard_factors
from lowbit.formats.aqlm import AQLMWeight
from lowbit.formats.e8p import E8PWeight
from lowbit.kernels import codebook, reference
from lowbit.models.tiny import tiny_model

LIB = codebook.library()
needs_native = pytest.mark.skipif(LIB is None, reason="native kernels not built (no C compiler at install)")
PATHS = LIB.paths if LIB is not None else ("scalar",)
TOL = 2e-6


def rel_err(y, r):
    return float((y - r).norm() / r.norm().clamp(min=1e-30))


@pytest.fixture(params=PATHS)
def isa(request):
    if LIB is None:
        pytest.skip("native kernels not built")
    with LIB.isa_capped(request.param) as path:
        if path != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield path


def orthogonal(n, g):
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).to(torch.float32)


def random_e8p(out, n, bits=2, tuned=False, seed=0):
    """An E8PWeight of random codes (and residual), transforms from a seed; ``tuned``: random
    continuous su / sv; a width with no Hadamard factorisation gets a random orthogonal matrix."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 65536, (out, n // 8), generator=g)
    residual = None
    if bits == 4:
        residual = torch.randint(0, 65536, (out, n // 8), generator=g)
    elif bits == 3:
        residual = torch.randint(0, 256, (out, n // 8), generator=g)
    su = sv = None
    if tuned:
        su = torch.randn(out, generator=g).abs() + 0.5
        sv = torch.randn(n, generator=g) * 1.3
    ud = orthogonal(out, g) if hadamard_factors(out) is None else None
    vd = orthogonal(n, g) if hadamard_factors(n) is None else None
    scale = 0.7 if bits == 2 else [0.7, 0.11]
    return E8PWeight.from_codes(codes, scale, (out, n), seed=seed + 11, bits=bits, residual=residual, su=su, sv=sv,
                                u_dense=ud, v_dense=vd)


# (out, in): power-of-two, Paley II 36 x 16, Paley I 20 x 32 and 12 x 128, orthogonal (no factorisation)
SHAPES = [(64, 64), (576, 576), (640, 1536), (1536, 640), (22, 184), (40, 184)]


def test_shapes_cover_every_transform_kind():
    kinds = {hadamard_factors(n) is None for s in SHAPES for n in s}
    bases = {hadamard_factors(n)[0] for s in SHAPES for n in s if hadamard_factors(n) is not None}
    assert kinds == {True, False} and {1, 12, 20, 36} <= bases


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_c_decode_is_the_formats_transformed_weight_bit_for_bit(bits):
    # every one of the 65,536 codes, in both stages
    codes = torch.arange(65536).reshape(64, 1024)
    res = {2: None, 3: torch.randint(0, 256, (64, 1024)), 4: torch.arange(65536).flip(0).reshape(64, 1024)}[bits]
    w = E8PWeight.from_codes(codes, 0.3 if bits == 2 else [0.3, 0.07], (64, 8192), seed=1, bits=bits, residual=res)
    assert torch.equal(codebook.e8p_decode_c(w), w.transformed())


def test_tables_follow_the_decode_rule():
    P, S, PM = codebook.e8p_tables()
    code = torch.arange(65536)
    v = (P.view(torch.int32)[code & 255] ^ S[code >> 8]).view(torch.float32)
    shift = torch.where((code >> 15) & 1 == 1, -0.25, 0.25)
    from lowbit.core import e8p
    assert torch.equal(v + shift[:, None], e8p.codebook())
    assert torch.equal(PM[0b10000001], torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, -1]))


@needs_native
@pytest.mark.parametrize("tuned", [False, True], ids=["seed-signs", "su-sv"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_e8p_kernel_equals_reference(isa, shape, bits, tuned):
    w = random_e8p(*shape, bits=bits, tuned=tuned, seed=bits)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(shape[0], generator=g)
    assert kernels.select(w).symbol == "lb_e8p_linear_w"
    for M in (1, 3, 17):
        x = torch.randn(M, shape[1], generator=g)
        y = kernels.linear(x, w, b if M != 3 else None)
        r = reference.linear(x, w, b if M != 3 else None)
        assert y.shape == r.shape and rel_err(y, r) < TOL, (M, rel_err(y, r))


@needs_native
def test_leading_dims_threads_and_the_prefill_path(isa):
    w = random_e8p(576, 1536, bits=4, tuned=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 1536, generator=g)
    y = codebook.e8p_linear_cpu(x, w)
    assert y.shape == (2, 3, 576) and rel_err(y, reference.linear(x, w)) < TOL
    old = torch.get_num_threads()
    LIB.lb_codebook_set_min_parallel_bytes(0)
    try:
        torch.set_num_threads(2)
        y2 = codebook.e8p_linear_cpu(x, w)
    finally:
        torch.set_num_threads(old)
        LIB.lb_codebook_set_min_parallel_bytes(48 * 1024)
    assert torch.equal(y, y2)  # each output row is summed the same way on any thread
    xp = torch.randn(codebook.FUSED_MAX_ROWS + 7, 1536, generator=g)  # prefill: W~ decoded once + GEMM
    assert rel_err(codebook.e8p_linear_cpu(xp, w), reference.linear(xp, w)) < TOL


@needs_native
def test_declines_what_the_c_code_does_not_take():
    w = random_e8p(64, 64)
    x = torch.randn(2, 64)
    assert codebook.e8p_linear_cpu(x.double(), w) is NotImplemented
    assert codebook.e8p_linear_cpu(x.bfloat16(), w) is NotImplemented
    xg = x.clone().requires_grad_()
    assert codebook.e8p_linear_cpu(xg, w) is NotImplemented
    y = kernels.linear(xg, w)  # the reference runs, autograd flows
    y.sum().backward()
    assert xg.grad is not None and rel_err(y.detach(), reference.linear(x, w)) < TOL
    # the C entry refuses a struct it cannot read
    st = codebook.e8p_struct(w)
    st.K = 60
    out = torch.empty(2, 64)
    assert LIB.lb_e8p_linear_w(ctypes.addressof(st), x.data_ptr(), 2, None, out.data_ptr(), 1) == 2


def test_any_device_row_equals_reference():
    w = random_e8p(40, 184, bits=3, tuned=True)
    x = torch.randn(3, 184)
    assert rel_err(codebook.e8p_linear(x, w, None), reference.linear(x, w)) < TOL


@needs_native
def test_struct_is_cached_per_stored_tensors():
    w = random_e8p(64, 64, bits=4)
    assert codebook.e8p_weight_struct(w) is codebook.e8p_weight_struct(w)
    w2 = dataclasses.replace(w, scale=w.scale.clone())  # a tensor changed: a new struct
    assert codebook.e8p_weight_struct(w2) is not codebook.e8p_weight_struct(w)
    from lowbit.kernels import _native

    before = len(_native._STRUCTS)
    del w, w2
    import gc

    gc.collect()
    assert len(_native._STRUCTS) == before - 1  # the cache keeps no weight alive (w and w2 share codes)


@pytest.fixture(scope="module")
def quip_tiny():
    """A tiny llama quantized with QuIP# once for the decode-step tests (they only read it)."""
    lm = tiny_model("llama", seed=4)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "quip", None, progress=False, n_samples=4, seq_len=32)
    return m.model


@needs_native
def test_native_decode_step_runs_a_quip_model_like_the_python_path(quip_tiny):
    from lowbit.runtime.native import _library
    from tests.test_runtime_native import REL, run_both

    if _library() is None:
        pytest.skip("decode library not built")
    for isa in PATHS:
        with LIB.isa_capped(isa):
            worst, _, nat = run_both(quip_tiny)
        assert nat.native_step.kernels.get("e8p", 0) > 0
        assert worst < REL, (isa, worst)


# -- AQLM ----------------------------------------------------------------------------------------
def random_aqlm(out, n, M=2, B=8, g=8, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**B, (out, n // g, M), generator=gen)
    codebooks = torch.randn(M, 2**B, g, generator=gen) * 0.3
    scales = torch.rand(out, generator=gen) + 0.5
    return AQLMWeight.from_codes(codes, codebooks, scales, (out, n), dtype=dtype)


# (M codebooks, B bits, group g): 2x8, 1x8, 3x8, 4x8 (tables), 2x4 (small tables), 1x8 with 16-groups,
# 2x8 with 4-groups; 1x16 and 1x12 (decode), 1x16 with 12-groups (no SIMD multiple)
AQLM_CONFIGS = [(2, 8, 8), (1, 8, 8), (3, 8, 8), (4, 8, 8), (2, 4, 8), (1, 8, 16), (2, 8, 4), (1, 16, 8), (1, 12, 8),
                (1, 16, 12)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("config", AQLM_CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}")
def test_aqlm_kernel_equals_reference(isa, config, dtype):
    M, B, g = config
    gen = torch.Generator().manual_seed(7)
    for shape in [(576, 576), (40, 1536)]:  # 576 rows: three tiles; 1536 inputs: many chunks of groups
        w = random_aqlm(*shape, M=M, B=B, g=g, dtype=dtype)
        assert kernels.select(w).symbol == "lb_aqlm_linear_w"
        b = torch.randn(shape[0], generator=gen)
        for rows in (1, 3, 17):
            x = torch.randn(rows, shape[1], generator=gen)
            y = kernels.linear(x, w, b if rows != 3 else None)
            r = reference.linear(x, w, b if rows != 3 else None)
            assert y.shape == r.shape and rel_err(y, r) < TOL, (shape, rows, rel_err(y, r))


@needs_native
@pytest.mark.parametrize("config", [(2, 8, 8), (1, 16, 8)], ids=["2x8", "1x16"])
def test_aqlm_threads_leading_dims_and_what_it_declines(isa, config):
    M, B, g = config
    w = random_aqlm(1536, 576, M=M, B=B, g=g)
    x = torch.randn(2, 2, 576, generator=torch.Generator().manual_seed(8))
    y = codebook.aqlm_linear_cpu(x, w)
    assert y.shape == (2, 2, 1536) and rel_err(y, reference.linear(x, w)) < TOL
    old = torch.get_num_threads()
    LIB.lb_codebook_set_min_parallel_bytes(0)
    try:
        torch.set_num_threads(2)
        y2 = codebook.aqlm_linear_cpu(x, w)  # the table built by two threads, rows split
    finally:
        torch.set_num_threads(old)
        LIB.lb_codebook_set_min_parallel_bytes(48 * 1024)
    assert torch.equal(y, y2)
    assert codebook.aqlm_linear_cpu(x.bfloat16(), w) is NotImplemented
    xp = torch.randn(codebook.FUSED_MAX_ROWS + 1, 576)
    assert codebook.aqlm_linear_cpu(xp, w) is NotImplemented  # prefill: the reference's GEMM
    assert rel_err(kernels.linear(xp, w), reference.linear(xp, w)) < TOL
    assert codebook.aqlm_weight_struct(w) is codebook.aqlm_weight_struct(w)


# -- E8P encoder (nearest point) -----------------------------------------------------------------
def e8p_dist(codes, y):
    """Squared distance (float64) of each row of y to the decoded point of its code."""
    from lowbit.core import e8p

    return ((e8p.codebook().double()[codes.long()] - y.double()) ** 2).sum(1)


def adversarial_targets(g):
    """Zeros, every E8P point, far-away values, midpoints between two points, and vectors on the
    quarter grid (exact ties between patterns, shifts and signs), with -0.0 among them."""
    from lowbit.core import e8p

    cb = e8p.codebook()
    i, j = torch.randint(0, 65536, (2, 4000), generator=g)
    nearby = torch.randint(0, 65536, (4000,), generator=g)
    quarter = torch.randint(-12, 13, (4000, 8), generator=g).float() / 4
    return {
        "zeros": torch.cat([torch.zeros(4, 8), -torch.zeros(4, 8)]),
        "lattice": cb.clone(),
        "large": torch.cat([torch.randn(2000, 8, generator=g) * 1e3, torch.randn(2000, 8, generator=g) * 1e6,
                            torch.full((2, 8), 3e7), torch.full((2, 8), -3e7)]),
        "halfway": (cb[i] + cb[j]) / 2,
        "halfway-neighbours": cb[nearby] + torch.where(torch.rand(4000, 8, generator=g) < 0.5, 0.25, -0.25),
        "quarter-grid": quarter,
    }


@needs_native
def test_e8p_encode_equals_the_torch_encoder_on_random_vectors(isa):
    from lowbit.core import e8p

    g = torch.Generator().manual_seed(21)
    for sd in (0.3, 1.0, 1.6, 4.0):
        y = torch.randn(8000, 8, generator=g) * sd
        c, r = codebook.e8p_encode(y), e8p.encode(y)
        assert c.dtype == torch.int32 and c.shape == (8000,)
        assert float((c == r).double().mean()) >= 0.999, sd
        dc, dr = e8p_dist(c, y), e8p_dist(r, y)
        assert bool((dc <= dr * (1 + 1e-5) + 1e-12).all()), (sd, float((dc - dr).max()))


@needs_native
def test_e8p_encode_adversarial_inputs(isa):
    from lowbit.core import e8p

    g = torch.Generator().manual_seed(22)
    for name, y in adversarial_targets(g).items():
        c, r = codebook.e8p_encode(y), e8p.encode(y)
        assert bool(((c >= 0) & (c < 65536)).all()), name
        dc, dr = e8p_dist(c, y), e8p_dist(r, y)
        assert bool((dc <= dr * (1 + 1e-5) + 1e-12).all()), (name, float((dc - dr).max()))
        if name == "lattice":  # every point is its own nearest point
            assert torch.equal(c, torch.arange(65536, dtype=torch.int32))


@needs_native
def test_e8p_encode_is_the_brute_force_nearest_point(isa):
    from lowbit.core import e8p

    g = torch.Generator().manual_seed(23)
    y = torch.randn(300, 8, generator=g) * 1.3
    cb = e8p.codebook().double()
    best = torch.cdist(y.double(), cb).pow(2).min(1).values
    d = e8p_dist(codebook.e8p_encode(y), y)
    assert torch.allclose(d, best, rtol=1e-6, atol=1e-9)


@needs_native
def test_e8p_encode_threads_shapes_and_refusals(monkeypatch):
    y = torch.randn(5000, 8, generator=torch.Generator().manual_seed(24))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c1 = codebook.e8p_encode(y)
        torch.set_num_threads(2)
        c2 = codebook.e8p_encode(y)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(c1, c2)
    assert torch.equal(codebook.e8p_encode(y.double()), c1)  # any float dtype, converted
    assert torch.equal(codebook.e8p_encode(y.t().contiguous().t()), c1)  # a non-contiguous view
    assert codebook.e8p_encode(torch.zeros(0, 8)).shape == (0,)
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError):
        codebook.e8p_encode(torch.zeros(3, 7))
    bad = y[:4].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(LowbitError):
        codebook.e8p_encode(bad)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert codebook.e8p_encode(y) is None


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quip_solve_is_the_same_with_the_c_encoder(monkeypatch, bits):
    """The native encoder changes only the speed of the QuIP# solve: the same codes, or (a near
    tie decided the other way by float rounding, then fed back through LDLQ) the same error."""
    from lowbit.algorithms.quip import QuIPConfig, quip_quantize

    g = torch.Generator().manual_seed(25)
    W = torch.randn(192, 128, generator=g) * 0.02
    X = torch.randn(1024, 128, generator=g)
    H = X.T @ X / 1024
    fmt, info = quip_quantize(W, H, QuIPConfig(bits=bits), 3)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert codebook.e8p_encode(torch.zeros(1, 8)) is None
    ref, ref_info = quip_quantize(W, H, QuIPConfig(bits=bits), 3)
    same = float((fmt.codes == ref.codes).double().mean())
    assert same >= 0.99
    assert abs(info["error"] - ref_info["error"]) <= 1e-6 * ref_info["error"] or same < 1, same
    assert abs(info["error"] - ref_info["error"]) <= 1e-4 * ref_info["error"]


# -- AQLM with int8 tables (the opt-in "aqlm-lut8" row) --------------------------------------------
def lut8_reference(x, w):
    """The lut8 kernel's arithmetic in plain torch: (q [G, M, 256] int64, block scales, y [N]
    float64) for one activation row x [K]."""
    K = w.shape[1]
    g, M = w.in_group_size, w.num_codebooks
    G = K // g
    C = w.codebooks[:, :, 0, :].float()                                   # [M, 256, g]
    X = x.reshape(G, g).float()
    lut = X[:, None, None, 0] * C[None, :, :, 0]                          # x_0 c_0, then + x_t c_t
    for t in range(1, g):
        lut = lut + X[:, None, None, t] * C[None, :, :, t]                # [G, M, 256] float32
    B = codebook.LUT8_BLOCK
    nb = -(-G // B)
    q = torch.zeros(G, M, 256, dtype=torch.int64)
    sb = torch.zeros(nb)
    for b in range(nb):
        blk = lut[b * B:(b + 1) * B]
        amax = blk.abs().max()
        if amax > 0:
            sb[b] = amax / torch.tensor(127.0)
            q[b * B:(b + 1) * B] = torch.round(blk * (torch.tensor(127.0) / amax)).clamp(-127, 127).long()
    codes = w.unsigned_codes()                                            # [N, G, M]
    N = w.shape[0]
    isum = q.gather(2, codes.permute(1, 2, 0)).sum(1)                     # [G, N]
    blocks = torch.stack([isum[b * B:(b + 1) * B].sum(0) for b in range(nb)])
    y = (sb.double()[:, None] * blocks.double()).sum(0) * w.scales.reshape(N).double()
    return q, sb, y


# (M, g): 2x8, 1x8, 4x8, groups of 4 and 16
LUT8_CONFIGS = [(2, 8), (1, 8), (4, 8), (2, 4), (1, 16)]


def test_lut8_repack_layout():
    codes = torch.randint(-128, 128, (70, 3, 2), dtype=torch.int8)
    r = codebook.repack_codes64(codes)
    assert r.shape == (2, 3, 2, 64) and r.dtype == torch.uint8
    pos = codebook.lut8_byte_order()
    for row in (0, 31, 32, 63, 64, 69):
        t, i = divmod(row, 64)
        assert torch.equal(r[t, :, :, pos[i]], codes[row].view(torch.uint8))
    assert int(r[1, :, :, pos[6:]].abs().sum()) == 0  # padding rows: code 0


@needs_native
@pytest.mark.parametrize("config", LUT8_CONFIGS, ids=lambda c: f"{c[0]}x8g{c[1]}")
def test_aqlm_lut8_equals_its_own_reference(isa, config):
    M, g = config
    gen = torch.Generator().manual_seed(31)
    for shape in [(200, 576), (40, 184 if g != 16 else 176), (64, 2048)]:
        w = random_aqlm(*shape, M=M, B=8, g=g)
        assert kernels.select(w, "int8").name == "aqlm-lut8" and kernels.select(w).name == "aqlm"
        b = torch.randn(shape[0], generator=gen)
        x = torch.randn(3, shape[1], generator=gen)
        y = codebook.aqlm_lut8_linear(x, w, b)
        for i in range(3):
            q, sb, r = lut8_reference(x[i], w)
            qc, sbc = codebook.aqlm_lut8_tables(x[i], w)
            assert torch.equal(qc.long(), q) and torch.equal(sbc, sb)  # the tables bit for bit
            err = float(((y[i] - b).double() - r).abs().max() / r.abs().max())
            assert err < 1e-6, (shape, i, err)
        f = reference.linear(x, w, b)
        assert rel_err(y - b, f - b) < 0.025  # int8 tables: ~1 % from the float product on random data


@needs_native
def test_aqlm_lut8_zero_rows_threads_and_what_it_declines(isa):
    w = random_aqlm(1536, 576, M=2, B=8, g=8)
    gen = torch.Generator().manual_seed(32)
    b = torch.randn(1536, generator=gen)
    x = torch.randn(2, 2, 576, generator=gen)
    x[0, 1] = 0
    y = codebook.aqlm_lut8_linear(x, w, b)
    assert y.shape == (2, 2, 1536) and torch.equal(y[0, 1], b)  # a zero row: zero tables, the bias
    old = torch.get_num_threads()
    LIB.lb_codebook_set_min_parallel_bytes(0)
    try:
        torch.set_num_threads(2)
        y2 = codebook.aqlm_lut8_linear(x, w, b)  # the tables built by two threads, tiles split
    finally:
        torch.set_num_threads(old)
        LIB.lb_codebook_set_min_parallel_bytes(48 * 1024)
    assert torch.equal(y, y2)
    assert codebook.aqlm_lut8_linear(x.double(), w) is NotImplemented
    w16 = random_aqlm(64, 64, M=1, B=16, g=8)
    assert codebook.aqlm_lut8_linear(torch.randn(1, 64), w16) is NotImplemented
    assert kernels.select(w16, "int8").name == "aqlm"  # not taken: the format's own product
    assert codebook.aqlm8_weight_struct(w) is codebook.aqlm8_weight_struct(w)


@needs_native
def test_decoder_int8_activations_run_aqlm_layers_through_lut8():
    """LeanDecoder(int8_activations=True): the Python path and the C decode step both run the
    aqlm-lut8 row for single-row AQLM 2x8 layers (the C step through its C entry)."""
    from torch import nn

    from lowbit.nn.linear import QuantizedLinear
    from lowbit.runtime.decoder import LeanDecoder
    from lowbit.runtime.native import _library
    from tests.test_runtime_native import REL, ids_for, rel

    if _library() is None:
        pytest.skip("decode library not built")
    m = tiny_model("llama", seed=16).model
    names = [n for n, mod in m.named_modules() if type(mod) is nn.Linear and "lm_head" not in n]
    for i, n in enumerate(names):
        lin = m.get_submodule(n)
        w = random_aqlm(lin.out_features, lin.in_features, M=2, B=8, g=8, seed=i)
        m.set_submodule(n, QuantizedLinear(w, None if lin.bias is None else lin.bias.detach()))
    ref = LeanDecoder(m, max_len=20, native=False, int8_activations=True)
    nat = LeanDecoder(m, max_len=20, native=True, int8_activations=True)
    assert nat.native_step.kernels.get("aqlm-lut8", 0) == len(names)
    ids = ids_for(5, m.config.vocab_size)
    a, b = ref.forward(ids), nat.forward(ids)
    assert torch.equal(a, b)
    worst = 0.0
    for _ in range(8):
        tok = int(a.argmax())
        a, b = ref.forward([tok]), nat.forward([tok])
        worst = max(worst, rel(b, a))
    assert worst < REL, worst


# -- E8P with int8 activations (the opt-in "e8p-a8" row) --------------------------------------------
def e8a_quantize_reference(xt):
    """The e8p-a8 activation rule in plain torch: int8 codes (int64) and block scales of xt [K]."""
    B = codebook.E8A_BLOCK
    K = xt.shape[0]
    q = torch.zeros(K, dtype=torch.int64)
    sx = torch.zeros(-(-K // B))
    for b in range(sx.shape[0]):
        blk = xt[b * B:(b + 1) * B]
        amax = blk.abs().max()
        if amax > 0:
            sx[b] = amax / torch.tensor(127.0)
            q[b * B:(b + 1) * B] = torch.round(blk * (torch.tensor(127.0) / amax)).clamp(-127, 127).long()
    return q, sx


def e8a_reference(q, sx, w):
    """z [N] float64 of the e8p-a8 arithmetic: per block of E8A_BLOCK the exact integer sum of
    (4 * the decoded weight) times the int8 activations, times the block scale, times scale / 4."""
    from lowbit.core import e8p

    N, K = w.shape
    W4 = (4 * e8p.decode(w.codes.to(torch.int64) & 0xFFFF)).reshape(N, K)
    assert torch.equal(W4, W4.round()) and float(W4.abs().max()) <= 15 and bool((W4.long() % 2 == 1).all())
    prod = W4.long() * q[None, :]                                              # [N, K] exact
    B = codebook.E8A_BLOCK
    nb = sx.shape[0]
    D = torch.nn.functional.pad(prod, (0, nb * B - K)).reshape(N, nb, B).sum(2)  # [N, nb] exact integers
    return (D.double() * sx.double()[None, :]).sum(1) * (float(w.scale[0]) / 4)


@needs_native
@pytest.mark.parametrize("tuned", [False, True], ids=["seed-signs", "su-sv"])
@pytest.mark.parametrize("shape", SHAPES + [(130, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_e8p_a8_equals_its_own_reference(isa, shape, tuned):
    w = random_e8p(*shape, bits=2, tuned=tuned, seed=3)
    assert kernels.select(w, "int8").name == "e8p-a8" and kernels.select(w).name == "e8p"
    gen = torch.Generator().manual_seed(41)
    b = torch.randn(shape[0], generator=gen)
    x = torch.randn(5, shape[1], generator=gen)
    y = codebook.e8p_a8_linear(x, w, b)
    inc = w.incoherence()
    for i in range(5):
        xt, q, sx = codebook.e8p_a8_activations(x[i], w)
        assert rel_err(xt, inc.input(x[i])) < TOL                          # the float kernel's transform
        qr, sxr = e8a_quantize_reference(xt)
        assert torch.equal(q.long(), qr) and torch.equal(sx, sxr)           # the int8 activations bit for bit
        r = inc.output(e8a_reference(qr, sxr, w).float())
        err = float((y[i] - b - r).abs().max() / r.abs().max())
        assert err < 1e-6, (shape, i, err)
    f = reference.linear(x, w, b)
    assert rel_err(y - b, f - b) < 0.01  # int8 activations: ~0.5 % from the float product on random data


@needs_native
def test_e8p_a8_every_path_gives_the_same_bits_zero_rows_threads():
    w = random_e8p(1536, 576, seed=4)
    gen = torch.Generator().manual_seed(42)
    b = torch.randn(1536, generator=gen)
    x = torch.randn(2, 3, 576, generator=gen)
    x[1, 2] = 0
    ys = {}
    for path in PATHS:
        with LIB.isa_capped(path) as got:
            ys[got] = codebook.e8p_a8_linear(x, w, b)
    first = next(iter(ys.values()))
    assert first.shape == (2, 3, 1536) and all(torch.equal(first, y) for y in ys.values()), list(ys)
    assert torch.equal(first[1, 2], b)  # a zero row: zero codes and scales, U^T 0 = 0, the bias
    one = torch.cat([codebook.e8p_a8_linear(r[None], w, b) for r in x.reshape(6, 576)])
    assert torch.equal(one, first.reshape(6, 1536))  # tiles of activation rows do not change a row
    old = torch.get_num_threads()
    LIB.lb_codebook_set_min_parallel_bytes(0)
    try:
        torch.set_num_threads(2)
        y2 = codebook.e8p_a8_linear(x, w, b)
    finally:
        torch.set_num_threads(old)
        LIB.lb_codebook_set_min_parallel_bytes(48 * 1024)
    assert torch.equal(first, y2)


# widths whose code count (K / 8) leaves a last chunk of n < 64 codes: the AVX-512 path runs the
# tails of 64 / P rows (P = 4, 8, 16, 32 >= n) in one shared chunk; n > 32 and n = 64 do not share
E8A_TAILS = [(13, 64), (37, 544), (37, 576), (19, 640), (21, 768), (11, 800), (9, 1536), (23, 2056)]


@needs_native
@pytest.mark.parametrize("shape", E8A_TAILS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_e8p_a8_shared_tail_chunks_same_bits_on_every_path(shape):
    N, K = shape
    w = random_e8p(N, K, seed=7)
    gen = torch.Generator().manual_seed(43)
    b = torch.randn(N, generator=gen)
    x = torch.randn(6, K, generator=gen)  # tiles of 4 + 2 activation rows
    ys = {}
    for path in PATHS:
        with LIB.isa_capped(path) as got:
            ys[got] = codebook.e8p_a8_linear(x, w, b)
    first = next(iter(ys.values()))
    assert all(torch.equal(first, y) for y in ys.values()), list(ys)
    inc = w.incoherence()
    for i in (0, 5):
        xt, q, sx = codebook.e8p_a8_activations(x[i], w)
        r = inc.output(e8a_reference(q.long(), sx, w).float())
        err = float((first[i] - b - r).abs().max() / r.abs().max())
        assert err < 1e-6, (shape, i, err)


@needs_native
def test_e8p_a8_declines_what_it_does_not_take():
    for bits in (3, 4):
        w = random_e8p(64, 64, bits=bits)
        assert codebook.e8p_a8_linear(torch.randn(1, 64), w) is NotImplemented
        assert kernels.select(w, "int8").name == "e8p"  # not taken: the format's own product
    w = random_e8p(64, 64)
    x = torch.randn(2, 64)
    assert codebook.e8p_a8_linear(x.double(), w) is NotImplemented
    assert codebook.e8p_a8_linear(x.requires_grad_(), w) is NotImplemented
    assert codebook.e8p8_weight_struct(w) is codebook.e8p8_weight_struct(w)
    st = codebook.e8p8_struct(w)
    st.e.bits = 4
    out = torch.empty(2, 64)
    assert LIB.lb_e8p_a8_linear_w(ctypes.addressof(st), x.data_ptr(), 2, None, out.data_ptr(), 1) == 2


@needs_native
def test_decoder_int8_activations_run_quip_layers_through_e8p_a8(quip_tiny):
    """LeanDecoder(int8_activations=True) on a QuIP#-quantized tiny llama: the Python path and the
    C decode step both run the e8p-a8 row for single-row 2-bit E8P layers, on every path."""
    from lowbit.runtime.native import _library
    from tests.test_runtime_native import REL, run_both

    if _library() is None:
        pytest.skip("decode library not built")
    for isa in PATHS:
        with LIB.isa_capped(isa):
            worst, _, nat = run_both(quip_tiny, int8_activations=True)
        assert nat.native_step.kernels.get("e8p-a8", 0) > 0 and "e8p" not in nat.native_step.kernels
        assert worst < REL, (isa, worst)
