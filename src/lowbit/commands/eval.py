"""`lowbit eval`: perplexity, KL to the original, size and speed of one model or checkpoint."""

from __future__ import annotations

from lowbit.commands._args import add_eval_args, eval_settings, log


def register(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, KL to the original, size and speed of one model")
    e.add_argument("model", nargs="?", help="model or lowbit checkpoint (default: embedded model)")
    add_eval_args(e)
    e.set_defaults(func=run)


def run(args) -> int:
    from lowbit import checkpoint
    from lowbit.eval.compare import base_spec_of, evaluate_specs, render

    settings = eval_settings(args)
    if args.model is not None and checkpoint.is_checkpoint(args.model):  # vs the original it was made from
        rows, _ = evaluate_specs(base_spec_of(args.model), [args.model], settings, log=log)
    else:
        rows, _ = evaluate_specs(args.model, [], settings, log=log)
    print(render(rows, markdown=args.markdown))
    return 0
