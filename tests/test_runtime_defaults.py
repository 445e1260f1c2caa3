"""The decode defaults a checkpoint carries (`lowbit.runtime.defaults`): measured at quantize time,
followed by `lowbit generate` / `bench`, overridden by their flags.

* step KL is mean Σ p_ref (log p_ref − log p), checked against a loop by hand;
* `choose` takes int8 activations exactly when their step KL is within the relative tolerance of
  the float path's (the same measurement, two tolerances either side of the ratio) or within the
  absolute one (two either side of the difference); models without an int8-activation row record
  nothing;
* `lowbit quantize` writes the choice into lowbit.json, and `generate` / `bench` start from it
  unless --int8-activations / --float-activations say otherwise.
"""

import json

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.models.tiny import save_tiny, tiny_model
from lowbit.runtime import defaults as D


def test_step_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    lp = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    want = sum(sum(float(ref[t, v].exp() * (ref[t, v] - lp[t, v])) for v in range(11)) for t in range(5)) / 5
    kl, top1 = D.step_kl(ref, lp)
    assert kl == pytest.approx(want, rel=1e-6)
    assert top1 == pytest.approx(float((ref.argmax(-1) == lp.argmax(-1)).float().mean()))
    assert D.step_kl(ref, ref) == (pytest.approx(0.0, abs=1e-7), 1.0)


def test_choose_follows_the_tolerance():
    lm = tiny_model("llama", seed=4)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    ids = D.measurement_ids(m.tokenizer, 24)
    assert ids.shape == (24,)
    ref = D.reference_steps(m.model, ids)
    assert D.choose(m.model, ids, ref) is None  # float layers: nothing to choose
    from lowbit.core.scheme import QuantScheme

    api.quantize(m, "rtn", QuantScheme(4, False, "group", 32), progress=False)
    assert D.has_int8_rows(m.model)
    d = D.choose(m.model, ids, ref)
    assert d["tokens"] == 24 and d["step_kl_float"] > 0 and d["step_kl_int8"] > 0
    assert d["step_kl_int8"] != d["step_kl_float"]  # the int8 path rounds differently
    ratio = d["step_kl_int8"] / d["step_kl_float"]
    diff = d["step_kl_int8"] - d["step_kl_float"]
    assert d["int8_activations"] == (ratio <= 1.05 or diff <= D.ABS_TOLERANCE)
    assert D.choose(m.model, ids, ref, tolerance=ratio - 1 + 1e-3, absolute=-1.0)["int8_activations"] is True
    assert D.choose(m.model, ids, ref, tolerance=ratio - 1 - 1e-3, absolute=-1.0)["int8_activations"] is False
    eps = 1e-3 * abs(diff) + 1e-9  # the absolute rule alone (relative rule off: tolerance -1), either side
    assert D.choose(m.model, ids, ref, tolerance=-1.0, absolute=diff + eps)["int8_activations"] is True
    assert D.choose(m.model, ids, ref, tolerance=-1.0, absolute=diff - eps)["int8_activations"] is False
    # the record's choice, unless a flag says otherwise
    rec = {"decode": d}
    assert D.resolve(rec, None)[0] == d["int8_activations"] and "measured" in D.resolve(rec, None)[1]
    assert D.resolve(rec, True) == (True, "asked for") and D.resolve(rec, False) == (False, "asked for")
    assert D.resolve({}, None)[0] is False and D.resolve(None, None)[0] is False
    assert D.resolve({"decode": {"int8_activations": "yes"}}, None)[0] is False  # malformed: float


def test_quantize_records_the_choice_and_generate_follows_it(tmp_path, capsys):
    src = save_tiny(tmp_path / "tiny", "llama", seed=3)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "4", "--group-size", "32", "--asym", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    rec = json.loads((out / "lowbit.json").read_text())
    d = rec["decode"]
    assert d["tokens"] == D.TOKENS and d["tolerance"] == D.TOLERANCE
    assert d["int8_activations"] == (d["step_kl_int8"] <= 1.05 * d["step_kl_float"]
                                     or d["step_kl_int8"] - d["step_kl_float"] <= D.ABS_TOLERANCE)
    assert "decode default:" in err
    act = "int8" if d["int8_activations"] else "float"
    for flags, want in (((), act), (("--int8-activations",), "int8"), (("--float-activations",), "float")):
        assert main(["bench", str(out), "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--markdown",
                     *flags]) == 0
        o, e = capsys.readouterr()
        head, _, row = o.strip().splitlines()
        got = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
        assert got["act"] == want, e
        assert f"{want} activations (" in e
    # the decode default is the measured one: generate with no flag equals generate with that flag
    args = ["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "6", "--ignore-eos"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + [f"--{act}-activations"]) == 0
    assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit):
        main(args + ["--int8-activations", "--float-activations"])
