"""`lowbit bitnet`: BitNet (1-bit) and BitNet b1.58 (ternary) models, trained rather than rounded.

    lowbit bitnet [MODEL] [--bits 1.58|1] [--norm] [training flags] -o DIR            conversion
    lowbit bitnet [MODEL] --scratch [--bits 1.58|1|float] [--layers 10 --width 256 ...] -o DIR

Conversion (the default): every projection of every decoder block of MODEL (a builtin name, a
transformers directory or a GGUF file) becomes a `lowbit.nn.bitlinear.BitLinear` initialised from
its float weight, and the model is trained towards the original's outputs (soft KL, the flags of
`lowbit distill`; ``--alpha 0`` for plain next-token CE), latent weights, biases and every norm
gain trainable. ``--norm`` adds BitNet's RMSNorm (SubLN) inside every converted layer; without it
(the default) the converted model keeps the original's architecture, which is what GGUF's llama
graph can carry (`lowbit export DIR --format gguf` writes TQ2_0 / TQ1_0).

From scratch (``--scratch``): a small llama-shaped model with MODEL's tokenizer and vocabulary,
randomly initialised, trained on the text with next-token CE: the BitNet papers' comparison in
miniature when run for ``--bits 1.58``, ``1`` and ``float`` (its fp32 twin: same shape, tokens and
schedule). BitLinear layers keep their norm here (the papers' layer), unless ``--no-norm``.

The result is packed (`BitNetWeight`: 2 bits a weight for b1.58, 1 for 1-bit, plus one scale;
int8 activations at run time) into a lowbit checkpoint for `lowbit eval`, `compare`, `generate`
(the C decode step runs it) and `export`; a ``--scratch --bits float`` model is written as a
transformers directory. Training is resumable (``--resume``), prints held-out results as it goes,
and its record (settings, first and final evaluations) is saved with the output.
"""

from __future__ import annotations

import argparse

from lowbit.errors import LowbitError

BITS = {"1.58": 1.58, "1": 1, "float": None}
SCRATCH_DEFAULTS = {"layers": 10, "width": 256, "ffn": 768, "heads": 4}


def register(sub) -> None:
    from lowbit.commands._training import add_training_args

    p = sub.add_parser("bitnet", help="BitNet 1-bit / b1.58 models: convert a model by distillation, or train one "
                                      "from scratch")
    p.add_argument("model", nargs="?", default=None,
                   help="the model to convert (a builtin name, a transformers directory or a GGUF file; default: "
                        "the default model); with --scratch, whose tokenizer the new model uses")
    p.add_argument("--bits", choices=tuple(BITS), default="1.58",
                   help="1.58 (BitNet b1.58, ternary; default), 1 (BitNet, binary), float (--scratch only: the fp32 "
                        "twin)")
    p.add_argument("--norm", action=argparse.BooleanOptionalAction, default=None,
                   help="an RMSNorm inside every BitLinear (SubLN; default: off for a conversion, on from scratch)")
    p.add_argument("--scratch", action="store_true", help="train a new small llama-shaped model from scratch")
    for k, v in SCRATCH_DEFAULTS.items():
        p.add_argument(f"--{k}", type=int, default=v, help=f"--scratch: {k} (default {v})")
    add_training_args(p, steps=200, lr=None)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output that lowbit did not write")
    p.set_defaults(func=cmd_bitnet)


def cmd_bitnet(args) -> int:
    from lowbit import outputs

    bits = BITS[args.bits]
    if bits is None and not args.scratch:
        raise LowbitError("--bits float is the fp32 twin of a --scratch run; a conversion needs --bits 1.58 or 1")
    for k in SCRATCH_DEFAULTS:
        if getattr(args, k) < 1:
            raise LowbitError(f"--{k} must be positive, got {getattr(args, k)}")
    if args.width % args.heads:
        raise LowbitError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    marker = "config.json" if bits is None else "lowbit.json"
    outputs.check_dir(args.output, marker, force=args.force, inputs=[args.model] if args.model else [])
    with outputs.lock(args.output):
        return _run(args, bits)


