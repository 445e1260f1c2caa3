"""No silent wrong results: NaN/Inf is reported where it first appears (calibration, evaluation,
generation); a checkpoint is compared only with its own original (never the default model by
accident, never one of another shape; a changed one or another lowbit version is said); a damaged
GGUF file lowbit wrote is an error; a Hugging Face folder never unpickles a stray .bin."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from lowbit.models import files as model_files

from lowbit import api, checkpoint
from lowbit.algorithms.base import Method
from lowbit.calibration.sequential import run_sequential
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.compare import render
from lowbit.eval.diagnose import first_nonfinite
from lowbit.eval.quality import PplProtocol, evaluate_quality
from lowbit.models.tiny import save_tiny
from tests.tiny import tiny_llama

BROKEN = "model.layers.1.mlp.down_proj"


def _break(model):
    with torch.no_grad():
        model.get_submodule(BROKEN).weight[0, 0] = float("inf")
    return model


def test_first_nonfinite_names_the_layer_that_made_it():
    x = torch.arange(12)[None] % 90
    assert first_nonfinite(tiny_llama(), input_ids=x) is None
    assert first_nonfinite(_break(tiny_llama()), input_ids=x) == BROKEN
    # made inside a module's own arithmetic (not by one of its children): that module is named
    m = tiny_llama()
    attn = m.model.layers[2].self_attn
    real = attn.forward
    attn.forward = lambda *a, **k: (real(*a, **k)[0] * float("nan"),) + tuple(real(*a, **k)[1:])
    assert first_nonfinite(m, input_ids=x) == "model.layers.2.self_attn"


def test_evaluation_notes_the_window_and_layer_and_scores_the_others():
    tokens = torch.arange(600) % 90
    good, bad = tiny_llama(), _break(tiny_llama())
    res = evaluate_quality({"fp": tiny_llama(), "ok": good, "bad": bad}, "fp", tokens, PplProtocol(ctx=64, max_tokens=600),
                           progress=False)
    assert res["fp"].nonfinite is None and res["ok"].nonfinite is None
    assert res["bad"].nonfinite.startswith("window 0 ") and BROKEN in res["bad"].nonfinite
    rows = [{"variant": k, "ppl": r.ppl, "nonfinite": r.nonfinite} for k, r in res.items()]
    text = render(rows)
    assert text.splitlines()[-1] == f"bad: NaN/Inf logits from {res['bad'].nonfinite}; its numbers are not meaningful"


class Overflow(Method):
    """Test method: one layer's weights set so large that its output overflows float32 (the
    weights themselves finite), the others unchanged."""

    name = "overflow"
    needs_calibration = True

    def __init__(self):
        super().__init__(None)

    def observe(self, name, module, x):
        pass

    def apply(self, name, module):
        w = module.weight.detach().clone()
        return torch.full_like(w, 3e38) if name == "model.layers.0.mlp.up_proj" else w


def test_calibration_stops_naming_the_block_and_layer():
    samples = torch.randint(0, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LowbitError, match=r"calibration: NaN/Inf in the output of model\.layers\.0\.mlp"
                                          r"\.(up_proj|act_fn|down_proj) \(block 0, calibration batch 0\)"):
        run_sequential(tiny_llama(), Overflow(), samples, batch_size=2, progress=False)


def test_generation_stops_naming_the_position_and_layer():
    from lowbit.runtime import LeanDecoder, SamplingParams
    from lowbit.runtime.generate import generate

    model = _break(tiny_llama())
    dec = LeanDecoder(model, max_len=16)
    with pytest.raises(LowbitError, match=rf"NaN/Inf logits at position 4 of the sequence \(they first appear in {BROKEN}\)"):
        list(generate(dec, torch.arange(5), 4, SamplingParams()))


# -- which original --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    src = save_tiny(root / "tiny", "llama", seed=3)
    ck = root / "q"
    assert main(["quantize", str(src), "--bits", "4", "--group-size", "32", "-o", str(ck)]) == 0
    return root, src, ck


def _copy(ck, root, name):
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(ck, d)
    return d


def _one_line(code, err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("lowbit: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


EVAL = ["--max-tokens", "256", "--ctx", "64", "--no-latency"]


def test_a_record_without_its_original_never_falls_back_to_the_default_model(made, capsys):
    root, src, ck = made
    d = _copy(ck, root, "no-base")
    rec = json.loads((d / "lowbit.json").read_text())
    del rec["base_model"]["path"]
    (d / "lowbit.json").write_text(json.dumps(rec))
    capsys.readouterr()
    _one_line(main(["eval", str(d), *EVAL]), capsys.readouterr().err, "names no original model", "--baseline")
    _one_line(main(["compare", str(d), *EVAL, "--plot", ""]), capsys.readouterr().err, "names no original model")
    assert main(["eval", str(d), "--baseline", str(src), *EVAL]) == 0  # named: fine


def test_an_original_of_another_shape_is_refused_and_a_changed_one_noted(made, capsys, tmp_path):
    root, src, ck = made
    other = save_tiny(tmp_path / "wide", "llama", seed=3, hidden_size=128)
    capsys.readouterr()
    _one_line(main(["eval", str(ck), "--baseline", str(other), *EVAL]), capsys.readouterr().err,
              "was made from a model with hidden_size 64", "has 128")
    assert main(["eval", str(ck), *EVAL]) == 0
    assert "is not the original" not in capsys.readouterr().err  # its own original, unchanged
    changed = tmp_path / "changed"
    shutil.copytree(src, changed)
    cfg = json.loads((changed / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (changed / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(ck), "--baseline", str(changed), *EVAL]) == 0
    assert "is not the original" in capsys.readouterr().err
    copy = tmp_path / "copy"  # the same files elsewhere (other mtimes): not a change
    shutil.copytree(src, copy)
    assert main(["eval", str(ck), "--baseline", str(copy), *EVAL]) == 0
    assert "is not the original" not in capsys.readouterr().err


def test_another_lowbit_version_is_said(made, capsys):
    root, src, ck = made
    d = _copy(ck, root, "old")
    rec = json.loads((d / "lowbit.json").read_text())
    rec["lowbit_version"] = "0.0.1"
    (d / "lowbit.json").write_text(json.dumps(rec))
    capsys.readouterr()
    checkpoint.load(d)
    err = capsys.readouterr().err
    assert f"{d} was written by lowbit 0.0.1; this is lowbit" in err
    checkpoint.load(d)
    assert capsys.readouterr().err == ""  # once
    checkpoint.load(ck)
    assert "written by lowbit" not in capsys.readouterr().err


# -- GGUF integrity --------------------------------------------------------------------------------
def test_a_damaged_gguf_file_lowbit_wrote_is_an_error(made, tmp_path):
    from lowbit.models.gguf_check import DIGEST_KEY, scan_gguf

    root, src, ck = made
    f = tmp_path / "q.gguf"
    assert main(["export", str(ck), "--type", "Q8_0", "-o", str(f)]) == 0
    layout = scan_gguf(f)
    assert len(layout.kv[DIGEST_KEY]) == 64 and set(layout.kv[DIGEST_KEY]) <= set("0123456789abcdef")
    want = api.load(str(f)).model
    data = bytearray(f.read_bytes())
    data[-100] ^= 1  # a byte of the last tensor's data
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="bad.gguf is corrupt: its bytes differ from the digest"):
        api.load(str(bad))
    # the digest key's own name damaged: the separate version key says a digest was written
    named = bytearray(f.read_bytes())
    at = bytes(named).index(DIGEST_KEY.encode())
    named[at:at + 9] = bytes(9)
    unnamed = tmp_path / "unnamed.gguf"
    unnamed.write_bytes(bytes(named))
    with pytest.raises(LowbitError, match="unnamed.gguf is corrupt: lowbit wrote it with a digest"):
        api.load(str(unnamed))
    model_files.VERIFY_FILES = False
    try:
        got = api.load(str(bad)).model  # --no-verify: loaded as it is
    finally:
        model_files.VERIFY_FILES = True
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert not torch.equal(got(x).logits, want(x).logits)


def test_a_stray_pickle_beside_safetensors_is_never_loaded(made, tmp_path):
    root, src, ck = made
    d = tmp_path / "hf"
    shutil.copytree(src, d)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    api.load(str(d))
    assert not marker.exists()
