"""lowbit auto: the per-tensor sensitivity (calibration.fisher + auto.sensitivity), the plan file,
and the command end to end on a tiny model.

* the output-channel Fisher of the head equals mean (onehot(y) - p)² for the sampled labels,
  written out by hand; H equals mean x xᵀ of the layer's inputs;
* the predicted KL is ½ Σ_r f_r (ΔW H ΔWᵀ)_rr, checked against a per-element double loop, and it
  tracks the true KL of a single perturbed tensor (ratio near 1 for small errors, rank
  correlation over tensors and options);
* a plan round-trips through its file; the command meets a size budget on disk, writes a
  checkpoint whose modules are the plan's choices and whose KL is the plan's measured KL, and a
  second budget reads the sensitivities from the cache;
* bad budgets and methods are one-line errors.
"""

import json

import numpy as np
import pytest
import torch

from lowbit import api
from lowbit.auto import run as R
from lowbit.auto import sensitivity as S
from lowbit.auto.plan import Entry, Plan
from lowbit.calibration.fisher import LayerStats, layer_statistics
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.size import dir_size_bytes
from lowbit.models.tiny import save_tiny, tiny_model

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, initializer_range=0.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=1, **SHAPE)


def _samples(n=2, L=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, L), generator=g)


def test_head_fisher_and_hessian_by_hand():
    m = tiny_model("llama", seed=2, **SHAPE)
    model = m.model
    head = model.lm_head
    q = model.model.layers[0].self_attn.q_proj
    ids = _samples()
    st = layer_statistics(model, {"head": head, "q": q}, ids, draws=1, seed=5, batch_size=2, progress=False)
    # by hand: the same forward, the same seeded draw of labels
    xs = []
    h = q.register_forward_hook(lambda mod, a, o: xs.append(a[0].detach()))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    h.remove()
    p = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
    y = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    g = -p.double()
    g[torch.arange(len(y)), y] += 1
    torch.testing.assert_close(st["head"].f, (g * g).mean(0), rtol=1e-5, atol=1e-9)
    X = xs[0].reshape(-1, xs[0].shape[-1]).double()
    torch.testing.assert_close(st["q"].H, X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)  # one float32 product
    assert st["q"].f.shape == (q.out_features,) and bool((st["q"].f > 0).all())


def test_predicted_kl_formula():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(5, 7, generator=g, dtype=torch.float64)
    X = torch.randn(40, 7, generator=g, dtype=torch.float64)
    H = X.T @ X / 40
    f = torch.rand(5, generator=g, dtype=torch.float64)
    want = 0.0
    for r in range(5):
        for t in range(40):
            want += 0.5 * f[r].item() * float(dW[r] @ X[t]) ** 2 / 40
    got = S.predicted_kl(dW, LayerStats(f=f, tokens=40, H=H))
    assert got == pytest.approx(want, rel=1e-5)  # float32 products, float64 sums
    # the embedding [vocab 5, d 7]: rows weighted half by frequency, half uniformly, times scale²
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    fe = torch.rand(7, generator=g, dtype=torch.float64)
    want = 0.0
    for v in range(5):
        for c in range(7):
            want += 0.5 * fe[c].item() * (0.5 * counts[v].item() / 4 + 0.5 / 5) * (2.0 * dW[v, c].item()) ** 2
    got = S.predicted_kl(dW, LayerStats(f=fe, tokens=4, counts=counts, scale=2.0))
    assert got == pytest.approx(want, rel=1e-5)  # float32 products, float64 sums


