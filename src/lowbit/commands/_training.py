"""What the training commands (`distill`, `qat`) share: their flags, the trainer settings and
training/evaluation windows built from them, the teacher, and writing a trained float model."""

from __future__ import annotations

import argparse
import json

from lowbit.errors import LowbitError


def add_training_args(p: argparse.ArgumentParser, *, steps: int = 200, lr: float | None = 1e-4) -> None:
    """The training flags; ``lr=None``: the command picks its default learning rate."""
    g = p.add_argument_group("training")
    g.add_argument("--text", metavar="FILE", help="training text (default: the bundled calibration text)")
    g.add_argument("--eval-text", metavar="FILE",
                   help="held-out text evaluated as training goes (default: the bundled evaluation text)")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    g.add_argument("--batch-size", type=int, default=8, help="windows per step (default: 8)")
    g.add_argument("--micro-batch", type=int, help="windows per forward/backward (default: 2; gradients accumulate)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    g.add_argument("--lr", type=float, default=lr,
                   help=f"peak learning rate (default: {lr:g})" if lr is not None else "peak learning rate")
    g.add_argument("--warmup", type=int, help="warmup steps (default: 5%% of --steps)")
    g.add_argument("--min-lr", type=float, default=0.1, help="the cosine ends at this fraction of --lr (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--schedule", choices=("cosine", "two-stage"), default="cosine",
                   help="learning-rate schedule: warmup + cosine (default), or BitNet b1.58's two-stage (lr -> lr/2 "
                        "over the first half, a drop to lr/4, then down to --min-lr; weight decay off in the second half)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="weight of the teacher's soft targets: loss = alpha*T^2*KL + (1-alpha)*CE (default 1; "
                        "0 = plain next-token CE without the teacher, the control)")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T (default 1)")
    g.add_argument("--hidden", type=float, default=0.0,
                   help="weight of a hidden-state matching loss (relative MSE of matched blocks' outputs; default 0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of forward/backward (bfloat16: autocast, weights stay float32; default float32)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--eval-every", type=int, default=50, help="evaluate on held-out windows every N steps (default 50)")
    g.add_argument("--eval-windows", type=int, default=4, help="held-out windows of --seq-len evaluated (default 4)")
    g.add_argument("--save-every", type=int, default=25, help="save the resumable state every N steps (default 25)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue an interrupted run from its saved state (--no-resume: discard it and start over; "
                        "without either, a run that finds one stops and asks)")


def train_config(args):
    from lowbit.training.trainer import TrainConfig

    mb = args.micro_batch or min(2, args.batch_size)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch=mb, lr=args.lr,
                       warmup=args.warmup, min_lr=args.min_lr, weight_decay=args.weight_decay, dtype=args.dtype,
                       schedule=getattr(args, "schedule", "cosine"),
                       grad_checkpointing=args.grad_checkpointing, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed)


def kd_config(args):
    from lowbit.training.kd import KDConfig

    return KDConfig(alpha=args.alpha, temperature=args.temperature, hidden=args.hidden)


def windows(tokenizer, args):
    """(training windows, held-out windows) from --text / --eval-text."""
    from lowbit.data.texts import load_text
    from lowbit.training.data import packed_windows

    if args.seq_len < 2 or args.eval_windows < 0:
        raise LowbitError("--seq-len must be at least 2 and --eval-windows at least 0")
    train = packed_windows(tokenizer, load_text(args.text or "calibration"), args.seq_len)
    held = None
    if args.eval_windows:
        held = packed_windows(tokenizer, load_text(args.eval_text or "evaluation"), args.seq_len,
                              max_windows=args.eval_windows)
    return train, held


def load_teacher(spec: str | None, device: str):
    """The original float model a student is trained towards (a lowbit `api.Model`): refuses a
    quantized checkpoint in one line."""
    from lowbit import api

    t = api.load(spec, dtype="float32", device=device)
    if t.record is not None:
        raise LowbitError(f"the teacher {spec} is a quantized checkpoint; give the original model")
    t.model.to(device)
    return t


def summary(res, train_cfg, kd_cfg, **extra) -> dict:
    """The record of a training run (saved with its output)."""
    return {"train": train_cfg.to_dict(), "kd": kd_cfg.__dict__ if kd_cfg is not None else None,
            "steps": res.steps, "tokens_this_run": res.tokens, "seconds_this_run": round(res.seconds, 1),
            "resumed_from": res.resumed_from, "peak_rss_bytes": res.peak_rss_bytes,
            "first_eval": res.first_eval() or None,
            "final_eval": res.final_eval(), **extra}


def checkpoint_record(method: dict, base_source: dict | None, res, training: dict, device: str) -> dict:
    """The record of a checkpoint a training command packed (``lowbit.json``): the method, the
    original it came from (None: trained from scratch), the training summary, time and memory."""
    import datetime as dt

    from lowbit import api

    return {
        "method": method,
        "base_model": None if base_source is None else api._with_fingerprint(base_source),
        "calibration": None,
        "training": training,
        "quantize_seconds": round(res.seconds, 3),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "dtype": "float32",
        "streaming": False,
        "peak_rss_bytes": res.peak_rss_bytes,
    }


def save_float_model(model, tokenizer, out: str, record: dict, *, force: bool = False) -> None:
    """A trained float model as a transformers directory (+ lowbit_train.json), written atomically."""
    from lowbit import outputs

    with outputs.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "lowbit_train.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
