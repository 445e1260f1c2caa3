"""The command line: end to end on a tiny model, and a one-line error for each kind of bad input."""

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit import checkpoint
from lowbit.cli import main
from lowbit.models.tiny import save_tiny

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be. ") * 40


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "text.txt"
    p.write_text(TEXT)
    return p


def run(capsys, *argv):
    capsys.readouterr()  # drop whatever the test's own setup printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_quantize_eval_compare_end_to_end(tmp_path, capsys, tiny_dir, text_file):
    outs = []
    for bits, extra in ((4, ["--group-size", "32"]), (3, ["--group-size", "48", "--asym"]), (8, ["--per-channel"])):
        out = tmp_path / f"q{bits}"
        code, _, err = run(capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", bits, *extra, "-o", out)
        assert code == 0, err
        rec = json.loads((out / "lowbit.json").read_text())
        assert rec["method"]["method"] == "rtn"
        assert rec["method"]["config"]["scheme"]["bits"] == bits
        assert rec["base_model"]["path"] == str(tiny_dir)
        assert rec["lowbit_version"]
        assert len(rec["modules"]) == 14
        outs.append(out)
    # 48 does not divide 64 (hidden) nor 128: a ragged last group, recorded in the config
    q3 = json.loads((outs[1] / "lowbit.json").read_text())
    assert q3["modules"]["model.layers.0.mlp.down_proj"]["scheme"]["group_size"] == 48

    code, out, err = run(capsys, "eval", outs[0], "--text", text_file, "--max-tokens", 512, "--ctx", 128, "--no-latency")
    assert code == 0, err
    assert "original" in out and "q4" in out and "KL" in out

    plot = tmp_path / "cmp.png"
    code, out, err = run(capsys, "compare", *outs, "--text", text_file, "--max-tokens", 512, "--ctx", 128,
                         "--plot", plot)
    assert code == 0, err
    rows = [l for l in out.splitlines() if l.startswith(("original", "q4", "q3", "q8"))]
    assert len(rows) == 4
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,needles", [
    (["--bits", "9"], ["bits", "9"]),
    (["--bits", "1"], ["bits", "1"]),
    (["--group-size", "0"], ["--group-size", "0"]),
    (["--group-size", "-7"], ["--group-size", "-7"]),
    (["--method", "nonsense"], ["unknown method", "nonsense", "rtn"]),
])
def test_bad_arguments(tmp_path, capsys, tiny_dir, argv, needles):
    code, _, err = run(capsys, "quantize", tiny_dir, *argv, "-o", tmp_path / "o")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_model(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tmp_path / "nope", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "not found", "nope")
    code, _, err = run(capsys, "eval", tmp_path / "nope.gguf")
    assert_one_line_error(code, err, "not found")


def test_missing_text_file(tmp_path, capsys, tiny_dir):
    code, _, err = run(capsys, "eval", tiny_dir, "--text", tmp_path / "none.txt")
    assert_one_line_error(code, err, "none.txt")


def test_truncated_and_corrupt_gguf(tmp_path, capsys):
    import gguf

    good = tmp_path / "good.gguf"
    w = gguf.GGUFWriter(str(good), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.randn(16, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = good.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) - 100])
    code, _, err = run(capsys, "quantize", trunc, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "trunc.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 40)
    code, _, err = run(capsys, "quantize", bad, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "bad.gguf")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world, not a model")
    code, _, err = run(capsys, "eval", notgguf)
    assert_one_line_error(code, err, "x.gguf")


def test_truncated_safetensors(tmp_path, capsys):
    d = save_tiny(tmp_path / "m", "llama")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    code, _, err = run(capsys, "quantize", d, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "safetensors")


def test_nan_weights(tmp_path, capsys):
    d = save_tiny(tmp_path / "m", "llama")
    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    code, _, err = run(capsys, "quantize", d, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "NaN")


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)).save_pretrained(d)
    code, _, err = run(capsys, "quantize", d, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "gpt2", "llama")


