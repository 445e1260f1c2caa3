"""lowbit auto against every uniform setting: KL to the original vs bits per weight, one run.

    python -P bench/auto_frontier.py [--model MODEL] [--methods gptq,rtn,hqq,nf4] [--bit-choices 2,3,4,5,6,8]
                                     [--groups 64] [--budgets 2.5,3,3.5,4,4.5,5,6] [--windows 8] [--markdown]

1. `lowbit.auto.run.prepare` measures (or reads from the cache) the predicted KL and bytes of every
   option of every block linear (the head stays float, as `lowbit quantize` leaves it), and the rank correlation of the prediction
   with the true single-tensor KL on a sample of tensors;
2. every *uniform* setting (one option for every tensor: method x bits x group) and `auto` at each
   budget are put in place as dequantized weights (what the packed modules compute) and scored on
   the same held-out windows of the evaluation text (KL of the next-token distributions to the
   original's, nats per token);
3. each row is appended to out/auto/frontier-<model>.jsonl as it is measured (an interrupted run
   resumes from there; delete the file to measure again); the table gives, for each auto point, the best uniform point at no more bits and the KL ratio;
   the plot (out/auto/frontier-<model>.png) draws both.

Quality only: no timing, so no benchmark lock. Every solved weight is kept in memory (one copy of
the model per option; SmolLM2-135M with 12 options: ~6.5 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.auto import run as R
from lowbit.auto import sensitivity as S
from lowbit.auto.report import plot_frontier
from lowbit.cli import quiet_transformers
from lowbit.data.texts import calibration_samples, load_text
from lowbit.eval.report import format_table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="gptq,rtn,hqq,nf4",
                    help="the options (awq: every option on AWQ-scaled weights, see lowbit auto --help)")
    ap.add_argument("--bit-choices", default="2,3,4,5,6,8")
    ap.add_argument("--groups", default="64")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,4.5,5,6")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    ap.add_argument("--rank-items", type=int, default=12)
    ap.add_argument("--out", default="out/auto")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = api.load(args.model)
    cfg = R.AutoConfig(bits=4.0, methods=tuple(args.methods.split(",")),
                       bit_choices=tuple(int(b) for b in args.bit_choices.split(",")),
                       groups=tuple(int(g) for g in args.groups.split(",")), n_samples=args.samples,
                       seq_len=args.seq_len, rank_items=args.rank_items, head=False)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    meas = R.prepare(m, cfg, log=log)
    meas.keep_all = True
    # held-out: the evaluation text, never seen by the statistics or the verification windows
    held = calibration_samples(m.tokenizer, n_samples=args.windows, seq_len=args.seq_len, text=load_text("evaluation"),
                               seed=0)
    meter = S.KLMeter(m.model, held)
    table = meas.table
    n = sum(r * c for r, c in table.shapes.values())
    name = (m.name or "model").replace("/", "_")
    name += "-" + "+".join(cfg.methods)  # rows of another option set are another frontier
    rows_file = out / f"frontier-{name}.jsonl"  # each row as it is measured; a rerun takes them
    done = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["setting"]] = r
    rows = []

    def keep(row):
        rows.append(row)
        if row["setting"] not in done:
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    common = set.intersection(*(set(table.options(k)) for k in table.kl)) - {"float"}
    for lab in sorted(common, key=lambda x: (x.split("-")[0], int(x.split("-w")[1].split("g")[0]))):
        if f"uniform {lab}" in done:
            keep(done[f"uniform {lab}"])
            continue
        choice = {k: lab for k in table.kl}
        kl = R.plan_kl(meas, choice, m.model, meter)
        nbytes = sum(table.bytes[k][lab] for k in table.kl)
        keep({"setting": f"uniform {lab}", "kind": lab.split("-")[0], "bits": 8 * nbytes / n, "kl": kl,
              "predicted": sum(table.kl[k][lab] for k in table.kl)})
        log(f"{rows[-1]['setting']}: {rows[-1]['bits']:.3f} bits/weight, held-out KL {kl:.4g}")
    for b in (float(x) for x in args.budgets.split(",")):
        if f"auto {b:g}" in done:
            keep(done[f"auto {b:g}"])
            continue
        plan = R.search(m, meas, cfg, int(b * n // 8), log=log)
        kl = R.plan_kl(meas, plan.choice(), m.model, meter)
        keep({"setting": f"auto {b:g}", "kind": "auto", "bits": plan.bits_per_weight, "kl": kl,
              "predicted": plan.predicted_kl, "verify_kl": plan.measured_kl})
        log(f"auto {b:g}: {plan.bits_per_weight:.3f} bits/weight, held-out KL {kl:.4g}")
    for r in rows:
        if r["kind"] != "auto":
            continue
        under = [u for u in rows if u["kind"] != "auto" and u["bits"] <= r["bits"] + 1e-9]
        if under:
            best = min(under, key=lambda u: u["kl"])
            r["best_uniform"] = best["setting"]
            r["ratio"] = r["kl"] / best["kl"]
    cols = [("setting", "setting"), ("bits", "bits/weight", ".3f"), ("kl", "held-out KL", ".4g"),
            ("predicted", "predicted KL", ".4g"), ("best_uniform", "best uniform at <= bits"),
            ("ratio", "KL / best uniform's")]
    shown = [dict(r, best_uniform=r.get("best_uniform", ""),
                  ratio=f"{r['ratio']:.3f}" if "ratio" in r else "")
             for r in sorted(rows, key=lambda r: r["bits"])]
    print(format_table(shown, cols, markdown=args.markdown))
    rc = meas.rank or {}
    print(f"\nmodel {m.name}; {len(table.kl)} block linears (the head stays float), options "
          f"{args.methods} x bits {args.bit_choices} x groups {args.groups}; calibration {cfg.n_samples} x "
          f"{cfg.seq_len} tokens; held-out KL on {args.windows} x {args.seq_len} tokens of the evaluation text")
    if rc:
        print(f"proxy vs true single-tensor KL ({len(rc['rows'])} pairs on {args.rank_items} tensors): Spearman "
              f"{rc['spearman']:.3f}; within a tensor {rc['spearman_within']:.3f}; across tensors at "
              f"{rc['across_option']} {rc['spearman_across']:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s (rows kept in {rows_file}: delete it to measure again)")
    uniform: dict[str, list] = {}
    for r in rows:
        if r["kind"] != "auto":
            uniform.setdefault(r["kind"], []).append((r["bits"], r["kl"]))
    png = plot_frontier([(r["bits"], r["kl"]) for r in rows if r["kind"] == "auto"], uniform,
                        out / f"frontier-{name}.png", f"{m.name}: auto vs uniform (held-out KL)")
    (out / f"frontier-{name}.json").write_text(json.dumps({"rows": rows, "rank_check": rc}, indent=1, default=str))
    print(f"plot -> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
