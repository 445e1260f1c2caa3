"""The LLM fake-quant layer (lowbit.training.fake_quant) and the trainable views of packed layers
(lowbit.training.tunable): the straight-through estimator and LSQ's scale gradient against hand
computations, RTN at init, the packed layer's output at init, and write-back bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import grid
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.base import WeightFormat
from lowbit.formats.incoherent import IncoherentAffineWeight
from lowbit.nn.linear import QuantizedLinear
from lowbit.training.fake_quant import FakeQuantLinear
from lowbit.training.tunable import TunableAffine, make_trainable, restore, trainable_parameters

SCHEMES = [
    QuantScheme(bits=4, group_size=32),                                             # 100 columns: 32, 32, 32, 4
    QuantScheme(bits=3, symmetric=False, group_size=48),
    QuantScheme(bits=2, symmetric=False, zero_point="float", group_size=40),
    QuantScheme(bits=8, granularity="channel", restricted_range=True),
    QuantScheme(bits=4, symmetric=False, granularity="tensor", scale_dtype="float32"),
    QuantScheme(bits=5, symmetric=False, zero_point="float", granularity="channel", scale_dtype="float32"),
]
IDS = [s.short_name() for s in SCHEMES]


def _linear(seed=0, out=24, inp=100, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out, 1) * 3)
    return lin


# -- the straight-through estimator and LSQ, by hand ---------------------------------------------
# weights / 0.1 (+ a zero-point of 4 for the asymmetric 3-bit grid [0, 7]; [-4, 3] symmetric):
#   1.2  -3.3  2.9  3.6  -4.4  -4.6  20  0     rounded: 1 -3 3 4 -4 -5 20 0
ROW = [0.12, -0.33, 0.29, 0.36, -0.44, -0.46, 2.0, 0.0]
INSIDE = [1, 1, 1, 0, 1, 0, 0, 1]  # 4 > 3 and -5 < -4 (or 8 > 7, -1 < 0 with the zero-point): clipped


@pytest.mark.parametrize("sym,zp", [(True, "int"), (False, "int"), (False, "float")])
@pytest.mark.parametrize("gran,gs", [("channel", None), ("group", 4), ("group", 3)])
def test_ste_is_exactly_identity_inside_and_zero_where_clipped(sym, zp, gran, gs):
    scheme = QuantScheme(bits=3, symmetric=sym, zero_point=zp, granularity=gran, group_size=gs)
    W = torch.tensor([ROW, ROW[3:] + ROW[:3]])                          # the second row: rotated
    mask = torch.tensor([INSIDE, INSIDE[3:] + INSIDE[:3]], dtype=torch.float32)
    shape = grid.scale_shape(tuple(W.shape), scheme)
    m = FakeQuantLinear(W, None, scheme, learn_scale=True, scale=torch.full(shape, 0.1),
                        zero=None if sym else torch.full(shape, 4.0))
    G = torch.randn(2, 8)
    (m.quantized_weight() * G).sum().backward()
    assert torch.equal(m.weight.grad, G * mask)
    assert m.scale.grad is not None and (m.zero is None or not isinstance(m.zero, nn.Parameter)
                                          or m.zero.grad is not None)


def test_lsq_scale_gradient_is_the_papers_formula():
    """Esser et al. 2020, eq. 3: dv^/ds = -v/s + round(v/s) inside, -Q_N / Q_P where clipped; times
    g = 1/sqrt(N_W Q_P) (N_W: weights per scale). (The paper clips v/s before rounding, the grid
    after: the two differ only within half a step beyond the grid's ends, where no weight is here.)"""
    scheme = QuantScheme(bits=4, granularity="channel", scale_dtype="float32")  # Q_N = 8, Q_P = 7
    W = torch.tensor([[0.31, -0.52, 0.77, -0.9, 0.04, 1.3], [0.2, 0.4, -0.11, 0.6, -0.8, 0.0]])
    s0 = torch.tensor([[0.1], [0.09]])
    m = FakeQuantLinear(W, None, scheme, learn_scale=True, scale=s0)
    G = torch.tensor([[0.5, -1.0, 2.0, 0.25, -0.75, 1.5], [1.0, 1.0, -2.0, 0.5, 0.3, -0.1]])
    (m.quantized_weight() * G).sum().backward()
    QN, QP, g = 8, 7, 1 / math.sqrt(6 * 7)
    want = []
    for r in range(2):
        total = 0.0
        for c in range(6):
            v = float(W[r, c]) / float(s0[r, 0])
            d = -QN if v <= -QN else QP if v >= QP else -v + math.floor(v + 0.5)
            total += float(G[r, c]) * d
        want.append([total * g])
    torch.testing.assert_close(m.scale.grad, torch.tensor(want), rtol=1e-6, atol=1e-7)
    m.zero_grad()
    m.grad_scale = False
    (m.quantized_weight() * G).sum().backward()
    torch.testing.assert_close(m.scale.grad, torch.tensor(want) / g, rtol=1e-6, atol=1e-6)


def test_a_float_zero_point_is_trained_where_weights_clip():
    scheme = QuantScheme(bits=3, symmetric=False, zero_point="float", granularity="channel", scale_dtype="float32")
    W = torch.tensor([ROW])
    m = FakeQuantLinear(W, None, scheme, learn_scale=True, scale=torch.tensor([[0.1]]), zero=torch.tensor([[4.0]]))
    G = torch.randn(1, 8)
    (m.quantized_weight() * G).sum().backward()
    clipped = 1 - torch.tensor([INSIDE], dtype=torch.float32)
    torch.testing.assert_close(m.zero.grad, (G * clipped * -0.1).sum(-1, keepdim=True))


# -- the layer against RTN, the packed layer and its write-back ----------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_from_linear_is_rtn_at_init(scheme):
    lin = _linear()
    x = torch.randn(3, 5, 100)
    m = FakeQuantLinear.from_linear(lin, scheme)
    rtn = AffineWeight.quantize_rtn(lin.weight.detach(), scheme)
    assert torch.equal(m.quantized_weight(), rtn.dequantize())
    assert torch.equal(m(x), F.linear(x, rtn.dequantize(), lin.bias))
    assert m.original is lin and m.to_format().qweight.equal(rtn.qweight)
    learned = FakeQuantLinear.from_linear(lin, scheme, learn_scale=True)   # LSQ starts at the same grid
    assert torch.equal(learned.quantized_weight(), rtn.dequantize())


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_from_affine_computes_the_packed_layer_and_writes_back_exactly(scheme):
    lin = _linear(1)
    fmt = AffineWeight.quantize_rtn(lin.weight.detach(), scheme)
    q = QuantizedLinear(fmt, lin.bias)
    m = FakeQuantLinear.from_affine(q)
    x = torch.randn(4, 100)
    with torch.no_grad():
        torch.testing.assert_close(m(x), q(x), rtol=0, atol=2e-6)
    back = m.to_format()                                                    # untrained: the same bits
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), fmt.tensors().values()))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)                        # a few steps towards a target
    target = torch.randn(4, 24)
    for _ in range(5):
        opt.zero_grad()
        (m(x) - target).pow(2).mean().backward()
        opt.step()
    tuned = m.to_format()
    assert not torch.equal(tuned.qweight, fmt.qweight) or not torch.equal(tuned.scales, fmt.scales)
    with torch.no_grad():
        assert torch.equal(tuned.dequantize(), m.quantized_weight())
    tensors, meta = tuned.to_state_dict()                                   # and through its stored form
    again = WeightFormat.from_state_dict({k: t.clone() for k, t in tensors.items()}, meta)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), tuned.tensors().values()))
    assert again.scheme == tuned.scheme and torch.equal(again.dequantize(), tuned.dequantize())


