"""`lowbit generate` and `lowbit bench` end to end on a tiny model (and a quantized checkpoint)."""

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.models.tiny import save_tiny, tiny_model
from lowbit.runtime import LeanDecoder, generate


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`lowbit generate --threads N` runs in this process and sets torch's thread count for the
    whole process; restore it, so later tests (e.g. the golden checkpoint bytes of sparsegpt,
    whose matrix products round differently on 1 thread) run with the default."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=3)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("q") / "int4"
    assert main(["quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "--asym", "-o", str(out)]) == 0
    return out


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, needle):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: ") and needle in lines[0], err


def expected_text(model, tokenizer, prompt, n, **sampling):
    from lowbit.runtime import SamplingParams

    ids = tokenizer(prompt).input_ids
    dec = LeanDecoder(model, max_len=len(ids) + n)
    toks = list(generate(dec, ids, n, SamplingParams(**sampling)))
    return tokenizer.decode(toks, skip_special_tokens=True)


def test_generate_greedy_streams_the_decoders_tokens(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", tiny_dir, "--prompt", "Hello", "--max-new-tokens", 12, "--ignore-eos",
                         "--threads", 1)
    assert code == 0, err
    t = tiny_model("llama", seed=3)
    assert out == expected_text(t.model, t.tokenizer, "Hello", 12) + "\n"
    assert "prefill 5 tokens" in err and "decode 11 tokens" in err and "tok/s" in err


def test_generate_sampling_seeded(capsys, tiny_dir):
    args = ["generate", tiny_dir, "--prompt", "abc", "--max-new-tokens", 10, "--temperature", 0.9, "--top-k", 20,
            "--top-p", 0.95, "--ignore-eos"]
    a = run(capsys, *args, "--seed", 7)
    b = run(capsys, *args, "--seed", 7)
    assert a[0] == 0 and a[1] == b[1]
    t = tiny_model("llama", seed=3)
    assert a[1] == expected_text(t.model, t.tokenizer, "abc", 10, temperature=0.9, top_k=20, top_p=0.95, seed=7) + "\n"


def test_generate_quantized_checkpoint(capsys, int4_dir):
    code, out, err = run(capsys, "generate", int4_dir, "--prompt", "Hi", "--max-new-tokens", 6, "--ignore-eos",
                         "--float-activations")
    assert code == 0, err
    assert "float activations (asked for)" in err
    q = api.load(str(int4_dir))
    assert out == expected_text(q.model, q.tokenizer, "Hi", 6) + "\n"
    code, out8, err = run(capsys, "generate", int4_dir, "--prompt", "Hi", "--max-new-tokens", 6, "--ignore-eos",
                          "--int8-activations", "--kv-cache", "float16")
    assert code == 0 and len(out8) > 1, err


def test_generate_errors(capsys, tiny_dir):
    one_line_error(*run(capsys, "generate", tiny_dir, "--prompt", "x" * 250, "--max-new-tokens", 10)[::2],
                   "exceeds the model's maximum length 256")
    one_line_error(*run(capsys, "generate", tiny_dir, "--prompt", "")[::2], "--prompt is empty")
    one_line_error(*run(capsys, "generate", tiny_dir, "--prompt", "a", "--chat")[::2], "no chat template")
    one_line_error(*run(capsys, "generate", tiny_dir, "--prompt", "a", "--top-p", 2)[::2], "top_p")
    one_line_error(*run(capsys, "generate", tiny_dir, "--prompt", "a", "--max-new-tokens", 0)[::2],
                   "--max-new-tokens")
    one_line_error(*run(capsys, "generate", tiny_dir, "--prompt", "a", "--threads", 0)[::2], "--threads")
    one_line_error(*run(capsys, "generate", tiny_dir.parent / "nope", "--prompt", "a")[::2], "model not found")


def test_bench_table(capsys, tiny_dir, int4_dir):
    for model, method in ((tiny_dir, "lowbit float"), (int4_dir, "lowbit rtn")):
        code, out, err = run(capsys, "bench", model, "--prompt-len", 16, "--new-tokens", 8, "--repeats", 1,
                             "--threads", 1)
        assert code == 0, err
        head, row = out.strip().splitlines()
        cols = head.split()
        assert cols[:2] == ["model", "method"] and "decode" in cols and "RSS" in cols
        cells = row.split()
        assert " ".join(cells[1:3]) == method and cells[4] == "1" and cells[5] == "16" and cells[6] == "8"
        assert float(cells[7]) > 0 and float(cells[8]) > 0  # prefill, decode tok/s
    for model, flag, act in ((tiny_dir, (), "float"), (int4_dir, ("--int8-activations", "--kv-cache", "float16"), "int8")):
        code, out, err = run(capsys, "bench", model, "--prompt-len", 8, "--new-tokens", 4, "--repeats", 1,
                             "--markdown", *flag)
        assert code == 0, err
        head, _, row = out.strip().splitlines()
        got = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
        assert got["step"] == "C" and got["act"] == act and float(got["decode tok/s"]) > 0
        assert got["KV"] == ("fp16" if flag else "fp32")
    code, out, err = run(capsys, "bench", tiny_dir, "--prompt-len", 8, "--new-tokens", 4, "--repeats", 1,
                         "--transformers")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[2].split()[1] == "transformers"
    code, out, _ = run(capsys, "bench", tiny_dir, "--prompt-len", 4, "--new-tokens", 2, "--repeats", 1, "--markdown")
    assert code == 0 and out.splitlines()[1].startswith("| ---") and out.count("\n") == 3
    one_line_error(*run(capsys, "bench", tiny_dir, "--prompt-len", 250, "--new-tokens", 10)[::2],
                   "exceed the model's maximum length 256")
    one_line_error(*run(capsys, "bench", tiny_dir, "--repeats", 0)[::2], "--repeats")
