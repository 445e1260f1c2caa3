"""The shared trainer: KD loss against a hand-written reference, the schedule, the data order,
and a run interrupted by a signal and resumed ending bit for bit where an uninterrupted one does."""

import math
import random
import signal

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.training.data import batch_indices, packed_windows
from lowbit.training.losses import ce_loss, hidden_loss, kd_loss
from lowbit.training.trainer import TrainConfig, Trainer, TrainingInterrupted
from tests.tiny import CharTokenizer, tiny_llama


def _kd_reference(zs, zt, tokens, alpha, T):
    """Loops over every predicted position, as the formula reads."""
    kl_terms, ce_terms = [], []
    B, L, V = zs.shape
    for b in range(B):
        for i in range(L - 1):
            p = [math.exp(zt[b, i, v] / T) for v in range(V)]
            q = [math.exp(zs[b, i, v] / T) for v in range(V)]
            sp, sq = sum(p), sum(q)
            kl_terms.append(sum(p[v] / sp * math.log((p[v] / sp) / (q[v] / sq)) for v in range(V)))
            e = [math.exp(zs[b, i, v]) for v in range(V)]
            ce_terms.append(-math.log(e[tokens[b, i + 1]] / sum(e)))
    kl, ce = sum(kl_terms) / len(kl_terms), sum(ce_terms) / len(ce_terms)
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("alpha,T", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (0.9, 4.0)])
def test_kd_loss_equals_reference(alpha, T):
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    loss, parts = kd_loss(zs, zt, tokens, alpha, T)
    ref, kl, ce = _kd_reference(zs, zt, tokens, alpha, T)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    if alpha < 1:
        assert parts["ce"] == pytest.approx(ce, rel=1e-5)
        assert float(ce_loss(zs, tokens)) == pytest.approx(ce, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_has_teacher_gradient_none():
    z = torch.randn(1, 4, 9, requires_grad=True)
    t = z.detach().clone().requires_grad_(True)
    loss, _ = kd_loss(z, t, torch.zeros(1, 4, dtype=torch.long), 1.0, 2.0)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert t.grad is None  # the teacher is a target, never trained


def test_kd_loss_rejects_bad_input():
    z = torch.randn(1, 4, 9)
    with pytest.raises(LowbitError, match="differ in shape"):
        kd_loss(z, torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LowbitError, match="alpha"):
        kd_loss(z, z, torch.zeros(1, 4, dtype=torch.long), alpha=1.5)


def test_hidden_loss():
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert float(hidden_loss([a, b], [b, b])) == pytest.approx(0.5 * (1 / 4 + 0))


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(55) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert cfg.lr_at(100) == pytest.approx(1e-4)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 99))


def test_two_stage_schedule_by_hand():
    """BitNet b1.58's tips: warmup, lr -> lr/2 linearly over the first half, a drop to lr/4, then
    linearly to min_lr*lr; weight decay on in the first half only."""
    c = TrainConfig(steps=20, lr=1.0, warmup=2, min_lr=0.1, weight_decay=0.1, schedule="two-stage")
    want = [0.5, 1.0] + [1 - 0.5 * k / 8 for k in range(8)] + [0.25 - 0.15 * k / 9 for k in range(10)]
    assert [c.lr_at(i) for i in range(20)] == pytest.approx(want, abs=1e-12)
    assert [c.weight_decay_at(i) for i in range(20)] == [0.1] * 10 + [0.0] * 10
    assert TrainConfig(steps=20, weight_decay=0.1).weight_decay_at(19) == 0.1  # cosine: constant
    with pytest.raises(LowbitError, match="schedule"):
        TrainConfig(schedule="linear")


def test_two_stage_weight_decay_reaches_the_optimizer():
    model, params, loss_fn, windows = _setup()
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup=1, weight_decay=0.1, schedule="two-stage")
    seen = []
    tr = Trainer(model, params, loss_fn, windows, cfg, progress=False,
                 on_step=lambda step: seen.append(sorted(g["weight_decay"] for g in tr.opt.param_groups)))
    tr.run()
    assert seen == [[0.0, 0.1], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]]


def test_batch_order_is_a_permutation_per_epoch_and_depends_only_on_step():
    n, B = 10, 4
    order = torch.cat([batch_indices(n, B, s, seed=3) for s in range(5)]).tolist()  # 20 = two epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert batch_indices(n, B, 3, seed=3).tolist() == order[12:16]
    assert batch_indices(n, B, 3, seed=4).tolist() != order[12:16]


def test_packed_windows_cover_the_text_in_order():
    tok = CharTokenizer()
    text = "abcdefghij" * 10
    w = packed_windows(tok, text, 16)
    assert w.shape == (6, 16)
    assert w.flatten().tolist() == tok(text)["input_ids"][:96]
    with pytest.raises(LowbitError, match="too few"):
        packed_windows(tok, "abc", 16)


