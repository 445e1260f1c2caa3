"""`lowbit distill`: train a student towards a teacher (knowledge distillation).

    lowbit distill [TEACHER] (--keep-layers 0,2,4,... | --drop N [--importance kl|bi] | --student CKPT)
                   [--alpha 1] [--temperature 1] [--hidden 0] [--steps 200] [--lr ...] [...] -o OUT

Students:
* a shallower copy of the teacher: ``--keep-layers`` names the blocks it keeps, ``--drop N``
  drops the N least important (each block's importance measured on the training text:
  ``kl`` = the KL to the teacher when that block alone is skipped, ``bi`` = 1 − cos(input,
  output)); initialised from the teacher's weights, every block parameter and the final norm
  trained; written as a transformers directory (``lowbit quantize OUT`` compresses it further);
* a compressed lowbit checkpoint of the teacher (``--student``): distillation as recovery. Its
  affine layers are made trainable (``--tune scales``, the default: the scales alone, every
  code kept; ``--tune latent``: latent weights with a straight-through estimator and learned
  scales), its QuIP# (E8P) layers train their sign vectors and scales with the lattice codes
  kept (the paper's end-to-end fine-tuning), its AQLM layers their codebooks and row factors
  with the codes kept, and the norms train; the result is written as a checkpoint of the same
  formats.

Loss: ``alpha·T²·KL(teacher ‖ student) + (1−alpha)·CE`` (+ ``hidden`` × a hidden-state matching
loss). ``--alpha 0`` is the control without a teacher. The run is resumable (``--resume``).
"""

from __future__ import annotations

import shutil

from lowbit.commands._args import claimed_output, log
from lowbit.commands._training import (
    add_training_args,
    kd_config,
    load_teacher,
    save_float_model,
    summary,
    train_config,
    windows,
)
from lowbit.errors import LowbitError


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a shallower or compressed student")
    p.add_argument("model", nargs="?", help="the teacher (default: the embedded SmolLM2-135M-Instruct)")
    s = p.add_mutually_exclusive_group(required=True)
    s.add_argument("--keep-layers", metavar="I,J,...", help="student = the teacher with only these blocks (0-based)")
    s.add_argument("--drop", type=int, metavar="N", help="student = the teacher without its N least important blocks")
    s.add_argument("--student", metavar="CKPT", help="student = this lowbit checkpoint of the teacher (recovery)")
    p.add_argument("--importance", choices=("kl", "bi"), default="kl",
                   help="how --drop ranks blocks: kl = KL to the teacher with the block skipped (default), "
                        "bi = block influence 1 - cos(in, out)")
    p.add_argument("--tune", choices=("scales", "latent"), default="scales",
                   help="what of a --student checkpoint's affine layers is trained: scales = the scales (and float "
                        "zero-points), every code kept (default); latent = a float weight with a straight-through "
                        "estimator and learned scales (codes may change; slower). QuIP# and AQLM layers train their "
                        "own views either way (sign vectors and scales; codebooks and row factors)")
    add_training_args(p, lr=None)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output that lowbit did not write")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit import outputs

    record = "lowbit.json" if args.student else "lowbit_train.json"
    inputs = [x for x in (args.model, args.student) if x]
    outputs.check_dir(args.output, record, force=args.force, inputs=inputs)
    with outputs.lock(args.output):
        return _run(args)


def _keep_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LowbitError(f"--keep-layers takes comma-separated block numbers, got {text!r}") from None


