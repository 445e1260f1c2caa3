"""QuIP# at 2 bits: the solver beats GPTQ W2 g64 on the Hessian-weighted error at fewer bits, the
E8P format round-trips and validates, and a quantized model saves and reloads with identical logits."""

import pytest
import torch

from lowbit import api, checkpoint
from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.quip import QuIPConfig, layer_seed, quip_quantize
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat
from lowbit.formats.e8p import E8PWeight
from lowbit.models.tiny import tiny_model


def _problem(out=64, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, n, generator=g) @ torch.randn(n, n, generator=g) * 0.1
    X[:, 3] *= 20  # an outlier channel
    W = torch.randn(out, n, generator=g) * 0.05
    return W, 2 * X.T @ X / X.shape[0]


def test_two_bits_beat_gptq_w2_g64():
    W, H = _problem()
    fmt, info = quip_quantize(W, H, QuIPConfig(), seed=5)
    assert fmt.bits_per_weight == pytest.approx(2.0, abs=0.01)
    g, ginfo = gptq_quantize(W, H, GPTQConfig(scheme=QuantScheme(bits=2, group_size=64)))
    assert g.bits_per_weight > 2.2
    assert info["error"] < 0.6 * ginfo["error"]
    D = (W.double() - fmt.dequantize().double())
    assert info["error"] == pytest.approx(float(((D @ H.double()) * D).sum()), rel=1e-4)


@pytest.mark.parametrize("bits,gptq_bits,group", [(3, 3, 64), (4, 4, 128)])
def test_residual_stage_beats_gptq_at_fewer_bits(bits, gptq_bits, group):
    W, H = _problem()
    fmt, info = quip_quantize(W, H, QuIPConfig(bits=bits), seed=5)
    assert fmt.bits_per_weight == pytest.approx(bits, abs=0.01) and fmt.residual is not None
    two, info2 = quip_quantize(W, H, QuIPConfig(bits=2), seed=5)
    assert info["error"] < 0.5 * info2["error"]
    g, ginfo = gptq_quantize(W, H, GPTQConfig(scheme=QuantScheme(bits=gptq_bits, group_size=group)))
    assert g.bits_per_weight > fmt.bits_per_weight and info["error"] < ginfo["error"]
    D = (W.double() - fmt.dequantize().double())
    assert info["error"] == pytest.approx(float(((D @ H.double()) * D).sum()), rel=1e-4)
    again = WeightFormat.from_state_dict(fmt.tensors(), fmt.meta())
    assert torch.equal(again.dequantize(), fmt.dequantize()) and again.bits == bits


def test_a_width_without_hadamard_factorisation_stores_its_orthogonal_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(21, 64, generator=g)  # 21: no Hadamard matrix of that order is built
    X = torch.randn(512, 64, generator=g)
    fmt, info = quip_quantize(W, X.T @ X / 512, QuIPConfig(), seed=3)
    assert info["orthogonal"] == ["u"] and fmt.u_dense.shape == (21, 21) and fmt.v_dense is None
    U = fmt.u_dense.double()
    torch.testing.assert_close(U @ U.T, torch.eye(21, dtype=torch.float64), atol=1e-5, rtol=0)
    again = WeightFormat.from_state_dict(fmt.tensors(), fmt.meta())
    assert torch.equal(again.dequantize(), fmt.dequantize())
    rel = float((fmt.dequantize() - W).norm() / W.norm())
    assert rel < 0.5


def test_format_round_trip_and_validation():
    W, H = _problem(out=32, n=64)
    fmt, _ = quip_quantize(W, H, QuIPConfig(), seed=layer_seed(3, "model.layers.0.mlp.up_proj"))
    again = WeightFormat.from_state_dict(fmt.tensors(), fmt.meta())
    assert isinstance(again, E8PWeight) and torch.equal(again.dequantize(), fmt.dequantize())
    assert fmt.meta()["seed"] == layer_seed(3, "model.layers.0.mlp.up_proj")
    with pytest.raises(LowbitError, match="lacks tensor 'u_dense'"):  # 21 has no Hadamard factorisation
        E8PWeight.from_codes(torch.zeros(21, 8, dtype=torch.int64), 1.0, (21, 64), 0)
    with pytest.raises(LowbitError, match="residual"):
        E8PWeight.from_codes(torch.zeros(32, 8, dtype=torch.int64), [1.0, 0.1], (32, 64), 0, bits=3)
    with pytest.raises(LowbitError, match="bits must be one of"):
        E8PWeight.from_codes(torch.zeros(32, 8, dtype=torch.int64), 1.0, (32, 64), 0, bits=5)
    with pytest.raises(LowbitError, match="multiple of 8"):
        quip_quantize(torch.zeros(32, 60), torch.eye(60), QuIPConfig(), 0)
    bad = fmt.tensors()
    bad["scale"] = torch.tensor([-1.0])
    with pytest.raises(LowbitError, match="scale must be positive"):
        WeightFormat.from_state_dict(bad, fmt.meta())


def test_quantized_model_saves_and_reloads_exactly(tmp_path):
    t = tiny_model("llama", seed=3)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    x = torch.arange(20)[None] % 250
    with torch.no_grad():
        ref = t.model(x).logits.clone()
    rec = api.quantize(m, "quip", None, progress=False, n_samples=4, seq_len=32)
    assert rec["method"]["method"] == "quip" and rec["runner"]["n_samples"] == 4
    with torch.no_grad():
        got = m.model(x).logits
    out = api.save(m, str(tmp_path / "q"))
    loaded, _, rec2 = checkpoint.load(out)
    assert {mm["format"] for mm in rec2["modules"].values()} == {"e8p"}
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, got)
    assert not torch.equal(got, ref) and float((got - ref).abs().mean()) < float(ref.abs().mean())


def test_the_kernel_equals_the_reference():
    from lowbit import kernels
    from lowbit.kernels import reference

    W, H = _problem(out=64, n=128)
    fmt, _ = quip_quantize(W, H, QuIPConfig(), seed=9)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    b = torch.randn(64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(kernels.linear(x, fmt, b), reference.linear(x, fmt, b), rtol=1e-5, atol=1e-5)
    assert kernels.find("e8p").linear is not None


def test_command_line(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.models.tiny import save_tiny

    src = save_tiny(tmp_path / "tiny", "llama", seed=3)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "quip", "--samples", "4", "--seq-len", "32", "-o", str(out)]) == 0
    import re

    assert re.search(r"done in .* 2\.00\d bits/weight", capsys.readouterr().err)  # + 32 bits of scale per layer
    assert main(["quantize", str(src), "--method", "quip", "--bits", "3", "--samples", "4", "--seq-len", "32",
                 "-o", str(tmp_path / "q3")]) == 0
    assert re.search(r"done in .* 3\.0\d\d bits/weight", capsys.readouterr().err)
    assert main(["quantize", str(src), "--method", "quip", "--bits", "5", "-o", str(tmp_path / "q5")]) == 2
    assert "QuIP# bits must be one of 2, 3, 4" in capsys.readouterr().err
    assert main(["quantize", str(src), "--method", "quip", "--group-size", "64", "-o", str(tmp_path / "qg")]) == 2
    assert "has its own number format" in capsys.readouterr().err
    assert main(["eval", str(out), "--max-tokens", "256", "--ctx", "64", "--no-latency"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "q" and row[1].startswith("2.00")
