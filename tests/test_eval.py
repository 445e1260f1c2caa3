"""lowbit.eval: the quality protocol against deliberately naive references, latency, size, report."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval import size
from lowbit.eval import (
    LatencyResult,
    PplProtocol,
    dir_size_bytes,
    evaluate_quality,
    format_table,
    human_bytes,
    measure_latency,
    perplexity,
    plot_ppl_vs_bits,
)

VOCAB = 100


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives nearly uniform predictions; sharpen them so ppl/KL are far from trivial.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def perturbed(model, scale: float = 0.05, seed: int = 1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return other.eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def noisy(base):
    return perturbed(base)


def random_tokens(n: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    return torch.randint(low, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- naive references (float64)


def naive_windows(tokens: torch.Tensor, ctx: int, max_tokens, bos_id):
    """The protocol restated as literally as possible: list of model-input windows."""
    stream = tokens.tolist()
    if max_tokens is not None:
        stream = stream[:max_tokens]
    per = ctx - 1 if bos_id is not None else ctx
    windows = []
    start = 0
    while start + per <= len(stream):
        piece = stream[start : start + per]
        windows.append(([bos_id] if bos_id is not None else []) + piece)
        start += per
    return windows


def naive_ppl(model, tokens, ctx, max_tokens=None, bos_id=None):
    """Token by token: each scored token gets its own forward pass over its prefix."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in naive_windows(tokens, ctx, max_tokens, bos_id):
            for i in range(1, len(window)):
                prefix = torch.tensor([window[:i]])
                last = model(prefix).logits[0, -1].double()
                logp = last - torch.logsumexp(last, dim=0)
                total += -float(logp[window[i]])
                count += 1
    return math.exp(total / count), count


def naive_agreement(base, other, tokens, ctx, max_tokens=None, bos_id=None, reverse=False):
    """KL(P_base || P_other) (or KL(P_other || P_base)) per scored position in float64, and top-1 matches."""
    kls, same = [], 0
    with torch.no_grad():
        for window in naive_windows(tokens, ctx, max_tokens, bos_id):
            x = torch.tensor([window])
            lp = torch.log_softmax(base(x).logits[0, :-1].double(), dim=-1)
            lq = torch.log_softmax(other(x).logits[0, :-1].double(), dim=-1)
            if reverse:
                lp, lq = lq, lp
            for i in range(lp.shape[0]):
                kls.append(float((lp[i].exp() * (lp[i] - lq[i])).sum()))
                same += int(lp[i].argmax() == lq[i].argmax())
    kls = np.array(kls)
    return kls.mean(), np.percentile(kls, 99), same / len(kls)


# ---------------------------------------------------------------- protocol


def test_protocol_counts_whole_windows_only():
    p = PplProtocol(ctx=16, max_tokens=None)
    assert p.stride(bos=False) == 16 and p.stride(bos=True) == 15
    assert p.n_windows(100, bos=False) == 6 and p.n_scored(100, bos=False) == 6 * 15
    assert p.n_windows(100, bos=True) == 6 and p.n_scored(100, bos=True) == 6 * 15
    assert p.n_windows(15, bos=False) == 0 and p.n_windows(15, bos=True) == 1
    capped = PplProtocol(ctx=16, max_tokens=50)
    assert capped.n_windows(10_000, bos=False) == 3
    assert PplProtocol() == PplProtocol(ctx=512, max_tokens=16384)
    assert PplProtocol().n_scored(10**6, bos=False) == 32 * 511
    with pytest.raises(Exception):
        PplProtocol().ctx = 3  # frozen
    for bad in ({"ctx": 1}, {"ctx": 2.5}, {"max_tokens": 0}):
        with pytest.raises(LowbitError):
            PplProtocol(**bad)


