"""`lowbit demo`: quantize the embedded model with RTN at 8/4/3 bits, print the table, write the plot."""

from __future__ import annotations

import os
import time

from lowbit.commands._args import log

DEMO_VARIANTS = [
    ("rtn-int8-channel", dict(bits=8, group_size=None, asym=False)),
    ("rtn-int4-g128", dict(bits=4, group_size=128, asym=False)),
    ("rtn-int4-g128-asym", dict(bits=4, group_size=128, asym=True)),
    ("rtn-int3-g128-asym", dict(bits=3, group_size=128, asym=True)),
]



def register(sub) -> None:
    d = sub.add_parser("demo", help="quantize the embedded model with RTN at 8/4/3 bits and print the table")
    d.add_argument("model", nargs="?", help="model (default: embedded SmolLM2-135M-Instruct)")
    d.add_argument("--out-dir", default="lowbit-demo", help="where checkpoints, table and plot go")
    d.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens to score (default: 8192)")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=run)


def run(args) -> int:
    from lowbit import api
    from lowbit.core.scheme import scheme_from_args
    from lowbit.eval.quality import PplProtocol
    from lowbit.eval.compare import EvalSettings, compare, render, write_plot

    t0 = time.perf_counter()
    base = api.load(args.model)
    variants = {"original (fp32)": base}
    for name, kw in DEMO_VARIANTS:
        m = api.load(args.model)
        api.quantize(m, "rtn", scheme_from_args(**kw), progress=False)
        m.path = api.save(m, os.path.join(args.out_dir, name))
        m.name = name
        variants[name] = m
        log(f"{name}: quantized in {m.record['quantize_seconds']:.1f} s -> {m.path}")
    settings = EvalSettings(protocol=PplProtocol(ctx=512, max_tokens=args.max_tokens), device=args.device,
                            decode_tokens=8, latency_repeats=2)
    rows = compare(variants, "original (fp32)", settings)
    table = render(rows)
    print(table)
    plot = write_plot(rows, os.path.join(args.out_dir, "ppl_vs_bits.png"), f"{base.name}: RTN perplexity vs bits/weight")
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(render(rows, markdown=True) + "\n")
    log(f"{rows[0]['n_tokens']} held-out tokens scored; plot {plot}; total {time.perf_counter() - t0:.0f} s")
    return 0
