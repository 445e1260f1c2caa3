"""lowbit.eval.reference: a cached reference of the original model gives the lockstep numbers
(exactly for the hidden-state kind, as a measured lower bound for top-k), and its cache file is
keyed, atomic and checked."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.quality import PplProtocol, evaluate_quality, protocol_windows
from lowbit.eval.reference import (
    Reference,
    build_reference,
    bucket_kl_rows,
    cached_reference,
    fingerprint,
    load_reference,
    reference_key,
    save_reference,
    score_against_reference,
    topk_rows,
)
from lowbit.eval.streaming import InMemory
from lowbit.models.tiny import tiny_model

FIELDS = ("ppl", "nll", "kl_mean", "kl_p99", "kl_rev_mean", "kl_rev_p99", "top1", "n_tokens", "delta_ppl")


def sharpened(family="llama", seed=0, **overrides):
    m = tiny_model(family, seed=seed, **overrides).model
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(6.0)  # far from uniform predictions
    return m


def perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return other.eval()


def tokens(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    base = sharpened()
    return base, perturbed(base)


def lockstep(base, q, toks, proto, bos=None):
    return evaluate_quality({"b": base, "q": q}, "b", toks, proto, bos_id=bos, progress=False)


def same_numbers(a, b, fields=FIELDS):
    for f in fields:
        assert getattr(a, f) == getattr(b, f), f
    assert np.array_equal(a.token_nll, b.token_nll)


# ---------------------------------------------------------------- exact math


@pytest.mark.parametrize("family,bos", [("llama", None), ("gemma3_text", 5), ("qwen2", None)])
@pytest.mark.parametrize("streamed", [False, True])
def test_hidden_reference_gives_the_lockstep_numbers_bit_for_bit(family, bos, streamed):
    overrides = {"final_logit_softcapping": 20.0} if family == "gemma3_text" else {}
    base = sharpened(family, seed=2, **overrides)
    q = perturbed(base)
    V = base.config.vocab_size
    proto = PplProtocol(ctx=24, max_tokens=None)
    toks = tokens(4 * 24, V, seed=3)
    exact = lockstep(base, q, toks, proto, bos)
    wins = protocol_windows(toks, proto, bos)
    key = reference_key(fingerprint(base), wins, "hidden")
    src = InMemory(base) if streamed else base
    ref = build_reference(src, wins, key, progress=False)
    assert ref.tensors["hidden"].shape == (4, 24, base.config.hidden_size)
    same_numbers(ref.baseline_result(), exact["b"], ("ppl", "nll", "n_tokens"))
    got = score_against_reference(ref, InMemory(q) if streamed else q, wins, progress=False)
    same_numbers(got, exact["q"])
    assert got.kl_rel_err is None and got.kl_mean > 1e-4


def test_topk_with_the_whole_vocabulary_equals_the_exact_kl(pair):
    base, q = pair
    V = base.config.vocab_size
    proto = PplProtocol(ctx=20, max_tokens=None)
    toks = tokens(5 * 20, V, seed=4)
    exact = lockstep(base, q, toks, proto)
    wins = protocol_windows(toks, proto)
    ref = build_reference(base, wins, reference_key("m", wins, "topk", k=V, audit=0), progress=False)
    assert torch.equal(ref.tensors["rest"], torch.full((5 * 19,), -math.inf))
    got = score_against_reference(ref, q, wins, progress=False)
    same_numbers(got, exact["q"])
    assert got.kl_rel_err is None  # no audit positions, nothing measured


def naive_bucket(lp, lq, k):
    """float64, row by row, straight from the formula."""
    fwd, rev = [], []
    for a, b in zip(lp.double(), lq.double()):
        top = set(torch.topk(a, k).indices.tolist())
        rest = [i for i in range(a.numel()) if i not in top]
        pa, pb = a.exp(), b.exp()
        pr, qr = float(pa[rest].sum()), float(pb[rest].sum())
        f = sum(float(pa[i] * (a[i] - b[i])) for i in top) + (pr * math.log(pr / qr) if pr > 0 else 0.0)
        r = sum(float(pb[i] * (b[i] - a[i])) for i in top) + (qr * math.log(qr / pr) if qr > 0 else 0.0)
        fwd.append(f)
        rev.append(r)
    return torch.tensor(fwd, dtype=torch.float64), torch.tensor(rev, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_bucket_kl_matches_the_formula_and_bounds_the_exact_kl_from_below(k):
    gen = torch.Generator().manual_seed(k)
    logits = 3 * torch.randn(12, 40, generator=gen)
    lp = torch.log_softmax(logits, -1)
    lq = torch.log_softmax(logits + 0.7 * torch.randn(12, 40, generator=gen), -1)
    ids, logp, rest = topk_rows(lp, k)
    assert torch.equal(ids, ids.sort(-1).values) and torch.equal(logp, lp.gather(-1, ids))
    assert torch.all(logp.min(-1).values >= lp.scatter(-1, ids, -math.inf).max(-1).values)  # the k largest
    fwd, rev = bucket_kl_rows(ids, logp, rest, lq)
    nf, nr = naive_bucket(lp, lq, k)
    assert torch.allclose(fwd, nf, rtol=1e-4, atol=2e-7) and torch.allclose(rev, nr, rtol=1e-4, atol=2e-7)
    exact_f = (lp.double().exp() * (lp.double() - lq.double())).sum(-1)
    exact_r = (lq.double().exp() * (lq.double() - lp.double())).sum(-1)
    assert torch.all(fwd <= exact_f + 1e-6) and torch.all(rev <= exact_r + 1e-6)
    if k == 40:
        assert torch.allclose(fwd, exact_f, rtol=1e-6) and torch.allclose(rev, exact_r, rtol=1e-6)
    else:
        assert float((exact_f - fwd).sum()) > 0 and float((exact_r - rev).sum()) > 0


def test_topk_error_is_measured_on_the_audit_positions(pair):
    base, q = pair
    V = base.config.vocab_size
    proto = PplProtocol(ctx=20, max_tokens=None)
    toks = tokens(4 * 20, V, seed=5)
    exact = lockstep(base, q, toks, proto)["q"]
    wins = protocol_windows(toks, proto)
    n = 4 * 19
    ref = build_reference(base, wins, reference_key("m", wins, "topk", k=4, audit=10_000), progress=False)
    assert torch.equal(ref.tensors["audit_pos"], torch.arange(n))  # every position audited
    got = score_against_reference(ref, q, wins, progress=False)
    assert got.kl_mean < exact.kl_mean and got.kl_rev_mean < exact.kl_rev_mean  # lower bounds
    assert got.kl_rel_err == pytest.approx((exact.kl_mean - got.kl_mean) / exact.kl_mean, rel=1e-5)
    assert got.kl_rev_rel_err == pytest.approx((exact.kl_rev_mean - got.kl_rev_mean) / exact.kl_rev_mean, rel=1e-5)
    assert 0 < got.kl_rel_err < 1 and 0 < got.kl_rev_rel_err < 1
    same_numbers(got, exact, ("ppl", "nll", "top1", "n_tokens", "delta_ppl"))  # exact either way
    few = build_reference(base, wins, reference_key("m", wins, "topk", k=4, audit=7), progress=False)
    assert few.tensors["audit_pos"].tolist() == [0, 12, 25, 38, 50, 62, 75]  # 75 * i / 6, halves to even
    assert torch.equal(few.tensors["audit_logp"][2], torch.log_softmax(base(wins[1:2]).logits[0, 25 - 19].float(), -1))


def test_scoring_checks_it_is_the_same_text(pair):
    base, q = pair
    proto = PplProtocol(ctx=16, max_tokens=None)
    wins = protocol_windows(tokens(48, 96, seed=1), proto)
    ref = build_reference(base, wins, reference_key("m", wins, "topk", k=3), progress=False)
    other = protocol_windows(tokens(48, 96, seed=2), proto)
    with pytest.raises(LowbitError, match="other tokens"):
        score_against_reference(ref, q, other, progress=False)
    with pytest.raises(LowbitError, match="3 windows of 16 tokens"):
        score_against_reference(ref, q, wins[:2], progress=False)


# ---------------------------------------------------------------- cache


def test_cache_hits_and_misses_on_every_part_of_the_key(pair, tmp_path):
    base, q = pair
    built = []

    def get(model, toks, proto, kind="topk", k=8, bos=None):
        wins = protocol_windows(toks, proto, bos)
        key = reference_key(fingerprint(model), wins, kind, k=k)

        def build():
            built.append(key)
            return build_reference(model, wins, key, progress=False)

        return cached_reference(key, tmp_path, build)

    proto = PplProtocol(ctx=16, max_tokens=None)
    t = tokens(64, 96)
    r1, hit = get(base, t, proto)
    assert not hit and len(built) == 1
    r2, hit = get(base, t, proto)
    assert hit and len(built) == 1 and r2.path == r1.path
    for name in r1.tensors:
        assert torch.equal(r1.tensors[name], r2.tensors[name])
    assert get(base, tokens(64, 96, seed=9), proto)[1] is False  # other text
    assert get(base, t, PplProtocol(ctx=32, max_tokens=None))[1] is False  # other protocol
    assert get(base, t, proto, bos=7)[1] is False  # other BOS rule
    assert get(base, t, proto, k=9)[1] is False  # other k
    assert get(base, t, proto, kind="hidden")[1] is False  # other kind
    assert get(q, t, proto)[1] is False  # other model
    assert len(built) == 7 and len({str(k) for k in built}) == 7
    assert len(os.listdir(tmp_path)) == 7
    assert get(base, t, proto)[1] is True and len(built) == 7


def test_fingerprint_follows_the_weights(tmp_path, pair):
    base, q = pair
    assert fingerprint(base) == fingerprint(copy.deepcopy(base)) != fingerprint(q)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 5_000_000)
    f1 = fingerprint(d)
    assert fingerprint(str(d)) == f1
    data = bytearray((d / "model.safetensors").read_bytes())
    data[2_500_000] = ord("y")  # a change in the middle of a large file: caught by size/mtime
    os.utime(d / "model.safetensors", ns=(1, 1))
    f2 = fingerprint(d)
    (d / "model.safetensors").write_bytes(bytes(data))
    assert len({f1, f2, fingerprint(d)}) == 3
    with pytest.raises(LowbitError, match="no such file"):
        fingerprint(tmp_path / "none")


def test_cache_file_is_written_atomically(pair, tmp_path, monkeypatch):
    base, _ = pair
    wins = protocol_windows(tokens(32, 96), PplProtocol(ctx=16, max_tokens=None))
    ref = build_reference(base, wins, reference_key("m", wins, "topk", k=3), progress=False)
    path = tmp_path / "r.safetensors"
    save_reference(ref, path)
    before = path.read_bytes()
    assert os.listdir(tmp_path) == ["r.safetensors"]

    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    other = build_reference(base, wins, reference_key("m", wins, "topk", k=5), progress=False)
    with pytest.raises(OSError):
        save_reference(other, path)
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["r.safetensors"]  # and no temporary file is left
    assert load_reference(path).key["k"] == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_cache_file_is_detected_and_recomputed(pair, tmp_path, damage):
    base, q = pair
    proto = PplProtocol(ctx=16, max_tokens=None)
    wins = protocol_windows(tokens(48, 96, seed=3), proto)
    key = reference_key(fingerprint(base), wins, "topk", k=4)
    calls = []

    def build():
        calls.append(1)
        return build_reference(base, wins, key, progress=False)

    good, hit = cached_reference(key, tmp_path, build)
    path = good.path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[-10] ^= 0x40  # inside the tensor data: only the checksum can tell
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file at all")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    with pytest.raises(LowbitError, match="corrupt") as info:
        load_reference(path, key)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    with pytest.raises(LowbitError, match="corrupt"):
        cached_reference(key, tmp_path, build, on_corrupt="error")
    assert len(calls) == 1

    logged = []
    again, hit = cached_reference(key, tmp_path, build, log=logged.append)
    assert not hit and len(calls) == 2 and len(logged) == 1 and "corrupt" in logged[0]
    for name in good.tensors:
        assert torch.equal(again.tensors[name], good.tensors[name])
    assert load_reference(path, key).key == key  # replaced by a sound file
    assert cached_reference(key, tmp_path, build)[1] is True


def test_a_file_for_another_key_is_rejected(pair, tmp_path):
    base, _ = pair
    wins = protocol_windows(tokens(32, 96), PplProtocol(ctx=16, max_tokens=None))
    k3 = reference_key("m", wins, "topk", k=3)
    path = save_reference(build_reference(base, wins, k3, progress=False), tmp_path / "x.safetensors")
    with pytest.raises(LowbitError, match="another model"):
        load_reference(path, reference_key("m", wins, "topk", k=4))
    assert isinstance(load_reference(path, k3), Reference)


def test_bad_settings():
    wins = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(LowbitError, match="kind"):
        reference_key("m", wins, "logits")
    with pytest.raises(LowbitError, match="topk"):
        reference_key("m", wins, "topk", k=0)


# ---------------------------------------------------------------- command line

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be. ") * 30


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from lowbit.cli import main
    from lowbit.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("cli")
    d = save_tiny(root / "tiny", "llama")
    text = root / "text.txt"
    text.write_text(TEXT)
    outs = []
    for bits in (4, 3):
        out = root / f"q{bits}"
        assert main(["quantize", str(d), "--bits", str(bits), "--group-size", "32", "-o", str(out)]) == 0
        outs.append(out)
    return d, text, outs


def cli(capsys, *argv):
    from lowbit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(out):
    lines = out.strip().splitlines()
    head = lines[0].split("  ")
    return [h.strip() for h in head if h.strip()], {l.split()[0]: l.split() for l in lines[2:]}


def test_cli_hidden_reference_prints_the_memory_table(quantized, capsys, tmp_path):
    d, text, (q4, q3) = quantized
    common = ["--text", text, "--max-tokens", 512, "--ctx", 64, "--no-latency"]
    code, mem, err = cli(capsys, "compare", q4, q3, *common, "--reference", "memory", "--plot", tmp_path / "a.png")
    assert code == 0, err
    cache = tmp_path / "cache"
    code, hid, err = cli(capsys, "compare", q4, q3, *common, "--reference", "hidden", "--cache-dir", cache,
                         "--plot", tmp_path / "b.png")
    assert code == 0, err
    assert hid == mem  # every number, to the last printed digit
    assert "KL rev" in hid and "KL err" not in hid
    assert "written to" in err and len(os.listdir(cache)) == 1
    code, again, err = cli(capsys, "eval", q4, *common, "--reference", "hidden", "--cache-dir", cache)
    assert code == 0, err
    assert "read from" in err and len(os.listdir(cache)) == 1  # the same reference, no recomputation
    assert again.splitlines()[2:4] == mem.splitlines()[2:4]
    code, alone, err = cli(capsys, "eval", d, *common, "--reference", "hidden", "--cache-dir", cache)
    assert code == 0, err
    code, alone_mem, err = cli(capsys, "eval", d, *common, "--reference", "memory")
    assert code == 0, err
    assert alone == alone_mem and "read from" not in err


def test_cli_topk_reference_reports_its_error(quantized, capsys, tmp_path):
    d, text, (q4, _) = quantized
    common = ["--text", text, "--max-tokens", 512, "--ctx", 64, "--no-latency", "--cache-dir", tmp_path]
    code, out, err = cli(capsys, "eval", q4, *common, "--topk", 8)
    assert code == 0, err
    headers, rows = table(out)
    assert "KL err %" in headers and "KL rev err %" in headers
    err_pct = float(rows["q4"][headers.index("KL err %")])
    assert 0 < err_pct < 100
    assert rows["original"][headers.index("KL err %")] == "-"
    code, full, err = cli(capsys, "eval", q4, *common, "--topk", 10_000)  # k >= vocabulary: exact
    assert code == 0, err
    _, mem = table(cli(capsys, "eval", q4, *common[:-2], "--reference", "memory")[1])
    h, r = table(full)
    assert r["q4"][h.index("KL mean")] == mem["q4"][h.index("KL mean")]
    assert float(r["q4"][h.index("KL err %")]) == 0.0


@pytest.mark.parametrize("argv,needle", [
    (["--reference", "hidden", "--topk", "8"], "--topk applies to --reference topk"),
    (["--topk", "0"], "--topk must be a positive integer"),
    (["--activation-budget", "-1"], "--activation-budget"),
])
def test_cli_reference_errors(quantized, capsys, argv, needle):
    _, text, (q4, _) = quantized
    code, _, err = cli(capsys, "eval", q4, "--text", text, "--no-latency", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error: ") and needle in lines[0]


def test_auto_picks_memory_when_both_fit_and_streams_what_does_not(quantized, monkeypatch):
    from lowbit import api
    from lowbit.eval.compare import EvalSettings, choose_reference, compute_bytes, stream_variant

    d, _, (q4, _) = quantized
    base_bytes = compute_bytes(str(d))
    assert base_bytes == 4 * sum(p.numel() for p in tiny_model("llama").model.parameters())  # float32
    assert compute_bytes(str(q4)) == sum(f.stat().st_size for f in q4.iterdir())
    s = EvalSettings()
    monkeypatch.setattr(api, "available_memory", lambda: 100 * base_bytes)
    assert choose_reference(str(d), [str(q4)], s) == "memory"
    assert not stream_variant(str(q4), s)  # fits, and latency wants it whole
    assert stream_variant(str(q4), EvalSettings(latency=False))  # no latency: streamed anyway
    assert not stream_variant(str(d), EvalSettings(latency=False))  # only checkpoints are streamed here
    monkeypatch.setattr(api, "available_memory", lambda: base_bytes)
    assert choose_reference(str(d), [str(q4)], s) == "hidden"
    assert stream_variant(str(q4), EvalSettings(latency=True)) is (compute_bytes(str(q4)) > 0.5 * base_bytes)
    assert choose_reference(str(d), [], EvalSettings(reference="topk")) == "topk"
