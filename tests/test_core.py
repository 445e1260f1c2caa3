"""Schemes, quantize/dequantize primitives and bit packing: exact values and error bounds."""

import math

import pytest
import torch

from lowbit.core import packing, primitives
from lowbit.core.scheme import QuantScheme, scheme_from_args
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight

ALL_SCHEMES = [
    QuantScheme(bits=b, symmetric=sym, granularity=gran, group_size=gs, restricted_range=rr, scale_dtype="float32")
    for b in (2, 3, 4, 5, 6, 7, 8)
    for sym in (True, False)
    for gran, gs in (("tensor", None), ("channel", None), ("group", 32), ("group", 100))
    for rr in (False, True)
] + [
    QuantScheme(bits=b, symmetric=False, granularity=gran, group_size=gs, zero_point="float", scale_dtype="float32")
    for b in (2, 3, 4, 8) for gran, gs in (("tensor", None), ("channel", None), ("group", 32), ("group", 100))
]


# -- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (2, 9), (4, 577), (0, 5), (13,)])
def test_pack_unpack_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + sum(shape))
    codes = torch.randint(0, 2**bits, shape, generator=g)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packing.packed_row_bytes(shape[-1], bits)
    assert torch.equal(packing.unpack(packed, bits, shape[-1]), codes.to(torch.int32))


def test_pack_layout_is_little_endian_runs():
    # 4-bit: codes 1,2 -> byte 0x21; 3-bit: codes 0..7 form the 24-bit word 0o76543210
    assert packing.pack(torch.tensor([[1, 2]]), 4).tolist() == [[0x21, 0, 0, 0]]
    word = sum(j << (3 * j) for j in range(8))
    assert packing.pack(torch.arange(8)[None], 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]
    assert packing.pack(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1]]), 1).tolist() == [[0b10001101]]


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_pack_in_row_chunks_equals_one_pass(bits, monkeypatch):
    # a large weight is packed a few rows at a time (bounded int64 work tensors): same bytes, and
    # the offset form (signed integers + code offset) equals adding the offset first
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (37, 45), generator=g, dtype=torch.int32)
    whole = packing.pack(codes, bits)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 100)  # 2 rows per step
    assert torch.equal(packing.pack(codes, bits), whole)
    signed = codes - 2 ** (bits - 1)
    assert torch.equal(packing.pack(signed, bits, offset=2 ** (bits - 1)), whole)
    with pytest.raises(LowbitError, match="out of range"):
        packing.pack(signed, bits)


def test_pack_rejects_out_of_range():
    with pytest.raises(LowbitError, match="out of range"):
        packing.pack(torch.tensor([[16]]), 4)
    with pytest.raises(LowbitError, match="1 to 8 bits"):
        packing.pack(torch.tensor([[1]]), 9)


def test_packed_size_is_exactly_bits_per_value():
    # 1000 3-bit values -> 125 runs of 8 -> 375 bytes = 3000 bits
    assert packing.pack(torch.zeros(2, 1000, dtype=torch.long), 3).shape == (2, 375)


# -- schemes -------------------------------------------------------------------------------------
def test_integer_ranges_full_and_restricted():
    assert (QuantScheme(8, True).qmin, QuantScheme(8, True).qmax) == (-128, 127)
    r = QuantScheme(8, True, restricted_range=True)
    assert (r.qmin, r.qmax) == (-127, 127)
    assert (QuantScheme(4, False).qmin, QuantScheme(4, False).qmax) == (0, 15)
    assert (QuantScheme(4, False, restricted_range=True).qmin, QuantScheme(4, False, restricted_range=True).qmax) == (0, 14)
    assert (QuantScheme(3, True).qmin, QuantScheme(3, True).qmax) == (-4, 3)


@pytest.mark.parametrize("kw,msg", [
    (dict(bits=1), "bits must be"), (dict(bits=9), "bits must be"), (dict(group_size=0), "group size"),
    (dict(group_size=-5), "group size"), (dict(granularity="row"), "granularity"),
])
def test_bad_schemes_raise_one_line(kw, msg):
    with pytest.raises(LowbitError, match=msg) as e:
        QuantScheme(**kw)
    assert "\n" not in str(e.value)


def test_scheme_from_args():
    assert scheme_from_args(4, -1).granularity == "channel"
    assert scheme_from_args(4, None).granularity == "channel"
    assert scheme_from_args(4, 64, asym=True) == QuantScheme(4, False, "group", 64)
    with pytest.raises(LowbitError):
        scheme_from_args(4, 0)


