"""`lowbit bitnet`: conversion by distillation and training from scratch write packed BitNet
checkpoints that reload into the same function; the training is resumable bit for bit; bad input
is refused in one line."""

import json
import signal

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.formats.bitnet import BitNetWeight
from lowbit.models.tiny import save_tiny
from lowbit.nn.bitlinear import BitLinear, convert, pack
from lowbit.nn.linear import QuantizedLinear
from lowbit.training import trainer as trainer_mod

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40
HELD = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
        "never took up any book but the Baronetage. ") * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("t")
    (d / "train.txt").write_text(TEXT)
    (d / "held.txt").write_text(HELD)
    return d / "train.txt", d / "held.txt"


def _flags(texts, steps=8, lr=3e-3):
    return ["--text", texts[0], "--eval-text", texts[1], "--steps", steps, "--batch-size", 2, "--seq-len", 32,
            "--lr", lr, "--eval-windows", 2, "--eval-every", 100, "--save-every", 2]


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, *capsys.readouterr()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits", ["1.58", "1"])
def test_conversion_distils_packs_and_reloads(tmp_path, capsys, tiny_dir, texts, bits):
    out = tmp_path / "bn"
    lr = 3e-3 if bits == "1.58" else 1e-3  # signs flip with the smallest updates: the 1-bit layer wants less
    code, _, err = run(capsys, "bitnet", tiny_dir, "--bits", bits, *_flags(texts, steps=10, lr=lr), "-o", out)
    assert code == 0, err
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["method"] == {"method": "bitnet", "bits": float(bits), "norm": False, "scratch": False}
    tr = rec["training"]
    assert tr["steps"] == 10 and tr["final_eval"]["kl"] < tr["first_eval"]["kl"]  # distillation helps
    assert len([h for h in tr["history"] if "loss" in h]) == 10
    m = api.load(str(out))
    layers = {n: q for n, q in m.model.named_modules() if isinstance(q, QuantizedLinear)}
    assert len(layers) == 2 * 7 and all(isinstance(q.weight_format, BitNetWeight) for q in layers.values())
    fmt = next(iter(layers.values())).weight_format
    assert fmt.bits == float(bits) and fmt.bits_per_weight < (2.1 if bits == "1.58" else 1.1)
    codes = torch.cat([q.weight_format.codes().flatten() for q in layers.values()])
    assert set(codes.unique().tolist()) <= ({-1, 0, 1} if bits == "1.58" else {-1, 1})
    # the reloaded checkpoint computes what its record's final evaluation saw
    from lowbit.training.kd import held_out

    windows = torch.tensor(m.tokenizer(HELD)["input_ids"][:64]).view(2, 32)
    assert held_out(m.model, None, windows)["ppl"] > 1


def test_packed_layers_are_the_trained_function():
    """convert -> (train) -> pack: the packed model's logits equal the BitLinear model's exactly."""
    from tests.tiny import tiny_llama

    model = tiny_llama()
    convert(model, 1.58, norm=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.weight.add_(0.01 * torch.randn_like(m.weight))
                m.norm_weight.mul_(1 + 0.1 * torch.rand_like(m.norm_weight))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    want = _logits(model, ids)
    formats = pack(model)
    assert len(formats) == 21 and not any(isinstance(m, BitLinear) for m in model.modules())
    assert torch.equal(_logits(model, ids), want)


def test_scratch_trains_float_twin_and_bitnet_on_the_same_tokens(tmp_path, capsys, tiny_dir, texts):
    shape = ["--layers", 2, "--width", 32, "--ffn", 64, "--heads", 2]
    outs = {}
    for bits in ("float", "1.58"):
        outs[bits] = tmp_path / bits
        code, _, err = run(capsys, "bitnet", tiny_dir, "--scratch", "--bits", bits, *shape, *_flags(texts, steps=6),
                           "-o", outs[bits])
        assert code == 0, err
    twin = json.loads((outs["float"] / "lowbit_train.json").read_text())
    rec = json.loads((outs["1.58"] / "lowbit.json").read_text())
    assert rec["method"]["norm"] is True and rec["method"]["scratch"] is True and rec["base_model"] is None
    assert twin["method"]["bits"] is None
    # same schedule, same data order: the learning rates of every step agree
    lrs = lambda r: [h["lr"] for h in r["training"]["history"] if "loss" in h]  # noqa: E731
    assert lrs(twin) == lrs(rec) and len(lrs(rec)) == 6
    for r in (twin, rec):
        assert r["training"]["final_eval"]["ppl"] < r["training"]["first_eval"]["ppl"]
    m = api.load(str(outs["1.58"]))
    assert m.model.config.hidden_size == 32 and m.model.config.num_hidden_layers == 2
    f = api.load(str(outs["float"]))
    assert not any(isinstance(x, QuantizedLinear) for x in f.model.modules())


def test_interrupted_conversion_resumes_bit_for_bit(tmp_path, capsys, tiny_dir, texts, monkeypatch):
    full = tmp_path / "full"
    assert run(capsys, "bitnet", tiny_dir, *_flags(texts, steps=6), "-o", full)[0] == 0
    part = tmp_path / "part"
    real_run = trainer_mod.Trainer.run

    def interrupting(self, resume=None):
        orig = self.on_step
        self.on_step = lambda step: signal.raise_signal(signal.SIGINT) if step == 3 else (orig and orig(step))
        return real_run(self, resume=resume)

    monkeypatch.setattr(trainer_mod.Trainer, "run", interrupting)
    code, _, err = run(capsys, "bitnet", tiny_dir, *_flags(texts, steps=6), "-o", part)
    assert code != 0 and "after step 3" in err
    monkeypatch.setattr(trainer_mod.Trainer, "run", real_run)
    code, _, err = run(capsys, "bitnet", tiny_dir, *_flags(texts, steps=6), "--resume", "-o", part)
    assert code == 0, err
    a, b = api.load(str(full)).model.state_dict(), api.load(str(part)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(tmp_path, capsys, tiny_dir):
    code, _, err = run(capsys, "bitnet", tiny_dir, "--bits", "float", "-o", tmp_path / "x")
    assert code == 2 and "--scratch" in err and "Traceback" not in err
    code, _, err = run(capsys, "bitnet", tiny_dir, "--scratch", "--width", 30, "--heads", 4, "-o", tmp_path / "y")
    assert code == 2 and "multiple of --heads" in err
