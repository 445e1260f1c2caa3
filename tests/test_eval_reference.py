"""lowbit.eval.reference: a cached reference of the original model gives the lockstep numbers
(exactly for the hidden-state kind, as an unbiased estimate with a measured error for top-k +
tail samples), and its cache file is keyed, atomic and checked."""

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
    key_hash,
    load_reference,
    reference_key,
    sampled_kl_rows,
    save_reference,
    score_against_reference,
    tail_sample_rows,
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


def test_tail_samples_are_systematic_draws_from_the_tail():
    """Over a fine grid of offsets u every tail token is drawn with frequency min(1, m p~_i)
    (systematic sampling: with probability exactly that, never twice below it), in strata of
    decreasing probability; the top-k part is topk_rows'."""
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(2 * torch.randn(3, 50, generator=gen), -1)
    k, m, grid = 5, 4, 4000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    for r in range(3):
        t = tail_sample_rows(lp[r:r + 1].expand(grid, -1), k, m, u)
        ids, logp, rest = topk_rows(lp[r:r + 1], k)
        assert torch.equal(t["ids"], ids.expand(grid, -1)) and torch.equal(t["logp"], logp.expand(grid, -1))
        assert torch.allclose(t["rest"], rest.expand(grid), rtol=0, atol=1e-6)
        assert torch.equal(t["tail_logp"], lp[r].gather(0, t["tail_ids"].reshape(-1)).reshape(grid, m))
        assert bool((t["tail_logp"][:, 1:] <= t["tail_logp"][:, :-1]).all())  # one per stratum, most likely first
        tail = torch.ones(50, dtype=torch.bool)
        tail[ids[0]] = False
        p_tail = (lp[r].double() - float(rest)).exp() * tail
        hits = torch.zeros(50, dtype=torch.float64)
        hits.index_add_(0, t["tail_ids"].reshape(-1), torch.ones(grid * m, dtype=torch.float64))
        expected = m * p_tail * grid  # expected draws; inclusion probability min(1, m p~)
        assert torch.allclose(hits, expected, rtol=0, atol=1.01)  # the grid's rounding only
        assert float(hits[~tail].sum()) == 0


def test_tail_samples_edge_cases():
    lp = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -math.inf, -math.inf, 0.0],
                                         [5.0, 1.0, 1.0, 1.0, -math.inf, -math.inf, -math.inf, -math.inf]]), -1)
    u = torch.tensor([0.999999999, 0.0], dtype=torch.float64)
    t = tail_sample_rows(lp, 2, 6, u)
    assert t["ids"].tolist() == [[0, 1], [0, 1]]  # ties go to the lower id
    assert set(t["tail_ids"][0].tolist()) <= {2, 3, 4, 7} and set(t["tail_ids"][1].tolist()) <= {2, 3}
    assert bool(torch.isfinite(t["tail_logp"]).all())  # a token without mass is never drawn
    assert t["tail_ids"][1].tolist() == [2, 2, 2, 3, 3, 3]  # two tokens, six strata
    full = tail_sample_rows(lp, 8, 3, u)  # no tail
    assert torch.equal(full["rest"], torch.full((2,), -math.inf)) and torch.equal(full["tail_ids"], torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(full["tail_logp"], torch.full((2, 3), -math.inf))
    none = tail_sample_rows(lp, 2, 0, u)
    assert none["tail_ids"].shape == (2, 0) and torch.equal(none["rest"], t["rest"])
    lq = torch.log_softmax(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), -1)
    fwd, rev, fv, rv = sampled_kl_rows(full["ids"], full["logp"], full["rest"], full["tail_ids"], full["tail_logp"], lq)
    exact = (lp.double().exp() * (lp.double() - lq.double())).nan_to_num(0).sum(-1)
    assert torch.allclose(fwd, exact, atol=1e-6) and torch.equal(fv, torch.zeros(2))
    # the model puts no mass on a token the original can emit: an infinite forward KL, as exactly
    lq0 = lq.clone()
    lq0[0, t["tail_ids"][0, 0]] = -math.inf
    fwd0, rev0, _, _ = sampled_kl_rows(t["ids"], t["logp"], t["rest"], t["tail_ids"], t["tail_logp"], lq0)
    assert fwd0[0] == math.inf and math.isfinite(rev0[0]) and math.isfinite(fwd0[1])


