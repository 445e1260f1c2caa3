"""The affine grid (lowbit.core.grid): bit-exact with the implementation it replaced, ragged groups,
symmetric / asymmetric / float zero-points, restricted ranges, per-tensor / channel / group, and
the fp16 storage rounding of scales and zero-points."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.core import grid
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from tests.reference import primitives_v0 as v0

SHAPES = [(8, 576), (5, 100), (3, 7), (4, 256)]          # 576 = 4·128 + 64: a ragged last group
GRAN = [("tensor", None), ("channel", None), ("group", 128), ("group", 48), ("group", 32), ("group", 1000)]
ZERO = [(True, "int"), (False, "int"), (False, "float")]


def _schemes():
    for bits, (gran, gs), (sym, zp), restricted, sd in itertools.product(
            (2, 3, 4, 8), GRAN, ZERO, (False, True), ("float16", "float32")):
        yield QuantScheme(bits=bits, symmetric=sym, granularity=gran, group_size=gs, restricted_range=restricted,
                          scale_dtype=sd, zero_point=zp)


SCHEMES = list(_schemes())


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    W[0, : cols // 2] = W[0, : cols // 2].abs() + 0.5            # one-signed stretches (ranges without 0)
    if rows > 2:
        W[1] = 0.0                                                 # an all-zero row
        W[2] = 0.75                                                # a constant row
    return W


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.short_name()}-{s.scale_dtype[-2:]}")
def test_grid_equals_the_old_primitives_bit_for_bit(scheme):
    for k, shape in enumerate(SHAPES):
        W = _weights(shape, k)
        s, z = grid.choose_qparams(W, scheme)
        s0, z0 = v0.choose_qparams(W, scheme)
        assert _same(s, s0) and _same(z, z0)
        q = grid.quantize(W, s, z, scheme)
        assert _same(q, v0.quantize(W, s0, z0, scheme))
        assert _same(grid.dequantize(q, s, z, scheme), v0.dequantize(q, s0, z0, scheme))
        assert _same(grid.fake_quantize(W, scheme), v0.fake_quantize(W, scheme))
        lo, hi = torch.randn(5), torch.randn(5).abs() + 1
        assert all(_same(a, b) for a, b in zip(grid.qparams_from_range(lo, hi, scheme),
                                               v0.qparams_from_range(lo, hi, scheme)))


@pytest.mark.parametrize("scheme", SCHEMES[::5], ids=lambda s: f"{s.short_name()}-{s.scale_dtype[-2:]}")
def test_fake_quantize_is_dequantize_of_quantize_in_every_form(scheme):
    W = _weights((6, 576), 3)
    s, z = grid.choose_qparams(W, scheme)
    q = grid.quantize(W, s, z, scheme)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax and q.dtype == torch.int32
    W_hat = grid.dequantize(q, s, z, scheme)
    assert torch.equal(grid.fake_quantize(W, scheme), W_hat)
    # the grouped view, as the searches use it (rows kept for per-tensor too)
    Wg = grid.grouped(W, scheme, by_row=True)
    assert torch.equal(grid.ungrouped(grid.fake_quantize_grouped(Wg, s, z, scheme), W.shape), W_hat)
    # column by column with the rows' qparams, as GPTQ's loop rounds
    n, g = grid.group_layout(tuple(W.shape), scheme)
    for c in (0, 127, 128, 575):
        gi = c // g if scheme.granularity == "group" else 0
        qc, wc = grid.round_to_grid(W[:, c], s[:, gi], None if z is None else z[:, gi], scheme)
        assert torch.equal(qc, q[:, c].float()) and torch.equal(wc, W_hat[:, c])
    # bf16 in, bf16 out, same grid
    Wb = W.bfloat16()
    assert torch.equal(grid.fake_quantize(Wb, scheme), grid.fake_quantize(Wb.float(), scheme).bfloat16())


def test_ragged_last_group_uses_only_its_real_entries():
    scheme = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=128, zero_point="float",
                         scale_dtype="float32")
    W = torch.randn(3, 576)
    W[:, 512:] = torch.linspace(1.0, 2.0, 64)                        # the 64-column tail: all in [1, 2]
    assert grid.group_layout((3, 576), scheme) == (5, 128)
    assert grid.scale_shape((3, 576), scheme) == (3, 5)
    Wg = grid.grouped(W, scheme)
    assert Wg.shape == (3, 5, 128) and torch.equal(Wg[:, 4, 64:], torch.zeros(3, 64))
    valid = grid.valid_mask((3, 576), scheme, Wg)
    assert valid.shape == (5, 128) and int(valid.sum()) == 576 and int(valid[4].sum()) == 64
    lo, hi = grid.slice_range(Wg, scheme, valid)
    assert torch.equal(lo[:, 4], torch.ones(3)) and torch.equal(hi[:, 4], torch.full((3,), 2.0))
    s, z = grid.choose_qparams(W, scheme)
    assert torch.allclose(s[:, 4], torch.full((3,), 1 / 15)) and torch.allclose(z[:, 4], torch.full((3,), -15.0))
    # the tail's ends come back exactly at the grid's ends; padding never reaches the weight
    W_hat = grid.fake_quantize(W, scheme)
    assert W_hat.shape == W.shape
    torch.testing.assert_close(W_hat[:, 512], W[:, 512]) and torch.testing.assert_close(W_hat[:, -1], W[:, -1])
    # a group longer than the row is one short group per row: per-channel in disguise
    big = QuantScheme(bits=4, granularity="group", group_size=1000)
    assert torch.equal(grid.fake_quantize(W, big), grid.fake_quantize(W, QuantScheme(bits=4, granularity="channel")))


@pytest.mark.parametrize("restricted", [False, True])
def test_symmetric_scales_and_restricted_range(restricted):
    scheme = QuantScheme(bits=8, symmetric=True, granularity="channel", restricted_range=restricted,
                         scale_dtype="float32")
    assert (scheme.qmin, scheme.qmax) == ((-127, 127) if restricted else (-128, 127))
    W = torch.tensor([[-2.54, 1.0, 0.0], [0.5, -0.25, 0.125]])
    s, z = grid.choose_qparams(W, scheme)
    assert z is None
    step = 127.0 if restricted else 127.5
    assert torch.equal(s, torch.tensor([[2.54 / step], [0.5 / step]]))
    q = grid.quantize(W * 1.01, s, None, scheme)                 # row 0 reaches -128.8 steps
    assert int(q.min()) == (-127 if restricted else -128) and int(q.max()) == 127  # full: the extra level
    asym = QuantScheme(bits=4, symmetric=False, granularity="tensor", restricted_range=restricted)
    assert asym.qmax == (14 if restricted else 15)
    s, z = grid.choose_qparams(W, asym)
    assert s.shape == (1, 1) and z.shape == (1, 1) and float(z) == torch.round(torch.tensor(2.54) / s).item()
    assert float(grid.fake_quantize(W, asym)[0, 2]) == 0.0         # 0 is on an integer zero-point grid


def test_granularity_shapes():
    W = torch.randn(6, 100)
    for scheme, shape in [(QuantScheme(granularity="tensor"), (1, 1)), (QuantScheme(granularity="channel"), (6, 1)),
                          (QuantScheme(granularity="group", group_size=32), (6, 4))]:
        s, _ = grid.choose_qparams(W, scheme)
        assert s.shape == shape == grid.scale_shape((6, 100), scheme)
        assert grid.grouped(W, scheme).shape[:-1] == shape or scheme.granularity == "tensor"
    assert grid.grouped(W, QuantScheme(granularity="tensor")).shape == (1, 1, 600)
    assert grid.grouped(W, QuantScheme(granularity="tensor"), by_row=True).shape == (6, 1, 100)
    with pytest.raises(LowbitError, match="2-D"):
        grid.grouped(torch.zeros(2, 3, 4), QuantScheme())
    with pytest.raises(LowbitError, match="2-D"):
        grid.dequantize(torch.zeros(4), torch.ones(1, 1), None, QuantScheme(granularity="tensor"))


def test_storage_rounding_of_scales_and_zero_points():
    fp16, fp32 = QuantScheme(scale_dtype="float16"), QuantScheme(scale_dtype="float32")
    x = torch.tensor([1 / 3, 1e5, -1e5, 1e-9, 0.0])
    assert torch.equal(grid.stored(x, fp32), x)
    assert torch.equal(grid.stored(x, fp16), torch.tensor([1 / 3, 65504.0, -65504.0, 1e-9, 0.0]).half().float())
    s = grid.round_scale(torch.tensor([0.0, 1e-9, 1 / 3, 1e6]), fp16)
    assert torch.equal(s, torch.tensor([2.0**-24, 2.0**-24, float(torch.tensor(1 / 3).half()), 65504.0]))
    assert torch.equal(grid.round_scale(torch.tensor([0.0, 1 / 3]), fp32), torch.tensor([grid.TINY, 1 / 3]))
    # an all-zero slice: the smallest scale, codes at the zero-point, and back to exactly 0
    for scheme in (QuantScheme(bits=4), QuantScheme(bits=4, symmetric=False),
                   QuantScheme(bits=4, symmetric=False, zero_point="float")):
        W = torch.zeros(2, 256)
        assert torch.equal(grid.fake_quantize(W, scheme), W)
    # float zero-points are stored like the scales
    fz = QuantScheme(bits=4, symmetric=False, zero_point="float", granularity="channel")
    _, z = grid.choose_qparams(torch.tensor([[0.1, 0.7, 0.31]]), fz)
    assert torch.equal(z, z.half().float())


@pytest.mark.parametrize("scheme", SCHEMES[::7], ids=lambda s: f"{s.short_name()}-{s.scale_dtype[-2:]}")
def test_the_differentiable_fake_quantization_is_the_grid_bit_for_bit(scheme):
    W = _weights((6, 576), 5)
    s, z = grid.choose_qparams(W, scheme)
    s = grid.round_scale(s * 0.5, scheme)                        # a narrower grid: some weights clip
    Wg = grid.grouped(W, scheme).clone().requires_grad_(True)
    got = grid.fake_quantize_ste(Wg, s, z, scheme)
    assert torch.equal(got, grid.fake_quantize_grouped(Wg.detach(), s, z, scheme))
    G = torch.randn_like(got)
    (got * G).sum().backward()
    u = grid.round_scaled(Wg.detach() / s.unsqueeze(-1), None if z is None else z.unsqueeze(-1), scheme, clamp=False)
    inside = (u >= scheme.qmin) & (u <= scheme.qmax)
    assert not inside.all() and inside.any()
    assert torch.equal(Wg.grad, G * inside)                        # the clipped STE, exactly


def test_stored_ste_rounds_like_a_checkpoint_and_passes_the_gradient():
    fp16 = QuantScheme(scale_dtype="float16")
    x = torch.tensor([1 / 3, 1e-9, 1e6, -0.1], requires_grad=True)
    s = grid.stored_ste(x, fp16, is_scale=True)
    assert torch.equal(s, grid.round_scale(x.detach(), fp16))
    z = grid.stored_ste(x, fp16, is_scale=False)
    assert torch.equal(z, grid.stored(x.detach(), fp16))
    (s.sum() + 2 * z.sum()).backward()
    assert torch.equal(x.grad, torch.full((4,), 3.0))