def test_baseline_against_itself_is_exactly_zero_kl(base):
    tokens = random_tokens(5 * 32)
    twin = copy.deepcopy(base)
    res = evaluate_quality({"base": base, "alias": base, "copy": twin}, "base", tokens,
                           PplProtocol(ctx=32, max_tokens=None), progress=False)
    assert list(res) == ["base", "alias", "copy"]
    b = res["base"]
    assert b.kl_mean is None and b.kl_p99 is None and b.top1 is None and b.delta_ppl is None
    assert b.kl_rev_mean is None and b.kl_rev_p99 is None
    assert b.n_tokens == 5 * 31
    for name in ("alias", "copy"):
        r = res[name]
        assert r.kl_mean == 0.0 and r.kl_p99 == 0.0
        assert r.kl_rev_mean == 0.0 and r.kl_rev_p99 == 0.0
        assert r.top1 == 1.0
        assert r.ppl == b.ppl and r.delta_ppl == 0.0 and r.n_tokens == b.n_tokens


@pytest.mark.parametrize("bos_id", [None, 7])
def test_ppl_equals_naive_token_by_token_reference(base, bos_id):
    tokens = random_tokens(3 * 24 + 5, seed=3, low=10)
    proto = PplProtocol(ctx=24, max_tokens=None)
    res = perplexity(base, tokens, proto, bos_id=bos_id, progress=False)
    ref, count = naive_ppl(base, tokens, 24, bos_id=bos_id)
    assert res.n_tokens == count == 3 * 23
    assert res.ppl == pytest.approx(ref, rel=1e-6)
    assert res.nll == pytest.approx(math.log(ref), rel=1e-6)
    assert abs(res.ppl / VOCAB - 1) > 0.2  # sharpened: far from the uniform model's ppl == VOCAB


@pytest.mark.parametrize("bos_id", [None, 7])
def test_kl_and_top1_equal_float64_reference(base, noisy, bos_id):
    tokens = random_tokens(4 * 32, seed=4)
    proto = PplProtocol(ctx=32, max_tokens=None)
    res = evaluate_quality({"fp": base, "q": noisy}, "fp", tokens, proto, bos_id=bos_id, progress=False)
    kl_mean, kl_p99, top1 = naive_agreement(base, noisy, tokens, 32, bos_id=bos_id)
    q = res["q"]
    assert q.kl_mean > 1e-4  # the perturbation is visible
    assert q.kl_mean == pytest.approx(kl_mean, rel=1e-4, abs=1e-7)
    assert q.kl_p99 == pytest.approx(kl_p99, rel=1e-4, abs=1e-7)
    assert q.kl_p99 >= q.kl_mean
    assert q.top1 == pytest.approx(top1, abs=1e-12)
    assert 0.0 < q.top1 < 1.0
    assert q.delta_ppl == pytest.approx(q.ppl - res["fp"].ppl, abs=1e-12)
    ref_ppl, _ = naive_ppl(noisy, tokens, 32, bos_id=bos_id)
    assert q.ppl == pytest.approx(ref_ppl, rel=1e-6)
    rev_mean, rev_p99, _ = naive_agreement(base, noisy, tokens, 32, bos_id=bos_id, reverse=True)
    assert q.kl_rev_mean == pytest.approx(rev_mean, rel=1e-4, abs=1e-7)
    assert q.kl_rev_p99 == pytest.approx(rev_p99, rel=1e-4, abs=1e-7)
    assert abs(q.kl_rev_mean - q.kl_mean) > 1e-4 * q.kl_mean  # a different number, not a copy


def test_token_nll_and_paired_ppl_ratio(base, noisy):
    from lowbit.eval.quality import paired_ppl_ratio

    tokens = random_tokens(5 * 20, seed=6)
    proto = PplProtocol(ctx=20, max_tokens=None)
    res = evaluate_quality({"fp": base, "q": noisy}, "fp", tokens, proto, progress=False)
    a, b = res["q"].token_nll, res["fp"].token_nll
    assert a.shape == b.shape == (res["q"].n_tokens,) == (5 * 19,)
    assert float(np.mean(a.astype(np.float64))) == pytest.approx(res["q"].nll, rel=1e-6)
    ratio, se = paired_ppl_ratio(a, b, block=19)
    assert ratio == pytest.approx(res["q"].ppl / res["fp"].ppl, rel=1e-6)
    d = (a.astype(np.float64) - b).reshape(5, 19).mean(1)  # naive: sd of window means / sqrt(n)
    assert se == pytest.approx(ratio * math.sqrt(sum((x - d.mean()) ** 2 for x in d) / 4 / 5), rel=1e-9)
    r2, se2 = paired_ppl_ratio(b, b, block=19)
    assert r2 == 1.0 and se2 == 0.0
    with pytest.raises(LowbitError, match="blocks of 7"):
        paired_ppl_ratio(a, b, block=7)
    with pytest.raises(LowbitError, match="equal-length"):
        paired_ppl_ratio(a[:-1], b, block=19)


