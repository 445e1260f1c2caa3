"""The compact ``topk`` reference against the exact KL: its error on the embedded model.

    python bench/topk_reference.py [--model MODEL] [--max-tokens 16384] [--k 32] [--m 0,32,64] [--markdown]

The original and its variants (RTN int4 g128, GPTQ int4 g128, RTN int8 g128) run in lockstep
for the exact KL in both directions (lowbit's perplexity protocol); then a ``topk`` reference
of the original is built for each number of tail samples ``m`` (0: the one-bucket lower bound)
and every variant is scored against it.  ``err %`` is the estimate's relative error over the
whole run, ``±%`` the standard error the estimate reports for itself, ``audit %`` the error it
measures on its audit positions.  One seed (lowbit's fixed one): see lowbit.eval.reference for
the spread over seeds.
"""

from __future__ import annotations

import argparse
import sys
import time

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.core.scheme import QuantScheme
from lowbit.data.texts import default_bos_id, eval_tokens, load_text
from lowbit.eval.quality import PplProtocol, evaluate_quality, protocol_windows
from lowbit.eval.reference import build_reference, reference_key, score_against_reference
from lowbit.eval.report import format_table

VARIANTS = [("rtn int4 g128", "rtn", 4), ("gptq int4 g128", "gptq", 4), ("rtn int8 g128", "rtn", 8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--m", default="0,32,64", help="comma-separated numbers of tail samples")
    ap.add_argument("--audit", type=int, default=64)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    t0 = time.perf_counter()

    base = api.load(args.model)
    models = {"original": base.model}
    for name, method, bits in VARIANTS:
        m = api.load(args.model)
        api.quantize(m, method, QuantScheme(bits=bits, group_size=128), progress=False)
        models[name] = m.model
    proto = PplProtocol(ctx=512, max_tokens=args.max_tokens)
    bos = default_bos_id(base.tokenizer)
    tokens = eval_tokens(base.tokenizer, load_text("evaluation"))
    exact = evaluate_quality(models, "original", tokens, proto, bos, progress=False)
    wins = protocol_windows(tokens, proto, bos)

    rows = []
    for m in [int(x) for x in args.m.split(",")]:
        key = reference_key("bench", wins, "topk", k=args.k, m=m, audit=args.audit)
        ref = build_reference(base.model, wins, key, progress=False)
        k = ref.tensors["ids"].shape[1]
        for name, _, _ in VARIANTS:
            e, got = exact[name], score_against_reference(ref, models[name], wins, progress=False)
            rows.append({"variant": name, "n": got.n_tokens, "k": k, "m": m, "bytes": (k + m) * 8 + 4,
                         "kl": e.kl_mean, "kl_err": 100 * (got.kl_mean / e.kl_mean - 1), "kl_se": 100 * got.kl_rel_se,
                         "kl_audit": -100 * got.kl_rel_err, "kl_rev": e.kl_rev_mean,
                         "rev_err": 100 * (got.kl_rev_mean / e.kl_rev_mean - 1), "rev_se": 100 * got.kl_rev_rel_se,
                         "rev_audit": -100 * got.kl_rev_rel_err, "p99_err": 100 * (got.kl_p99 / e.kl_p99 - 1)})
    cols = [("variant", "variant", None), ("n", "positions", "d"), ("k", "k", "d"), ("m", "m", "d"),
            ("bytes", "bytes/pos", "d"), ("kl", "KL", ".5f"), ("kl_err", "err %", "+.2f"), ("kl_se", "±%", ".2f"),
            ("kl_audit", "audit %", "+.2f"), ("kl_rev", "KL rev", ".5f"), ("rev_err", "rev err %", "+.2f"),
            ("rev_se", "rev ±%", ".2f"), ("rev_audit", "rev audit %", "+.2f"), ("p99_err", "p99 err %", "+.2f")]
    print(format_table(rows, cols, markdown=args.markdown))
    print(f"\nerr % = estimate / exact - 1 over the whole run; audit % the same on {args.audit} positions; "
          f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