def naive_sampled(lp, lq, ids, tail_ids):
    """float64, row by row, straight from the module docstring's formulas."""
    fwd, rev = [], []
    for a, b, top, smp in zip(lp.double(), lq.double(), ids.tolist(), tail_ids.tolist()):
        rest = [i for i in range(a.numel()) if i not in top]
        pa, pb = a.exp(), b.exp()
        pr, qr = float(pa[rest].sum()), float(pb[rest].sum())
        f = sum(float(pa[i] * (a[i] - b[i])) for i in top) + pr * math.log(pr / qr)
        r = sum(float(pb[i] * (b[i] - a[i])) for i in top) + qr * math.log(qr / pr)
        w = [(float(pb[i]) / qr) / (float(pa[i]) / pr) for i in smp]
        f += pr * sum(x - 1 - math.log(x) for x in w) / len(w)
        r += qr * sum(x * math.log(x) - x + 1 for x in w) / len(w)
        fwd.append(f)
        rev.append(r)
    return torch.tensor(fwd, dtype=torch.float64), torch.tensor(rev, dtype=torch.float64)


def test_sampled_kl_matches_the_formula():
    gen = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(10, 60, generator=gen)
    lp = torch.log_softmax(logits, -1)
    lq = torch.log_softmax(logits + 0.8 * torch.randn(10, 60, generator=gen), -1)
    t = tail_sample_rows(lp, 6, 5, torch.rand(10, generator=gen, dtype=torch.float64))
    fwd, rev, fv, rv = sampled_kl_rows(t["ids"], t["logp"], t["rest"], t["tail_ids"], t["tail_logp"], lq)
    nf, nr = naive_sampled(lp, lq, t["ids"], t["tail_ids"])
    assert torch.allclose(fwd, nf, rtol=1e-5, atol=1e-7) and torch.allclose(rev, nr, rtol=1e-5, atol=1e-7)
    bf, br = bucket_kl_rows(t["ids"], t["logp"], t["rest"], lq)
    assert bool((fwd >= bf).all()) and bool((rev >= br).all())  # non-negative tail terms
    assert bool((fv > 0).all()) and bool((rv > 0).all())


def test_sampled_kl_is_unbiased_where_the_bucket_is_a_lower_bound():
    """Vocabulary 2000, k = 8, m = 8, 300 positions, 64 seeds: the bucket under-reports KL by
    far; the sampled estimate's mean over seeds is the exact KL (within its standard error), every
    seed's run is within a few percent, and the standard error it reports is the spread."""
    gen = torch.Generator().manual_seed(0)
    n, V, k, m, seeds = 300, 2000, 8, 8, 64
    logits = 2.5 * torch.randn(n, V, generator=gen)
    lp = torch.log_softmax(logits, -1)
    lq = torch.log_softmax(0.9 * logits + 0.6 * torch.randn(n, V, generator=gen), -1)
    exact = np.array([float(_kl(lp, lq).sum()), float(_kl(lq, lp).sum())])
    ids, logp, rest = topk_rows(lp, k)
    bf, br = bucket_kl_rows(ids, logp, rest, lq)
    assert bool((bf <= _kl(lp, lq) + 1e-9).all()) and bool((br <= _kl(lq, lp) + 1e-9).all())
    bucket_err = 1 - np.array([float(bf.sum()), float(br.sum())]) / exact
    assert bucket_err[0] > 0.2 and bucket_err[1] > 0.2  # a lower bound, and far below
    runs, ses = [], []
    for seed in range(seeds):
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        t = tail_sample_rows(lp, k, m, u)
        f, r, fv, rv = sampled_kl_rows(t["ids"], t["logp"], t["rest"], t["tail_ids"], t["tail_logp"], lq)
        runs.append([float(f.sum()), float(r.sum())])
        ses.append([float(fv.sum()) ** 0.5, float(rv.sum()) ** 0.5])
    rel = np.array(runs) / exact - 1
    spread = rel.std(axis=0)  # measured: 1.8 % forward, 2.7 % reverse (300 positions)
    assert np.all(np.abs(rel) < 0.08)  # every run, where the bucket is 57 % / 65 % low
    assert np.all(np.abs(rel.mean(axis=0)) < 4 * spread / seeds**0.5)  # unbiased (measured -0.14 %, -0.24 %)
    assert np.all(np.abs(rel.mean(axis=0)) < 0.005)
    predicted = np.array(ses).mean(axis=0) / exact
    assert np.all((predicted > 0.7 * spread) & (predicted < 1.4 * spread))  # the reported standard error


def _kl(a, b):
    a, b = a.double(), b.double()
    return (a.exp() * (a - b)).sum(-1)