def _run(args) -> int:
    import torch

    from lowbit import api, outputs
    from lowbit.models.families import find_blocks
    from lowbit.training.kd import distill

    if args.lr is None:  # measured on SmolLM2-135M GPTQ W3 g64 (docs/training.md)
        args.lr = 1e-4 if not args.student else {"scales": 1e-3, "latent": 2e-4}[args.tune]
    train_cfg, kd_cfg = train_config(args), kd_config(args)
    teacher_m = load_teacher(args.model, args.device)
    teacher = teacher_m.model
    tok = teacher_m.tokenizer
    train_w, held = windows(tok, args)
    state = outputs.resume_dir(args.output)
    layer_map = None
    standins = None
    if args.student:
        m = api.load(args.student, device=args.device)
        if m.record is None:
            raise LowbitError(f"--student {args.student} is not a lowbit checkpoint")
        from lowbit.training.kd import named_parameters_of, norm_parameters
        from lowbit.training.tunable import make_trainable

        student = m.model.to(args.device)
        dense = ()
        if m.record["method"].get("sparsity") is not None:  # a pruned model: its float layers train, zeros kept
            from lowbit.models.families import block_linears

            dense = list(block_linears(student, only_plain=True))
        standins = make_trainable(student, mode=args.tune, dense=dense)
        if not standins:
            raise LowbitError(f"{args.student} has no quantized or pruned layer lowbit can train")
        if standins.skipped:
            log(f"{len(standins.skipped)} layers have no trainable view and stay as they are "
                f"({', '.join(sorted(set(standins.skipped.values())))})")
        params = {**named_parameters_of(standins), **norm_parameters(student)}
        kinds = sorted({type(s).__name__ for s in standins.values()})
        what = f"{len(standins)} quantized layers of {args.student} (trainable views: {', '.join(kinds)})"
    else:
        from lowbit.training import depth

        n_blocks = len(find_blocks(teacher))
        if args.keep_layers is not None:
            keep = _keep_list(args.keep_layers)
        else:
            if not 0 < args.drop < n_blocks:
                raise LowbitError(f"--drop must be between 1 and {n_blocks - 1} for a model of {n_blocks} blocks")
            log(f"ranking the {n_blocks} blocks by importance ({args.importance}) on {min(8, len(train_w))} "
                "training windows")
            scores = depth.block_scores(teacher, train_w[:8].to(args.device), method=args.importance)
            keep = depth.choose_drop(scores, args.drop)
            log("block importance: " + " ".join(f"{i}:{s:.3g}" for i, s in enumerate(scores)))
        student = depth.drop_blocks(teacher, keep).to(args.device)
        layer_map = keep
        from lowbit.training.kd import norm_parameters

        prefix = find_blocks_path(student)
        params = {**{n: p for n, p in student.named_parameters() if n.startswith(prefix)},
                  **norm_parameters(student)}
        what = f"{len(keep)} of {n_blocks} blocks ({','.join(map(str, keep))})"
    n_train = sum(p.numel() for p in params.values())
    log(f"distilling {teacher_m.name} into {what}: {n_train / 1e6:.1f}M trainable parameters, "
        f"{train_w.shape[0]} training windows of {train_w.shape[1]}, {train_cfg.steps} steps of "
        f"{train_cfg.batch_size} windows, alpha {kd_cfg.alpha}, T {kd_cfg.temperature}")
    res = distill(student, teacher if (kd_cfg.alpha > 0 or kd_cfg.hidden > 0) else None, params, train_w, held,
                  train_cfg, kd_cfg, state_dir=state, resume=args.resume, device=args.device,
                  layer_map=layer_map)
    if args.student:
        from lowbit.training.tunable import restore

        restore(student, standins, keep=True)
        m.record = dict(m.record, distill=summary(res, train_cfg, kd_cfg, teacher=teacher_m.name,
                                                  student=str(args.student), tune=args.tune))
        m.model = student.to("cpu")
        api.save(m, args.output, force=args.force)
    else:
        rec = summary(res, train_cfg, kd_cfg, teacher=teacher_m.name, teacher_source=teacher_m.source,
                      keep_layers=layer_map, importance=None if args.keep_layers else args.importance)
        save_float_model(student.to("cpu"), tok, args.output, rec)
    shutil.rmtree(state, ignore_errors=True)
    fin = res.final_eval()
    shown = ", ".join(f"{k} {v:.4g}" for k, v in fin.items())
    log(f"done: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.0f} s this run, peak RSS "
        f"{res.peak_rss_bytes / 2**20:.0f} MiB; held-out {shown} -> {args.output}")
    return 0


def find_blocks_path(model) -> str:
    from lowbit.models.families import family_of

    return family_of(model).blocks + "."
