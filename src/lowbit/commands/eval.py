"""`lowbit eval`: perplexity, KL to the original, size and speed of one model or checkpoint."""

from __future__ import annotations

from lowbit.commands._args import add_eval_args, eval_settings, log, results_file


def register(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, KL to the original, size and speed of one model")
    e.add_argument("model", nargs="?", help="model or lowbit checkpoint (default: embedded model)")
    e.add_argument("--baseline", help="the original a checkpoint is compared with (default: the one its record names)")
    e.add_argument("--results", metavar="FILE",
                   help="append the rows to this JSON Lines file as each is measured; rows it already holds for the "
                        "same models and settings are taken from it (an interrupted evaluation resumes)")
    e.add_argument("--fresh", action="store_true", help="measure every row again, even those in --results")
    add_eval_args(e)
    e.set_defaults(func=run)


def run(args) -> int:
    from lowbit import checkpoint
    from lowbit.eval.compare import base_spec_of, evaluate_specs, render

    settings = eval_settings(args)
    with results_file(args.results or "", args.fresh) as results:
        if args.model is not None and checkpoint.is_checkpoint(args.model):  # vs the original it was made from
            base = args.baseline or base_spec_of(args.model)
            rows, _ = evaluate_specs(base, [args.model], settings, log=log, results=results)
        elif args.baseline:
            rows, _ = evaluate_specs(args.baseline, [args.model], settings, log=log, results=results)
        else:
            rows, _ = evaluate_specs(args.model, [], settings, log=log, results=results)
    print(render(rows, markdown=args.markdown))
    if args.model is not None and checkpoint.is_checkpoint(args.model) and not settings.int8_activations:
        from lowbit.runtime.defaults import resolve

        if resolve(checkpoint.read_record(args.model), None)[0]:
            log("note: this checkpoint decodes with int8 activations by default (lowbit generate/bench); the "
                "numbers above are for float activations: --int8-activations scores the int8 path")
    return 0
