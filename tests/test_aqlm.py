"""AQLM: the format round-trips and validates; the solver's code, codebook and scale steps never
increase the Hessian-weighted error and end far below GPTQ's at 2 bits; the beam search equals a
naive coordinate search where that is exhaustive; block tuning lowers the block's error; a model
saves and reloads exactly, and its export loads in transformers + aqlm with the same logits."""

import importlib.util
import itertools

import pytest
import torch

from lowbit import api, checkpoint
from lowbit.algorithms import aqlm as A
from lowbit.algorithms.aqlm import AQLM, AQLMConfig, aqlm_quantize
from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.aqlm import AQLMWeight
from lowbit.formats.base import WeightFormat
from lowbit.models.tiny import tiny_model

FAST = dict(nbits_per_codebook=4, in_group_size=4, rounds=1, kmeans_iters=4)  # 2 codebooks of 16: 2 bits


def _problem(out=64, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, n, generator=g) @ torch.randn(n, n, generator=g) * 0.1
    X[:, 3] *= 20  # an outlier channel
    W = torch.randn(out, n, generator=g) * 0.05
    return W, 2 * X.T @ X / X.shape[0]


def _err(W, What, H):
    D = W.double() - What.double()
    return float(((D @ H.double()) * D).sum())


# -- config ------------------------------------------------------------------------------------

def test_bits_choose_the_codebooks():
    assert AQLMConfig().num_codebooks == 2 and AQLMConfig().code_bits == 2
    assert AQLMConfig(bits=3).num_codebooks == 3 and AQLMConfig(bits=4).num_codebooks == 4
    assert AQLMConfig(nbits_per_codebook=16).num_codebooks == 1                  # 1x16
    assert AQLMConfig(bits=4, num_codebooks=1, nbits_per_codebook=16).num_codebooks == 1  # explicit wins
    for bad, match in [(dict(bits=3, nbits_per_codebook=16), "whole number"), (dict(beam_size=0), "beam_size"),
                       (dict(dtype="int8"), "dtype"), (dict(damp=float("nan")), "damp"),
                       (dict(nbits_per_codebook=17), "at most 16"), (dict(rounds=True), "rounds")]:
        with pytest.raises(LowbitError, match=match) as e:
            AQLMConfig(**bad)
        assert "\n" not in str(e.value)


# -- format ------------------------------------------------------------------------------------