def _setup(seed=0):
    model = tiny_llama(seed=seed)
    teacher = tiny_llama(seed=seed + 1)
    params = {n: p for n, p in model.named_parameters() if "mlp" in n or "norm" in n}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    def loss_fn(m, x):
        with torch.no_grad():
            t = teacher(x).logits
        return kd_loss(m(x).logits, t, x, alpha=0.5, temperature=2.0)

    windows = torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(5))
    return model, params, loss_fn, windows


def _final(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["cosine", "two-stage"])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, schedule):
    cfg = TrainConfig(steps=9, batch_size=4, micro_batch=2, lr=3e-3, warmup=2, save_every=4, eval_every=3, seed=7,
                      schedule=schedule, weight_decay=0.1 if schedule == "two-stage" else 0.0)
    model, params, loss_fn, windows = _setup()
    evals = lambda m: {"mse": float(sum(p.pow(2).sum() for p in m.parameters()))}  # noqa: E731
    full = Trainer(model, params, loss_fn, windows, cfg, evaluate=evals, progress=False).run()
    want = _final(model)

    stop_at = random.Random(11).randint(1, cfg.steps - 1)  # a random step, between two saves or on one

    def interrupt(step):
        if step == stop_at:
            signal.raise_signal(signal.SIGINT)

    model, params, loss_fn, windows = _setup()
    state = tmp_path / "state"
    with pytest.raises(TrainingInterrupted, match=f"after step {stop_at} of 9"):
        Trainer(model, params, loss_fn, windows, cfg, state_dir=state, evaluate=evals, progress=False,
                on_step=interrupt).run()
    assert (state / "trainer.pt").exists()

    model, params, loss_fn, windows = _setup()  # a new process would start from the original weights
    with pytest.raises(LowbitError, match="--resume"):
        Trainer(model, params, loss_fn, windows, cfg, state_dir=state, progress=False).run()
    res = Trainer(model, params, loss_fn, windows, cfg, state_dir=state, evaluate=evals, progress=False).run(resume=True)
    assert res.resumed_from == stop_at and res.steps == cfg.steps
    got = _final(model)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert [h["loss"] for h in res.history if "loss" in h] == [h["loss"] for h in full.history if "loss" in h]
    changed = [n for n in want if not torch.equal(want[n], _setup()[0].state_dict()[n])]
    assert changed and all("mlp" in n or "norm" in n for n in changed)


def test_resume_refuses_other_settings(tmp_path):
    model, params, loss_fn, windows = _setup()
    cfg = TrainConfig(steps=2, batch_size=2, save_every=1)
    Trainer(model, params, loss_fn, windows, cfg, state_dir=tmp_path, progress=False).run()
    model, params, loss_fn, windows = _setup()
    other = TrainConfig(steps=2, batch_size=2, save_every=1, lr=5e-4)
    with pytest.raises(LowbitError, match="other settings.*lr"):
        Trainer(model, params, loss_fn, windows, other, state_dir=tmp_path, progress=False).run(resume=True)
    with pytest.raises(LowbitError, match="other training text"):
        Trainer(model, params, loss_fn, windows[:6], cfg, state_dir=tmp_path, progress=False).run(resume=True)


def test_grad_checkpointing_gives_the_same_step():
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup=1)
    a = _setup()
    Trainer(*a, cfg, progress=False).run()
    b = _setup()
    Trainer(*b, TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup=1, grad_checkpointing=True), progress=False).run()
    for (n, p), (_, q) in zip(a[0].named_parameters(), b[0].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_trains():
    model, params, loss_fn, windows = _setup()
    res = Trainer(model, params, loss_fn, windows, TrainConfig(steps=3, batch_size=2, dtype="bfloat16", lr=1e-3),
                  progress=False).run()
    assert all(p.dtype == torch.float32 for p in params.values()) and res.steps == 3


def test_nan_loss_is_a_clear_error():
    model, params, _, windows = _setup()
    with pytest.raises(LowbitError, match="not finite at step 0"):
        Trainer(model, params, lambda m, x: (m(x).logits.sum() * float("nan"), {}), windows,
                TrainConfig(steps=1, batch_size=2), progress=False).run()


def test_config_validation():
    with pytest.raises(LowbitError, match="micro_batch"):
        TrainConfig(batch_size=8, micro_batch=3)
    with pytest.raises(LowbitError, match="dtype"):
        TrainConfig(dtype="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_follows_the_cpu_run():
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup=1)
    a = _setup()
    Trainer(*a, cfg, progress=False).run()
    model, params, _, windows = _setup()
    teacher = tiny_llama(seed=1).cuda()
    model.cuda()

    def loss_fn(m, x):
        with torch.no_grad():
            t = teacher(x).logits
        return kd_loss(m(x).logits, t, x, alpha=0.5, temperature=2.0)

    Trainer(model, params, loss_fn, windows, cfg, device="cuda", progress=False).run()
    for (n, p), (_, q) in zip(a[0].named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
