"""`lowbit compare`: one table (and a plot) for several quantized variants of one model."""

from __future__ import annotations

from pathlib import Path

from lowbit.commands._args import add_eval_args, eval_settings, log, results_file
from lowbit.errors import LowbitError


def register(sub) -> None:
    c = sub.add_parser("compare", help="one table for several quantized variants of one model")
    c.add_argument("models", nargs="+", help="lowbit checkpoints (and/or models) to compare")
    c.add_argument("--baseline", help="original model (default: the one the checkpoints record)")
    c.add_argument("--plot", default="compare.png", help="PNG plot of perplexity vs bits/weight (default: compare.png)")
    c.add_argument("--results", metavar="FILE",
                   help="each row is appended to this JSON Lines file as soon as it is measured, and a run that finds "
                        "rows for the same models and settings there takes them instead of measuring again, so an "
                        "interrupted comparison resumes (default: the plot's name with .jsonl; '' for none)")
    c.add_argument("--fresh", action="store_true", help="measure every row again, even those in --results")
    add_eval_args(c)
    c.set_defaults(func=run)


def run(args) -> int:
    from lowbit.eval.compare import base_spec_of, evaluate_specs, render, write_plot

    settings = eval_settings(args)
    if args.plot:  # a bad plot path fails now, not after every model has been scored
        from lowbit import outputs
        from lowbit.eval.report import PNG

        outputs.check_file(args.plot, PNG)
    bases = set() if args.baseline else {base_spec_of(s) for s in args.models} - {None}
    base_spec = args.baseline or (bases.pop() if len(bases) == 1 else None)
    if base_spec is None and not args.baseline:
        raise LowbitError("the variants come from different base models; name the original with --baseline")
    path = args.results if args.results is not None else (
        str(Path(args.plot).expanduser().with_suffix(".jsonl")) if args.plot else "")
    with results_file(path, args.fresh) as results:
        rows, info = evaluate_specs(base_spec, list(args.models), settings, log=log, results=results)
    print(render(rows, markdown=args.markdown))
    if args.plot:
        write_plot(rows, args.plot, f"{info['base_name']}: perplexity vs bits/weight")
        log(f"plot written to {args.plot}")
    return 0