def test_format_round_trip_layout_and_validation():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (6, 4, 2), generator=g)
    C = torch.randn(2, 256, 8, generator=g)
    s = torch.rand(6, generator=g) + 0.5
    w = AQLMWeight.from_codes(codes, C, s, (6, 32))
    assert w.codes.dtype == torch.int8 and w.codebooks.shape == (2, 256, 1, 8) and w.scales.shape == (6, 1, 1, 1)
    assert w.codebooks.dtype == w.scales.dtype == torch.float16
    assert torch.equal(w.unsigned_codes(), codes)
    Ch, sh = C.half().float(), s.half().float()
    want = torch.stack([torch.cat([(Ch[0, codes[o, j, 0]] + Ch[1, codes[o, j, 1]]) * sh[o] for j in range(4)])
                        for o in range(6)])
    assert torch.equal(w.dequantize(), want)
    back = WeightFormat.from_state_dict(*w.to_state_dict())
    assert isinstance(back, AQLMWeight) and torch.equal(back.dequantize(), w.dequantize())
    # 12-bit codes: int16, stored as signed 12-bit values
    w12 = AQLMWeight.from_codes(torch.tensor([[[4095], [2048]], [[0], [2047]]]), torch.randn(1, 4096, 4),
                                torch.ones(2), (2, 8), dtype=torch.float32)
    assert w12.codes.dtype == torch.int16 and w12.codes.flatten().tolist() == [-1, -2048, 0, 2047]
    assert w12.unsigned_codes().flatten().tolist() == [4095, 2048, 0, 2047]

    t, meta = w.to_state_dict()
    cases = [
        (dict(t, codes=torch.full_like(t["codes"], 9)), dict(meta, nbits_per_codebook=4), "codebooks has shape"),
        (dict(t, codebooks=t["codebooks"].float()), meta, "scales has shape"),  # scales follow the codebooks' dtype
        (dict(t, codebooks=t["codebooks"][:, :128]), meta, "codebooks has shape"),
        (dict(t, codes=t["codes"].to(torch.int16)), meta, "codes has shape"),
        (dict(t, codebooks=t["codebooks"].clone().index_fill_(1, torch.tensor([3]), float("nan"))), meta, "NaN/Inf"),
        (dict(t, scales=torch.full_like(t["scales"], float("inf"))), meta, "scales contains NaN/Inf"),
        (t, dict(meta, shape=[6, 30]), "not a multiple of in_group_size"),
        (t, dict(meta, out_group_size=2), "out_group_size 1 only"),
    ]
    for tensors, m, match in cases:
        with pytest.raises(LowbitError, match=match) as e:
            WeightFormat.from_state_dict(tensors, m)
        assert "\n" not in str(e.value)
    # 4-bit codes must be stored as signed 4-bit values
    w4 = AQLMWeight.from_codes(torch.tensor([[[15, 3]]]), torch.randn(2, 16, 4), torch.ones(1), (1, 4))
    assert w4.codes.flatten().tolist() == [-1, 3]
    bad = dict(w4.tensors(), codes=torch.tensor([[[9, 3]]], dtype=torch.int8))
    with pytest.raises(LowbitError, match=r"4-bit values stored in \[-8, 7\], got \[3, 9\]"):
        WeightFormat.from_state_dict(bad, w4.meta())
    with pytest.raises(LowbitError, match="power of two"):
        AQLMWeight.from_codes(codes, torch.randn(2, 200, 8), s, (6, 32))
    with pytest.raises(LowbitError, match=r"codes must be in \[0, 255\]"):
        AQLMWeight.from_codes(codes.index_fill(0, torch.tensor([2]), 256), C, s, (6, 32))


# -- solver ------------------------------------------------------------------------------------

def test_two_bits_far_below_gptq_w2_and_rtn():
    W, H = _problem()
    fmt, info = aqlm_quantize(W, H, AQLMConfig(nbits_per_codebook=4, in_group_size=4, rounds=3))
    assert fmt.meta()["num_codebooks"] == 2 and fmt.codes.dtype == torch.int8
    assert info["error"] == pytest.approx(_err(W, fmt.dequantize(), H), rel=1e-9)
    g, ginfo = gptq_quantize(W, H, GPTQConfig(scheme=QuantScheme(bits=2, group_size=64)))
    rtn = _err(W, AffineWeight.quantize_rtn(W, QuantScheme(bits=2, group_size=64)).dequantize(), H)
    assert info["error"] < 0.3 * ginfo["error"] and info["error"] < 0.1 * rtn


def test_every_step_lowers_the_objective():
    W, H = _problem(out=48, n=96, seed=1)
    _, info = aqlm_quantize(W, H, AQLMConfig(nbits_per_codebook=4, in_group_size=4, rounds=3, beam_size=3))
    steps = info["steps"]
    assert [s[1] for s in steps[:2]] == ["init", "store"] and len(info["rounds"]) == 3
    for (_, _, before), (r, kind, after) in zip(steps, steps[1:]):
        if kind in ("codebooks", "scales", "codes"):
            assert after <= before * (1 + 1e-12), (r, kind, before, after)
    assert info["rounds"][-1] < 0.5 * steps[1][2]            # the rounds do real work
    assert sum(info["changed"]) > 0 and info["changed"][0] >= info["changed"][-1]


