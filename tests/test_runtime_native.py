"""The lean decoder's native decode step (csrc/decode.c, lowbit.runtime.native) against the
decoder's Python path, which is itself checked against transformers in test_runtime.py: every
family, float and quantized weights (affine 2- to 8-bit with int / float / no zero-points, ternary,
NF4, N:M and CSR sparse, quantized output head), sliding windows, soft-capping, long contexts (attention split across
threads), every kernel instruction set; the KV cache it writes; when it declines a model."""

import pytest
import torch

from lowbit import api
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.kernels import cpu
from lowbit.models.tiny import tiny_model
from lowbit.runtime import LeanDecoder
from lowbit.runtime.native import PROFILE_CATEGORIES, _library

pytestmark = pytest.mark.skipif(_library() is None or not cpu.available(),
                                reason="native kernels not built (no C compiler at install)")

REL = 2e-6


def rel(a, b):
    return float((a - b).norm() / b.norm())


def ids_for(n, vocab, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_library_is_built_whenever_the_kernels_are():
    # (the skip above would otherwise hide a decode library that fails to build or load)
    assert _library() is not None


def run_both(model, n_prompt=9, n_steps=16, max_len=None, threads=None, **kw):
    """Prefill the same prompt in a Python-path decoder and a native one, then feed both the
    Python path's greedy tokens; returns (max rel err of the step logits, the two decoders)."""
    vocab = model.config.vocab_size
    ids = ids_for(n_prompt, vocab)
    max_len = max_len or n_prompt + n_steps
    ref = LeanDecoder(model, max_len=max_len, native=False, **kw)
    nat = LeanDecoder(model, max_len=max_len, native=True, **kw)
    assert nat.native_step is not None and nat.native_reason is None
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = ref.forward(ids), nat.forward(ids)
        assert torch.equal(a, b)  # prefill: both on the Python path
        worst = 0.0
        for _ in range(n_steps):
            tok = int(a.argmax())
            a, b = ref.forward([tok]), nat.forward([tok])
            assert b.shape == a.shape and torch.isfinite(b).all()
            worst = max(worst, rel(b, a))
    finally:
        torch.set_num_threads(old)
    assert nat.pos == ref.pos == n_prompt + n_steps
    return worst, ref, nat


FAMILIES = {
    "llama": {},
    "qwen2": {},                            # q/k/v biases
    "mistral": {"sliding_window": 5},       # window shorter than the run
    "gemma3_text": {"sliding_window": 5},   # (1 + w) norms, sandwich and q/k norms, scaled embedding, GELU
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float_step_equals_python_path_and_writes_the_same_cache(family):
    m = tiny_model(family, seed=3, **FAMILIES[family]).model
    if family == "qwen2":
        with torch.no_grad():
            for blk in m.model.layers:
                blk.self_attn.k_proj.bias.normal_()
    worst, ref, nat = run_both(m)
    assert worst < REL, worst
    n = ref.pos
    assert float((ref.k_cache[:, :n] - nat.k_cache[:, :n]).abs().max()) < 1e-5
    assert float((ref.v_cache[:, :n] - nat.v_cache[:, :n]).abs().max()) < 1e-5


QUANT = [
    ("rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)),
    ("rtn", QuantScheme(bits=4, symmetric=True, granularity="group", group_size=64)),
    ("rtn", QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None)),
    ("rtn", QuantScheme(bits=2, symmetric=False, granularity="group", group_size=32)),
    ("hqq", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32, zero_point="float")),
    ("ternary", None),
    # 3, 5 and 6 bits: runs of 8 codes, the odd-width kernels
    ("rtn", QuantScheme(bits=3, symmetric=False, granularity="group", group_size=32)),
    ("rtn", QuantScheme(bits=5, symmetric=True, granularity="group", group_size=16)),
    ("rtn", QuantScheme(bits=6, symmetric=True, granularity="channel", group_size=None)),
    ("nf4", None),
]


@pytest.mark.parametrize("method,scheme", QUANT, ids=lambda v: getattr(v, "short_name", lambda: str(v))())
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_quantized_step_equals_python_path(family, method, scheme):
    lm = tiny_model(family, seed=4, **FAMILIES[family])
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, method, scheme, progress=False)
    worst, _, _ = run_both(m.model)
    assert worst < REL, worst


@pytest.mark.parametrize("storage", ["nm", "csr"])
def test_sparse_step_equals_python_path(storage):
    from lowbit.algorithms.sparse_storage import store

    lm = tiny_model("llama", seed=14)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "magnitude", None, progress=False, pattern="2:4")
    store(m, storage)
    kinds = {type(mod.weight_format).name for mod in m.model.modules() if hasattr(mod, "weight_format")}
    assert kinds == {"sparse-nm" if storage == "nm" else "sparse-csr"}
    worst, _, nat = run_both(m.model)
    assert worst < REL, worst


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_quantized_output_head(head):
    lm = tiny_model("llama", seed=5)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32), progress=False,
                 head=head)
    worst, _, _ = run_both(m.model)
    assert worst < REL, worst


