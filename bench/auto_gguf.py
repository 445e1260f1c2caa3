"""lowbit auto --target gguf against llama.cpp's mixes at the same file size, scored in llama.cpp.

    PYTHONPATH=<llama-cpp-python> python -P bench/auto_gguf.py [--model MODEL] [--mixes Q3_K_M,Q4_K_M,Q5_K_M]
                                                            [--max-tokens 2048] [--ctx 256] [--markdown]

1. the baseline: the model written as F32 GGUF, run by llama.cpp;
2. llama.cpp's mixes with an importance matrix from lowbit's calibration text (the same windows
   `auto` measures on): written by lowbit's port of llama.cpp's quantizer, which
   `bench/gguf_llamacpp.py` checks byte for byte against ``llama_model_quantize`` (llama.cpp's
   own imatrix path is not reachable from llama-cpp-python);
3. for each mix, `lowbit auto --target gguf` with the mix's file size as the budget (every type
   valid for each tensor's rows, the type's own imatrix encoder or GPTQ onto its grid);
4. llama.cpp runs every file on the same held-out windows of the evaluation text; KL of each
   file's next-token distributions to the F32 file's, as llama.cpp computes them.

Quality only (no timing): no benchmark lock.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.auto import run as R
from lowbit.cli import quiet_transformers
from lowbit.data.texts import default_bos_id, eval_tokens, load_text
from lowbit.eval.quality import PplProtocol, evaluate_quality
from lowbit.eval.report import format_table
from lowbit.export.gguf import collect_imatrix, export_gguf


def _peer():
    spec = importlib.util.spec_from_file_location("gguf_llamacpp", Path(__file__).with_name("gguf_llamacpp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--mixes", default="Q3_K_M,Q4_K_M,Q5_K_M")
    ap.add_argument("--methods", default="imatrix,gptq")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exclude-types", default="",
                    help="types auto may not choose (from the cached table, no new measurement): e.g. Q4_1,Q5_1 on "
                         "SmolLM2, whose shipped weights lie on a Q4_1 grid that those two types hold exactly")
    ap.add_argument("--out", default="out/auto")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    peer = _peer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", file=sys.stderr, flush=True)

    m = api.load(args.model)
    name = (m.name or "model").replace("/", "_")
    files: dict[str, Path] = {}
    rep = export_gguf(m, out / f"{name}-F32.gguf", "F32", force=True)
    files["F32 (baseline)"] = Path(rep.path)
    im = collect_imatrix(m, n_samples=args.samples, seq_len=args.seq_len)
    cfg0 = R.AutoConfig(target="gguf", bits=4.0, methods=tuple(args.methods.split(",")), n_samples=args.samples,
                        seq_len=args.seq_len)
    meas = R.prepare(m, cfg0, log=log)
    excluded = {t for t in args.exclude_types.split(",") if t}
    if excluded:
        for k in list(meas.table.kl):
            keep = [lab for lab in meas.table.kl[k] if lab.split("+")[0] not in excluded]
            meas.table.kl[k] = {lab: meas.table.kl[k][lab] for lab in keep}
            meas.table.bytes[k] = {lab: meas.table.bytes[k][lab] for lab in keep}
        log(f"auto may not choose {', '.join(sorted(excluded))}")
    tag = "-no-" + "-".join(sorted(excluded)) if excluded else ""
    pairs = []
    for mix in args.mixes.split(","):
        rep = export_gguf(m, out / f"{name}-{mix}-imatrix.gguf", mix, imatrix=im, force=True)
        size = Path(rep.path).stat().st_size
        files[f"llama.cpp {mix} + imatrix"] = Path(rep.path)
        log(f"{mix} + imatrix: {size} bytes ({rep.types})")
        cfg = R.AutoConfig(target="gguf", size=size, methods=cfg0.methods, n_samples=args.samples,
                           seq_len=args.seq_len)
        names = R._module_names(m.model, meas)
        plan, path = R.write(m, meas, cfg, out / f"{name}-auto{tag}-{mix}.gguf", force=True, log=log)
        R._restore(m.model, meas, names)
        m.record = None
        plan.save(str(path) + ".plan.json")
        files[f"auto @ {mix} size"] = Path(path)
        pairs.append((mix, f"llama.cpp {mix} + imatrix", f"auto @ {mix} size"))
        log(f"auto at {size} bytes: {Path(path).stat().st_size} bytes, predicted KL {plan.predicted_kl:.4g}, "
            f"measured (torch, calibration windows) {plan.measured_kl:.4g}")

    tokens = eval_tokens(m.tokenizer, load_text("evaluation"))
    bos = default_bos_id(m.tokenizer)
    protocol = PplProtocol(ctx=args.ctx, max_tokens=args.max_tokens)
    lms = {k: peer.LlamaCppLM(p, args.ctx, args.threads) for k, p in files.items()}
    log(f"llama.cpp evaluates {len(lms)} files on {protocol.n_scored(tokens.numel(), bos is not None)} tokens")
    res = evaluate_quality(lms, "F32 (baseline)", tokens, protocol, bos_id=bos, progress=False)
    rows = []
    for k, r in res.items():
        size = files[k].stat().st_size
        rows.append({"file": k, "mb": size / 1e6, "ppl": r.ppl, "kl": r.kl_mean,
                     "top1": None if r.top1 is None else 100 * r.top1})
    cols = [("file", "file"), ("mb", "MB", ".3f"), ("ppl", "ppl", ".3f"), ("kl", "KL to F32", ".5f"),
            ("top1", "top-1 %", ".2f")]
    print(format_table(rows, cols, markdown=args.markdown))
    by = {r["file"]: r for r in rows}
    print()
    summary = []
    for mix, a, b in pairs:
        ratio = by[b]["kl"] / by[a]["kl"]
        summary.append({"mix": mix, "size_ratio": by[b]["mb"] / by[a]["mb"], "kl_ratio": ratio})
        print(f"{mix}: auto / llama.cpp KL = {ratio:.3f} at {100 * by[b]['mb'] / by[a]['mb']:.2f}% of its size "
              f"(goal <= 0.7)")
    print(f"model {m.name}; llama.cpp threads {args.threads}; calibration {args.samples} x {args.seq_len} tokens; "
          f"total {time.perf_counter() - t_all:.0f} s")
    (out / f"gguf-{name}{tag}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
