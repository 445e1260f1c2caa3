"""QAT: the straight-through estimator's gradient, observers that keep updating while training,
conversion of a QAT-trained model to the integer model, and the digits classifier claims
(static int8 within 1 point of fp32; QAT at 4 bits beats PTQ at 4 bits)."""

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from lowbit.algorithms.static_int8 import StaticInt8Config  # noqa: E402
from lowbit.cnn.ptq import quantize_static  # noqa: E402
from lowbit.cnn.qat import QATConfig, convert_qat, prepare_qat, qat, train_qat  # noqa: E402
from lowbit.core.scheme import QuantScheme  # noqa: E402
from lowbit.core.ste import fake_quantize, fake_quantize_weight  # noqa: E402
from lowbit.models.digits import accuracy, digits_cnn, digits_split, train  # noqa: E402


def test_fake_quantize_values_and_ste_gradient():
    # scale 0.5, zero 2, grid [0, 10]: real range [-1, 4]
    x = torch.tensor([-2.0, -1.0, -0.26, 0.0, 0.3, 1.24, 4.0, 4.3, 7.0], requires_grad=True)
    y = fake_quantize(x, 0.5, 2.0, 0, 10)
    assert y.tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 4.0, 4.0, 4.0]
    w = torch.arange(1.0, 10.0)
    (y * w).sum().backward()
    # identity inside the clipping range, zero where round(x / s) + z falls outside [qmin, qmax]
    # (4.3 -> round(8.6) + 2 = 11 > 10 is clipped; -1.0 -> 0 is the edge, kept)
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0.0])
    assert torch.equal(x.grad, w * inside)


def test_weight_fake_quant_gradient_is_straight_through():
    torch.manual_seed(0)
    W = (torch.randn(4, 6) * 0.3).requires_grad_()
    W.data[0, 0] = W.data[0].abs().max() + 0.1  # a positive channel maximum: the full-range grid clips it
    Wq, s = fake_quantize_weight(W, 4, restricted=False)
    assert s.shape == (4,)
    assert float(Wq[0, 0].detach()) == pytest.approx(7 * float(s[0])) and float(W[0, 0].detach()) == pytest.approx(7.5 * float(s[0]))
    # plain STE for weights: the gradient passes unchanged, the clipped maximum included
    g = torch.randn(4, 6)
    Wq.backward(g)
    assert torch.equal(W.grad, g)
    # codes: Wq / s is an integer in [-8, 7]
    k = Wq.detach() / s[:, None]
    assert torch.allclose(k, k.round(), atol=1e-5) and k.min() >= -8 and k.max() <= 7


def test_observers_keep_updating_during_training_and_convert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    X = torch.randn(256, 5)
    y = torch.randint(0, 3, (256,))
    cfg = QATConfig(bits=8, epochs=2, batch_size=32, warmup_batches=1, observer="moving-minmax",
                    averaging_constant=0.5)
    fq = prepare_qat(model, cfg, warmup_data=X)
    obs = fq.quantizers()[1].observer
    before = (float(obs.min), float(obs.max))
    train_qat(fq, X * 3.0, y, cfg)  # a shifted input range: the observers must follow it
    after = (float(obs.min), float(obs.max))
    assert after != before
    assert float(fq.quantizers()[0].observer.max) > 2.0 * float(X.max())
    # the original float model is untouched
    assert not torch.equal(model[0].weight, fq.layers[0].layer.weight)
    qm = convert_qat(fq)
    with torch.no_grad():
        y_int, y_fq = qm(X), fq(X)
    lsb = qm[-1].aq.scale
    assert float((y_int - y_fq).abs().max()) <= 2 * lsb + 1e-6


@pytest.fixture(scope="module")
def digits():
    Xtr, ytr, Xte, yte = digits_split(seed=0)
    model = train(digits_cnn(seed=0), Xtr, ytr, epochs=10, seed=0)
    return model, Xtr, ytr, Xte, yte


def _scheme(bits):
    return QuantScheme(bits=bits, symmetric=False, granularity="channel", scale_dtype="float32")


def test_digits_static_int8_within_one_point_and_qat4_beats_ptq4(digits):
    model, Xtr, ytr, Xte, yte = digits
    fp32 = accuracy(model, Xte, yte)
    assert fp32 > 93.0
    calib = Xtr[:200]
    for obs in ("minmax", "entropy"):
        qm, _ = quantize_static(model, calib, StaticInt8Config(scheme=_scheme(8), observer=obs))
        assert abs(accuracy(qm, Xte, yte) - fp32) <= 1.0, obs
    ptq4 = max(accuracy(quantize_static(model, calib, StaticInt8Config(scheme=_scheme(4), observer=o))[0], Xte, yte)
               for o in ("minmax", "mse"))
    qm4, fq4 = qat(model, Xtr, ytr, QATConfig(bits=4, seed=0))
    qat4 = accuracy(qm4, Xte, yte)
    assert qat4 > ptq4, (qat4, ptq4)
    # the integer model and its fake-quant twin classify alike
    with torch.no_grad():
        agree = float((qm4(Xte).argmax(-1) == fq4(Xte).argmax(-1)).float().mean())
    assert agree >= 0.98


def test_cli_qat_digits(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "int.pt"
    assert main(["qat", "--bits", "8", "--epochs", "2", "--qat-epochs", "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fp32" in text and "QAT W8A8 -> integer" in text
    qm = torch.load(out, weights_only=False)
    assert qm.int_forward(torch.rand(2, 1, 8, 8)).dtype == torch.int8
    assert main(["qat", "smollm2-135m"]) == 2  # an LLM's QAT writes a checkpoint: -o is needed
    assert "give the output directory" in capsys.readouterr().err
