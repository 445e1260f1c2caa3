"""`lowbit qat`: quantization-aware training of the digits CNN, converted to the integer model.

    lowbit qat [digits] [--bits 8|4] [--epochs 30] [--qat-epochs 15] [--observer moving-minmax]
               [--lr 1e-3] [--seed 0] [-o model.pt]

Trains the small CNN on scikit-learn's digits in fp32, quantizes it post-training (static, same
bits, same observer) for reference, then fine-tunes it through fake quantization (weights per
output channel, activations observed all through training, straight-through gradients) and
converts the result to the integer-only model. Prints test accuracy and size of the three; ``-o``
saves the integer model (``torch.save`` of the module; load with ``torch.load(..., weights_only=False)``).
Only the digits CNN is supported: QAT of an LLM's linears is not implemented.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("qat", help="quantization-aware training of the digits CNN -> integer model")
    p.add_argument("model", nargs="?", default="digits", help="what to train: digits (the only choice for now)")
    p.add_argument("--bits", type=int, default=8, choices=range(2, 9), metavar="{2..8}",
                   help="bits of weights and activations (default 8)")
    p.add_argument("--epochs", type=int, default=30, help="fp32 training epochs (default 30)")
    p.add_argument("--qat-epochs", type=int, default=15, help="QAT fine-tuning epochs (default 15)")
    p.add_argument("--observer", default="moving-minmax",
                   choices=["minmax", "moving-minmax", "entropy", "mse", "percentile"],
                   help="activation observer used during QAT and for the PTQ reference (default moving-minmax)")
    p.add_argument("--sym", action="store_true", help="symmetric activations (default asymmetric)")
    p.add_argument("--lr", type=float, default=1e-3, help="QAT learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="save the integer model here (torch.save)")
    p.set_defaults(func=cmd_qat)


def cmd_qat(args) -> int:
    import time

    import torch

    from lowbit.algorithms.static_int8 import StaticInt8Config
    from lowbit.cnn.ptq import quantize_static
    from lowbit.cnn.qat import QATConfig, qat
    from lowbit.core.scheme import QuantScheme
    from lowbit.errors import LowbitError
    from lowbit.eval.report import format_table
    from lowbit.models.digits import accuracy, digits_cnn, digits_split, float_bytes, train

    if args.model != "digits":
        raise LowbitError(f"lowbit qat trains the digits CNN only; got {args.model!r} (QAT of LLMs is not implemented)")
    if args.epochs <= 0 or args.qat_epochs <= 0 or args.lr <= 0:
        raise LowbitError("--epochs, --qat-epochs and --lr must be positive")
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = digits_split(seed=args.seed)
    model = train(digits_cnn(seed=args.seed), Xtr, ytr, epochs=args.epochs, seed=args.seed)
    scheme = QuantScheme(bits=args.bits, symmetric=args.sym, granularity="channel", group_size=None,
                         scale_dtype="float32")
    ptq, _ = quantize_static(model, Xtr[:200], StaticInt8Config(scheme=scheme, observer=args.observer))
    cfg = QATConfig(bits=args.bits, symmetric=args.sym, observer=args.observer, epochs=args.qat_epochs,
                    lr=args.lr, seed=args.seed)
    qm, _ = qat(model, Xtr, ytr, cfg)
    rows = [
        {"variant": "fp32", "acc": accuracy(model, Xte, yte), "kb": float_bytes(model) / 1e3},
        {"variant": f"PTQ static W{args.bits}A{args.bits} ({args.observer})", "acc": accuracy(ptq, Xte, yte),
         "kb": ptq.stored_bytes() / 1e3},
        {"variant": f"QAT W{args.bits}A{args.bits} -> integer", "acc": accuracy(qm, Xte, yte),
         "kb": qm.stored_bytes() / 1e3},
    ]
    print(format_table(rows, [("variant", "variant"), ("acc", "test acc %", ".2f"), ("kb", "size KB", ".1f")]))
    if args.output:
        torch.save(qm, args.output)
        print(f"lowbit: integer model saved to {args.output}", file=sys.stderr)
    print(f"lowbit: {len(yte)} test images; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