def scratch_model(tokenizer, vocab_size: int, layers: int, width: int, ffn: int, heads: int, seed: int,
                  max_len: int = 2048):
    """A randomly initialised llama-shaped causal LM (tied embeddings, SiLU-gated MLP, RoPE)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                      bos_token_id=getattr(tokenizer, "bos_token_id", None),
                      eos_token_id=getattr(tokenizer, "eos_token_id", None))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.float().eval()


def _run(args, bits) -> int:
    import copy
    import shutil

    from lowbit import api, outputs
    from lowbit.commands._args import log
    from lowbit.commands._training import (checkpoint_record, kd_config, save_float_model, summary, train_config,
                                           windows)
    from lowbit.eval import size
    from lowbit.nn.bitlinear import convert, pack, parameters_of
    from lowbit.training.kd import distill, norm_parameters

    norm = (args.scratch if args.norm is None else args.norm) and bits is not None
    if args.lr is None:
        args.lr = 2e-3 if args.scratch else 5e-4
    if args.scratch:
        args.alpha = 0.0  # no teacher: next-token CE on the text
    train_cfg, kd_cfg = train_config(args), kd_config(args)
    base = api.load(args.model, dtype="float32", device=args.device)
    if base.record is not None:
        raise LowbitError(f"{args.model} is already quantized; BitNet starts from the original float model")
    train_w, held = windows(base.tokenizer, args)
    teacher = None
    if args.scratch:
        vocab = int(base.model.config.vocab_size)
        student = scratch_model(base.tokenizer, vocab, args.layers, args.width, args.ffn, args.heads, args.seed)
        base.model = None  # the pretrained weights are not needed: only its tokenizer
        what = (f"a new {args.layers}-layer llama (d={args.width}, ffn={args.ffn}, {args.heads} heads, vocab {vocab}, "
                f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters)")
    else:
        if kd_cfg.alpha > 0 or kd_cfg.hidden > 0:
            teacher = copy.deepcopy(base.model).to(args.device)
        student = base.model
        what = base.name
    student.to(args.device)
    layers = convert(student, bits, norm=norm) if bits is not None else {}
    if args.scratch:
        params = dict(student.named_parameters())
    else:
        params = {**parameters_of(layers), **norm_parameters(student)}
    kind = {1.58: "BitNet b1.58", 1: "BitNet 1-bit", None: "float32"}[bits]
    log(f"{kind}{' (SubLN norms)' if norm else ''} {'from scratch' if args.scratch else 'conversion'} of {what}: "
        f"{len(layers)} BitLinear layers, {sum(p.numel() for p in params.values()) / 1e6:.1f}M trainable parameters, "
        f"{train_cfg.steps} steps of {train_cfg.batch_size}x{train_w.shape[1]} tokens, lr {train_cfg.lr:g} "
        f"({train_cfg.schedule}), {'CE' if kd_cfg.alpha == 0 else f'alpha {kd_cfg.alpha}'}")
    state = outputs.resume_dir(args.output)
    res = distill(student, teacher, params, train_w, held, train_cfg, kd_cfg, state_dir=state, resume=args.resume,
                  device=args.device)
    student = student.to("cpu")
    method = {"method": "bitnet", "bits": bits, "norm": bool(norm), "scratch": bool(args.scratch)}
    if args.scratch:
        method["shape"] = {k: getattr(args, k) for k in SCRATCH_DEFAULTS}
    training = summary(res, train_cfg, kd_cfg, text=args.text or "calibration", history=res.history)
    if bits is None:
        save_float_model(student, base.tokenizer, args.output, {"method": method, "training": training},
                         force=args.force)
        out = args.output
        log(f"done: fp32 twin written to {out}")
    else:
        pack(student)
        m = api.Model(model=student, tokenizer=base.tokenizer, name=base.name, source=base.source)
        m.record = checkpoint_record(method, None if args.scratch else base.source, res, training, args.device)
        out = api.save(m, args.output, force=args.force)
        bpw, _, n = size.linear_bits(m.model)
        log(f"{bpw:.3f} bits/weight over {n / 1e6:.1f}M linear weights -> {out}")
    shutil.rmtree(state, ignore_errors=True)
    fin = ", ".join(f"{k} {v:.4g}" for k, v in res.final_eval().items())
    log(f"done: {res.steps} steps in {res.seconds:.0f} s this run; held-out {fin}")
    return 0
