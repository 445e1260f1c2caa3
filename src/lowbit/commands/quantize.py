"""`lowbit quantize`: quantize a model with a registered method and save the checkpoint.

    lowbit quantize [MODEL] [--method rtn] [--bits N] [--group-size G] [... scheme flags]
                    [--head int8|int6|int4] [--embed int8|int6|int4] [--stream] -o DIR
"""

from __future__ import annotations

import os

from lowbit.commands._args import (
    add_large_model_args,
    add_output_args,
    add_scheme_args,
    claimed_output,
    log,
    options_from_flags,
    parse_bytes,
    scheme_from_flags,
)
from lowbit.errors import LowbitError
from lowbit.eval import size


def register(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", nargs="?", help="model (default: the embedded SmolLM2-135M-Instruct)")
    add_scheme_args(q)
    q.add_argument("--head", choices=("int8", "int6", "int4"),
                   help="also quantize the output layer (lm_head) with RTN: int8 per channel, int6 g16 (Q6_K-like) "
                        "or int4 g32 (untied from the embedding; default: keep it in float)")
    q.add_argument("--embed", choices=("int8", "int6", "int4"),
                   help="also quantize the token embedding, row by row, as --head does (default: keep it in float, "
                        "in the source's dtype)")
    add_large_model_args(q)
    add_output_args(q, "output directory")
    q.set_defaults(func=run)


def run(args) -> int:
    with claimed_output(args):
        return _run(args)


def _run(args) -> int:
    from lowbit import api
    from lowbit.algorithms import get_method

    method_cls = get_method(args.method)  # unknown method -> clear error before any loading
    scheme = scheme_from_flags(args, method_cls)
    options = options_from_flags(args, method_cls)
    try:
        from lowbit.algorithms.base import make_method

        make_method(args.method, scheme, **options)  # invalid settings -> clear error before loading
    except TypeError as e:
        raise LowbitError(f"invalid settings for {args.method}: {e}") from None
    if args.calib:
        from lowbit.data.texts import load_text

        load_text(args.calib)  # a bundled split name or a readable text file; one-line error otherwise
    resume_dir = None
    if method_cls.needs_calibration or args.sequential:  # finished blocks kept for --resume
        from lowbit import outputs
        from lowbit.calibration.resume import check_asked

        resume_dir = str(outputs.resume_dir(args.output))
        check_asked(resume_dir, args.resume, args.output)
    max_shard = parse_bytes(args.max_shard_size, "--max-shard-size")
    budget = parse_bytes(args.activation_budget, "--activation-budget", allow_zero=True)
    stream = args.stream
    if not stream and args.no_stream is False:
        dtype = api.compute_dtype(args.dtype, args.device)
        stream = api.should_stream(args.model, dtype)
        if stream:
            log(f"the weights would take more than half of the available memory in {str(dtype)[6:]}: streaming "
                "them block by block (--no-stream to load them whole)")
    m = api.load(args.model, dtype=args.dtype, device=args.device, stream=stream)
    fields = method_cls.config_cls.__dataclass_fields__
    # a pruner's scheme only matters when it also quantizes (SparseGPT's quantize=true)
    quantizes = options.get("quantize", getattr(method_cls.config_cls(), "quantize", True))
    shown = scheme if scheme is not None and quantizes else None
    verb = "pruning" if "sparsity" in fields else "quantizing"
    how = f"{str(m.extra['dtype'])[6:]}{', streamed' if stream else ''}"
    # a method solving onto a GGUF block type (GPTQ's gguf_type) leaves the scheme unused
    grid = f"onto GGUF {options['gguf_type']}" if options.get("gguf_type") else shown.short_name() if shown else ""
    log(f"{verb} {m.name} with {args.method}{' ' + grid if grid else ''} on {args.device} ({how})")
    decode_ref = _decode_reference(m, stream, args.device)
    rec = api.quantize(m, args.method, scheme, calibration_text=args.calib, n_samples=args.samples,
                       seq_len=args.seq_len, device=args.device, force_runner=args.sequential,
                       head=getattr(args, "head", None), embed=getattr(args, "embed", None),
                       output=args.output if stream else None, max_shard_size=max_shard,
                       activation_budget=budget, force=args.force, resume_dir=resume_dir, resume=args.resume,
                       checkpoint_every=args.checkpoint_every,
                       offload_dir=args.offload_dir or os.path.dirname(os.path.abspath(args.output)), **options)
    if decode_ref is not None:
        _record_decode_choice(m, *decode_ref)
    out = args.output if stream else api.save(m, args.output, max_shard_size=max_shard, force=args.force)
    bpw, nbytes, n = size.linear_bits(m.model)
    sparsity = rec["method"].get("sparsity")
    what = f"{bpw:.3f} bits/weight" + (f", {100 * sparsity:.1f}% zeros" if sparsity is not None else "")
    log(f"done in {rec['quantize_seconds']:.1f} s: {what} over {n / 1e6:.1f}M linear weights -> {out}")
    if rec.get("runner"):
        r = rec["runner"]
        if r.get("resumed_blocks"):
            log(f"resumed: {r['resumed_blocks']} finished blocks taken from the interrupted run")
        spilled = f", {r['spilled_bytes'] / 2**20:.0f} MiB of them spilled to disk" if r.get("spilled_bytes") else ""
        log(f"runner peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB (start {r['rss_at_start_bytes'] / 2**20:.0f} MiB, "
            f"activations {r['activation_bytes'] / 2**20:.0f} MiB{spilled})")
    log(f"process peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB; checkpoint {rec.get('shards', 1)} shard(s)")
    return 0


def _decode_reference(m, stream: bool, device: str):
    """(ids, the float model's step log-probabilities) for `lowbit.runtime.defaults`, or None
    (a streamed or non-CPU run, a model the lean decoder does not run, no tokenizer)."""
    from lowbit.runtime import defaults

    if stream or device != "cpu" or m.tokenizer is None or not defaults.decodable(m.model):
        return None
    ids = defaults.measurement_ids(m.tokenizer)
    return ids, defaults.reference_steps(m.model, ids)


def _record_decode_choice(m, ids, ref) -> None:
    """The checkpoint's default activation path, measured (`lowbit.runtime.defaults`)."""
    from lowbit.runtime import defaults

    d = defaults.choose(m.model, ids, ref)
    if d is None:
        return
    m.record["decode"] = d
    log(f"decode default: {'int8' if d['int8_activations'] else 'float'} activations (step KL to the float model "
        f"{d['step_kl_int8']:.4g} with int8 vs {d['step_kl_float']:.4g} with float over {d['tokens']} tokens; "
        f"int8 when within {100 * d['tolerance']:.0f} % or +{d['abs_tolerance']:.3g})")