def test_from_affine_refuses_other_formats():
    fmt = AffineWeight.quantize_rtn(torch.randn(16, 32), QuantScheme(bits=4, group_size=16))
    q = QuantizedLinear(IncoherentAffineWeight.wrap(fmt, 3))
    with pytest.raises(LowbitError, match="affine"):
        FakeQuantLinear.from_affine(q)


# -- the trainable views -------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_tunable_affine_keeps_the_codes_and_changes_only_the_scales(scheme):
    lin = _linear(2)
    fmt = AffineWeight.quantize_rtn(lin.weight.detach(), scheme)
    q = QuantizedLinear(fmt, lin.bias)
    t = TunableAffine(q)
    x = torch.randn(6, 100)
    with torch.no_grad():
        torch.testing.assert_close(t(x), q(x), rtol=0, atol=2e-6)
    opt = torch.optim.Adam([t.scale] + ([t.zero] if isinstance(t.zero, nn.Parameter) else []), lr=1e-2)
    target = torch.randn(6, 24)
    for _ in range(3):
        opt.zero_grad()
        (t(x) - target).pow(2).mean().backward()
        opt.step()
    tuned = t.weight_format()
    assert torch.equal(tuned.qweight, fmt.qweight)                              # codes bit-identical
    assert not torch.equal(tuned.scales, fmt.scales)
    if fmt.qzeros is not None:
        assert torch.equal(tuned.qzeros, fmt.qzeros)                            # integer zero-points too
    with torch.no_grad():
        assert torch.equal(tuned.dequantize(), t.quantized_weight())


def test_make_trainable_and_restore_on_a_whole_module():
    torch.manual_seed(0)
    scheme = QuantScheme(bits=4, symmetric=False, group_size=16)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 8))
    ref = [l.weight.detach().clone() for l in (model[0], model[2])]
    model[0] = QuantizedLinear(AffineWeight.quantize_rtn(ref[0], scheme), model[0].bias)
    model[2] = QuantizedLinear(IncoherentAffineWeight.wrap(AffineWeight.quantize_rtn(ref[1], scheme), 1))
    originals = (model[0], model[2])
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = model(x)
    for mode in ("scales", "latent"):
        st = make_trainable(model, mode)
        assert list(st) == ["0"] and st.skipped == {"2": "affine-incoherent"}
        assert isinstance(model[0], TunableAffine if mode == "scales" else FakeQuantLinear)
        assert model[0].original is originals[0] and model[2] is originals[1]
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        params = trainable_parameters(st)
        assert params and all(p.requires_grad for p in params)
        with torch.no_grad():
            params[0].mul_(1.5)
        assert restore(model, st, keep=False) == {}                          # discarded: the originals back
        assert model[0] is originals[0] and model[2] is originals[1]
    st = make_trainable(model)                                               # trained and kept
    assert isinstance(model[0], TunableAffine)                                # "auto": the scales view
    opt = torch.optim.Adam(trainable_parameters(st), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        trained = model(x)
    tuned = restore(model, st, keep=True)
    assert set(tuned) == {"0"} and isinstance(model[0], QuantizedLinear) and model[0] is not originals[0]
    assert model[0].weight_format.tensors().keys() == tuned["0"].tensors().keys()
    assert not torch.equal(model[0].bias, originals[0].bias)                   # the bias is trained too
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=0, atol=1e-5)
    with pytest.raises(LowbitError, match="trainable view"):
        make_trainable(model, "codes")
