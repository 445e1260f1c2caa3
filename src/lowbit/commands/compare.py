"""`lowbit compare`: one table (and a plot) for several quantized variants of one model."""

from __future__ import annotations

from lowbit.commands._args import add_eval_args, eval_settings, log
from lowbit.errors import LowbitError


def register(sub) -> None:
    c = sub.add_parser("compare", help="one table for several quantized variants of one model")
    c.add_argument("models", nargs="+", help="lowbit checkpoints (and/or models) to compare")
    c.add_argument("--baseline", help="original model (default: the one the checkpoints record)")
    c.add_argument("--plot", default="compare.png", help="PNG plot of perplexity vs bits/weight (default: compare.png)")
    add_eval_args(c)
    c.set_defaults(func=run)


def run(args) -> int:
    from lowbit.eval.compare import base_spec_of, evaluate_specs, render, write_plot

    settings = eval_settings(args)
    if args.plot:  # a bad plot path fails now, not after every model has been scored
        from lowbit import outputs
        from lowbit.eval.report import PNG

        outputs.check_file(args.plot, PNG)
    bases = {base_spec_of(s) for s in args.models} - {None}
    base_spec = args.baseline or (bases.pop() if len(bases) == 1 else None)
    if base_spec is None and not args.baseline:
        raise LowbitError("the variants come from different base models; name the original with --baseline")
    rows, info = evaluate_specs(base_spec, list(args.models), settings, log=log)
    print(render(rows, markdown=args.markdown))
    if args.plot:
        write_plot(rows, args.plot, f"{info['base_name']}: perplexity vs bits/weight")
        log(f"plot written to {args.plot}")
    return 0