def test_a_code_sweep_keeps_codes_that_cannot_improve_and_never_increases():
    g = torch.Generator().manual_seed(2)
    C = torch.randn(2, 16, 4, generator=g).double()
    b = torch.randint(0, 16, (10, 6, 2), generator=g)
    s = torch.rand(10, generator=g).double() + 0.5
    H = A.damped(_problem(n=24, seed=2)[1], 0.01)
    exact = A.reconstruct(C, b, s)                           # representable: the objective is 0
    again, changed = A.update_codes(exact, H, C, b, s, beam=4)
    assert changed == 0 and torch.equal(again, b)
    W = exact + 0.3 * torch.randn(exact.shape, generator=g).double()
    f0 = A.objective(W, exact, H)
    b1, changed = A.update_codes(W, H, C, b, s, beam=4)
    assert changed > 0 and A.objective(W, A.reconstruct(C, b1, s), H) < f0
    b2, _ = A.update_codes(W, H, C, b1, s, beam=4)
    assert A.objective(W, A.reconstruct(C, b2, s), H) <= A.objective(W, A.reconstruct(C, b1, s), H)


def _naive_code_sweep(W, H, C, b, s):
    """One codebook: for each group in turn and each row, try every code with the full objective
    (the others fixed) and keep the best if strictly better."""
    b = b.clone()
    K = C.shape[1]
    for j in range(b.shape[1]):
        for o in range(b.shape[0]):
            def f(k):
                t = b.clone()
                t[o, j, 0] = k
                d = W[o] - A.reconstruct(C, t, s)[o]
                return float(d @ H @ d)
            best = min(range(K), key=f)
            if f(best) < f(int(b[o, j, 0])):
                b[o, j, 0] = best
    return b


def test_one_codebook_search_equals_the_naive_exhaustive_sweep():
    g = torch.Generator().manual_seed(3)
    W, H = _problem(out=5, n=12, seed=3)
    W, H = W.double(), A.damped(H, 0.01)
    C = 0.05 * torch.randn(1, 32, 4, generator=g).double()
    s = torch.rand(5, generator=g).double() + 0.5
    b = torch.randint(0, 32, (5, 3, 1), generator=g)
    got, _ = A.update_codes(W, H, C, b, s, beam=2)
    assert torch.equal(got, _naive_code_sweep(W, H, C, b, s))