# -- primitives ----------------------------------------------------------------------------------
def test_restricted_vs_full_range_values():
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]])
    full = QuantScheme(8, True, "tensor", scale_dtype="float32")
    rest = QuantScheme(8, True, "tensor", restricted_range=True, scale_dtype="float32")
    sf, _ = primitives.choose_qparams(x, full)
    sr, _ = primitives.choose_qparams(x, rest)
    assert sf.item() == pytest.approx(1 / 127.5)
    assert sr.item() == pytest.approx(1 / 127)
    assert primitives.quantize(x, sr, None, rest).tolist() == [[-127, -64, 0, 32, 127]]
    # full range: +1 -> 127.5 clamped to 127, 0.25 -> round(31.875) = 32; -1 sits at -127.5 exactly
    # (a tie) and -1.003 clearly uses the extra level -128 that the restricted range lacks
    assert primitives.quantize(x, sf, None, full).tolist()[0][1:] == [-64, 0, 32, 127]
    assert primitives.quantize(torch.tensor([[-1.003]]), sf, None, full).item() == -128
    assert primitives.quantize(torch.tensor([[-1.003]]), sr, None, rest).item() == -127


def test_asymmetric_hand_computed():
    s = QuantScheme(8, False, "tensor", scale_dtype="float32")
    x = torch.tensor([[0.0, 1.0, 2.55]])  # min widened to 0: scale 0.01, zero-point 0
    sc, z = primitives.choose_qparams(x, s)
    assert sc.item() == pytest.approx(0.01) and z.item() == 0
    assert primitives.quantize(x, sc, z, s).tolist() == [[0, 100, 255]]
    x = torch.tensor([[-1.0, 0.0, 3.0]])  # scale 4/255, z = round(0 - (-1)/(4/255)) = round(63.75) = 64
    sc, z = primitives.choose_qparams(x, s)
    assert sc.item() == pytest.approx(4 / 255) and z.item() == 64


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.short_name())
def test_error_bound_and_zero_exact(scheme):
    g = torch.Generator().manual_seed(scheme.bits)
    W = torch.randn(6, 250, generator=g) * torch.rand(6, 1, generator=g) * 3
    if not scheme.symmetric:
        W[2] = W[2].abs() + 0.5  # an all-positive row: range is widened to include 0
    W[:, 7] = 0.0  # zeros must come back exactly
    s, z = primitives.choose_qparams(W, scheme)
    q = primitives.quantize(W, s, z, scheme)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    W_hat = primitives.dequantize(q, s, z, scheme)
    if scheme.zero_point == "int":
        assert torch.all(W_hat[:, 7] == 0.0)
    # every weight lies within half a step of its reconstruction (its slice's scale)
    n, gl = primitives.group_layout(tuple(W.shape), scheme)
    if scheme.granularity == "tensor":
        step = s.expand(W.shape)
    else:
        step = s.repeat_interleave(gl, dim=1)[:, : W.shape[1]]
    assert torch.all((W - W_hat).abs() <= step / 2 * (1 + 1e-4) + 1e-7)


def test_ragged_last_group_stays_in_its_row():
    # 576 columns, group 128: 5 groups per row, the last one 64 wide
    s = QuantScheme(4, True, "group", 128, restricted_range=True, scale_dtype="float32")  # absmax / 7
    W = torch.full((2, 576), 7.0)
    W[0, 512:] = 700.0  # only row 0's last group is large
    sc, _ = primitives.choose_qparams(W, s)
    assert sc.shape == (2, 5)
    assert sc[0, 4].item() == 100.0 and sc[1, 4].item() == 1.0
    assert sc[0, :4].tolist() == [1.0] * 4
    assert torch.equal(primitives.fake_quantize(W, s), W)  # both values sit exactly on their grids
    # a row-crossing grouping (flattening rows) would have put 700 into row 1's groups:
    assert torch.equal(primitives.fake_quantize(W, s)[1], torch.full((576,), 7.0))


def test_fp16_scales_are_what_is_used():
    s = QuantScheme(4, True, "group", 32)  # float16 scales
    W = torch.randn(8, 96)
    fmt = AffineWeight.quantize_rtn(W, s)
    assert fmt.scales.dtype == torch.float16
    sc, _ = primitives.choose_qparams(W, s)
    assert torch.equal(sc, fmt.scales.float())
    assert torch.equal(fmt.dequantize(), primitives.fake_quantize(W, s))


@pytest.mark.parametrize("scheme", [QuantScheme(4, True, "group", 128), QuantScheme(3, False, "group", 128),
                                    QuantScheme(8, True, "channel"), QuantScheme(2, False, "tensor")],
                         ids=lambda s: s.short_name())
