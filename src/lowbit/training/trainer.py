"""The one small trainer every training-time method shares (distillation, QAT, recovery of a
compressed model): a plain PyTorch loop that is resumable bit for bit.

* AdamW (weight decay on matrices only), linear warmup then cosine decay to ``min_lr`` × lr
  (or BitNet b1.58's two-stage rate and weight decay, ``schedule="two-stage"``),
  gradient clipping, gradient accumulation (``batch_size`` windows a step, ``micro_batch`` a
  forward/backward), float32 or bfloat16 autocast, gradient checkpointing per block
  (transformers' own, non-reentrant), a tqdm bar with loss and tokens/s.
* ``evaluate`` (a callable the caller gives, e.g. held-out KL to the teacher) runs before the
  first step, every ``eval_every`` steps and at the end; its results are printed as they come
  and kept in the history.
* **Resumable**: every ``save_every`` steps (and when the run is interrupted with SIGINT or
  SIGTERM, after the step in flight) the trainable tensors, the optimizer's state, the RNG
  states, the step and the history are written atomically to ``state_dir/trainer.pt``. A run
  started again with ``resume=True`` loads them and continues exactly where the saved one was:
  the data a step reads depends only on (seed, step) (`lowbit.training.data.batch_indices`) and
  the learning rate only on the step, so the resumed run ends with the same tensors, bit for bit,
  as one that was never interrupted.

The trainer knows nothing about teachers or formats: ``loss_fn(model, tokens)`` returns the
loss of one micro-batch (and a dict of floats to show), ``params`` names the tensors to train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit import outputs
from lowbit.core.log import log
from lowbit.errors import LowbitError
from lowbit.training.data import batch_indices

STATE_FILE = "trainer.pt"
HISTORY_FILE = "history.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULES = ("cosine", "two-stage")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8               # windows per optimizer step
    micro_batch: int | None = None    # windows per forward/backward (None: batch_size)
    lr: float = 1e-4
    warmup: int | None = None         # steps of linear warmup (None: 5 % of steps)
    min_lr: float = 0.1               # the cosine ends at min_lr * lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float | None = 1.0          # max gradient norm (None: no clipping)
    dtype: str = "float32"            # or "bfloat16" (autocast; trainable tensors stay float32)
    grad_checkpointing: bool = False
    eval_every: int = 50
    save_every: int = 25
    seed: int = 0
    schedule: str = "cosine"          # or "two-stage" (BitNet b1.58's: see lr_at / weight_decay_at)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:  # steps 0: the model as it starts, evaluated
            raise LowbitError(f"steps must be >= 0 and batch_size positive, got {self.steps}, {self.batch_size}")
        mb = self.micro_batch or self.batch_size
        if mb < 1 or self.batch_size % mb:
            raise LowbitError(f"micro_batch ({mb}) must divide batch_size ({self.batch_size})")
        if not self.lr > 0:
            raise LowbitError(f"lr must be positive, got {self.lr}")
        if self.dtype not in DTYPES:
            raise LowbitError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.min_lr <= 1:
            raise LowbitError(f"min_lr is a fraction of lr in [0, 1], got {self.min_lr}")
        if self.eval_every < 1 or self.save_every < 1:
            raise LowbitError("eval_every and save_every must be positive")
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup is not None else max(1, round(0.05 * self.steps))

    @property
    def stage_two_start(self) -> int:
        """The first step of the two-stage schedule's second stage (the half, after warmup)."""
        return max(self.warmup_steps + 1, self.steps // 2)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based).

        "cosine": linear warmup, then cosine to min_lr·lr.
        "two-stage" (BitNet b1.58's training tips: a high rate for the first half, then a sudden
        drop): linear warmup, then linear decay from lr to lr/2 over the first half of the steps;
        at the half the rate drops to lr/4 and decays linearly to min_lr·lr at the end."""
        w = self.warmup_steps
        if step < w:
            return self.lr * (step + 1) / w
        if self.schedule == "two-stage":
            half = self.stage_two_start
            if step < half:
                return self.lr * (1 - 0.5 * (step - w) / max(1, half - w))
            end = min(self.min_lr, 0.25)
            t = (step - half) / max(1, self.steps - 1 - half)
            return self.lr * (0.25 + (end - 0.25) * min(1.0, t))
        t = (step - w) / max(1, self.steps - w)
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def weight_decay_at(self, step: int) -> float:
        """The weight decay of step ``step``: constant for "cosine"; for "two-stage" (BitNet
        b1.58's tips) ``weight_decay`` during the first half and 0 in the second, when the latent
        weights should settle instead of being pulled towards the rounding boundaries."""
        if self.schedule == "two-stage" and step >= self.stage_two_start:
            return 0.0
        return self.weight_decay

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


class TrainingInterrupted(LowbitError):
    """SIGINT/SIGTERM during a run: the state after the last finished step is saved."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    history: list = field(default_factory=list)   # one dict per logged/evaluated step
    resumed_from: int = 0
    peak_rss_bytes: int = 0

    def first_eval(self) -> dict:
        return next((h["eval"] for h in self.history if "eval" in h), {})

    def final_eval(self) -> dict:
        return next((h["eval"] for h in reversed(self.history) if "eval" in h), {})


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _fingerprint(windows: Tensor) -> list:
    w = windows.to(torch.int64)
    return [list(w.shape), int(w.sum()), int((w * torch.arange(1, w.shape[1] + 1)).sum() % 1_000_000_007)]


class Trainer:
    def __init__(self, model: nn.Module, params: dict[str, Tensor], loss_fn: Callable, windows: Tensor,
                 config: TrainConfig, *, state_dir: str | Path | None = None,
                 evaluate: Callable[[nn.Module], dict] | None = None, device: str | torch.device = "cpu",
                 progress: bool = True, on_step: Callable[[int], None] | None = None):
        if windows.dim() != 2 or windows.shape[0] == 0:
            raise LowbitError(f"training windows must be a non-empty [n, seq_len] tensor, got {tuple(windows.shape)}")
        if not params:
            raise LowbitError("nothing to train: no trainable tensors were given")
        bad = [n for n, p in params.items() if not p.is_floating_point() or not p.is_leaf]
        if bad:
            raise LowbitError(f"trainable tensors must be floating-point leaves; not: {', '.join(bad[:5])}")
        self.model, self.loss_fn, self.windows, self.cfg = model, loss_fn, windows, config
        self.params = dict(sorted(params.items()))
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.evaluate, self.device, self.progress, self.on_step = evaluate, torch.device(device), progress, on_step
        decay = [p for p in self.params.values() if p.dim() >= 2]
        rest = [p for p in self.params.values() if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay, "decayed": True},
                              {"params": rest, "weight_decay": 0.0, "decayed": False}) if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
        self.step = 0
        self.history: list[dict] = []
        self._stop: str | None = None

    # -- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path | None:
        return self.state_dir / STATE_FILE if self.state_dir is not None else None

    def _save(self) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "windows": _fingerprint(self.windows),
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
        }
        with outputs.atomic_file(self.state_path) as tmp:
            torch.save(state, tmp)

    def _load(self) -> None:
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a damaged file: say so in one line
            raise LowbitError(f"{self.state_path}: cannot read the training state ({e})") from None
        saved = dict(state.get("config", {}), steps=None)
        mine = dict(self.cfg.to_dict(), steps=None)
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise LowbitError(f"{self.state_path} was written by a run with other settings ({', '.join(diff)}); "
                              "start over without --resume")
        if state.get("windows") != _fingerprint(self.windows):
            raise LowbitError(f"{self.state_path} was written by a run on other training text; start over without --resume")
        if sorted(state["params"]) != list(self.params):
            raise LowbitError(f"{self.state_path} holds other trainable tensors than this run's; start over without --resume")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(p.device))
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        with outputs.atomic_file(self.state_dir / HISTORY_FILE) as tmp:  # drop the steps that are redone
            tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))

    def cleanup(self) -> None:
        """Remove the state folder (call once the trained model is safely written)."""
        if self.state_dir is not None and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _record(self, entry: dict) -> None:
        self.history.append(entry)
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / HISTORY_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")

    # -- the loop ---------------------------------------------------------------------------
    def _run_eval(self) -> None:
        if self.evaluate is None or any(h.get("step") == self.step and "eval" in h for h in self.history[-1:]):
            return  # none, or this step's evaluation is the last thing recorded already
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            res = self.evaluate(self.model)
        self.model.train(was)
        self._record({"step": self.step, "eval": res})
        log(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in res.items()))

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop = signal.Signals(signum).name

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _grad_checkpointing(self, on: bool) -> None:
        if not self.cfg.grad_checkpointing:
            return
        if on:
            on_, _, kwarg = self._checkpointing_calls()
            on_(**{kwarg: {"use_reentrant": False}})
        else:
            self._checkpointing_calls()[1]()

    def _checkpointing_calls(self):
        for kind in ("activation", "gradient"):  # transformers >= 5 renamed it
            if hasattr(self.model, f"{kind}_checkpointing_enable"):
                return (getattr(self.model, f"{kind}_checkpointing_enable"),
                        getattr(self.model, f"{kind}_checkpointing_disable"), f"{kind}_checkpointing_kwargs")
        raise LowbitError(f"{type(self.model).__name__} has no per-block gradient checkpointing")

    def run(self, resume: bool | None = None) -> TrainResult:
        """Train for ``config.steps`` steps (module docstring). ``resume``: True continues the run
        saved in ``state_dir``, False discards it, None refuses to touch one."""
        cfg = self.cfg
        if self.state_path is not None and self.state_path.exists():
            if resume is None:
                raise LowbitError(f"{self.state_dir} holds an interrupted training run: continue it with --resume, "
                                  "or start over with --no-resume")
            if resume:
                self._load()
                log(f"resuming training at step {self.step} of {cfg.steps}")
            else:
                self.cleanup()
        elif resume:
            log(f"no earlier training state in {self.state_dir}; starting at step 0")
        resumed_from = self.step
        mb = cfg.micro_batch or cfg.batch_size
        amp = DTYPES[cfg.dtype] if cfg.dtype != "float32" else None
        t0 = time.perf_counter()
        tokens = 0
        if self.step == 0:
            self._run_eval()
        self.model.train()
        self._grad_checkpointing(True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   leave=False)
        try:
            with self._signals():
                while self.step < cfg.steps:
                    idx = batch_indices(self.windows.shape[0], cfg.batch_size, self.step, cfg.seed)
                    lr, wd = cfg.lr_at(self.step), cfg.weight_decay_at(self.step)
                    for g in self.opt.param_groups:
                        g["lr"] = lr
                        g["weight_decay"] = wd if g["decayed"] else 0.0
                    self.opt.zero_grad(set_to_none=True)
                    total, shown = 0.0, {}
                    for k in range(0, cfg.batch_size, mb):
                        x = self.windows[idx[k:k + mb]].to(self.device)
                        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                            loss, metrics = self.loss_fn(self.model, x)
                        if not torch.isfinite(loss):
                            raise LowbitError(f"the training loss is not finite at step {self.step} ({float(loss)}); "
                                              "lower the learning rate")
                        (loss * (mb / cfg.batch_size)).backward()
                        total += float(loss.detach()) * mb / cfg.batch_size
                        for key, v in (metrics or {}).items():
                            shown[key] = shown.get(key, 0.0) + float(v) * mb / cfg.batch_size
                        tokens += x.numel()
                    gnorm = None
                    if cfg.clip is not None:
                        gnorm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.clip))
                    self.opt.step()
                    self.step += 1
                    entry = {"step": self.step, "loss": total, "lr": lr, **shown}
                    if gnorm is not None:
                        entry["grad_norm"] = gnorm
                    self._record(entry)
                    el = time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tokens / max(el, 1e-9):.0f}")
                    if self.on_step is not None:
                        self.on_step(self.step)
                    if self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        self._run_eval()
                        self.model.train()
                    if self._stop is not None:
                        self._save()
                        raise TrainingInterrupted(
                            f"training interrupted ({self._stop}) after step {self.step} of {cfg.steps}; the state "
                            f"is saved in {self.state_dir}: run the same command with --resume to continue"
                            if self.state_dir is not None else
                            f"training interrupted ({self._stop}) after step {self.step} of {cfg.steps} (no state folder)")
                    if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self._save()
        finally:
            bar.close()
            self._grad_checkpointing(False)
        self.model.eval()
        self._run_eval()
        self._save()
        return TrainResult(steps=self.step, tokens=tokens, seconds=time.perf_counter() - t0,
                           history=self.history, resumed_from=resumed_from, peak_rss_bytes=_peak_rss())