@pytest.mark.parametrize("isa", cpu.library().paths if cpu.available() else ())
def test_every_kernel_instruction_set(isa):
    lm = tiny_model("llama", seed=6)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32), progress=False)
    with cpu.library().isa_capped(isa) as got:
        if got != isa:
            pytest.skip(f"CPU has no {isa}")
        worst, _, _ = run_both(m.model)
    assert worst < REL, worst


@pytest.mark.parametrize("isa", _library().paths if _library() is not None else ())
@pytest.mark.parametrize("head_dim", [16, 12])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_instruction_sets_head_dims_and_chunks(isa, head_dim, threads):
    with _library().isa_capped(isa) as got:
        if got != isa:
            pytest.skip(f"CPU has no {isa}")
        # 2 query heads per key/value head; 700 positions x 4 heads x head_dim: split into chunks
        # of positions when threads > 1
        m = tiny_model("llama", seed=13, head_dim=head_dim, max_position_embeddings=800).model
        worst, _, _ = run_both(m, n_prompt=690, n_steps=6, threads=threads)
    assert worst < 1e-5, worst


def test_soft_capping():
    m = tiny_model("gemma3_text", seed=7, sliding_window=5).model
    m.config.attn_logit_softcapping = 0.5  # small caps so that both clearly bite
    m.config.final_logit_softcapping = 0.3
    worst, ref, _ = run_both(m)
    assert worst < REL, worst
    assert ref.attn_softcap == 0.5 and ref.final_softcap == 0.3


@pytest.mark.parametrize("threads", [1, 2])
def test_long_context_attention_across_threads(threads):
    # 2100 positions x 6 heads x 12 dims: above the size at which attention is split over threads
    m = tiny_model("llama", seed=8, max_position_embeddings=2200).model
    worst, _, _ = run_both(m, n_prompt=2090, n_steps=8, threads=threads)
    assert worst < 1e-5, worst


def test_thread_count_does_not_change_the_result():
    lm = tiny_model("llama", seed=9)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "rtn", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32), progress=False)
    out = []
    for t in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(t)
        try:
            dec = LeanDecoder(m.model, max_len=24, native=True)
            dec.forward(ids_for(5, m.model.config.vocab_size))
            out.append(torch.stack([dec.forward([i]) for i in range(3, 10)]))
        finally:
            torch.set_num_threads(old)
    assert torch.equal(out[0], out[1])


def test_profile_accounts_for_the_step():
    m = tiny_model("llama", seed=10).model
    dec = LeanDecoder(m, max_len=32, native=True)
    dec.forward(ids_for(4, m.config.vocab_size))
    dec.native_step.start_profile()
    for i in range(5):
        dec.forward([i])
    prof = dec.native_step.stop_profile()
    assert tuple(prof) == PROFILE_CATEGORIES
    assert all(v >= 0 for v in prof.values()) and sum(prof.values()) > 0
    assert prof["q/k/v projections"] > 0 and prof["attention"] > 0 and prof["output head"] > 0
    assert dec.native_step.stop_profile() == {}  # stopped: nothing more is recorded


def test_declines_what_it_does_not_cover_and_python_path_takes_over():
    lm = tiny_model("llama", seed=11)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "llm-int8", None, progress=False)   # LLM.int8() has no native step kernel
    dec = LeanDecoder(m.model, max_len=16)
    assert dec.native_step is None and "llm-int8" in dec.native_reason
    with pytest.raises(LowbitError, match="native decode step cannot run this model: .*llm-int8"):
        LeanDecoder(m.model, max_len=16, native=True)
    ids = ids_for(4, m.model.config.vocab_size)
    a = LeanDecoder(m.model, max_len=16, native=False)
    assert torch.equal(a.forward(ids), dec.forward(ids))
    assert torch.equal(a.forward([3]), dec.forward([3]))  # same Python path for the step

    half = tiny_model("llama", seed=12).model.to(torch.bfloat16)
    d16 = LeanDecoder(half, max_len=8)
    assert d16.native_step is None and "float32" in d16.native_reason
    assert LeanDecoder(tiny_model("llama").model, max_len=8, native=False).native_reason == "disabled (native=False)"


def test_lowbit_native_off_keeps_python_path(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")  # read on every library lookup
    dec = LeanDecoder(tiny_model("llama").model, max_len=8)
    assert dec.native_step is None and "LOWBIT_NATIVE" in dec.native_reason


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32),
                                    QuantScheme(bits=4, symmetric=True, granularity="group", group_size=64),
                                    QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None)],
                         ids=lambda s: s.short_name())