def test_codebook_update_reaches_the_least_squares_optimum():
    g = torch.Generator().manual_seed(4)
    out, n, gs, M, K = 8, 16, 4, 2, 4
    W, H = _problem(out=out, n=n, seed=4)
    W, H = W.double(), A.damped(H, 0.01)
    C = 0.05 * torch.randn(M, K, gs, generator=g).double()
    b = torch.randint(0, K, (out, n // gs, M), generator=g)
    s = torch.rand(out, generator=g).double() + 0.5
    # the normal equations, built naively: W^ = P θ, θ the M·K·g codebook entries
    P = torch.zeros(out, n, M * K * gs, dtype=torch.float64)
    for o, i, m in itertools.product(range(out), range(n), range(M)):
        P[o, i, (m * K + int(b[o, i // gs, m])) * gs + i % gs] = s[o]
    N = sum(P[o].T @ H @ P[o] for o in range(out))
    rhs = sum(P[o].T @ H @ W[o] for o in range(out))
    theta = torch.linalg.lstsq(N, rhs[:, None], driver="gelsd").solution[:, 0]
    best = A.objective(W, (P @ theta).reshape(out, n), H)
    f0 = A.objective(W, A.reconstruct(C, b, s), H)
    one = A.update_codebooks(W, H, C, b, s, steps=1)
    many = A.update_codebooks(W, H, C, b, s, steps=60)
    f1, fmany = A.objective(W, A.reconstruct(one, b, s), H), A.objective(W, A.reconstruct(many, b, s), H)
    assert f0 > f1 > fmany and fmany == pytest.approx(best, rel=1e-4)
    s_new = A.update_scales(W, H, many, b, s, lambda t: t)
    assert A.objective(W, A.reconstruct(many, b, s_new), H) <= fmany


def test_one_codebook_of_16_bits():
    W, H = _problem(out=16, n=32, seed=5)
    fmt, info = aqlm_quantize(W, H, AQLMConfig(nbits_per_codebook=16, rounds=1, kmeans_iters=2, kmeans_points=64))
    assert fmt.codes.dtype == torch.int16 and fmt.codebooks.shape == (1, 65536, 1, 8)
    assert info["steps"][-1][2] <= info["steps"][-2][2] * (1 + 1e-12)
    assert info["error"] < 0.2 * _err(W, torch.zeros_like(W), H)


def test_bad_input():
    with pytest.raises(LowbitError, match="multiple of in_group_size 8"):
        aqlm_quantize(torch.zeros(4, 12), torch.eye(12), AQLMConfig())
    with pytest.raises(LowbitError, match="Hessian has shape"):
        aqlm_quantize(torch.zeros(4, 16), torch.eye(8), AQLMConfig())


# -- block tuning ------------------------------------------------------------------------------

def test_tune_block_lowers_the_block_error():
    import copy

    from lowbit.algorithms.block_tune import relative_error
    from lowbit.calibration.sequential import capture_block_kwargs
    from lowbit.models.families import linear_layers
    from lowbit.nn.replace import replacement

    model = tiny_model("llama", seed=3).model
    tokens = torch.randint(0, 250, (8, 64), generator=torch.Generator().manual_seed(0))
    kw = capture_block_kwargs(model, tokens[:1])[0]
    with torch.no_grad():
        X = [model.model.embed_tokens(tokens[i:i + 2]) for i in range(0, 8, 2)]
    blk = model.model.layers[0]
    original = copy.deepcopy(blk)
    with torch.no_grad():
        T = [original(x, **kw) for x in X]
        T = [t[0] if isinstance(t, tuple) else t for t in T]
    method = AQLM(AQLMConfig(**FAST, finetune_steps=30, finetune_lr=1e-3))
    assert method.tunes_blocks and not AQLM(AQLMConfig()).tunes_blocks
    hooks = [lin.register_forward_hook(lambda mod, a, o, n=n: method.observe(f"model.layers.0.{n}", mod, a[0]))
             for n, lin in linear_layers(blk).items()]
    with torch.no_grad():
        for x in X:
            blk(x, **kw)
    for h in hooks:
        h.remove()
    for n, lin in linear_layers(blk).items():  # as the runner installs results
        blk.set_submodule(n, replacement(lin, method.apply(f"model.layers.0.{n}", lin)))
    assert len(method._references) == 7

    def held_out():
        with torch.no_grad():
            return float(relative_error(blk, X[-1], T[-1], kw))

    start = held_out()
    with torch.no_grad():  # as the runner calls it
        weights = method.tune_block(blk, "model.layers.0", X, T, kw)
    rep = method.tuned["model.layers.0"]
    assert rep["kept"] and len(rep["held_out"]) == 3 and rep["held_out"][0] == pytest.approx(start, rel=1e-5)
    assert rep["held_out"][2] <= rep["held_out"][1] <= start and rep["held_out"][2] < 0.97 * start
    assert set(weights) == set(linear_layers(original)) and all(isinstance(w, AQLMWeight) for w in weights.values())
    for n, w in weights.items():
        blk.set_submodule(n, replacement(blk.get_submodule(n), w))
    assert held_out() == pytest.approx(rep["held_out"][2], rel=1e-5)
    assert method._references == {} and method.describe()["tuning"]["model.layers.0"]["kept"]
    assert not any(p.requires_grad != q.requires_grad for p, q in zip(blk.parameters(), original.parameters()))


def test_the_trainable_view_equals_the_stored_layer():
    from lowbit.nn.linear import QuantizedLinear
    from lowbit.training.tunable import TunableAQLM, view

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 32, generator=g), torch.randn(128, 32, generator=g)
    fmt, _ = aqlm_quantize(W, X.T @ X, AQLMConfig(**FAST))
    q = QuantizedLinear(fmt, torch.randn(24, generator=g))
    t = view(q, "scales")
    assert isinstance(t, TunableAQLM) and t.original is q
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(t(x), q(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(t.weight_format().dequantize(), fmt.dequantize())  # untrained: the same weight
        t.codebooks.mul_(1.1)
        t.factors[:3] = 0.5
        again = QuantizedLinear(t.weight_format(), q.bias)
        torch.testing.assert_close(t(x), again(x), rtol=2e-3, atol=2e-3)  # float16 storage of the tuned values
    assert torch.equal(again.weight_format.unsigned_codes(), fmt.unsigned_codes())


# -- a whole model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized():
    t = tiny_model("llama", seed=3)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    x = torch.arange(20)[None] % 250
    with torch.no_grad():
        ref = t.model(x).logits.clone()
    rec = api.quantize(m, "aqlm", None, progress=False, n_samples=4, seq_len=32, rounds=1, kmeans_iters=4)
    with torch.no_grad():
        got = m.model(x).logits.clone()
    return m, rec, x, ref, got


def test_quantized_model_saves_and_reloads_exactly(quantized, tmp_path):
    m, rec, x, ref, got = quantized
    assert rec["method"]["method"] == "aqlm" and rec["method"]["config"]["num_codebooks"] == 2
    out = api.save(m, str(tmp_path / "q"))
    loaded, _, rec2 = checkpoint.load(out)
    assert {mm["format"] for mm in rec2["modules"].values()} == {"aqlm"}
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, got)
    assert not torch.equal(got, ref) and float((got - ref).abs().mean()) < 0.5 * float(ref.abs().mean())


@pytest.mark.skipif(importlib.util.find_spec("aqlm") is None or importlib.util.find_spec("numba") is None,
                    reason="the aqlm package (with numba for its CPU kernel) is not installed")
def test_export_loads_in_transformers_with_the_same_logits(quantized, tmp_path):
    import numba
    from transformers import AutoModelForCausalLM

    from lowbit.export.aqlm import export_aqlm

    m, _, x, _, got = quantized
    out = export_aqlm(m, tmp_path / "e")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    qc = hf.config.quantization_config
    assert (qc.num_codebooks, qc.nbits_per_codebook, qc.in_group_size) == (2, 8, 8)
    assert type(hf.model.layers[0].mlp.down_proj).__module__.startswith("aqlm")
    assert type(hf.lm_head) is torch.nn.Linear
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # aqlm 1.1.7's CPU kernel adds into one output vector from parallel threads
    try:
        with torch.no_grad():
            hf_logits = hf(x).logits
    finally:
        numba.set_num_threads(threads)
    torch.testing.assert_close(hf_logits, got, rtol=1e-5, atol=1e-5)


def test_export_refuses_other_formats(tmp_path):
    from lowbit.export.aqlm import export_aqlm

    t = tiny_model("llama", seed=1)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    with pytest.raises(LowbitError, match="no quantized layers"):
        export_aqlm(m, tmp_path / "a")
    api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32), progress=False)
    with pytest.raises(LowbitError, match="AQLM layers only; this model also has affine"):
        export_aqlm(m, tmp_path / "b")


def test_command_line(tmp_path, capsys):
    import json
    import re

    from lowbit.cli import main
    from lowbit.models.tiny import save_tiny

    src = save_tiny(tmp_path / "tiny", "llama", seed=3)
    out = tmp_path / "q"
    opts = [x for k, v in FAST.items() for x in ("--option", f"{k}={v}")]
    assert main(["quantize", str(src), "--method", "aqlm", "--samples", "4", "--seq-len", "32", *opts,
                 "-o", str(out)]) == 0
    assert re.search(r"done in .* bits/weight", capsys.readouterr().err)
    assert main(["quantize", str(src), "--method", "aqlm", "--option", "bits=3", "--option", "nbits_per_codebook=16",
                 "-o", str(tmp_path / "bad")]) == 2
    assert "whole number" in capsys.readouterr().err
    assert main(["eval", str(out), "--max-tokens", "256", "--ctx", "64", "--no-latency"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "q"
    assert main(["export", str(out), "--format", "aqlm", "-o", str(tmp_path / "e")]) == 0
    qc = json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "aqlm" and (qc["num_codebooks"], qc["nbits_per_codebook"], qc["in_group_size"]) == (2, 4, 4)
