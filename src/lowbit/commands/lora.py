"""`lowbit lora`: train LoRA adapters on a frozen base, quantized (QLoRA) or float.

    lowbit lora BASE [--rank 16] [--alpha 32] [--targets q,k,v,o,gate,up,down] [--dropout 0]
                [--objective kl|ce] [--teacher MODEL] [--merge [--merged-output DIR]]
                [--steps 200] [--lr 2e-4] [...training flags] -o ADAPTER_DIR

BASE is a lowbit checkpoint (its packed layers stay packed and frozen; the adapters learn around
them) or a float model. Objectives:

* ``kl`` (default): KL(original ‖ adapted) on the training text: adapters that repair the
  quantization error. The original is the checkpoint's recorded base model, or ``--teacher``.
* ``ce``: next-token cross-entropy on ``--text`` (fine-tuning; the teacher, if given, is only
  evaluated against).

Only the adapters' A and B train (`lowbit.training.lora`), with the shared trainer
(`lowbit.training.kd.distill`: resumable with ``--resume``, a progress bar, held-out KL /
perplexity as it goes). Output: a PEFT adapter directory (``adapter_config.json``,
``adapter_model.safetensors``: ``peft.PeftModel.from_pretrained(float_model, ADAPTER_DIR)`` loads
it) and ``lowbit_train.json``, the run's record. ``--merge`` also writes the float model with the
adapters folded in (the base dequantized) as a transformers directory at ``--merged-output``
(default: ``ADAPTER_DIR-merged`` beside the adapter).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lowbit.commands._args import log
from lowbit.commands._training import (
    add_training_args,
    load_teacher,
    save_float_model,
    summary,
    train_config,
    windows,
)
from lowbit.errors import LowbitError

DEFAULT_TARGETS = "q,k,v,o,gate,up,down"
DEFAULT_LR = 2e-4  # QLoRA's for 7B-13B models (Dettmers et al. 2023, Table 9)


def register(sub) -> None:
    # conflict_handler="resolve": the LoRA --alpha below replaces the training group's --alpha (the
    # KD mixing weight, fixed here by --objective)
    p = sub.add_parser("lora", help="train LoRA adapters on a frozen (quantized) base: QLoRA",
                       conflict_handler="resolve")
    p.add_argument("base", help="the base: a lowbit checkpoint (QLoRA) or a float model")
    add_training_args(p, lr=DEFAULT_LR)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=16, help="adapter rank r (default 16)")
    g.add_argument("--alpha", dest="lora_alpha", metavar="ALPHA", type=float, default=32.0,
                   help="LoRA alpha: the update is scaled by alpha / r (default 32)")
    g.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"projection roles that get adapters (default {DEFAULT_TARGETS})")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    g.add_argument("--objective", choices=("kl", "ce"), default="kl",
                   help="kl = KL to the original model (repairs quantization error; default), "
                        "ce = next-token cross-entropy on --text")
    g.add_argument("--teacher", metavar="MODEL",
                   help="the original float model (default for a checkpoint: its recorded base model)")
    g.add_argument("--merge", action="store_true",
                   help="also write the float model with the adapters folded in (transformers directory)")
    g.add_argument("--merged-output", metavar="DIR", help="where --merge writes (default: OUTPUT-merged)")
    p.add_argument("-o", "--output", required=True, help="the adapter directory (PEFT layout)")
    p.add_argument("--force", action="store_true", help="replace an existing output that lowbit did not write")
    p.set_defaults(func=run)


def _merged_path(args) -> str | None:
    if args.merged_output and not args.merge:
        raise LowbitError("--merged-output is where --merge writes; add --merge")
    if not args.merge:
        return None
    return args.merged_output or str(Path(args.output).expanduser()).rstrip("/") + "-merged"


def run(args) -> int:
    import contextlib

    from lowbit import outputs
    from lowbit.training.lora import _check_hyper, parse_targets

    _check_hyper(args.rank, args.lora_alpha, args.dropout)  # bad input: one line, before any loading
    args.roles = parse_targets(args.targets)
    inputs = [x for x in (args.base, args.teacher) if x]
    outputs.check_dir(args.output, "lowbit_train.json", force=args.force, inputs=inputs)
    merged = _merged_path(args)
    if merged is not None:
        if Path(merged).expanduser().absolute() == Path(args.output).expanduser().absolute():
            raise LowbitError("--merged-output must differ from the adapter's output")
        outputs.check_dir(merged, "lowbit_train.json", force=args.force, inputs=inputs)
    with outputs.lock(args.output), (outputs.lock(merged) if merged else contextlib.nullcontext()):
        return _run(args, merged)


def _float_source(m) -> str | None:
    """What PEFT's base_model_name_or_path names: the original float model's directory when there
    is one, else its lowbit spec."""
    from lowbit import api

    src = m.record.get("base_model") if m.record else m.source
    path = src.get("path") if isinstance(src, dict) else None
    if isinstance(path, str) and (Path(path) / "config.json").is_file():
        return path
    try:
        return api.base_spec(m)
    except LowbitError:
        return None


def _run(args, merged_out: str | None) -> int:
    import torch

    from lowbit import api, outputs
    from lowbit.training.kd import KDConfig, distill
    from lowbit.training.lora import add_lora, lora_parameters, merge, save_adapter
    from lowbit.version import __version__

    train_cfg = train_config(args)
    kd_cfg = KDConfig(alpha=1.0 if args.objective == "kl" else 0.0, temperature=args.temperature,
                      hidden=args.hidden if args.objective == "kl" else 0.0)
    if args.objective == "ce" and args.hidden:
        raise LowbitError("--hidden matches the teacher's hidden states: use it with --objective kl")
    m = api.load(args.base, device=args.device)
    model = m.model.to(args.device)
    torch.manual_seed(args.seed)  # A's initialisation
    adapters = add_lora(model, args.rank, args.lora_alpha, args.roles, args.dropout)  # a bad base fails here
    teacher_spec = args.teacher
    if teacher_spec is None and args.objective == "kl":
        if m.record is None:
            raise LowbitError(f"{args.base} is a float model: --objective kl needs the model to match (--teacher), "
                              "or use --objective ce")
        teacher_spec = api.base_spec(m)
    teacher = None
    if teacher_spec is not None:
        t = load_teacher(teacher_spec, args.device)
        teacher = t.model
        tok = m.tokenizer if m.tokenizer is not None else t.tokenizer
    else:
        tok = m.tokenizer
    if tok is None:
        raise LowbitError(f"{args.base} has no tokenizer to read the training text with")
    train_w, held = windows(tok, args)
    params = lora_parameters(adapters)
    n_train = sum(p.numel() for p in params.values())
    n_base = sum(p.numel() for p in model.parameters() if not any(p is q for q in params.values()))
    log(f"LoRA r={args.rank} alpha={args.lora_alpha:g} on {len(adapters)} layers ({','.join(args.roles)}) of "
        f"{m.name}{' (quantized)' if m.record else ''}: {n_train / 1e6:.2f}M trainable parameters; objective "
        f"{args.objective}{f' to {teacher_spec}' if args.objective == 'kl' else ''}, {train_w.shape[0]} training "
        f"windows of {train_w.shape[1]}, {train_cfg.steps} steps of {train_cfg.batch_size} windows")
    # the teacher runs in the loss only for kl; with ce a --teacher is evaluated against (held-out KL)
    res = distill(model, teacher, params, train_w, held, train_cfg, kd_cfg, state_dir=outputs.resume_dir(args.output),
                  resume=args.resume, device=args.device)
    rec = summary(res, train_cfg, kd_cfg, lowbit_version=__version__, kind="lora", objective=args.objective,
                  base=str(args.base), base_quantized=m.record is not None,
                  base_method=(m.record or {}).get("method"), teacher=teacher_spec, rank=args.rank,
                  lora_alpha=args.lora_alpha, dropout=args.dropout, targets=args.roles, adapted_layers=len(adapters),
                  trainable_parameters=n_train, frozen_parameters=n_base, merged_output=merged_out)
    text = json.dumps(rec, indent=1, default=str) + "\n"
    save_adapter(adapters, args.output, _float_source(m), extra_files={"lowbit_train.json": text})
    if merged_out is not None:
        save_float_model(merge(model, adapters).to("cpu"), tok, merged_out, dict(rec, merged_from=str(args.output)))
    shutil.rmtree(outputs.resume_dir(args.output), ignore_errors=True)
    fin, first = res.final_eval(), res.first_eval()
    shown = ", ".join(f"{k} {first.get(k, float('nan')):.4g} -> {v:.4g}" for k, v in fin.items())
    log(f"done: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.0f} s this run "
        f"({res.seconds / max(1, res.steps - res.resumed_from):.2f} s/step), peak RSS "
        f"{res.peak_rss_bytes / 2**20:.0f} MiB; held-out {shown} -> {args.output}"
        + (f" (merged: {merged_out})" if merged_out else ""))
    return 0
