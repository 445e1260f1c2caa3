"""``lowbit prune-iterative [MODEL] --schedule 0.3,0.5 --steps N -o OUT``: prune in stages with a
short masked recovery fine-tune on the bundled calibration text after each stage
(`lowbit.algorithms.iterative_prune`), optionally printing held-out perplexity after every prune
and every fine-tune (``--eval-tokens``) next to one-shot pruning straight to the final sparsity
(``--compare-oneshot``), so the prune/retrain cycle's recovery is visible.
"""

from __future__ import annotations


from lowbit.commands._args import add_output_args, claimed_output
from lowbit.commands._args import log as _log
from lowbit.errors import LowbitError


def _schedule(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LowbitError(f"--schedule expects comma-separated sparsities such as 0.3,0.5, got {text!r}") from None


def cmd_prune_iterative(args) -> int:
    with claimed_output(args):
        return _run(args)


def _run(args) -> int:
    from lowbit.algorithms.iterative_prune import IterativeConfig

    cfg = IterativeConfig(schedule=_schedule(args.schedule), method=args.method, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, seq_len=args.seq_len, n_samples=args.samples, seed=args.seed)
    if args.eval_tokens < 0:
        raise LowbitError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    import torch

    from lowbit import api
    from lowbit.algorithms.iterative_prune import _prune_stage, iterative_prune

    m = api.load(args.model)
    eval_fn = None
    rows = []
    if args.eval_tokens:
        from lowbit.data.texts import default_bos_id, eval_tokens, load_text
        from lowbit.eval.quality import PplProtocol, perplexity

        tokens = eval_tokens(m.tokenizer, load_text("evaluation"))
        proto = PplProtocol(ctx=args.ctx, max_tokens=args.eval_tokens)
        bos = default_bos_id(m.tokenizer)

        def eval_fn(model):
            with torch.no_grad():
                return round(perplexity(model, tokens, proto, bos, progress=False).ppl, 4)

        rows.append(("original", 0.0, eval_fn(m.model)))
        _log(f"original: ppl {rows[-1][2]:.3f} on {args.eval_tokens} held-out tokens")
        if args.compare_oneshot:
            one = api.load(args.model)
            _prune_stage(one.model, one.tokenizer, cfg, cfg.schedule[-1], progress=False)
            rows.append((f"one-shot {cfg.method} {cfg.schedule[-1]:g}, no fine-tune", cfg.schedule[-1],
                         eval_fn(one.model)))
            _log(f"{rows[-1][0]}: ppl {rows[-1][2]:.3f}")
            del one
    _log(f"iterative {cfg.method}: schedule {list(cfg.schedule)}, {cfg.steps} steps x {cfg.batch_size} x "
         f"{cfg.seq_len} tokens per stage, lr {cfg.lr:g}")
    rec = iterative_prune(m, cfg, eval_fn=eval_fn, progress=False, log=_log)
    if args.storage != "dense":
        from lowbit.algorithms.sparse_storage import store

        store(m, args.storage)
    out = api.save(m, args.output, force=args.force)
    _log(f"done in {rec['quantize_seconds']:.0f} s: {100 * rec['method']['sparsity']:.2f}% zeros -> {out}")
    if eval_fn is not None:
        for i, st in enumerate(rec["method"]["stages"]):
            rows.append((f"stage {i + 1}: pruned to {st['sparsity']:g}", st["achieved"], st["ppl_pruned"]))
            if "ppl_finetuned" in st:
                rows.append((f"stage {i + 1}: + {st['steps']} fine-tune steps", st["achieved_after_finetune"],
                             st["ppl_finetuned"]))
        w = max(len(r[0]) for r in rows)
        print(f"{'step'.ljust(w)}  sparsity  ppl")
        for name, sp, ppl in rows:
            print(f"{name.ljust(w)}  {100 * sp:7.2f}%  {ppl:.3f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prune-iterative", help="prune in stages with a short masked recovery fine-tune after each")
    p.add_argument("model", nargs="?", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="magnitude", help="pruner of every stage: magnitude, wanda, sparsegpt")
    p.add_argument("--schedule", default="0.3,0.5", help="rising sparsities, one stage each (default: 0.3,0.5)")
    p.add_argument("--steps", type=int, default=30, help="fine-tune steps after each prune (default: 30)")
    p.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate (default: 2e-5)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows the steps draw from (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="score this many held-out tokens after every prune and fine-tune (default: 0, off)")
    p.add_argument("--ctx", type=int, default=512, help="context of the perplexity protocol (default: 512)")
    p.add_argument("--compare-oneshot", action="store_true",
                   help="also prune a fresh copy straight to the final sparsity (no fine-tune) and score it")
    p.add_argument("--storage", default="dense", choices=("dense", "csr", "auto"),
                   help="how the pruned layers are stored (see lowbit prune --storage)")
    add_output_args(p, "output directory")
    p.set_defaults(func=cmd_prune_iterative)