def test_prediction_tracks_the_true_kl():
    m = tiny_model("llama", seed=2, **SHAPE)
    model = m.model
    items = S.items_of(model, "lowbit")
    ids = _samples(4, 32)
    stats = S.statistics(model, items, ids, progress=False)
    meter = S.KLMeter(model, _samples(2, 32, seed=1))
    # small errors: second order is accurate; one tensor at a time
    ratios = []
    for k in list(items)[:6]:
        W = items[k].weight.detach()
        W_hat, _, _, pred = S.item_cost(k, W, stats, S.Option("rtn", 8, 32), model)
        with S.swapped_weight(items[k], W_hat):
            ratios.append(meter.kl() / pred)
    assert 0.3 < float(np.median(ratios)) < 3.0, ratios
    opts = {k: S.options_for("lowbit", tuple(v.weight.shape), methods=("rtn", "gptq"), bits=(2, 3, 4, 8),
                             groups=(32,)) for k, v in items.items()}
    rc = S.rank_check(model, items, stats, opts, meter, n_items=5, n_options=4, progress=False)
    assert len(rc["rows"]) == 20
    assert rc["spearman"] > 0.8, rc["rows"]


def test_spearman():
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert S.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])


def test_option_labels_round_trip():
    for o in (S.Option("gptq", 3, 64), S.Option("float"), S.Option("imatrix", gguf_type="Q4_K"),
              S.Option("gptq", gguf_type="Q5_0")):
        assert S.Option.parse(o.label) == o
    # a tensor gets the groups / block types its rows allow
    assert {o.group for o in S.options_for("lowbit", (8, 96), methods=("rtn",), groups=(32, 64))} == {32}
    types = {o.gguf_type for o in S.options_for("gguf", (8, 576), types=S.GGUF_TYPES)}
    assert "Q4_K" not in types and {"Q4_0", "Q5_0", "Q8_0", "F16"} <= types
    with pytest.raises(LowbitError, match="unknown target"):
        S.options_for("onnx", (8, 64))


