"""Iterative pruning with a short recovery fine-tune (gradual magnitude pruning, Zhu & Gupta 2017;
"prune, then retrain" of Han et al. 2015), sized for a CPU:

    for s in schedule (rising sparsities s1 < s2 < … < s_k):
        prune the model to sparsity s with a one-shot pruner (magnitude, Wanda or SparseGPT —
            weights already zero score lowest, so every stage keeps the previous stage's zeros
            when the comparison set allows it)
        fine-tune ``steps`` steps on bundled calibration text (next-token cross-entropy):
            only the weights of the blocks' linear layers train (embeddings, norms, lm_head frozen);
            the mask M (True = pruned, fixed right after pruning) is enforced on every step:
            grad ← grad ⊙ ¬M before the Adam step, W ← W ⊙ ¬M after it, so pruned weights stay
            exactly 0 and the layer keeps exactly the sparsity it was pruned to.

The fine-tune samples are windows of the calibration split (never the evaluation split). The
result is an ordinary pruned model (dense nn.Linear layers holding zeros) with a record of every
stage, which saves, loads and can be stored sparse like any pruned model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.magnitude import model_linear_layers
from lowbit.algorithms.pruning import check_sparsity, sparsity_of
from lowbit.errors import LowbitError

PRUNERS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class IterativeConfig:
    schedule: tuple[float, ...] = (0.3, 0.5)  # rising sparsities, one prune + fine-tune per entry
    method: str = "magnitude"                 # the one-shot pruner of every stage
    steps: int = 30                           # fine-tune steps after each prune (0: prune only)
    lr: float = 2e-5                          # Adam learning rate
    batch_size: int = 2                       # sequences per step
    seq_len: int = 128                        # tokens per sequence
    n_samples: int = 64                       # calibration windows the steps draw from
    calib_samples: int = 32                   # windows for the pruner's statistics (Wanda, SparseGPT)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, tuple) or not self.schedule:
            raise LowbitError("iterative pruning needs a non-empty schedule of sparsities, e.g. 0.3,0.5")
        prev = -1.0
        for s in self.schedule:
            check_sparsity(s, "iterative pruning")
            if s <= prev:
                raise LowbitError(f"iterative pruning schedule must rise strictly, got {list(self.schedule)}")
            prev = s
        if self.method not in PRUNERS:
            raise LowbitError(f"iterative pruning method must be one of {', '.join(PRUNERS)}, got {self.method!r}")
        for k in ("steps", "batch_size", "seq_len", "n_samples", "calib_samples"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise LowbitError(f"iterative pruning {k} must be an integer >= {0 if k == 'steps' else 1}, got {v!r}")
        if self.seq_len < 2:
            raise LowbitError("iterative pruning seq_len must be at least 2")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise LowbitError(f"iterative pruning lr must be a finite number > 0, got {self.lr!r}")


def linear_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable set: weights of the blocks' float nn.Linear layers."""
    out = []
    for name, lin in model_linear_layers(model):
        if type(lin) is not nn.Linear:
            raise LowbitError(f"{name} is {type(lin).__name__}, not a float nn.Linear; fine-tune before "
                              "quantizing or storing sparse")
        out.append((name, lin.weight))
    if not out:
        raise LowbitError("the model's blocks hold no float nn.Linear layers to fine-tune (quantized or stored "
                          "sparse?); fine-tune before quantizing or storing sparse")
    return out


def masked_finetune(model: nn.Module, samples: torch.Tensor, steps: int, lr: float, batch_size: int,
                    seed: int = 0, progress: bool = True) -> list[float]:
    """Fine-tune the linear weights on next-token loss with every currently-zero weight held at 0.
    ``samples`` LongTensor [n, L]. Returns the training loss of every step."""
    from tqdm.auto import tqdm

    if steps == 0:
        return []
    weights = linear_weights(model)
    frozen = [p for p in model.parameters()]
    was_training = model.training
    for p in frozen:
        p.requires_grad_(False)
    params = [w for _, w in weights]
    keep = [w.detach() != 0 for w in params]                       # ¬M, fixed for this stage
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    try:
        for _ in tqdm(range(steps), desc="fine-tune", unit="step", disable=not progress, leave=False):
            x = samples[torch.randint(0, samples.shape[0], (batch_size,), generator=g)]
            loss = model(input_ids=x, labels=x).loss
            if not torch.isfinite(loss):
                raise LowbitError(f"fine-tuning diverged (loss {float(loss)}); lower the learning rate")
            loss.backward()
            with torch.no_grad():
                for p, k in zip(params, keep):
                    p.grad.mul_(k)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, k in zip(params, keep):
                    p.mul_(k)                                      # exact zeros where pruned
            losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        model.train(was_training)
        model.eval()
    return losses


