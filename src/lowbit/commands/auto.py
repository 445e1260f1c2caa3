"""`lowbit auto`: a different format per tensor, chosen for a size budget and measured.

    lowbit auto [MODEL] (--bits 3.5 | --size 90MB | --tok-s 120) [--target lowbit|gguf] [--methods gptq,rtn]
                [--bit-choices 2,3,4,5,6,8] [--groups 32,64,128] [--types Q4_K,Q5_0,...]
                [--repair 1] [--rank-check 8] [--plot PLOT.png] -o OUT

The per-tensor sensitivities are cached (a second budget for the same model and calibration
measures nothing again). The plan is written next to the output (``OUT/auto-plan.json`` for a
checkpoint, ``OUT.plan.json`` beside a GGUF file) and printed as a table.
"""

from __future__ import annotations

from lowbit.commands._args import add_output_args, claimed_output, log, parse_bytes
from lowbit.errors import LowbitError


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LowbitError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not out:
        raise LowbitError(f"{flag} is empty")
    return out


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def register(sub) -> None:
    p = sub.add_parser("auto", help="choose a format per tensor for a size budget (measured, cached)")
    p.add_argument("model", nargs="?", help="model (default: the embedded SmolLM2-135M-Instruct)")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--bits", type=float, help="budget: bits per weight over the allocated tensors")
    b.add_argument("--size", help="budget: the output's size on disk, e.g. 90MB")
    b.add_argument("--tok-s", type=float, help="budget: decoded tokens/s (lowbit's lean decoder, batch 1, timed on "
                                              "this machine; lowbit target)")
    p.add_argument("--threads", type=int, help="threads for the speed budget's timings (default: torch's)")
    p.add_argument("--target", choices=("lowbit", "gguf"), default="lowbit",
                   help="a lowbit checkpoint (formats of lowbit's methods) or a GGUF file (llama.cpp's block types)")
    p.add_argument("--methods", help="lowbit: from gptq,rtn,hqq,awq,nf4 (default gptq,rtn,hqq); gguf: from "
                                     "imatrix,gptq,awq (the type's own encoder, GPTQ onto its grid; default "
                                     "imatrix,gptq). awq first folds AWQ's channel scales into the model, then "
                                     "every option is chosen on the scaled weights (lowbit: plus AWQ's clipped grids)")
    p.add_argument("--bit-choices", default="2,3,4,5,6,8", help="lowbit target: the bit widths offered")
    p.add_argument("--groups", default="32,64,128", help="lowbit target: the group sizes offered (a tensor gets "
                                                        "those that divide its rows)")
    p.add_argument("--types", help="gguf target: the block types offered (default: every type lowbit writes)")
    p.add_argument("--no-head", action="store_true", help="leave the output head as it is")
    p.add_argument("--no-embedding", action="store_true",
                   help="lowbit target: leave the token embedding as it is (GGUF always writes it)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--repair", type=int, default=1, help="greedy repair rounds after the end-to-end check (default 1)")
    p.add_argument("--rank-check", type=int, default=0, metavar="N",
                   help="also measure N tensors alone against the prediction and report the rank correlation")
    p.add_argument("--no-cache", action="store_true", help="measure the sensitivities again")
    p.add_argument("--plot", help="write a plot of the chosen bits per tensor to this PNG")
    add_output_args(p, "output: a checkpoint directory (lowbit) or a .gguf file (gguf)")
    p.set_defaults(func=run)


def run(args) -> int:
    with claimed_output(args, "gguf" if args.target == "gguf" else "checkpoint"):
        return _run(args)


def _config(args):
    from lowbit.auto.run import AutoConfig
    from lowbit.auto.sensitivity import GGUF_TYPES

    size = None if args.size is None else parse_bytes(args.size, "--size")
    types = _names(args.types) or GGUF_TYPES
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise LowbitError(f"--types: {', '.join(unknown)} not offered; choose from {', '.join(GGUF_TYPES)}")
    return AutoConfig(target=args.target, bits=args.bits, size=size, tok_s=args.tok_s, threads=args.threads, methods=_names(args.methods),
                      bit_choices=_ints(args.bit_choices, "--bit-choices"), groups=_ints(args.groups, "--groups"),
                      gguf_types=types, head=not args.no_head, embedding=not args.no_embedding, n_samples=args.samples, seq_len=args.seq_len,
                      repair_rounds=args.repair, rank_items=args.rank_check, cache=not args.no_cache)


def _run(args) -> int:
    from pathlib import Path

    from lowbit import api
    from lowbit.auto import run as R

    cfg = _config(args)
    m = api.load(args.model)
    what = (f"{cfg.bits} bits/weight" if cfg.bits is not None else f"{cfg.size} bytes on disk"
            if cfg.size is not None else f"{cfg.tok_s:g} tokens/s")
    log(f"auto: {m.name}, target {cfg.target}, budget {what}")
    meas = R.prepare(m, cfg, log=log)
    plan, out = R.write(m, meas, cfg, args.output, force=args.force, log=log)
    print(plan.table())
    if args.plot:
        from lowbit.auto.report import plot_plan

        log(f"plot -> {plot_plan(plan, args.plot)}")
    log(f"done: {out} ({Path(out).stat().st_size if Path(out).is_file() else plan.bytes} bytes), plan -> "
        f"{R.plan_path(args.output, cfg.target)}")
    return 0
