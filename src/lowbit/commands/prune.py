"""`lowbit prune`: zero out weights with a pruning method (magnitude, Wanda, SparseGPT), save the
checkpoint, and optionally store the pruned layers N:M-compressed or as CSR.
"""

from __future__ import annotations

import argparse

from lowbit.commands import quantize
from lowbit.commands._args import add_large_model_args, add_output_args, claimed_output, log
from lowbit.errors import LowbitError

PRUNERS = ("magnitude", "wanda", "sparsegpt")



def register(sub) -> None:
    pr = sub.add_parser("prune", help="prune a model (zero out weights) and save it")
    pr.add_argument("model", nargs="?", help="model (default: the embedded SmolLM2-135M-Instruct)")
    pr.add_argument("--method", default="wanda", help=f"one of {', '.join(PRUNERS)} (default: wanda)")
    pr.add_argument("--sparsity", type=float, help="fraction of weights to zero, e.g. 0.5")
    pr.add_argument("--pattern", help="N:M structured sparsity, N kept of every M, e.g. 2:4")
    pr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="other method settings")
    pr.add_argument("--calib", metavar="FILE", help="calibration text file (default: bundled text)")
    pr.add_argument("--samples", type=int, default=32)
    pr.add_argument("--seq-len", type=int, default=512)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--storage", default="dense", choices=("dense", "nm", "csr", "auto"),
                    help="how pruned layers are stored: dense zeros, N:M-compressed, CSR, or auto "
                         "(per layer, what bench/sparse_kernels.py found smaller and not slower; default: dense)")
    add_large_model_args(pr)
    add_output_args(pr, "output directory")
    pr.set_defaults(func=run)


def run(args) -> int:
    with claimed_output(args):  # held through the storage rewrite below too
        return _run(args)


def _run(args) -> int:
    if args.method not in PRUNERS:
        raise LowbitError(f"unknown pruning method {args.method!r}; available: {', '.join(PRUNERS)}")
    if (args.sparsity is None) == (args.pattern is None):
        raise LowbitError("give exactly one of --sparsity FRACTION or --pattern N:M")
    opts = [f"sparsity={args.sparsity}"] if args.sparsity is not None else [f"pattern={args.pattern}"]
    ns = argparse.Namespace(**vars(args))
    ns.option = opts + list(args.option)
    for k in ("bits", "group_size"):
        setattr(ns, k, None)
    for k in ("per_channel", "per_tensor", "asym", "float_zero", "sym", "restricted", "sequential"):
        setattr(ns, k, False)
    ns.head = ns.embed = None
    if args.storage == "nm" and args.pattern is None:
        raise LowbitError("--storage nm needs --pattern N:M")
    rc = quantize.run(ns)
    if args.storage != "dense":  # rewrite the pruned layers in a sparse format (lowbit.algorithms.sparse_storage)
        from lowbit.algorithms.sparse_storage import restore_checkpoint
        from lowbit.core import processes

        # split over processes: process 0 rewrites the checkpoint it wrote, the others wait
        info = processes.gather(lambda: restore_checkpoint(args.output, args.storage) if processes.is_main()
                                else None)[0]
        log(f"stored {args.storage}: " + ", ".join(f"{sum(1 for f in info['layers'].values() if f == k)} {k}"
                                                   for k in sorted(set(info["layers"].values()))))
    return rc