def test_topk_error_is_measured_on_the_audit_positions(pair):
    base, q = pair
    V = base.config.vocab_size
    proto = PplProtocol(ctx=20, max_tokens=None)
    toks = tokens(4 * 20, V, seed=5)
    exact = lockstep(base, q, toks, proto)["q"]
    wins = protocol_windows(toks, proto)
    n = 4 * 19
    bucket = build_reference(base, wins, reference_key("m", wins, "topk", k=4, m=0, audit=10_000), progress=False)
    assert torch.equal(bucket.tensors["audit_pos"], torch.arange(n))  # every position audited
    low = score_against_reference(bucket, q, wins, progress=False)
    assert low.kl_mean < exact.kl_mean and low.kl_rev_mean < exact.kl_rev_mean  # m = 0: lower bounds
    assert 0 < low.kl_rel_err < 1 and 0 < low.kl_rev_rel_err < 1
    assert low.kl_rel_se == 0 and low.kl_rev_rel_se == 0  # nothing sampled, no sampling error
    ref = build_reference(base, wins, reference_key("m", wins, "topk", k=4, m=8, audit=10_000), progress=False)
    got = score_against_reference(ref, q, wins, progress=False)
    for e, g, rel in ((exact.kl_mean, got.kl_mean, got.kl_rel_err), (exact.kl_rev_mean, got.kl_rev_mean, got.kl_rev_rel_err)):
        assert rel == pytest.approx((e - g) / e, rel=1e-5, abs=1e-12)  # every position audited: the run's error
        assert abs(rel) < 0.05
    assert 0 < got.kl_rel_se < 0.05 and 0 < got.kl_rev_rel_se < 0.05
    assert abs(got.kl_rel_err) < 4 * got.kl_rel_se  # the standard error tells the size of the error
    assert got.kl_mean > low.kl_mean and got.kl_rev_mean > low.kl_rev_mean
    for r in (low, got):
        same_numbers(r, exact, ("ppl", "nll", "top1", "n_tokens", "delta_ppl"))  # exact either way
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

    def get(model, toks, proto, kind="topk", k=8, m=4, bos=None):
        wins = protocol_windows(toks, proto, bos)
        key = reference_key(fingerprint(model), wins, kind, k=k, m=m)

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
    assert get(base, t, proto, m=5)[1] is False  # other number of tail samples
    assert get(base, t, proto, kind="hidden")[1] is False  # other kind
    assert get(q, t, proto)[1] is False  # other model
    assert len(built) == 8 and len({str(k) for k in built}) == 8
    assert len(os.listdir(tmp_path)) == 8
    assert get(base, t, proto)[1] is True and len(built) == 8


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
    with pytest.raises(LowbitError, match="No space left on device"):  # one line, not a traceback
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
    with pytest.raises(LowbitError, match="tail-samples"):
        reference_key("m", wins, "topk", m=-1)
    assert "m" not in reference_key("m", wins, "hidden")  # the settings of topk only


def test_a_stale_file_is_reported_and_recomputed(pair, tmp_path):
    """A file of an older format under the name of the current key (or read directly) is
    never mis-read: it is reported as stale and, by cached_reference, rebuilt."""
    base, _ = pair
    wins = protocol_windows(tokens(32, 96), PplProtocol(ctx=16, max_tokens=None))
    key = reference_key("m", wins, "topk", k=3, m=2)
    assert key["format"] == 2 and reference_key("m", wins, "hidden")["format"] == 1
    ref = build_reference(base, wins, key, progress=False)
    old = Reference(key={**key, "format": 1}, tensors={n: t for n, t in ref.tensors.items()
                                                       if not n.startswith("tail_")}, info=ref.info)
    path = save_reference(old, tmp_path / f"topk-{key_hash(key)}.safetensors")
    with pytest.raises(LowbitError, match="stale .*format 1.*format 2"):
        load_reference(path)
    with pytest.raises(LowbitError, match="stale"):
        cached_reference(key, tmp_path, lambda: ref, on_corrupt="error")
    logged = []
    got, hit = cached_reference(key, tmp_path, lambda: ref, log=logged.append)
    assert not hit and len(logged) == 1 and "stale" in logged[0]
    assert load_reference(path, key).key == key


def test_tail_tensors_of_the_wrong_shape_are_rejected(pair, tmp_path):
    base, _ = pair
    wins = protocol_windows(tokens(32, 96), PplProtocol(ctx=16, max_tokens=None))
    key = reference_key("m", wins, "topk", k=3, m=4)
    ref = build_reference(base, wins, key, progress=False)
    assert ref.tensors["tail_ids"].shape == (2 * 15, 4) and ref.tensors["tail_ids"].dtype == torch.int32
    ref.tensors["tail_logp"] = ref.tensors["tail_logp"][:, :3].contiguous()
    path = save_reference(ref, tmp_path / "x.safetensors")  # a sound checksum over the wrong shapes
    with pytest.raises(LowbitError, match="corrupt .*tail_logp do not have the shapes"):
        load_reference(path, key)


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