def test_plan_round_trip(tmp_path):
    plan = Plan(target="lowbit", budget={"bits": 3.5, "size": None, "bytes": 100},
                entries=[Entry("a", "gptq-w3g64", 30, 64, 1e-3, 2e-3), Entry("b", "rtn-w4g32", 40, 64, 5e-4)],
                calibration={"text": "calibration"}, measured_kl=2.5e-3, rounds=[{"round": 0}])
    p = plan.save(tmp_path)
    back = Plan.load(p)
    assert back == plan
    assert back.bytes == 70 and back.bits_per_weight == pytest.approx(8 * 70 / 128)
    text = back.table()
    assert "gptq-w3g64" in text and "total" in text and "2.5e-03" in text.replace("0.0025", "2.5e-03")
    (tmp_path / "bad.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(LowbitError, match="bad.json"):
        Plan.load(tmp_path / "bad.json")


def test_auto_command_meets_a_size_budget(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    size = 150_000
    code = main(["auto", str(tiny_dir), "--size", str(size), "--groups", "32", "--bit-choices", "2,3,4,8",
                 "--methods", "gptq,rtn", "--samples", "4", "--seq-len", "32", "--plot", str(tmp_path / "p.png"),
                 "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert dir_size_bytes(out) <= size
    plan = Plan.load(out)
    assert abs(plan.extra["on_disk_bytes"] - dir_size_bytes(out)) < 32
    uni = [r for r in plan.rounds if str(r["round"]).startswith("uniform ")]  # the uniform check ran
    assert uni and plan.measured_kl <= min(r["measured_kl"] for r in uni) + 1e-12
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "measured in" in captured.err
    dec = json.loads((out / "lowbit.json").read_text())["decode"]  # the decode default, measured as quantize does
    assert dec["int8_activations"] == (dec["step_kl_int8"] <= 1.05 * dec["step_kl_float"]
                                       or dec["step_kl_int8"] - dec["step_kl_float"] <= 0.01)
    # the checkpoint holds exactly the plan's choices
    q = api.load(str(out))
    mods = dict(q.model.named_modules())
    for e in plan.entries:
        opt = S.Option.parse(e.option)
        if opt.method == "float":
            continue
        fmt = mods["model.embed_tokens" if e.tensor == S.EMBED else e.tensor].weight_format
        assert fmt.scheme.bits == opt.bits and fmt.scheme.group_size == opt.group
        assert fmt.nbytes == e.bytes
    # and its KL on the verification windows is the plan's measured KL
    orig = api.load(str(tiny_dir))
    from lowbit.data.texts import calibration_samples, load_text

    ids = calibration_samples(orig.tokenizer, n_samples=4, seq_len=32, text=load_text("calibration"), seed=1)
    meter = S.KLMeter(orig.model, ids)
    assert meter.kl(q.model) == pytest.approx(plan.measured_kl, rel=1e-3)
    # a second budget: the sensitivities come from the cache
    code = main(["auto", str(tiny_dir), "--bits", "3", "--groups", "32", "--bit-choices", "2,3,4,8",
                 "--methods", "gptq,rtn", "--samples", "4", "--seq-len", "32", "-o", str(tmp_path / "q3")])
    captured = capsys.readouterr()
    assert code == 0 and "from the cache" in captured.err
    p3 = Plan.load(tmp_path / "q3")
    assert p3.bytes <= p3.budget["bytes"] and p3.bits_per_weight <= 3.0 + 1e-9


def test_allocation_is_the_knapsack_optimum():
    g = np.random.default_rng(0)
    table = S.Table(key={}, shapes={f"t{i}": [4, 8] for i in range(4)})
    for i in range(4):
        table.kl[f"t{i}"] = {f"o{j}": float(g.random()) for j in range(3)}
        table.bytes[f"t{i}"] = {f"o{j}": int(g.integers(1, 10)) for j in range(3)}
    import itertools

    for budget in (12, 16, 24):
        choice, sol = R.allocate(table, budget)
        best = min((sum(table.kl[f"t{i}"][f"o{c[i]}"] for i in range(4)), c)
                   for c in itertools.product(range(3), repeat=4)
                   if sum(table.bytes[f"t{i}"][f"o{c[i]}"] for i in range(4)) <= budget)
        assert sol.cost == pytest.approx(best[0])
        assert sum(table.bytes[k][v] for k, v in choice.items()) <= budget


def test_bad_input(tiny_dir, tmp_path, capsys):
    with pytest.raises(LowbitError, match="exactly one budget"):
        R.AutoConfig()
    with pytest.raises(LowbitError, match="not offered"):
        R.AutoConfig(bits=4, methods=("awq-magic",))
    with pytest.raises(LowbitError, match="between 1 and 32"):
        R.AutoConfig(bits=0.5)
    code = main(["auto", str(tiny_dir), "--size", "1KB", "--samples", "2", "--seq-len", "16", "--no-cache",
                 "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "budget" in err and "Traceback" not in err


GGUF_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  num_hidden_layers=2, tie_word_embeddings=True, initializer_range=0.1)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("g") / "tiny", "llama", seed=3, **GGUF_SHAPE)


def test_auto_gguf_target(gguf_dir, tmp_path, monkeypatch, capsys):
    """A GGUF file at a size budget: every tensor has the plan's type; GPTQ-solved tensors read back
    (gguf-py) exactly as lowbit solved them; the file meets the budget."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants as gq

    from lowbit.export import gguf as GW
    from lowbit.models.families import family_of

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.gguf"
    code = main(["auto", str(gguf_dir), "--target", "gguf", "--bits", "4.5", "--types",
                 "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,IQ4_NL,Q8_0", "--samples", "4", "--seq-len", "32", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = Plan.load(str(out) + ".plan.json")
    assert plan.bytes <= plan.budget["bytes"]
    assert any("+gptq" in e.option for e in plan.entries)
    m = api.load(str(gguf_dir))
    fam = family_of(m.model)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    cfg = m.model.config
    for e in plan.entries:
        opt = S.Option.parse(e.option)
        hf = fam.embed if e.tensor == S.EMBED else e.tensor
        gname = GW.gguf_name(hf + ".weight", fam)
        t = tensors[gname]
        assert t.tensor_type.name == opt.gguf_type, gname
        assert int(t.n_bytes) == e.bytes
        if opt.method == "gptq":
            got = torch.from_numpy(gq.dequantize(t.data, t.tensor_type).reshape(-1, t.shape[0]).copy())
            # the solve, repeated: the same statistics, the same solver
            W = dict(m.model.named_modules())[hf].weight.detach()
            items = S.items_of(m.model, "gguf")
            from lowbit.data.texts import calibration_samples, load_text

            ids = calibration_samples(m.tokenizer, n_samples=4, seq_len=32, text=load_text("calibration"), seed=0)
            stats = S.statistics(m.model, items, ids, progress=False)
            W_hat, _, _, _ = S.item_cost(e.tensor, W, stats, opt, m.model)
            want = GW._gguf_layout(gname, W_hat, fam, cfg.num_attention_heads, cfg.num_key_value_heads)
            assert torch.equal(got, want), gname
            break


def test_speed_budget(tiny_dir, tmp_path, monkeypatch, capsys):
    """--tok-s: the knapsack counts measured kernel time; the plan records the timings and the
    decode speed measured on the written model (no speed is asserted: timings are the machine's)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LowbitError, match="lowbit target"):
        R.AutoConfig(tok_s=100, target="gguf")
    with pytest.raises(LowbitError, match="exactly one budget"):
        R.AutoConfig(tok_s=100, bits=4)
    out = tmp_path / "s"
    code = main(["auto", str(tiny_dir), "--tok-s", "5", "--threads", "1", "--groups", "32", "--bit-choices", "2,8",
                 "--methods", "rtn", "--samples", "2", "--seq-len", "32", "--repair", "0", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    plan = Plan.load(out)
    ex = plan.extra
    assert ex["kernel_us"] <= plan.budget["kernel_us"] + 1e-6
    assert ex["predicted_tok_s"] == pytest.approx(1e6 / (ex["kernel_us"] + ex["overhead_us"]))
    assert ex["measured_tok_s"] > 0 and "tokens/s measured" in err
    # a budget this loose is no constraint: the least predicted KL, option by option
    for e in plan.entries:
        assert e.option in ("rtn-w8g32", "float")


def test_speed_budget_out_of_reach_names_the_limit():
    meas = R.Measured(items={}, stats={}, options={}, table=S.Table(key={}), meter=None, calibration={})
    meas.kernel_us = {"a": {"x": 300.0, "y": 100.0}, "b": {"x": 50.0}}
    meas.overhead_us = 850.0
    with pytest.raises(LowbitError, match=r"fastest choice of every tensor takes 150 µs.*at most 1000.0 tokens/s"):
        R.budget_units(R.AutoConfig(tok_s=1001), meas, 0)
    assert R.budget_units(R.AutoConfig(tok_s=500), meas, 0) == int((2000 - 850) / R.SPEED_UNIT)


def test_awq_nf4_and_embedding_options():
    """awq and nf4 options, and the embedding's: labels round-trip, the grids a tensor's rows allow."""
    for o in (S.Option("nf4", 4, 64), S.Option("awq", 3, 32)):
        assert S.Option.parse(o.label) == o
    opts = S.options_for("lowbit", (8, 96), methods=("nf4", "awq"), bits=(3, 4), groups=(16, 32, 48))
    assert {o.label for o in opts} == {"nf4-w4g16", "nf4-w4g32", "awq-w3g16", "awq-w3g32", "awq-w3g48",
                                       "awq-w4g16", "awq-w4g32", "awq-w4g48"}
    emb = S.options_for("lowbit", (50, 64), methods=("gptq", "rtn", "awq", "nf4"), bits=(4,), groups=(32,),
                        embedding=True)
    assert [o.label for o in emb] == ["float", "rtn-w4g32"]
    # the awq option: AWQ's clipped grid, searched on the layer's own inputs (q/k left unclipped)
    from lowbit.algorithms.awq import awq_quantize, search_clip

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    st = LayerStats(f=torch.ones(16, dtype=torch.float64), tokens=256, H=(X.T @ X / 256).double())
    opt = S.Option("awq", 3, 32)
    W_hat, fmt, nb = S.solve(W, st, opt)
    want = awq_quantize(W, search_clip(st.H.float(), W, opt.scheme()), opt.scheme())
    assert torch.equal(W_hat, want.dequantize().float()) and nb == want.nbytes
    W_rtn, _, _ = S.solve(W, st, S.Option("rtn", 3, 32))
    assert torch.equal(S.solve(W, st, opt, clip=False)[0], W_rtn)
    from lowbit.algorithms.awq import output_error

    assert output_error(W, W_hat, st.H.float()) < output_error(W, W_rtn, st.H.float())
    m = tiny_model("llama", seed=2, **SHAPE)
    assert not S.clips("model.layers.0.self_attn.k_proj", m.model) and S.clips("model.layers.0.mlp.up_proj", m.model)
    nf = S.solve(W, st, S.Option("nf4", 4, 32))[1]
    assert type(nf).__name__ == "NF4Weight" and nf.blocksize == 32


def test_auto_awq_scales_and_a_quantized_tied_embedding(gguf_dir, tmp_path, monkeypatch):
    """methods awq,nf4,...: AWQ's scales are folded first (the float model computes the same), the
    tied embedding is allocated and written as a quantized table for both its roles, and the
    checkpoint loads to exactly the plan's weights (its KL is the plan's measured KL)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    m = api.load(str(gguf_dir))
    orig = api.load(str(gguf_dir))
    ids = _samples(2, 16)
    with torch.no_grad():
        ref = orig.model(input_ids=ids).logits
    cfg = R.AutoConfig(bits=6, methods=("awq", "nf4", "rtn"), bit_choices=(2, 4, 8), groups=(32, 64),
                       n_samples=4, seq_len=32, repair_rounds=0)
    logs = []
    meas = R.prepare(m, cfg, progress=False, log=logs.append)
    assert any("AWQ channel scales folded" in line for line in logs)
    with torch.no_grad():
        got = m.model(input_ids=ids).logits
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()  # scaled, yet the same function
    norm = m.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, orig.model.model.layers[0].input_layernorm.weight)
    assert S.EMBED in meas.items and S.HEAD not in meas.items
    assert set(meas.table.kl[S.EMBED]) == {"float", "rtn-w2g32", "rtn-w2g64", "rtn-w4g32", "rtn-w4g64",
                                           "rtn-w8g32", "rtn-w8g64"}
    # a quantized tied table is stored twice (embedding rows and head)
    from lowbit.formats.affine import AffineWeight

    W = meas.items[S.EMBED].weight.detach().float()
    assert meas.table.bytes[S.EMBED]["rtn-w4g32"] == 2 * AffineWeight.quantize_rtn(
        W, S.Option("rtn", 4, 32).scheme()).nbytes
    # force the embedding's choice: an 8-bit table, the rest by the knapsack
    meas.table.kl[S.EMBED] = {"rtn-w8g32": meas.table.kl[S.EMBED]["rtn-w8g32"]}
    meas.table.bytes[S.EMBED] = {"rtn-w8g32": meas.table.bytes[S.EMBED]["rtn-w8g32"]}
    plan, out = R.write(m, meas, cfg, tmp_path / "q")
    assert {S.Option.parse(e.option).method for e in plan.entries} <= {"awq", "nf4", "rtn"}
    q = api.load(str(out))
    emb, head = q.model.get_input_embeddings(), q.model.get_output_embeddings()
    from lowbit.nn.embedding import QuantizedEmbedding
    from lowbit.nn.linear import QuantizedLinear

    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    W_hat = S.solve(W, meas.stats[S.EMBED], S.Option("rtn", 8, 32))[0]
    assert torch.equal(emb.weight_format.dequantize().float(), W_hat)
    assert torch.equal(head.weight_format.dequantize().float(), W_hat)
    assert S.KLMeter(orig.model, meas.meter.ids).kl(q.model) == pytest.approx(plan.measured_kl, rel=1e-3, abs=1e-6)


def test_auto_gguf_target_with_awq_scales(gguf_dir, tmp_path, monkeypatch):
    """GGUF target, methods imatrix,awq: the scales are folded into the norms before any type is
    chosen, and the file llama.cpp's format holds reads back (lowbit's GGUF reader) to the plan's
    measured KL."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    m = api.load(str(gguf_dir))
    orig = api.load(str(gguf_dir))
    cfg = R.AutoConfig(target="gguf", bits=6, methods=("imatrix", "awq"), gguf_types=("Q4_0", "Q8_0", "Q6_K", "Q4_K"),
                       n_samples=4, seq_len=32, repair_rounds=0)
    meas = R.prepare(m, cfg, progress=False, log=lambda *a: None)
    assert "transform" in meas.table.key
    plan, out = R.write(m, meas, cfg, tmp_path / "m.gguf", log=lambda *a: None)
    g = api.load(str(out))
    n0 = g.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(n0, orig.model.model.layers[0].input_layernorm.weight)
    assert torch.allclose(n0, m.model.model.layers[0].input_layernorm.weight)
    assert S.KLMeter(orig.model, meas.meter.ids).kl(g.model) == pytest.approx(plan.measured_kl, rel=1e-4)


def test_uniform_seeds_and_greedy_fill():
    """The uniform check's pieces: the largest uniform plan of each method within the budget, and
    the greedy fill (most predicted KL saved per byte, never over the budget), by hand."""
    table = S.Table(key={}, shapes={"a": [4, 8], "b": [4, 8]})
    table.kl = {"a": {"rtn-w2g8": 1.0, "rtn-w4g8": 0.3, "gptq-w2g8": 0.8, "gptq-w4g8": 0.1, "float": 0.0},
                "b": {"rtn-w2g8": 2.0, "rtn-w4g8": 0.2, "gptq-w2g8": 1.5, "gptq-w4g8": 0.15}}
    table.bytes = {"a": {"rtn-w2g8": 10, "rtn-w4g8": 20, "gptq-w2g8": 10, "gptq-w4g8": 20, "float": 64},
                   "b": {"rtn-w2g8": 10, "rtn-w4g8": 20, "gptq-w2g8": 10, "gptq-w4g8": 20}}
    assert R.uniform_seeds(table, 30) == ["gptq-w2g8", "rtn-w2g8"]
    assert R.uniform_seeds(table, 40) == ["gptq-w4g8", "rtn-w4g8"]
    assert R.uniform_seeds(table, 19) == []
    # from gptq-w2 everywhere with 10 bytes to spare: b's upgrade saves 1.35 per 10 bytes, a's 0.7
    assert R.greedy_fill(table, {"a": "gptq-w2g8", "b": "gptq-w2g8"}, 30) == {"a": "gptq-w2g8", "b": "gptq-w4g8"}
    assert R.greedy_fill(table, {"a": "gptq-w2g8", "b": "gptq-w2g8"}, 40) == {"a": "gptq-w4g8", "b": "gptq-w4g8"}
    # a measured correction (scale) changes the order
    assert R.greedy_fill(table, {"a": "gptq-w2g8", "b": "gptq-w2g8"}, 30, scale={"a": 10.0}) == \
        {"a": "gptq-w4g8", "b": "gptq-w2g8"}
    # a same-size swap with a saving is taken at once (rtn -> gptq at 2 bits), unless kept to one method
    assert R.greedy_fill(table, {"a": "rtn-w2g8", "b": "rtn-w2g8"}, 20) == {"a": "gptq-w2g8", "b": "gptq-w2g8"}
    assert R.greedy_fill(table, {"a": "rtn-w2g8", "b": "rtn-w2g8"}, 30, method="rtn") == \
        {"a": "rtn-w2g8", "b": "rtn-w4g8"}
