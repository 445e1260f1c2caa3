"""BitLinear (BitNet 1-bit and b1.58): the forward against the papers' formulas on numbers worked
out by hand and by a naive loop, the straight-through gradients, convert() on two families, a few
steps of distillation, and the packed ternary weight."""

import copy
import math

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.families import family_of, find_blocks, linear_layers
from lowbit.nn.bitlinear import NORM_EPS, BitLinear, activation_quant, convert, rms_norm
from lowbit.training.kd import KDConfig, distill, named_parameters_of
from lowbit.training.trainer import TrainConfig
from tests.tiny import tiny_gemma3, tiny_llama

# a 2x4 weight and 2 tokens, chosen so that no rounding meets a tie
W = [[0.4, -0.1, 0.0, 0.25],
     [-0.6, 0.05, 0.3, -0.2]]
X = [[1.0, -4.0, 0.6, 0.25],      # gamma 4:   x * 127/4  = 31.75 -127 19.05 7.9375 -> 32 -127 19 8
     [0.3, 0.2, -0.1, 0.5]]       # gamma 0.5: x * 127/0.5 = 76.2 50.8 -25.4 127    -> 76 51 -25 127
BETA0 = 1.9 / 8                   # mean |W| = (0.4+0.1+0+0.25+0.6+0.05+0.3+0.2) / 8 = 0.2375
BETA = 1946 / 2**13               # 0.2375 rounded to float16 (ulp 2^-13 in [0.125, 0.25)): 0.237548828125
GAMMA = [4.0, 0.5]
XQ = [[32, -127, 19, 8], [76, 51, -25, 127]]
# b1.58: W / beta0 = 1.684 -0.421 0 1.053 / -2.526 0.211 1.263 -0.842 -> RoundClip to [-1, 1]
W158 = [[1, 0, 0, 1], [-1, 0, 1, -1]]
# 1-bit: alpha = mean W = 0.1/8 = 0.0125; W - alpha = .3875 -.1125 -.0125 .2375 / -.6125 .0375 .2875 -.2125
W1 = [[1, -1, -1, 1], [-1, 1, 1, -1]]


def _layer(bits, norm, bias=None):
    m = BitLinear(4, 2, bias=bias is not None, bits=bits, norm=norm)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(W))
        if bias is not None:
            m.bias.copy_(torch.tensor(bias))
    return m


def _naive(Wt, beta, x_rows, bias=(0.0, 0.0), norm=False):
    """The papers' formulas, one number at a time (float64): returns (x~, gamma, y)."""
    xq, gammas, y = [], [], []
    for x in x_rows:
        if norm:
            r = math.sqrt(sum(v * v for v in x) / len(x) + NORM_EPS)
            x = [v / r for v in x]
        g = max(abs(v) for v in x)
        q = [max(-127, min(127, round(v * 127 / g))) for v in x]
        xq.append(q)
        gammas.append(g)
        y.append([sum(Wt[o][j] * q[j] for j in range(len(q))) * beta * g / 127 + bias[o] for o in range(len(Wt))])
    return xq, gammas, y


@pytest.mark.parametrize("bits,Wt", [(1.58, W158), (1, W1)])
def test_weight_quantization_by_hand(bits, Wt):
    Wq, beta = _layer(bits, False).quantized_weight()
    assert Wq.tolist() == Wt
    assert float(beta) == BETA  # exactly: the stored scale is a float16 value


def test_activation_quantization_by_hand():
    xq, gamma = activation_quant(torch.tensor(X))
    assert xq.tolist() == XQ
    assert gamma.reshape(-1).tolist() == GAMMA


