from lowbit.models import files as model_files
"""Checkpoints record every file's size and sha256; loading checks them (a flipped byte is an error
naming the file), `--no-verify` skips the check, records from before the digests still load."""

import json

import pytest

from lowbit import checkpoint
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    src = save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")
    out = tmp_path_factory.mktemp("q") / "q"
    assert main(["quantize", str(src), "--bits", "4", "--group-size", "32", "-o", str(out)]) == 0
    return out


def copy(ck, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(ck, dst)
    return dst


def test_the_record_lists_every_file(ck):
    rec = json.loads((ck / "lowbit.json").read_text())
    on_disk = sorted(p.name for p in ck.iterdir() if p.name != "lowbit.json")
    assert sorted(rec["files"]) == on_disk and "model.safetensors" in on_disk and "config.json" in on_disk
    for name, d in rec["files"].items():
        assert d["bytes"] == (ck / name).stat().st_size and len(d["sha256"]) == 64


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "config"])
def test_a_damaged_file_is_named(ck, tmp_path, damage):
    c = copy(ck, tmp_path)
    w = c / "model.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit in the tensor data: the file still parses
        w.write_bytes(bytes(data))
        needle = "model.safetensors is corrupt: its sha256 differs"
    elif damage == "truncate":
        w.write_bytes(bytes(data[:-7]))
        needle = "model.safetensors is corrupt"
    elif damage == "delete":
        w.unlink()
        needle = "lacks model.safetensors"
    else:
        (c / "config.json").write_text((c / "config.json").read_text().replace("silu", "gelu"))
        needle = "config.json is corrupt"
    with pytest.raises(LowbitError, match=needle):
        checkpoint.load(c)
    with pytest.raises(LowbitError, match=needle):
        checkpoint.open_lazy(c)
    if damage == "flip":
        model_files.VERIFY_FILES = False
        try:
            checkpoint.load(c)  # unchecked, it loads (the flipped bit is in a packed code)
        finally:
            model_files.VERIFY_FILES = True


def test_no_verify_on_the_command_line(ck, tmp_path, capsys):
    c = copy(ck, tmp_path)
    w = c / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["export", str(c), "--type", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "is corrupt" in err and "--no-verify" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(c), "--type", "Q8_0", "--no-verify", "-o", str(tmp_path / "a.gguf")]) == 0
    assert model_files.VERIFY_FILES  # the switch is the command's only


def test_records_without_digests_still_load(ck, tmp_path):
    c = copy(ck, tmp_path)
    rec = json.loads((c / "lowbit.json").read_text())
    del rec["files"]
    (c / "lowbit.json").write_text(json.dumps(rec))
    checkpoint.load(c)
    rec["files"] = {"../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}
    (c / "lowbit.json").write_text(json.dumps(rec))
    with pytest.raises(LowbitError, match="a bad entry"):
        checkpoint.load(c)
