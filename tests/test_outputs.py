"""Where lowbit writes (lowbit.outputs): nothing it did not write is deleted or overwritten, every
output is swapped in whole, a concurrent run on the same path is refused, permissions follow the
umask; and the commands check -o before any work."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from lowbit import outputs
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny

RECORD = {"lowbit_version": "0.1.0", "method": {"method": "rtn"}, "modules": {}}


def fake_checkpoint(path, extra=()):
    path.mkdir(parents=True)
    (path / "lowbit.json").write_text(json.dumps(RECORD))
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"old weights")
    for name in extra:
        (path / name).write_text("the user's own file")
    return path


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(code, err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


# -- directories -------------------------------------------------------------------------------
@pytest.mark.parametrize("record", ["{}", "plain text, not json", '{"lowbit_version": 3}', "[1, 2]"])
def test_a_folder_with_a_bogus_record_is_never_replaced(tmp_path, record):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "lowbit.json").write_text(record)
    (proj / "main.py").write_text("print('my work')")
    before = snapshot(proj)
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        outputs.check_dir(proj)
    assert snapshot(proj) == before


def test_a_checkpoint_holding_the_users_files_needs_force(tmp_path):
    ck = fake_checkpoint(tmp_path / "q", extra=["notes.txt", "plot.png"])
    with pytest.raises(LowbitError, match=r"not part of a checkpoint \(notes.txt, plot.png\)"):
        outputs.check_dir(ck)
    assert outputs.check_dir(ck, force=True) == ck
    # a checkpoint of its own files only (and hidden leftovers) is replaceable
    clean = fake_checkpoint(tmp_path / "c", extra=["tokenizer.json", "model-00001-of-00002.safetensors"])
    (clean / ".DS_Store").write_text("")
    assert outputs.check_dir(clean) == clean


def test_bad_output_paths_are_one_line_errors(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LowbitError, match="exists and is not a directory"):
        outputs.check_dir(f)
    with pytest.raises(LowbitError, match="is not a directory"):
        outputs.check_dir(f / "sub" / "out")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(LowbitError, match="broken symbolic link"):
        outputs.check_dir(link)
    with pytest.raises(LowbitError, match="too long"):
        outputs.check_dir(tmp_path / ("n" * 300))
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(LowbitError, match="would replace the input"):
        outputs.check_dir(src, inputs=[src])
    with pytest.raises(LowbitError, match="would replace the input"):
        outputs.check_dir(tmp_path, force=True, inputs=[src])  # a folder holding the input
    ck = fake_checkpoint(tmp_path / "ck")
    monkeypatch.chdir(ck)
    with pytest.raises(LowbitError, match="current directory"):
        outputs.check_dir(".")
    with pytest.raises(LowbitError, match="inside the checkpoint"):
        outputs.check_dir("sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused_before_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LowbitError, match="cannot write in"):
            outputs.check_dir(ro / "out")
    finally:
        ro.chmod(0o755)


# -- files -------------------------------------------------------------------------------------
def test_files_are_replaced_only_by_their_own_kind(tmp_path):
    mine = tmp_path / "essay.txt"
    mine.write_text("not a gguf")
    with pytest.raises(LowbitError, match="not a GGUF file"):
        outputs.check_file(mine, b"GGUF")
    assert outputs.check_file(mine, b"GGUF", force=True) == mine
    old = tmp_path / "old.gguf"
    old.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert outputs.check_file(old, b"GGUF") == old
    with pytest.raises(LowbitError, match="is the input"):
        outputs.check_file(old, b"GGUF", inputs=[old])
    ck = fake_checkpoint(tmp_path / "ck")
    with pytest.raises(LowbitError, match="a file of the checkpoint"):
        outputs.check_file(ck / "model.safetensors", b"GGUF")
    assert outputs.check_file(ck / "new.gguf", b"GGUF") == ck / "new.gguf"  # a new file may go anywhere
    with pytest.raises(LowbitError, match="is a directory"):
        outputs.check_file(ck, b"GGUF")


# -- atomic replacement ------------------------------------------------------------------------
def test_atomic_dir_swaps_whole_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    out = fake_checkpoint(tmp_path / "q")
    with pytest.raises(RuntimeError):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial folder, no lock file left
    with outputs.atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new weights")
    assert (out / "model.safetensors").read_bytes() == b"new weights" and not (out / "lowbit.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    # without renameat2 (another file system): renamed aside, and put back if the new one fails
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_second)
    with pytest.raises(OSError):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"newer")
    monkeypatch.setattr(outputs.os, "replace", real)
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_disk_full_is_a_one_line_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"GGUF old")
    with pytest.raises(LowbitError, match="cannot write .*No space left on device"):
        with outputs.atomic_file(target) as tmp:
            tmp.write_bytes(b"GGUF part")
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"GGUF old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    out = tmp_path / "q"
    (tmp_path / ".q.partial-abc123").mkdir()
    (tmp_path / ".q.partial-abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".q.x1y2.tmp").write_bytes(b"half")
    (tmp_path / ".other.partial-zzz").mkdir()  # another output's: not ours to remove
    with outputs.atomic_dir(out) as tmp:
        (tmp / "lowbit.json").write_text(json.dumps(RECORD))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-zzz", "q"]


# -- concurrency -------------------------------------------------------------------------------
def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    out = tmp_path / "q"
    other = textwrap.dedent(f"""
        import sys
        from lowbit import outputs
        from lowbit.errors import LowbitError
        try:
            with outputs.lock({str(out)!r}):
                print("got it")
        except LowbitError as e:
            print(e)
    """)
    with outputs.lock(out):
        with outputs.lock(out):  # re-entrant in one process
            pass
        r = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120)
        assert "another lowbit run is writing" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "got it", r.stdout + r.stderr
    assert not (tmp_path / ".q.lock").exists()


# -- permissions -------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with outputs.atomic_dir(tmp_path / "q") as tmp:
            (tmp / "config.json").write_text("{}")
        with outputs.atomic_file(tmp_path / "m.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "q") == 0o777 & ~mask
    assert mode(tmp_path / "q" / "config.json") == 0o666 & ~mask
    assert mode(tmp_path / "m.gguf") == 0o666 & ~mask


# -- the commands ------------------------------------------------------------------------------
def test_quantize_checks_the_output_before_loading(tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "lowbit.json").write_text("{}")
    (proj / "README.md").write_text("my project")
    before = snapshot(proj)
    # the model does not exist either: the output is what is reported, so nothing was loaded
    code, err = run_cli(capsys, "quantize", tmp_path / "no-such-model", "--method", "gptq", "-o", proj)
    one_line(code, err, "not a lowbit checkpoint", "proj")
    assert snapshot(proj) == before


def test_requantizing_keeps_the_users_files_unless_forced(tmp_path, capsys, tiny_dir):
    out = tmp_path / "q"
    code, err = run_cli(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "-o", out)
    assert code == 0, err
    (out / "notes.txt").write_text("keep me")
    code, err = run_cli(capsys, "quantize", tiny_dir, "--bits", "8", "--per-channel", "-o", out)
    one_line(code, err, "notes.txt", "--force")
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "lowbit.json").read_text())["method"]["config"]["scheme"]["bits"] == 4
    code, err = run_cli(capsys, "quantize", tiny_dir, "--bits", "8", "--per-channel", "--force", "-o", out)
    assert code == 0, err
    assert json.loads((out / "lowbit.json").read_text())["method"]["config"]["scheme"]["bits"] == 8
    code, err = run_cli(capsys, "quantize", tiny_dir, "--bits", "4", "-o", tiny_dir)
    one_line(code, err, "input")


def test_export_never_overwrites_what_it_did_not_write(tmp_path, capsys, tiny_dir):
    ck = tmp_path / "q"
    code, err = run_cli(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "-o", ck)
    assert code == 0, err
    weights = (ck / "model.safetensors").read_bytes()
    code, err = run_cli(capsys, "export", ck, "--type", "Q8_0", "-o", ck / "model.safetensors")
    one_line(code, err, "a file of the checkpoint")
    assert (ck / "model.safetensors").read_bytes() == weights
    essay = tmp_path / "essay.txt"
    essay.write_text("mine")
    code, err = run_cli(capsys, "export", ck, "--type", "Q8_0", "-o", essay)
    one_line(code, err, "not a GGUF file")
    assert essay.read_text() == "mine"
    g = tmp_path / "m.gguf"
    code, err = run_cli(capsys, "export", ck, "--type", "Q8_0", "-o", g)
    assert code == 0 and g.read_bytes()[:4] == b"GGUF", err
    code, err = run_cli(capsys, "export", g, "--type", "Q8_0", "-o", g)
    one_line(code, err, "is the input")
    code, err = run_cli(capsys, "export", ck, "--type", "Q4_0", "-o", g)  # an earlier GGUF: replaced
    assert code == 0, err
    code, err = run_cli(capsys, "compare", ck, "--plot", tmp_path, "--max-tokens", "64")
    one_line(code, err, "is a directory")
