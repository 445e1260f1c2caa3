"""Interrupted work resumes: a calibration run from its finished blocks to the checkpoint an
uninterrupted run writes (the golden digests, bit for bit), and an evaluation from the rows it
had finished to the same table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit import api
from lowbit.calibration import sequential
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny
from tests.test_golden import CASES, _golden, checkpoint_digest, golden_model, quantize_as_recorded

ROOT = Path(__file__).resolve().parents[1]
CALIBRATED = [c for c in CASES if "n_samples" in c[3]]


class Crash(Exception):
    pass


def _crash_in_block(monkeypatch, block: int) -> None:
    """The run dies at the first layer of ``block`` (after every earlier block is finished)."""
    real = sequential.solve_layer

    def solve(method, name, lin):
        if f".layers.{block}." in name:
            raise Crash(name)
        return real(method, name, lin)

    monkeypatch.setattr(sequential, "solve_layer", solve)


def _quantize(family, case, out: Path, state: Path, *, resume=None, stream_src: Path | None = None) -> api.Model:
    _, method, scheme, kw, storage = case
    assert storage is None
    m = api.load(str(stream_src), stream=True) if stream_src is not None else golden_model(family)
    quantize_as_recorded(m, method, scheme, resume_dir=str(state), resume=resume, checkpoint_every=0,
                         output=str(out) if stream_src is not None else None, **kw)
    if stream_src is None:
        api.save(m, str(out))
    return m


@pytest.mark.parametrize("family,case", [("gemma3_text", c) for c in CALIBRATED] + [("llama", CALIBRATED[0])],
                         ids=[f"gemma3_text/{c[0]}" for c in CALIBRATED] + [f"llama/{CALIBRATED[0][0]}"])
def test_a_crashed_run_resumes_to_the_golden_checkpoint(family, case, tmp_path, monkeypatch):
    state, out = tmp_path / ".q.resume", tmp_path / "q"
    with monkeypatch.context() as mp:
        _crash_in_block(mp, 1)
        with pytest.raises(Crash):
            _quantize(family, case, out, state)
    st = json.loads((state / "state.json").read_text())
    assert st["done"] == 1 and (state / "block-00000.safetensors").is_file() and not out.exists()
    with pytest.raises(LowbitError, match="1 of 2 blocks of an interrupted run.*--resume continues it"):
        _quantize(family, case, out, state)  # not asked: the finished block is not dropped
    assert (state / "state.json").is_file()
    m = _quantize(family, case, out, state, resume=True)
    assert m.record["runner"]["resumed_blocks"] == 1
    assert checkpoint_digest(out) == _golden()[f"{family}/{case[0]}"]
    assert not state.exists()  # the checkpoint is complete: the finished blocks are gone


def test_a_streamed_run_resumes_to_the_golden_checkpoint(tmp_path, monkeypatch):
    from tests.test_stream import _source

    case = next(c for c in CASES if c[0] == "gptq-int4-g32")
    src = _source(tmp_path, "llama")
    state, out = tmp_path / ".q.resume", tmp_path / "q"
    with monkeypatch.context() as mp:
        _crash_in_block(mp, 1)
        with pytest.raises(Crash):
            _quantize("llama", case, out, state, stream_src=src)
    assert not out.exists()
    _quantize("llama", case, out, state, resume=True, stream_src=src)
    assert checkpoint_digest(out) == _golden()[f"llama/{case[0]}"]
    assert not state.exists()


def test_other_settings_or_a_damaged_state_are_refused_and_no_resume_starts_over(tmp_path, monkeypatch):
    case = next(c for c in CASES if c[0] == "gptq-int4-g32")
    state, out = tmp_path / ".q.resume", tmp_path / "q"
    with monkeypatch.context() as mp:
        _crash_in_block(mp, 1)
        with pytest.raises(Crash):
            _quantize("llama", case, out, state)
    other = (case[0], case[1], case[2], dict(case[3], n_samples=5), None)
    with pytest.raises(LowbitError, match=r"other settings \(calibration: .*--no-resume starts over"):
        _quantize("llama", other, out, state, resume=True)
    block = state / "block-00000.safetensors"
    good = block.read_bytes()
    block.write_bytes(good[:100])
    with pytest.raises(LowbitError, match="block-00000.safetensors is corrupt"):
        _quantize("llama", case, out, state, resume=True)
    block.write_bytes(good)
    (state / "state.json").write_text("{not json")
    with pytest.raises(LowbitError, match="state.json is corrupt"):
        _quantize("llama", case, out, state, resume=True)
    m = _quantize("llama", case, out, state, resume=False)  # discarded: a whole new run
    assert m.record["runner"]["resumed_blocks"] == 0
    assert checkpoint_digest(out) == _golden()[f"llama/{case[0]}"]


def test_nothing_to_resume_starts_from_the_first_block(tmp_path):
    case = next(c for c in CASES if c[0] == "awq-int4-g32-asym")
    m = _quantize("llama", case, tmp_path / "q", tmp_path / ".q.resume", resume=True)
    assert m.record["runner"]["resumed_blocks"] == 0
    assert checkpoint_digest(tmp_path / "q") == _golden()[f"llama/{case[0]}"]


# -- kill -9 ---------------------------------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the moment to kill never came")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory):
    """A tiny llama with 16 blocks: enough work after the first ones for a kill to land mid-run."""
    return save_tiny(tmp_path_factory.mktemp("deep") / "tiny16", "llama", seed=5, num_hidden_layers=16,
                     hidden_size=128, intermediate_size=256)


def _state_done(state: Path) -> int:
    try:
        return json.loads((state / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_during_quantize_then_resume_gives_the_uninterrupted_checkpoint(deep_tiny, tmp_path, capsys):
    args = ["quantize", str(deep_tiny), "--method", "gptq", "--group-size", "32", "--samples", "16",
            "--seq-len", "64", "--checkpoint-every", "0"]
    out = tmp_path / "q"
    state = tmp_path / ".q.resume"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", *args, "-o", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: _state_done(state) >= 3)
    assert not out.exists() and _state_done(state) >= 3
    capsys.readouterr()
    assert main(args + ["-o", str(out)]) == 2  # asks first
    err = capsys.readouterr().err
    assert "blocks of an interrupted run" in err and "--resume continues it" in err and len(err.splitlines()) == 1
    assert main(args + ["-o", str(out), "--resume"]) == 0
    assert "finished blocks taken from the interrupted run" in capsys.readouterr().err
    assert not state.exists()
    whole = tmp_path / "whole"
    assert main(args + ["-o", str(whole)]) == 0
    assert checkpoint_digest(out) == checkpoint_digest(whole)


def test_kill_9_during_compare_then_the_finished_rows_are_kept(deep_tiny, tmp_path, capsys):
    variants = []
    for bits in (8, 4, 3, 2):
        out = tmp_path / f"q{bits}"
        assert main(["quantize", str(deep_tiny), "--bits", str(bits), "--group-size", "32", "-o", str(out)]) == 0
        variants.append(str(out))
    common = [*variants, "--max-tokens", "8192", "--ctx", "64", "--no-latency", "--reference", "hidden",
              "--cache-dir", str(tmp_path / "cache"), "--plot", str(tmp_path / "c.png")]
    results = tmp_path / "c.jsonl"

    def rows():
        try:
            return len(results.read_text().splitlines()) - 1
        except OSError:
            return 0

    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "compare", *common], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: rows() >= 2)  # the original's row and the first variant's
    kept = rows()
    assert 2 <= kept < 5
    capsys.readouterr()
    assert main(["compare", *common]) == 0
    resumed = capsys.readouterr()
    assert f"{kept} of 5 rows read from {results}" in resumed.err
    assert main(["compare", *common, "--fresh", "--results", str(tmp_path / "fresh.jsonl")]) == 0
    fresh = capsys.readouterr()
    assert resumed.out == fresh.out  # the same table, to the last digit
    assert rows() == 5
    assert main(["compare", *common]) == 0  # all rows known: nothing is measured
    again = capsys.readouterr()
    assert again.out == fresh.out and "5 of 5 rows read" in again.err and "reference:" not in again.err


def test_results_file_rules(tmp_path, capsys):
    from lowbit.eval.results import MAGIC, ResultsFile

    p = tmp_path / "r.jsonl"
    r = ResultsFile(p)
    r.add("a", {"variant": "x", "ppl": 3.5, "kl": float("nan"), "token_nll": [1, 2]})
    r.add("b", {"variant": "y", "ppl": 4.0})
    with open(p, "ab") as f:
        f.write(b'{"key": "c", "row": {"vari')  # a kill mid-line
    again = ResultsFile(p)
    assert again.skipped == 1 and set(again.rows) == {"a", "b"}
    assert again.get("a")["ppl"] == 3.5 and "token_nll" not in again.get("a")
    again.add("c", {"variant": "z", "ppl": 5.0})  # appended on a line of its own
    assert set(ResultsFile(p).rows) == {"a", "b", "c"}
    assert ResultsFile(p, fresh=True).rows == {}
    assert p.read_bytes().startswith(MAGIC)
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    with pytest.raises(LowbitError, match="not a lowbit results file"):
        ResultsFile(other)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(MAGIC + b"\ngarbage\n" + b'{"key": "a", "row": {"variant": "x"}}\n')
    with pytest.raises(LowbitError, match="line 2 is not a results row"):
        ResultsFile(bad)
    capsys.readouterr()
    assert main(["eval", "--results", str(other), "--max-tokens", "64"]) == 2  # checked before any work
    assert "is not a lowbit results file" in capsys.readouterr().err
    assert other.read_text() == "my notes\n"