class Recorder(nn.Module):
    """Wraps a model and logs (name, input ids) of every call into a shared list."""

    def __init__(self, inner, name, log):
        super().__init__()
        self.inner, self.name, self.log = inner, name, log

    def forward(self, input_ids):
        self.log.append((self.name, input_ids[0].tolist()))
        return self.inner(input_ids)


@pytest.mark.parametrize("bos_id", [None, 99])
def test_windows_are_consecutive_whole_and_in_lockstep(base, noisy, bos_id):
    ctx = 16
    tokens = random_tokens(5 * ctx + 11, seed=5, low=1)  # not a multiple of ctx: tail dropped
    log = []
    models = {"b": Recorder(base, "b", log).eval(), "q": Recorder(noisy, "q", log).eval()}
    res = evaluate_quality(models, "b", tokens, PplProtocol(ctx=ctx, max_tokens=None), bos_id=bos_id, progress=False)
    expected = naive_windows(tokens, ctx, None, bos_id)
    n_windows = len(tokens) // (ctx - 1 if bos_id is not None else ctx)
    assert len(expected) == n_windows
    # baseline then model for window 0, then window 1, ...: never two windows of one model in a row
    assert log == [(name, w) for w in expected for name in ("b", "q")]
    assert all(len(w) == ctx for _, w in log)
    if bos_id is not None:
        assert all(w[0] == bos_id and bos_id not in w[1:] for _, w in log)
    assert res["b"].n_tokens == res["q"].n_tokens == n_windows * (ctx - 1)


def test_max_tokens_caps_the_stream(base):
    tokens = random_tokens(1000, seed=6)
    log = []
    res = perplexity(Recorder(base, "m", log).eval(), tokens, PplProtocol(ctx=20, max_tokens=70), progress=False)
    assert [w for _, w in log] == [tokens[i * 20 : (i + 1) * 20].tolist() for i in range(3)]
    assert res.n_tokens == 3 * 19
    ref, _ = naive_ppl(base, tokens, 20, max_tokens=70)
    assert res.ppl == pytest.approx(ref, rel=1e-6)


class NaNModel(nn.Module):
    def forward(self, input_ids):
        return torch.full((1, input_ids.shape[1], VOCAB), float("nan"))


def test_broken_model_reports_nan_instead_of_raising(base):
    res = evaluate_quality({"b": base, "broken": NaNModel().eval()}, "b", random_tokens(64),
                           PplProtocol(ctx=16, max_tokens=None), progress=False)
    assert math.isfinite(res["b"].ppl)
    assert math.isnan(res["broken"].ppl) and math.isnan(res["broken"].kl_mean)