def _prune_stage(model, tokenizer, cfg: IterativeConfig, sparsity: float, progress: bool):
    from lowbit.algorithms.base import make_method
    from lowbit.calibration.sequential import apply_data_free, run_sequential
    from lowbit.data.texts import calibration_samples, load_text

    meth = make_method(cfg.method, sparsity=sparsity)
    if meth.needs_calibration:
        samples = calibration_samples(tokenizer, n_samples=cfg.calib_samples, seq_len=512,
                                      text=load_text("calibration"), seed=cfg.seed)
        run_sequential(model, meth, samples, progress=progress)
    else:
        apply_data_free(model, meth, progress=progress)
    return meth


def iterative_prune(m, cfg: IterativeConfig, *, eval_fn=None, progress: bool = True, log=None) -> dict:
    """Run the schedule on ``m`` (an `api.Model`, modified in place) and set its record.

    ``eval_fn(model) -> float`` (e.g. held-out perplexity), if given, is called after each prune
    and after each fine-tune; ``log(str)`` receives one line per event."""
    from lowbit.data.texts import calibration_samples, load_text

    if m.record is not None:
        raise LowbitError(f"{m.name} is already quantized or pruned; start from the original model")
    t0 = time.perf_counter()
    train = calibration_samples(m.tokenizer, n_samples=cfg.n_samples, seq_len=cfg.seq_len,
                                text=load_text("calibration"), seed=cfg.seed + 1)
    stages = []
    meth = None
    for i, s in enumerate(cfg.schedule):
        ts = time.perf_counter()
        meth = _prune_stage(m.model, m.tokenizer, cfg, s, progress)
        t_prune = time.perf_counter() - ts
        st = {"sparsity": s, "achieved": round(_model_sparsity(m.model), 6), "prune_seconds": round(t_prune, 2)}
        if eval_fn is not None:
            st["ppl_pruned"] = eval_fn(m.model)
        if log:
            log(f"stage {i + 1}/{len(cfg.schedule)}: pruned to {100 * st['achieved']:.2f}% in {t_prune:.1f} s"
                + (f", ppl {st['ppl_pruned']:.3f}" if eval_fn else ""))
        ts = time.perf_counter()
        losses = masked_finetune(m.model, train, cfg.steps, cfg.lr, cfg.batch_size, seed=cfg.seed + i,
                                 progress=progress)
        st["finetune_seconds"] = round(time.perf_counter() - ts, 2)
        st["steps"] = cfg.steps
        if losses:
            k = max(1, len(losses) // 5)
            st["loss_first"] = round(sum(losses[:k]) / k, 4)
            st["loss_last"] = round(sum(losses[-k:]) / k, 4)
        st["achieved_after_finetune"] = round(_model_sparsity(m.model), 6)
        if eval_fn is not None and cfg.steps:
            st["ppl_finetuned"] = eval_fn(m.model)
        if log and cfg.steps:
            log(f"stage {i + 1}/{len(cfg.schedule)}: fine-tuned {cfg.steps} steps in {st['finetune_seconds']:.1f} s, "
                f"loss {st.get('loss_first', float('nan')):.3f} -> {st.get('loss_last', float('nan')):.3f}"
                + (f", ppl {st['ppl_finetuned']:.3f}" if eval_fn else ""))
        stages.append(st)
    import datetime as _dt

    described = meth.describe()
    config = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    config["schedule"] = list(cfg.schedule)
    rec = {
        "method": {"method": f"iterative-{cfg.method}", "config": config, "stages": stages,
                   "sparsity": round(_model_sparsity(m.model), 6), "layers": described.get("layers", {}),
                   "pruner": described},
        "base_model": m.source,
        "calibration": {"text": "calibration", "n_samples": cfg.n_samples, "seq_len": cfg.seq_len, "seed": cfg.seed},
        "runner": None,
        "quantize_seconds": round(time.perf_counter() - t0, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
    }
    m.record = rec
    return rec


def _model_sparsity(model: nn.Module) -> float:
    ws = [lin.weight for _, lin in model_linear_layers(model)]
    n = sum(w.numel() for w in ws)
    return sum(sparsity_of(w) * w.numel() for w in ws) / max(1, n)
