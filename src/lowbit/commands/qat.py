"""`lowbit qat`: quantization-aware training, of an LLM or of the digits CNN.

    lowbit qat MODEL [--bits 4] [--group-size 64] [--asym|--float-zero] [--lsq] [training flags] -o DIR
    lowbit qat [digits] [--bits 8|4] [--epochs 30] [--qat-epochs 15] [--observer moving-minmax]
               [--lr 1e-3] [--seed 0] [-o model.pt]

An LLM (``MODEL``: a builtin name such as ``smollm2-135m``, a transformers directory or a GGUF
file): every linear layer of every block is fake-quantized on the scheme's grid (weights only,
straight-through gradients; ``--lsq`` learns the scales as in LSQ instead of re-choosing them from
the weight) and trained towards the original model's outputs (`lowbit.training.qat`; the flags of
`lowbit distill`: steps, lr, alpha, ...; resumable with ``--resume``); the result is packed into
the affine format GPTQ or RTN write, a checkpoint for `lowbit eval`, `export`, `generate`. The
default scheme is GPTQ's with ``--bits``/``--group-size`` applied, so the two compare at the same
size.

The digits CNN (``lowbit qat`` or ``lowbit qat digits``):

Trains the small CNN on scikit-learn's digits in fp32, quantizes it post-training (static, same
bits, same observer) for reference, then fine-tunes it through fake quantization (weights per
output channel, activations observed all through training, straight-through gradients) and
converts the result to the integer-only model. Prints test accuracy and size of the three; ``-o``
saves the integer model (``torch.save`` of the module; load with ``torch.load(..., weights_only=False)``).
"""

from __future__ import annotations

import sys

from lowbit.errors import LowbitError


def register(sub) -> None:
    from lowbit.commands._training import add_training_args

    p = sub.add_parser("qat", help="quantization-aware training of an LLM (-> packed checkpoint) or of the digits CNN")
    p.add_argument("model", nargs="?", default="digits",
                   help="the LLM to train (a builtin name, a transformers directory or a GGUF file), or digits "
                        "(default: digits, the small CNN)")
    p.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}",
                   help="bits of the weights (LLM, default 4) or of weights and activations (digits, default 8)")
    p.add_argument("--group-size", type=int, help="LLM: columns sharing one scale, -1 = per channel (default 64)")
    p.add_argument("--asym", action="store_true", help="LLM: asymmetric with an integer zero-point")
    p.add_argument("--float-zero", action="store_true", help="LLM: asymmetric with a real-valued zero-point")
    p.add_argument("--lsq", action="store_true",
                   help="LLM: learn the scales (LSQ) instead of re-choosing them from the weight at every step")
    p.add_argument("--epochs", type=int, default=30, help="fp32 training epochs (default 30)")
    p.add_argument("--qat-epochs", type=int, default=15, help="QAT fine-tuning epochs (default 15)")
    p.add_argument("--observer", default="moving-minmax",
                   choices=["minmax", "moving-minmax", "entropy", "mse", "percentile"],
                   help="activation observer used during QAT and for the PTQ reference (default moving-minmax)")
    p.add_argument("--sym", action="store_true", help="digits: symmetric activations (default asymmetric)")
    add_training_args(p, steps=200, lr=None)
    p.add_argument("-o", "--output", help="LLM: output checkpoint directory (required); digits: save the integer "
                                          "model here (torch.save)")
    p.add_argument("--force", action="store_true", help="replace an existing output that lowbit did not write")
    p.set_defaults(func=cmd_qat)


def cmd_qat(args) -> int:
    if args.model != "digits":
        return _llm(args)
    return _digits(args)


def _digits(args) -> int:
    import time

    import torch

    from lowbit.algorithms.static_int8 import StaticInt8Config
    from lowbit.cnn.ptq import quantize_static
    from lowbit.cnn.qat import QATConfig, qat
    from lowbit.core.scheme import QuantScheme
    from lowbit.errors import LowbitError
    from lowbit.eval.report import format_table
    from lowbit.models.digits import accuracy, digits_cnn, digits_split, float_bytes, train

    args.bits = 8 if args.bits is None else args.bits
    args.lr = 1e-3 if args.lr is None else args.lr
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


