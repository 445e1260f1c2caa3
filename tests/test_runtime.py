"""The lean decoder (lowbit.runtime): logits equal to transformers' forward for every supported
family, float and quantized; KV cache across prefill + decode equal to full recomputation;
sampling filters against a naive reference, seeded reproducibility; one-line errors."""

import math

import pytest
import torch
from torch import nn

from lowbit import api
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.tiny import tiny_model
from lowbit.runtime import (GenerationStats, LeanDecoder, SamplingParams, TextStream, generate, measure_lean,
                            sample_next)
from lowbit.runtime.sampling import filtered_logits

REL = 1e-4


def rel(a, b):
    return float((a - b).norm() / b.norm())


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids[None]).logits[0]


def prompt(n, vocab, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def check_parity(model, ids, n_prefill, max_len=None):
    """Prefill ids[:n_prefill] (all positions' logits), then one token at a time; compare every
    position with transformers' forward over the whole sequence."""
    ref = hf_logits(model, ids)
    dec = LeanDecoder(model, max_len=max_len or len(ids))
    got = [dec.forward(ids[:n_prefill], all_logits=True)]
    got += [dec.forward(ids[t:t + 1])[None] for t in range(n_prefill, len(ids))]
    got = torch.cat(got)
    assert got.shape == ref.shape
    assert rel(got, ref) < REL, rel(got, ref)
    assert dec.pos == len(ids)
    return ref


FAMILIES = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": 8},  # window shorter than the sequence: exercised
    "gemma3_text": {"sliding_window": 8},  # layer 0 sliding, layer 1 full; (1 + w) and q/k norms
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float_parity_prefill_and_20_decode_steps(family):
    m = tiny_model(family, **FAMILIES[family]).model
    ids = prompt(36, m.config.vocab_size)
    check_parity(m, ids, n_prefill=16)


def test_qwen2_biases_are_used():
    m = tiny_model("qwen2").model
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        for blk in m.model.layers:
            blk.self_attn.k_proj.bias.normal_()
    check_parity(m, prompt(24, m.config.vocab_size), n_prefill=4)


def test_greedy_tokens_identical_to_transformers_generate():
    m = tiny_model("llama", seed=3).model
    ids = prompt(12, m.config.vocab_size, seed=5)
    with torch.inference_mode():
        ref = m.generate(ids[None], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                         pad_token_id=m.config.pad_token_id)[0, 12:].tolist()
    dec = LeanDecoder(m, max_len=40)
    assert list(generate(dec, ids, 20)) == ref


QUANT = [
    ("rtn", QuantScheme(bits=8, symmetric=True, granularity="channel")),
    ("rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)),
    ("rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=64)),
    ("nf4", None),
    ("ternary", None),
]


@pytest.mark.parametrize("method,scheme", QUANT, ids=lambda v: getattr(v, "short_name", lambda: str(v))())
def test_quantized_parity(method, scheme):
    from lowbit.algorithms import available_methods

    if method not in available_methods():
        pytest.skip(f"method {method} not registered")
    lm = tiny_model("llama", seed=2)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, method, scheme, progress=False)
    from lowbit.nn.linear import QuantizedLinear

    assert sum(isinstance(x, QuantizedLinear) for x in m.model.modules()) == 14
    ids = prompt(30, m.model.config.vocab_size)
    check_parity(m.model, ids, n_prefill=10)


def test_int8_activation_prompt_equals_decode_steps():
    """With int8 activations a prompt runs the int8 GEMM of lowbit.kernels.a8 and decode steps its
    row kernel (or the C step): activations are rounded per row, so the prompt's logits are the
    one-token steps' logits up to float summation order — except where that last-bit difference
    moves an activation across an int8 rounding boundary (from then on, through the cache, ~1e-3) — and
    clearly not the float-activation ones."""
    from lowbit.kernels import a8

    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    lm = tiny_model("llama", seed=2)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "rtn", QuantScheme(bits=4, symmetric=False, group_size=32), progress=False)
    ids = prompt(24, m.model.config.vocab_size, seed=4)
    for native in (False, None):
        dec = LeanDecoder(m.model, max_len=24, int8_activations=True, native=native)
        whole = dec.forward(ids, all_logits=True)
        dec.reset()
        steps = torch.cat([dec.forward(ids[t:t + 1])[None] for t in range(24)])
        per_pos = [rel(whole[t], steps[t]) for t in range(24)]
        assert sum(e < 1e-5 for e in per_pos) >= 6, (native, per_pos)  # before the first flip: equal
        assert max(per_pos) < 1e-2, (native, per_pos)
        flt = LeanDecoder(m.model, max_len=24).forward(ids, all_logits=True)
        assert rel(whole, steps) < rel(whole, flt) / 3, (native, rel(whole, steps), rel(whole, flt))


def test_kv_cache_chunked_prefill_equals_full_recompute_and_reset_reuses_buffers():
    m = tiny_model("gemma3_text", sliding_window=6).model
    ids = prompt(30, m.config.vocab_size, seed=7)
    ref = hf_logits(m, ids)
    dec = LeanDecoder(m, max_len=32)
    kp, vp = dec.k_cache.data_ptr(), dec.v_cache.data_ptr()
    for _ in range(2):  # second round after reset(): same answers, same buffers
        dec.reset()
        chunks, out, t = (7, 5, 1, 1, 9, 1, 6), [], 0
        for c in chunks:
            out.append(dec.forward(ids[t:t + c], all_logits=True))
            t += c
        assert t == 30
        assert rel(torch.cat(out), ref) < REL
        assert (dec.k_cache.data_ptr(), dec.v_cache.data_ptr()) == (kp, vp)
    # the cache holds exactly transformers' keys for the filled positions
    from transformers import DynamicCache

    cache = DynamicCache(config=m.config)
    with torch.inference_mode():
        m(ids[None], cache=cache, use_cache=True)
    k_ref = cache.layers[1].keys[0]  # [kv, T, hd]
    assert torch.allclose(dec.k_cache[1, :30].transpose(0, 1), k_ref, atol=1e-5, rtol=1e-5)


def test_decoder_uses_the_models_own_weights():
    m = tiny_model("llama").model
    ids = prompt(8, m.config.vocab_size)
    dec = LeanDecoder(m, max_len=8)
    before = dec.forward(ids)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(2)  # in place: the decoder must see it
    dec.reset()
    after = dec.forward(ids)
    assert not torch.allclose(before, after)
    assert rel(after, hf_logits(m, ids)[-1]) < REL
    params = sum(p.numel() for p in m.parameters())
    cache = dec.k_cache.numel() + dec.v_cache.numel()
    extra = sum(t.numel() for tables in dec.rope.values() for t in tables)
    assert extra + cache < params  # no copy of the linear weights


# -- sampling --------------------------------------------------------------------------------------
def naive_filter(logits, temperature, top_k, top_p):
    """Straight from the definitions, one token at a time (float64)."""
    x = [float(v) / temperature for v in logits]
    n = len(x)
    keep = [True] * n
    if top_k:
        kth = sorted(x, reverse=True)[min(top_k, n) - 1]
        keep = [v >= kth for v in x]
    if top_p < 1:
        m = max(v for v, k in zip(x, keep) if k)
        w = [math.exp(v - m) if k else 0.0 for v, k in zip(x, keep)]
        z = sum(w)
        order = sorted(range(n), key=lambda i: -w[i])
        mass = 0.0
        keep2 = [False] * n
        for rank, i in enumerate(order):
            if keep[i] and (rank == 0 or mass < top_p):
                keep2[i] = True
            mass += w[i] / z
        keep = keep2
    return keep


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.5), (1.0, 0, 0.05), (2.0, 3, 0.99)])
def test_filters_match_naive_reference(t, k, p):
    g = torch.Generator().manual_seed(11)
    for _ in range(5):
        logits = torch.randn(50, generator=g) * 3
        got = torch.isfinite(filtered_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=p)))
        assert got.tolist() == naive_filter(logits.tolist(), t, k, p)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    sp = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=0)
    probs = torch.softmax(filtered_logits(logits, sp), -1)
    g = sp.generator()
    n = 4000
    counts = torch.zeros(7)
    for _ in range(n):
        counts[sample_next(logits, sp, g)] += 1
    assert counts[probs == 0].sum() == 0
    sd = torch.sqrt(n * probs * (1 - probs))
    assert torch.all((counts - n * probs).abs() <= 4 * sd + 1e-9), (counts, n * probs)