def test_cli_int8_activations_scores_the_int8_path(quantized, capsys, tmp_path):
    """--int8-activations: the quantized layers run their int8 product (kernels.prefer), so the
    numbers move a little from the float path's; the memory and hidden references agree on
    them; a results file keeps float and int8 rows apart."""
    from lowbit.kernels import a8

    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    d, text, (q4, _) = quantized
    common = ["--text", text, "--max-tokens", 512, "--ctx", 64, "--no-latency"]
    res = tmp_path / "rows.jsonl"
    code, flt, err = cli(capsys, "eval", q4, *common, "--reference", "memory", "--results", res)
    assert code == 0, err
    code, i8, err = cli(capsys, "eval", q4, *common, "--reference", "memory", "--int8-activations", "--results", res)
    assert code == 0, err
    assert "int8 activations" in err
    head, rows_f = table(flt)
    _, rows_i = table(i8)
    name = next(k for k in rows_f if k != "original")
    ppl = head.index("ppl")
    pf, pi = float(rows_f[name][ppl]), float(rows_i[name][ppl])
    assert pf != pi and abs(pf - pi) < 0.05 * pf      # a different product, the same model
    assert rows_f["original"] == rows_i["original"]   # the float original is untouched
    code, hid, err = cli(capsys, "eval", q4, *common, "--reference", "hidden", "--int8-activations",
                         "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert table(hid)[1][name] == rows_i[name]


def test_cli_topk_reference_reports_its_error(quantized, capsys, tmp_path):
    d, text, (q4, _) = quantized
    common = ["--text", text, "--max-tokens", 512, "--ctx", 64, "--no-latency", "--cache-dir", tmp_path]
    code, out, err = cli(capsys, "eval", q4, *common, "--topk", 8, "--tail-samples", 4)
    assert code == 0, err
    headers, rows = table(out)
    for col in ("KL ±%", "KL rev ±%", "KL err %", "KL rev err %"):
        assert rows["original"][headers.index(col)] == "-"
        assert 0 < abs(float(rows["q4"][headers.index(col)])) < 100, col
    _, mem = table(cli(capsys, "eval", q4, *common[:-2], "--reference", "memory")[1])
    kl, kl_mem = float(rows["q4"][headers.index("KL mean")]), float(mem["q4"][headers.index("KL mean")])
    assert abs(kl / kl_mem - 1) < 0.1  # an estimate, close
    code, bucket, err = cli(capsys, "eval", q4, *common, "--topk", 8, "--tail-samples", 0)
    assert code == 0, err
    _, r = table(bucket)
    assert float(r["q4"][headers.index("KL mean")]) < kl_mem and float(r["q4"][headers.index("KL ±%")]) == 0
    code, full, err = cli(capsys, "eval", q4, *common, "--topk", 10_000)  # k >= vocabulary: exact
    assert code == 0, err
    h, r = table(full)
    assert r["q4"][h.index("KL mean")] == mem["q4"][h.index("KL mean")]
    assert float(r["q4"][h.index("KL err %")]) == 0.0 and float(r["q4"][h.index("KL ±%")]) == 0.0


@pytest.mark.parametrize("argv,needle", [
    (["--reference", "hidden", "--topk", "8"], "--topk applies to --reference topk"),
    (["--reference", "memory", "--tail-samples", "8"], "--tail-samples applies to --reference topk"),
    (["--topk", "0"], "--topk must be a positive integer"),
    (["--tail-samples", "-1"], "--tail-samples must be an integer >= 0"),
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


def test_auto_falls_back_to_topk_only_when_the_hidden_reference_would_crowd_the_disk(quantized, capsys, tmp_path,
                                                                                      monkeypatch):
    from lowbit import api
    from lowbit.eval import reference
    from lowbit.eval.reference import hidden_reference_bytes
    from lowbit.eval.compare import compute_bytes

    d, text, (q4, _) = quantized
    m = tiny_model("llama").model
    V, H = m.get_output_embeddings().weight.shape
    assert hidden_reference_bytes(m, 8, 64) == 4 * H * (8 * 64 + V)
    assert reference.free_bytes(tmp_path / "not" / "yet") == reference.free_bytes(tmp_path) > 0
    monkeypatch.setattr(api, "available_memory", lambda: compute_bytes(str(d)))  # no room for both: not memory
    common = ["eval", q4, "--text", text, "--max-tokens", 512, "--ctx", 64, "--no-latency", "--cache-dir", tmp_path]
    need = 4 * H * (8 * 64 + V)
    monkeypatch.setattr(reference, "free_bytes", lambda folder: 2 * need + 1)
    code, out, err = cli(capsys, *common)
    assert code == 0, err
    assert "reference: hidden" in err and "KL ±%" not in out
    monkeypatch.setattr(reference, "free_bytes", lambda folder: 2 * need - 1)
    code, out, err = cli(capsys, *common)
    assert code == 0, err
    assert "using the compact topk reference" in err and "reference: topk" in err and "KL ±%" in out