def _llm(args) -> int:
    from lowbit import outputs

    if not args.output:
        raise LowbitError("lowbit qat of an LLM writes a checkpoint: give the output directory (-o DIR)")
    outputs.check_dir(args.output, "lowbit.json", force=args.force,
                      inputs=[args.model] if args.model else [])
    with outputs.lock(args.output):
        return _llm_run(args)


def _llm_run(args) -> int:
    import copy
    import shutil

    from lowbit import api, outputs
    from lowbit.algorithms import get_method
    from lowbit.commands._args import log
    from lowbit.commands._training import checkpoint_record, kd_config, summary, train_config, windows
    from lowbit.core.scheme import QuantScheme
    from lowbit.eval import size
    from lowbit.training.kd import distill, named_parameters_of, norm_parameters
    from lowbit.training.qat import convert, prepare

    if args.asym and args.float_zero:
        raise LowbitError("--asym and --float-zero are mutually exclusive")
    d = get_method("gptq").config_cls().scheme.to_dict()
    d["bits"] = 4 if args.bits is None else args.bits
    g = 64 if args.group_size is None else args.group_size
    if g == -1:
        d.update(granularity="channel", group_size=None)
    elif g > 0:
        d.update(granularity="group", group_size=g)
    else:
        raise LowbitError(f"--group-size must be a positive integer or -1 (per channel), got {g}")
    if args.asym or args.float_zero:
        d.update(symmetric=False, zero_point="float" if args.float_zero else "int")
    scheme = QuantScheme(**d)
    args.lr = 1e-5 if args.lr is None else args.lr
    train_cfg, kd_cfg = train_config(args), kd_config(args)
    m = api.load(args.model, dtype="float32", device=args.device)
    if m.record is not None:
        raise LowbitError(f"{args.model} is already quantized; QAT starts from the original model")
    teacher = None
    if kd_cfg.alpha > 0 or kd_cfg.hidden > 0:
        teacher = copy.deepcopy(m.model).to(args.device)  # the original, frozen: what the student is trained towards
    student = m.model.to(args.device)
    train_w, held = windows(m.tokenizer, args)
    standins = prepare(student, scheme, learn_scale=args.lsq)
    params = {**named_parameters_of(standins), **norm_parameters(student)}
    log(f"QAT of {m.name} at {scheme.short_name()}{' (LSQ scales)' if args.lsq else ''}: {len(standins)} layers, "
        f"{sum(p.numel() for p in params.values()) / 1e6:.1f}M trainable parameters, {train_cfg.steps} steps of "
        f"{train_cfg.batch_size}x{train_w.shape[1]} tokens, alpha {kd_cfg.alpha}")
    state = outputs.resume_dir(args.output)
    res = distill(student, teacher, params, train_w, held, train_cfg, kd_cfg, state_dir=state, resume=args.resume,
                  device=args.device)
    convert(student, standins)
    m.model = student.to("cpu")
    method = {"method": "qat", "scheme": scheme.to_dict(), "learn_scale": bool(args.lsq)}
    m.record = checkpoint_record(method, m.source, res, summary(res, train_cfg, kd_cfg, text=args.text or "calibration"),
                                 args.device)
    out = api.save(m, args.output, force=args.force)
    shutil.rmtree(state, ignore_errors=True)
    bpw, _, n = size.linear_bits(m.model)
    fin = ", ".join(f"{k} {v:.4g}" for k, v in res.final_eval().items())
    log(f"done: {res.steps} steps in {res.seconds:.0f} s this run; {bpw:.3f} bits/weight over {n / 1e6:.1f}M linear "
        f"weights; held-out {fin} -> {out}")
    return 0