def test_corrupt_checkpoint(tmp_path, capsys, tiny_dir):
    out = tmp_path / "q"
    assert run(capsys, "quantize", tiny_dir, "-o", out)[0] == 0
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:3000])
    code, _, err = run(capsys, "eval", out, "--no-latency")
    assert_one_line_error(code, err, "model.safetensors is corrupt: 3000 bytes")  # the recorded size
    code, _, err = run(capsys, "eval", out, "--no-latency", "--no-verify")
    assert_one_line_error(code, err, "corrupt or truncated")  # the reader's own check


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--bits", "12", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["lowbit: error: bits must be an integer from 2 to 8, got 12"]


def test_method_options_and_scheme_flags(tmp_path, capsys, tiny_dir):
    out = tmp_path / "fz"
    code, _, err = run(capsys, "quantize", tiny_dir, "--bits", "3", "--group-size", "32", "--float-zero", "-o", out)
    assert code == 0, err
    scheme = json.loads((out / "lowbit.json").read_text())["method"]["config"]["scheme"]
    assert scheme["symmetric"] is False and scheme["zero_point"] == "float" and scheme["group_size"] == 32
    code, _, err = run(capsys, "quantize", tiny_dir, "--option", "nonsense=1", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "no option", "nonsense")
    code, _, err = run(capsys, "quantize", tiny_dir, "--asym", "--sym", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "mutually exclusive")
    code, _, err = run(capsys, "quantize", tiny_dir, "--option", "novalue", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "KEY=VALUE")


def test_methods_listing(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    assert out.splitlines()[-1].startswith("rtn") or any(l.startswith("rtn ") for l in out.splitlines())
    assert "int4-g128" in out


@pytest.mark.parametrize("argv,check", [
    (["--method", "gptq", "--bits", "3", "--group-size", "32", "--asym", "--option", "damp=0.05"],
     lambda c: c["scheme"]["bits"] == 3 and c["damp"] == 0.05 and c["act_order"] is True),
    (["--method", "gptq", "--option", "act_order=false", "--option", "static_groups=false"],
     lambda c: c["act_order"] is False and c["scheme"]["group_size"] == 128),
    (["--method", "awq", "--bits", "3", "--option", "n_grid=4"],
     lambda c: c["scheme"]["symmetric"] is False and c["scheme"]["bits"] == 3 and c["n_grid"] == 4),
    (["--method", "hqq", "--bits", "3"], lambda c: c["scheme"]["zero_point"] == "float" and c["scheme"]["group_size"] == 64),
    (["--method", "nf4"], lambda c: c["blocksize"] == 64 and c["double_quant"] is True),
    (["--method", "llm-int8", "--option", "threshold=5.5"], lambda c: c["threshold"] == 5.5),
])
def test_every_method_from_the_command_line(tmp_path, capsys, tiny_dir, text_file, argv, check):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_dir, *argv, "--calib", text_file, "--samples", 4, "--seq-len", 64,
                       "-o", out)
    assert code == 0, err
    rec = json.loads((out / "lowbit.json").read_text())
    assert check(rec["method"]["config"]), rec["method"]
    assert rec["modules"]
    code, out_text, err = run(capsys, "eval", out, "--text", text_file, "--max-tokens", 256, "--ctx", 64, "--no-latency")
    assert code == 0, err


def test_own_format_methods_refuse_scheme_flags(tmp_path, capsys, tiny_dir):
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "nf4", "--bits", "3", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "nf4", "own number format")


@pytest.mark.parametrize("argv,expect", [
    (["--method", "magnitude", "--sparsity", "0.5"], 0.5),
    (["--method", "wanda", "--pattern", "2:4"], 0.5),
    (["--method", "sparsegpt", "--sparsity", "0.25"], 0.25),
])
def test_prune_command(tmp_path, capsys, tiny_dir, text_file, argv, expect):
    out = tmp_path / "p"
    code, _, err = run(capsys, "prune", tiny_dir, *argv, "--calib", text_file, "--samples", 4, "--seq-len", 64,
                       "-o", out)
    assert code == 0, err
    assert "pruning" in err and f"{100 * expect:.1f}% zeros" in err
    rec = json.loads((out / "lowbit.json").read_text())
    assert rec["method"]["sparsity"] == pytest.approx(expect, abs=0.01)
    code, _, err = run(capsys, "eval", out, "--text", text_file, "--max-tokens", 256, "--ctx", 64, "--no-latency")
    assert code == 0, err