def test_sampled_generation_reproducible_with_seed():
    m = tiny_model("llama", seed=4).model
    dec = LeanDecoder(m, max_len=48)
    ids = prompt(8, m.config.vocab_size)

    def run(seed, **kw):
        return list(generate(dec, ids, 30, SamplingParams(temperature=1.0, seed=seed, **kw)))

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert run(5, top_k=1) == list(generate(dec, ids, 30))  # top-k 1 is greedy
    assert run(1, top_p=0.5) == run(1, top_p=0.5)


def test_generation_stops_at_stop_token_and_times():
    m = tiny_model("llama", seed=4).model
    dec = LeanDecoder(m, max_len=48)
    ids = prompt(8, m.config.vocab_size)
    full = list(generate(dec, ids, 20))
    stop = full[5]
    st = GenerationStats()
    cut = list(generate(dec, ids, 20, stop_ids={stop}, stats=st))
    assert cut == full[:full.index(stop) + 1]
    assert st.generated == len(cut) and st.decode_tokens == len(cut) - 1 and st.prompt_tokens == 8
    r = measure_lean(dec, prompt_len=8, new_tokens=4, warmup=0, repeats=1)
    assert r.decode_tokens == 4 and r.decode_tok_s > 0 and r.prefill_tok_s > 0