def test_int8_activation_step_equals_python_int8_path(scheme):
    from lowbit.kernels import a8

    if not a8.available():
        pytest.skip("int8-activation kernel not built")
    lm = tiny_model("llama", seed=14)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "rtn", scheme, progress=False, head="int8")
    vocab = m.model.config.vocab_size
    ids = ids_for(7, vocab)
    ref = LeanDecoder(m.model, max_len=24, native=False, int8_activations=True)
    nat = LeanDecoder(m.model, max_len=24, native=True, int8_activations=True)
    flt = LeanDecoder(m.model, max_len=24, native=True)
    assert nat.native_step.kernels == {"affine-a8": 15}   # 2 blocks x 7 + the head
    assert flt.native_step.kernels == {"affine": 15}
    a, b, c = ref.forward(ids), nat.forward(ids), flt.forward(ids)
    assert torch.equal(a, b)  # prompts: Python path for both (the last position's head row in int8)
    assert 0 < rel(a, c) < 5e-2
    worst, drift = 0.0, 0.0
    for _ in range(12):
        tok = int(a.argmax())
        a, b, c = ref.forward([tok]), nat.forward([tok]), flt.forward([tok])
        worst = max(worst, rel(b, a))
        drift = max(drift, rel(a, c))
    assert worst < REL, worst
    assert 1e-5 < drift < 5e-2, drift  # int8 activations: a visible but small change from float


def test_int8_activations_keep_float_where_the_kernel_declines():
    from lowbit.kernels import a8

    if not a8.available():
        pytest.skip("int8-activation kernel not built")
    # in_features 72 (not a multiple of 32): the int8 kernel declines, float activations run
    m = tiny_model("llama", seed=15, hidden_size=72, head_dim=18, num_attention_heads=4).model
    lm = api.Model(model=m, tokenizer=None, name="t", source={})
    api.quantize(lm, "rtn", QuantScheme(bits=4, symmetric=False, granularity="channel", group_size=None),
                 progress=False)
    nat = LeanDecoder(m, max_len=16, native=True, int8_activations=True)
    assert nat.native_step.kernels.get("affine", 0) >= 4  # q/k/v/gate/up read 72-wide rows
    worst, _, _ = run_both(m, n_prompt=4, n_steps=6)
    assert worst < REL


def test_half_conversions_match_torch_bit_for_bit():
    lib = _library()
    import ctypes

    lib.lb_decode_float_to_half.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.lb_decode_half_to_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 18, (20000,), generator=g)),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, float("inf"), -float("inf"),
                                 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -14, 3 * 2.0 ** -25]),
                   # exact ties between two halves: 1 + (2k+1) * 2^-11
                   1 + (2 * torch.arange(64, dtype=torch.float32) + 1) * 2.0 ** -11])
    y = torch.empty(x.numel(), dtype=torch.float16)
    lib.lb_decode_float_to_half(x.data_ptr(), y.data_ptr(), x.numel())
    assert torch.equal(y.view(torch.int16), x.half().view(torch.int16))
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[~torch.isnan(h)].contiguous()
    f = torch.empty(h.numel())
    lib.lb_decode_half_to_float(h.data_ptr(), f.data_ptr(), h.numel())
    assert torch.equal(f, h.float())


@pytest.mark.parametrize("isa", _library().paths if _library() is not None else ())
@pytest.mark.parametrize("threads", [1, 2])
def test_fp16_kv_cache(isa, threads):
    with _library().isa_capped(isa) as got:
        if got != isa:
            pytest.skip(f"CPU has no {isa}")
        m = tiny_model("gemma3_text", seed=16, sliding_window=300, max_position_embeddings=800).model
        worst, ref, nat = run_both(m, n_prompt=690, n_steps=6, threads=threads, kv_dtype=torch.float16)
    assert worst < 1e-5, worst
    assert nat.k_cache.dtype == torch.float16 and nat.cache_bytes == ref.cache_bytes
    n = ref.pos
    for a, b in ((ref.k_cache[:, :n], nat.k_cache[:, :n]), (ref.v_cache[:, :n], nat.v_cache[:, :n])):
        assert float((a.float() - b.float()).abs().max()) <= 2e-3 * float(a.float().abs().max())
        assert float((a == b).float().mean()) > 0.97  # mostly bit-identical halves


def test_fp16_kv_cache_stays_close_to_float32():
    m = tiny_model("llama", seed=17).model
    ids = ids_for(6, m.config.vocab_size)
    a = LeanDecoder(m, max_len=20)
    b = LeanDecoder(m, max_len=20, kv_dtype=torch.float16)
    assert b.cache_bytes * 2 == a.cache_bytes
    la, lb = a.forward(ids), b.forward(ids)
    for t in range(10):
        la, lb = a.forward([t]), b.forward([t])
        assert 0 < rel(lb, la) < 2e-3
    with pytest.raises(LowbitError, match="kv_dtype"):
        LeanDecoder(m, max_len=8, kv_dtype=torch.int8)
    bf = LeanDecoder(m, max_len=8, kv_dtype=torch.bfloat16)
    assert bf.native_step is None and "bfloat16" in bf.native_reason