def test_affine_weight_pack_round_trip_and_bits(scheme):
    W = torch.randn(33, 576)
    fmt = AffineWeight.quantize_rtn(W, scheme)
    s, z = primitives.choose_qparams(W, scheme)
    assert torch.equal(fmt.integers(), primitives.quantize(W, s, z, scheme))
    if z is not None:
        assert torch.equal(fmt.zero_points(), z.to(torch.int32))
    n_groups = 1 if scheme.granularity != "group" else math.ceil(576 / 128)
    rows_with_scales = 1 if scheme.granularity == "tensor" else 33
    expect_bytes = 33 * math.ceil(576 / 8) * scheme.bits + rows_with_scales * n_groups * 2
    if not scheme.symmetric:
        expect_bytes += rows_with_scales * math.ceil(n_groups / 8) * scheme.bits
    assert fmt.nbytes == expect_bytes
    again = AffineWeight.from_tensors(fmt.tensors(), fmt.meta())
    assert torch.equal(again.dequantize(), fmt.dequantize())


def test_nan_weights_are_refused():
    W = torch.randn(4, 4)
    W[1, 2] = float("nan")
    with pytest.raises(LowbitError, match="NaN/Inf"):
        primitives.check_finite(W, "layer.weight")


def test_rtn_error_shrinks_with_bits():
    W = torch.randn(64, 512)
    errs = [(primitives.fake_quantize(W, QuantScheme(b, True, "group", 128)) - W).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > 3 * b for a, b in zip(errs, errs[1:]))  # each extra bit ~4x less MSE


@pytest.mark.parametrize("scheme", ALL_SCHEMES[::3] + [QuantScheme(4, False, "group", 128), QuantScheme(4, True, "group", 64)],
                         ids=lambda s: s.short_name())
def test_fast_dequantize_equals_formula_exactly(scheme):
    W = torch.randn(9, 576) * 2
    fmt = AffineWeight.quantize_rtn(W, scheme)
    ref = primitives.dequantize(fmt.integers(), fmt.scales.float(), fmt.zero_points(), scheme)
    assert torch.equal(fmt.dequantize(), ref)


def test_float_zero_point_spans_min_to_max():
    s = QuantScheme(4, False, "group", 4, zero_point="float", scale_dtype="float32")
    W = torch.tensor([[1.0, 1.6, 2.0, 4.0, -3.0, -1.0, 0.0, 0.75]])
    sc, z = primitives.choose_qparams(W, s)
    assert sc[0].tolist() == pytest.approx([0.2, 0.25])
    assert z[0].tolist() == pytest.approx([-5.0, 12.0])  # z = -min / s
    q = primitives.quantize(W, sc, z, s)
    assert q.tolist() == [[0, 3, 5, 15, 0, 8, 12, 15]]
    W_hat = primitives.dequantize(q, sc, z, s)
    assert W_hat[0, 0].item() == pytest.approx(1.0) and W_hat[0, 3].item() == pytest.approx(4.0)
    fmt = AffineWeight.quantize_rtn(W, s)
    assert fmt.qzeros is None and fmt.zeros is not None
    assert torch.equal(AffineWeight.from_tensors(fmt.tensors(), fmt.meta()).dequantize(), fmt.dequantize())
    assert torch.equal(fmt.dequantize(), primitives.dequantize(fmt.integers(), fmt.scales.float(), fmt.zero_points(), s))


def test_float_zero_short_last_group_is_not_widened_by_padding():
    s = QuantScheme(4, False, "group", 4, zero_point="float", scale_dtype="float32")
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.5, 5.6]])  # last group: [5.5, 5.6], 2 wide
    sc, z = primitives.choose_qparams(W, s)
    assert sc[0, 1].item() == pytest.approx(0.1 / 15, rel=1e-5)
    W_hat = primitives.fake_quantize(W, s)
    assert (W_hat - W).abs().max().item() < 0.1 / 15


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_float_zero_constant_group_comes_back(scale_dtype):
    s = QuantScheme(4, False, "group", 4, zero_point="float", scale_dtype=scale_dtype)
    W = torch.tensor([[0.3, 0.3, 0.3, 0.3, -2.0, -2.0, -2.0, -2.0, 0.0, 0.0, 0.0, 0.0]])
    W_hat = AffineWeight.quantize_rtn(W, s).dequantize()
    torch.testing.assert_close(W_hat, W, rtol=2e-3, atol=1e-6)


def test_holds_code_finds_a_code_in_every_position_of_the_byte():
    from lowbit.core import packing

    for bits in (1, 2, 4):
        for j in range(8 // bits):
            codes = torch.zeros(1, 8 // bits, dtype=torch.uint8)
            codes[0, j] = (1 << bits) - 1
            p = packing.pack(codes, bits)
            assert packing.holds_code(p, bits, (1 << bits) - 1) and not packing.holds_code(p, bits, 1 if bits > 1 else 2)
    with pytest.raises(LowbitError, match="1, 2 or 4"):
        packing.holds_code(torch.zeros(1, dtype=torch.uint8), 3, 0)