def test_text_stream_holds_back_split_utf8():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    text = "naïve – ok ✓"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode())  # byte-level: multi-byte characters span several tokens
    s = TextStream(tok)
    pieces = [s.push(i) for i in ids]
    assert "".join(pieces) + s.flush() == text
    assert all("\ufffd" not in p for p in pieces)


# -- bad input -------------------------------------------------------------------------------------
def test_errors():
    m = tiny_model("llama").model
    vocab = m.config.vocab_size
    dec = LeanDecoder(m, max_len=16)
    with pytest.raises(LowbitError, match="exceeds the decoder's max length 16"):
        dec.forward(prompt(17, vocab))
    with pytest.raises(LowbitError, match="needs 20 positions; the maximum length is 16"):
        list(generate(dec, prompt(10, vocab), 11))
    with pytest.raises(LowbitError, match="prompt is empty"):
        list(generate(dec, [], 4))
    with pytest.raises(LowbitError, match="outside the vocabulary"):
        dec.forward([vocab])
    with pytest.raises(LowbitError, match="max_new_tokens"):
        list(generate(dec, [1, 2], 0))
    with pytest.raises(LowbitError, match="max_position_embeddings 256"):
        LeanDecoder(m, max_len=257)
    with pytest.raises(LowbitError, match="max_len must be a positive integer"):
        LeanDecoder(m, max_len=0)
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(seed="x"),
                dict(temperature=float("nan"))):
        with pytest.raises(LowbitError):
            SamplingParams(**bad)
    assert dec.pos == 0  # failed calls leave the cache as it was


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(LowbitError, match="unsupported model family 'gpt2'"):
        LeanDecoder(gpt2)
    with pytest.raises(LowbitError, match="cannot tell the family"):
        LeanDecoder(nn.Linear(2, 2))


# -- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return api.load()


@pytest.mark.slow
def test_smollm2_parity_float_and_int8(smollm2):
    m = smollm2.model
    text = "The Bennets of Longbourn had five daughters, and"
    ids = torch.tensor(smollm2.tokenizer(text).input_ids)
    dec = LeanDecoder(m, max_len=len(ids) + 20)
    greedy = list(generate(dec, ids, 21))
    seq = torch.cat([ids, torch.tensor(greedy[:20])])
    ref = check_parity(m, seq, n_prefill=len(ids))
    # transformers' greedy choice at every step of the same sequence (= its greedy generation)
    assert ref[len(ids) - 1:].argmax(-1).tolist() == greedy

    q = api.load()
    api.quantize(q, "rtn", QuantScheme(bits=8, symmetric=True, granularity="channel"), progress=False)
    check_parity(q.model, seq, n_prefill=len(ids))


def test_profiled_decoder_same_logits_and_categories():
    from lowbit.runtime.profile import ProfiledDecoder, profile_decode

    m = tiny_model("llama").model
    ids = prompt(12, m.config.vocab_size)
    a = LeanDecoder(m, max_len=12).forward(ids, all_logits=True)
    p = ProfiledDecoder(m, max_len=12)
    assert torch.equal(p.forward(ids, all_logits=True), a)
    assert p.times["linear q_proj"] > 0 and p.times["RMSNorm"] > 0
    assert p.times["attention (scores, softmax, values)"] > 0
    rows = profile_decode(m, prompt_len=8, tokens=3)
    assert rows[-1][0] == "total" and abs(sum(r[2] for r in rows[:-1]) - 1) < 1e-9