@pytest.mark.parametrize("bits,Wt,WX", [
    (1.58, W158, [[32 + 8, -32 + 19 - 8], [76 + 127, -76 - 25 - 127]]),                # W~ x~ per token
    (1, W1, [[32 + 127 - 19 + 8, -(32 + 127 - 19 + 8)], [76 - 51 + 25 + 127, -(76 - 51 + 25 + 127)]]),
])
def test_forward_by_hand_without_norm(bits, Wt, WX):
    bias = [0.1, -0.2]
    y = _layer(bits, False, bias)(torch.tensor(X))
    want = [[WX[t][o] * BETA * GAMMA[t] / 127 + bias[o] for o in range(2)] for t in range(2)]
    assert torch.allclose(y, torch.tensor(want), atol=1e-6, rtol=0)
    if bits == 1.58:  # with beta0: 40*.2375*4 = 38, -21*.95 = -19.95, 203*.2375*.5 = 24.10625, -228*.11875 = -27.075
        r = BETA / BETA0  # the float16 rounding of beta scales every output alike
        assert torch.allclose(y, torch.tensor([[38 * r / 127 + 0.1, -19.95 * r / 127 - 0.2],
                                               [24.10625 * r / 127 + 0.1, -27.075 * r / 127 - 0.2]]), atol=1e-6, rtol=0)
    # and the naive loop agrees with the hand-worked numbers
    xq, g, yn = _naive(Wt, BETA, X, bias)
    assert xq == XQ and g == GAMMA
    assert torch.allclose(torch.tensor(yn, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          atol=1e-12, rtol=0)


@pytest.mark.parametrize("bits,Wt", [(1.58, W158), (1, W1)])
def test_forward_with_norm_equals_naive_loop(bits, Wt):
    m = _layer(bits, True)
    x = torch.tensor(X)
    xq_naive, g_naive, y_naive = _naive(Wt, BETA, X, norm=True)
    xq, gamma = activation_quant(rms_norm(x, m.norm_weight))
    assert xq.tolist() == xq_naive
    assert torch.allclose(gamma.reshape(-1).double(), torch.tensor(g_naive, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(m(x).double(), torch.tensor(y_naive, dtype=torch.float64), atol=1e-6, rtol=0)
    with torch.no_grad():  # the gain multiplies the normalised input
        m.norm_weight.copy_(torch.tensor([2.0, 0.5, 1.0, -1.0]))
    # the loop on the normalised input times the gain (RMSNorm(x) * g, not RMSNorm(x * g))
    normed = rms_norm(x, None) * torch.tensor([2.0, 0.5, 1.0, -1.0])
    _, _, y_gain = _naive(Wt, BETA, normed.double().tolist())
    assert torch.allclose(m(x).double(), torch.tensor(y_gain, dtype=torch.float64), atol=1e-6, rtol=0)


def test_activation_clip_maps_absmax_to_127():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 33) * torch.rand(5, 7, 1) * 10
    xq, gamma = activation_quant(x)
    assert torch.equal(xq, xq.round()) and float(xq.abs().max()) == 127
    assert torch.equal(xq.abs().amax(-1), torch.full((5, 7), 127.0))
    i = x.abs().argmax(-1, keepdim=True)
    assert torch.equal(xq.gather(-1, i), 127 * torch.sign(x.gather(-1, i)))
    assert torch.equal(gamma, x.abs().amax(-1, keepdim=True))


@pytest.mark.parametrize("bits", [1.58, 1])
@pytest.mark.parametrize("norm", [False, True])
def test_straight_through_gradients(bits, norm):
    """What is tested: for L = sum(y * R), (1) dL/d(latent W) of BitLinear equals dL/dV of
    F.linear(x_hat, V) + b at V = W~ * beta (a leaf), where x_hat = x~ * gamma / 127 is the
    layer's dequantized activation held constant -- the identity STE on the weight; (2) dL/dx
    (and dL/d gain) equal autograd through x -> RMSNorm(x) * g (when norm) -> the identity in
    place of the activation rounding -> F.linear(., W~ * beta) + b; (3) dL/db is R summed."""
    torch.manual_seed(1)
    m = BitLinear(16, 6, bias=True, bits=bits, norm=norm)
    x = torch.randn(3, 5, 16, requires_grad=True)
    R = torch.randn(3, 5, 6)
    (m(x) * R).sum().backward()

    Wt, beta = m.quantized_weight()
    V = (Wt * beta).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    h = rms_norm(x2, m.norm_weight.detach()) if norm else x2
    xq, gamma = activation_quant(h)
    x_hat = xq * gamma / 127
    (nn.functional.linear(x_hat, V, m.bias.detach()) * R).sum().backward()
    assert torch.allclose(m.weight.grad, V.grad, atol=1e-5, rtol=1e-5)
    x3 = x.detach().clone().requires_grad_(True)
    g3 = m.norm_weight.detach().clone().requires_grad_(True) if norm else None
    h3 = rms_norm(x3, g3) if norm else x3
    xq3, gamma3 = activation_quant(h3)
    h3_ste = h3 + (xq3 * gamma3 / 127 - h3).detach()
    (nn.functional.linear(h3_ste, Wt * beta, m.bias.detach()) * R).sum().backward()
    assert torch.allclose(x.grad, x3.grad, atol=1e-5, rtol=1e-5)
    if norm:
        assert torch.allclose(m.norm_weight.grad, g3.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(m.bias.grad, R.sum((0, 1)), atol=1e-5)


@pytest.mark.parametrize("bits", [1.58, 1])
def test_packed_round_trip(bits):
    torch.manual_seed(2)
    m = BitLinear(37, 9, bits=bits)
    Wt, beta = m.quantized_weight()
    p = m.packed()
    assert torch.equal(p.codes().float(), Wt)
    assert torch.equal(p.dequantize(), Wt * beta)
    if bits == 1:
        assert not bool((p.codes() == 0).any())
    else:
        assert bool((p.codes() == 0).any())


@pytest.mark.parametrize("make,bits", [(tiny_llama, 1.58), (tiny_gemma3, 1)])
def test_convert_replaces_exactly_the_family_projections(make, bits):
    model = make()
    fam = family_of(model)
    layers = convert(model, bits)
    want = {f"{fam.blocks}.{i}.{p}" for i in range(len(find_blocks(model))) for p in fam.projections.values()}
    assert set(layers) == want
    assert all(isinstance(model.get_submodule(n), BitLinear) and model.get_submodule(n) is m
               for n, m in layers.items())
    assert all(not linear_layers(b) for b in find_blocks(model))  # no float linear is left in a block
    assert isinstance(model.get_submodule(fam.lm_head), nn.Linear)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (2, 12, 96) and bool(torch.isfinite(logits).all())
    with pytest.raises(LowbitError):
        convert(model, bits)  # already converted: no nn.Linear to start from
    with pytest.raises(LowbitError):
        convert(make(), 2)


def test_distillation_lowers_the_training_loss():
    torch.set_num_threads(1)
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    layers = convert(student, 1.58)
    windows = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    res = distill(student, teacher, named_parameters_of(layers), windows, None,
                  TrainConfig(steps=5, batch_size=2, lr=1e-3), KDConfig(), progress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_block_linears_is_every_block_linear_by_full_name():
    """The one walk of every block's linear layers (qat.prepare, distill's dense list, magnitude
    pruning use it): full module names in block order; only_plain skips replaced subclasses."""
    from lowbit.models.families import block_linears

    model = tiny_llama()
    got = block_linears(model)
    want = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    assert list(got) == want and len(got) == 3 * 7
    assert all(model.get_submodule(n) is m for n, m in got.items())

    class Sub(nn.Linear):
        pass

    model.model.layers[1].mlp.up_proj = Sub(72, 160)
    assert "model.layers.1.mlp.up_proj" in block_linears(model)
    assert "model.layers.1.mlp.up_proj" not in block_linears(model, only_plain=True)
    assert len(block_linears(model, only_plain=True)) == 20