def test_prune_errors(tmp_path, capsys, tiny_dir):
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "rtn", "--sparsity", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "pruning method", "rtn")
    code, _, err = run(capsys, "prune", tiny_dir, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--sparsity", "--pattern")
    code, _, err = run(capsys, "prune", tiny_dir, "--sparsity", "1.5", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "1.5")


def test_reproducible_flag_turns_on_thread_invariant_products(tmp_path, capsys, tiny_dir, monkeypatch):
    # --reproducible (quantize, prune) asks for thread-count-independent products before the first
    # product (the switch itself: tests/test_distributed.py, in a subprocess, since MKL reads it once
    # per process and this test process must keep its default numerics)
    from lowbit.core import processes

    calls = []
    monkeypatch.setattr(processes, "thread_invariant_products", lambda: calls.append(1) or True)
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
                       "--reproducible", "-o", tmp_path / "r")
    assert code == 0, err
    assert calls == [1]
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
                       "-o", tmp_path / "d")
    assert code == 0 and calls == [1]


@pytest.mark.parametrize("argv, needle", [
    (["quantize", "--device", "bogus"], "unknown device 'bogus'"),
    (["quantize", "--device", "mps"], "unknown device 'mps'"),
    (["quantize", "--device", "meta"], "unknown device 'meta'"),
    (["quantize", "--device", "cpu:1"], "unknown device 'cpu:1'"),
    (["quantize", "--group-size", str(2**40)], "--group-size must be -1"),
    (["quantize", "--group-size", "0"], "--group-size must be -1"),
    (["quantize", "--samples", "1000000"], "calibration tokens"),
    (["quantize", "--samples", "0"], "--samples must be positive"),
    (["export", "--imatrix", "--samples", "100000", "--seq-len", "4096"], "calibration tokens"),
])
def test_bounded_arguments_fail_before_any_work(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, *argv, "-o", tmp_path / "o")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", "--device", "cuda", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "CUDA is not available")


def test_threads_and_seed_bounds():
    import argparse
    import os

    from lowbit.commands._args import check_common_args
    from lowbit.errors import LowbitError

    a = argparse.Namespace(threads=1000)
    check_common_args(a)
    assert a.threads == (os.cpu_count() or 1)  # clamped, and said so
    with pytest.raises(LowbitError, match="--threads must be at least 1"):
        check_common_args(argparse.Namespace(threads=0))
    with pytest.raises(LowbitError, match="--seed must be between"):
        check_common_args(argparse.Namespace(seed=2**70))
    check_common_args(argparse.Namespace(seed=2**63 - 1, device="cpu", group_size=-1, samples=128, seq_len=2048))


def test_layer_wise_distillation_option(tmp_path, capsys, tiny_dir, text_file):
    out = tmp_path / "lkd"
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "gptq", "--bits", "3", "--group-size", "32",
                       "--option", "lkd_steps=5", "--option", "lkd_lr=1e-4", "--calib", text_file, "--samples", 8,
                       "--seq-len", 32, "-o", out)
    assert code == 0, err
    rec = json.loads((out / "lowbit.json").read_text())["method"]
    assert rec["method"] == "gptq" and rec["lkd"]["steps"] == 5 and rec["lkd"]["lr"] == 1e-4
    assert len(rec["lkd"]["blocks"]) == 2
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "gptq", "--option", "lkd_steps=many", "-o",
                       tmp_path / "o")
    assert_one_line_error(code, err, "lkd_steps", "int")
    code, _, err = run(capsys, "quantize", tiny_dir, "--method", "quip", "--option", "finetune_steps=5",
                       "--option", "lkd_steps=5", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "finetune_steps", "lkd_steps")