class Masked(nn.Module):
    """Logits of ids >= 90 are -inf (e.g. padded vocabulary rows): KL must stay finite."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        logits = self.inner(input_ids).logits.clone()
        logits[..., 90:] = float("-inf")
        return logits


def test_kl_ignores_impossible_tokens(base, noisy):
    tokens = random_tokens(64, seed=8, low=0) % 90
    res = evaluate_quality({"b": Masked(base).eval(), "q": Masked(noisy).eval()}, "b", tokens,
                           PplProtocol(ctx=16, max_tokens=None), progress=False)
    with torch.no_grad():
        kls = []
        for w in naive_windows(tokens, 16, None, None):
            x = torch.tensor([w])
            lp = torch.log_softmax(base(x).logits[0, :-1, :90].double(), -1)
            lq = torch.log_softmax(noisy(x).logits[0, :-1, :90].double(), -1)
            kls += (lp.exp() * (lp - lq)).sum(-1).tolist()
    assert math.isfinite(res["q"].kl_mean) and math.isfinite(res["q"].ppl)
    assert res["q"].kl_mean == pytest.approx(float(np.mean(kls)), rel=1e-4, abs=1e-7)


def test_quality_input_errors(base):
    proto = PplProtocol(ctx=16, max_tokens=None)
    tokens = random_tokens(64)
    with pytest.raises(LowbitError, match="baseline 'x'"):
        evaluate_quality({"b": base}, "x", tokens, proto, progress=False)
    with pytest.raises(LowbitError, match="too few tokens: 15"):
        evaluate_quality({"b": base}, "b", tokens[:15], proto, progress=False)
    with pytest.raises(LowbitError, match="out of range"):
        evaluate_quality({"b": base}, "b", tokens + VOCAB, proto, progress=False)
    with pytest.raises(LowbitError, match="token id 199 is out of range for a vocabulary of 100"):
        evaluate_quality({"n": NaNModel().eval()}, "n", tokens + VOCAB, proto, progress=False)  # no embeddings
    with pytest.raises(LowbitError, match="1-D"):
        evaluate_quality({"b": base}, "b", tokens[None], proto, progress=False)
    with pytest.raises(LowbitError, match="non-empty"):
        evaluate_quality({}, "b", tokens, proto, progress=False)
    training = copy.deepcopy(base).train()
    with pytest.raises(LowbitError, match="training mode"):
        evaluate_quality({"b": base, "t": training}, "b", tokens, proto, progress=False)
    with pytest.raises(LowbitError) as info:
        evaluate_quality({"b": base}, "x", tokens, proto, progress=False)
    assert "\n" not in str(info.value)


def test_progress_bar_goes_to_stderr(base, capsys):
    perplexity(base, random_tokens(64), PplProtocol(ctx=16, max_tokens=None), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "quality" in captured.err


# ---------------------------------------------------------------- latency


def test_latency_uses_kv_cache_one_token_per_decode_step(base):
    lengths = []
    handle = base.register_forward_pre_hook(lambda mod, args, kwargs: lengths.append(
        (args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    try:
        res = measure_latency(base, prompt_len=12, decode_tokens=5, warmup=1, repeats=2)
    finally:
        handle.remove()
    assert isinstance(res, LatencyResult)
    assert lengths == [12, 1, 1, 1, 1, 1] * 3  # (warmup + repeats) runs: prefill then 5 single tokens
    assert res.prefill_ms > 0 and res.decode_ms_per_token > 0
    assert res.prefill_tok_s == pytest.approx(12 / (res.prefill_ms / 1000))
    assert res.decode_tok_s == pytest.approx(1000 / res.decode_ms_per_token)
    assert (res.prompt_len, res.decode_tokens, res.repeats, res.device) == (12, 5, 2, "cpu")
    assert res.threads == torch.get_num_threads()


def test_latency_input_errors(base):
    with pytest.raises(LowbitError, match="prompt_len"):
        measure_latency(base, prompt_len=0)
    with pytest.raises(LowbitError, match="repeats"):
        measure_latency(base, repeats=0)
    with pytest.raises(LowbitError, match="vocab"):
        measure_latency(NaNModel(), prompt_len=4)


# ---------------------------------------------------------------- size


def test_dir_size_counts_each_file_once(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 24)
    os.symlink(tmp_path / "a.bin", tmp_path / "sub" / "link.bin")  # same file again
    os.link(tmp_path / "sub" / "b.bin", tmp_path / "hard.bin")  # same inode again
    os.symlink(tmp_path / "sub", tmp_path / "dirlink")  # not descended into
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    assert dir_size_bytes(tmp_path) == 1024
    assert dir_size_bytes(str(tmp_path / "a.bin")) == 1000
    with pytest.raises(LowbitError, match="no such file"):
        dir_size_bytes(tmp_path / "nope")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"), (10 * 1024, "10.0 KiB"),
    (1023 * 1024 + 1000, "1.00 MiB"), (135 * 2**20, "135 MiB"), (int(1.07 * 2**30), "1.07 GiB"),
    (-2048, "-2.00 KiB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


# ---------------------------------------------------------------- report

ROWS = [
    {"name": "fp32", "bits": 32.0, "ppl": 30.861, "kl": None, "baseline": True},
    {"name": "rtn-w4g128", "bits": 4.25, "ppl": 33.5, "kl": 0.0712, "group": "rtn"},
    {"name": "gptq|w3", "bits": 3.25, "ppl": 41.0, "kl": 0.21, "group": "gptq"},
]
COLS = [("name", "variant", None), ("bits", "bits/w", ".2f"), ("ppl", "ppl", ".3f"), ("kl", "KL", ".4f")]


def test_format_table_plain_is_aligned():
    assert format_table(ROWS, COLS) == "\n".join([
        "variant     bits/w     ppl      KL",
        "----------  ------  ------  ------",
        "fp32         32.00  30.861       -",
        "rtn-w4g128    4.25  33.500  0.0712",
        "gptq|w3       3.25  41.000  0.2100",
    ])


def test_format_table_markdown():
    assert format_table(ROWS, COLS, markdown=True) == "\n".join([
        "| variant    | bits/w |    ppl |     KL |",
        "| ---------- | -----: | -----: | -----: |",
        "| fp32       |  32.00 | 30.861 |      - |",
        "| rtn-w4g128 |   4.25 | 33.500 | 0.0712 |",
        "| gptq\\|w3   |   3.25 | 41.000 | 0.2100 |",
    ])


def test_format_table_callable_and_errors():
    out = format_table([{"n": 2048}], [("n", "size", human_bytes), ("missing", "x")])
    assert out.splitlines()[2] == "2.00 KiB  -"
    with pytest.raises(LowbitError):
        format_table([{"n": "abc"}], [("n", "n", ".2f")])


def test_plot_writes_a_png_atomically(tmp_path):
    from matplotlib.image import imread

    rows = ROWS + [{"name": "w2", "bits": 2.1, "ppl": 450.0, "group": "rtn"},
                   {"name": "broken", "bits": 2.0, "ppl": float("nan")}]
    out = tmp_path / "plots" / "ppl.png"
    written = plot_ppl_vs_bits(rows, out, "tiny test")
    assert written == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(out).shape[:2]
    assert (width, height) == (960, 600)
    assert sorted(os.listdir(out.parent)) == ["ppl.png"]  # no temporary file left behind
    before = out.read_bytes()
    with pytest.raises(LowbitError, match="bits"):
        plot_ppl_vs_bits([{"name": "x", "ppl": 3.0}], out)
    assert out.read_bytes() == before  # a failed call leaves the old file alone
    assert sorted(os.listdir(out.parent)) == ["ppl.png"]


def test_linear_bits_counts_float_layers_left_beside_quantized_ones():
    """A partly converted model (e.g. sparse storage that keeps some layers dense): the float
    block linears count 32 bits each, the converted ones what their format stores."""
    from lowbit import api
    from lowbit.core.scheme import QuantScheme
    from lowbit.formats.affine import AffineWeight
    from lowbit.models.families import find_blocks
    from lowbit.nn.linear import QuantizedLinear
    from tests.tiny import tiny_llama

    model = tiny_llama()
    blk = find_blocks(model)[0]
    n_all = sum(m.weight.numel() for b in find_blocks(model) for m in b.modules() if isinstance(m, torch.nn.Linear))
    assert size.linear_bits(model) == (32.0, 4 * n_all, n_all)
    fmt = AffineWeight.quantize_rtn(blk.self_attn.q_proj.weight.detach(), QuantScheme(bits=4, group_size=72))
    blk.self_attn.q_proj = QuantizedLinear(fmt)
    n_q = fmt.n_weights
    bpw, nbytes, n = size.linear_bits(model)
    assert n == n_all and nbytes == 4 * (n_all - n_q) + fmt.nbytes
    assert bpw == 8 * nbytes / n_all < 32.0
