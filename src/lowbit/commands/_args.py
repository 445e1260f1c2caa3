"""What several subcommands share: their argument groups (scheme, large-model, evaluation flags),
the translation of those flags into a scheme, method options and evaluation settings, byte sizes
on the command line, and the stderr log line.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from lowbit.errors import LowbitError


from lowbit.core.log import log  # noqa: E402,F401 (the commands' log line)


@contextlib.contextmanager
def results_file(path: str, fresh: bool = False):
    """The `lowbit.eval.results.ResultsFile` at ``path`` ('' for none: yields None), checked before
    any work and locked against a concurrent run for the whole command."""
    if not path:
        yield None
        return
    from lowbit import outputs
    from lowbit.eval.results import ResultsFile

    outputs.check_file(path)
    with outputs.lock(path):
        yield ResultsFile(path, fresh=fresh)  # an existing file that is not a results file: refused here


#--------------------------------------------------------------------------


MAX_CALIBRATION_TOKENS = 1 << 22  # samples x seq-len: 16x GPTQ's usual 128 x 2048
MAX_GROUP_SIZE = 1 << 20


def check_common_args(args) -> None:
    """Bounds on the arguments several commands share, checked before any work: a one-line
    error, or a clamp that is reported (threads), never minutes of work that fail later."""
    import re

    dev = getattr(args, "device", None)
    if isinstance(dev, str):
        m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", dev)
        if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
            raise LowbitError(f"unknown device {dev!r}; use cpu, cuda or cuda:N")
        if m.group(1) == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise LowbitError(f"device {dev} requested but CUDA is not available")
            if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
                raise LowbitError(f"device {dev} requested but there are {torch.cuda.device_count()} CUDA devices")
    threads = getattr(args, "threads", None)
    if threads is not None:
        cpus = os.cpu_count() or 1
        if threads < 1:
            raise LowbitError(f"--threads must be at least 1, got {threads}")
        if threads > cpus:
            log(f"--threads {threads} is more than the {cpus} CPUs here; using {cpus}")
            args.threads = cpus
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise LowbitError(f"--seed must be between 0 and 2^63-1, got {seed}")
    g = getattr(args, "group_size", None)
    if g is not None and g != -1 and not 1 <= g <= MAX_GROUP_SIZE:
        raise LowbitError(f"--group-size must be -1 (per channel) or 1..{MAX_GROUP_SIZE}, got {g}")
    samples, seq_len = getattr(args, "samples", None), getattr(args, "seq_len", None)
    if samples is not None and seq_len is not None:
        if samples < 1 or seq_len < 2:
            raise LowbitError("--samples must be positive and --seq-len at least 2")
        if samples * seq_len > MAX_CALIBRATION_TOKENS:
            raise LowbitError(f"--samples x --seq-len is {samples * seq_len:,} calibration tokens; at most "
                              f"{MAX_CALIBRATION_TOKENS:,} are taken")


def add_output_args(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("-o", "--output", required=True, help=help)
    p.add_argument("--force", action="store_true",
                   help="replace an existing output even if it holds files lowbit did not write (or, for a "
                        "file, is not of the kind being written)")


def _inputs(args) -> list[str]:
    model = getattr(args, "model", None)
    return [model] if model and os.path.exists(os.path.expanduser(model)) else []


@contextlib.contextmanager
def claimed_output(args, kind: str = "checkpoint"):
    """Check ``args.output`` before any work and hold its write lock for the whole command
    (process 0 of a torchrun group, which alone writes). ``kind``: "checkpoint",
    "compressed-tensors" (directories) or "gguf" (a file)."""
    from lowbit import outputs
    from lowbit.core.processes import is_main

    if kind == "gguf":
        outputs.check_file(args.output, b"GGUF", force=args.force, inputs=_inputs(args))
    else:
        from lowbit.checkpoint import RECORD
        from lowbit.export.compressed_tensors import EXPORT_RECORD

        record = EXPORT_RECORD if kind == "compressed-tensors" else RECORD
        outputs.check_dir(args.output, record, force=args.force, inputs=_inputs(args))
    with outputs.lock(args.output) if is_main() else contextlib.nullcontext():
        yield


#--------------------------------------------------------------------------


def add_scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rtn", help="quantization method (default: rtn; see `lowbit methods`)")
    p.add_argument("--bits", type=int, help="bits per weight, 2-8 (default: the method's, 4 for rtn)")
    p.add_argument("--group-size", type=int,
                   help="columns sharing one scale; -1 = per output channel (default: the method's, 128 for rtn)")
    p.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    p.add_argument("--per-tensor", action="store_true", help="one scale for the whole tensor")
    p.add_argument("--asym", action="store_true", help="asymmetric with an integer zero-point")
    p.add_argument("--float-zero", action="store_true", help="asymmetric with a real-valued zero-point (Q4_1/HQQ style)")
    p.add_argument("--sym", action="store_true", help="symmetric (absmax), for methods whose default is asymmetric")
    p.add_argument("--restricted", action="store_true", help="restricted integer range (e.g. -127..127)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting, e.g. --option damp=0.1 --option act_order=false (repeatable)")
    p.add_argument("--observer", choices=["minmax", "moving-minmax", "entropy", "mse", "percentile"],
                   help="activation range observer of static-int8 (same as --option observer=NAME)")
    p.add_argument("--calib", metavar="FILE", help="calibration text file (default: bundled text)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default: 32)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sample length (default: 512)")
    p.add_argument("--device", default="cpu", help="device for calibration/evaluation: cpu, cuda, cuda:1 ...")
    p.add_argument("--sequential", action="store_true",
                   help="run a data-free method (rtn) through the block-by-block calibration runner too "
                        "(same result; reports the runner's peak memory)")


def add_large_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stream", action="store_true",
                   help="read, quantize and write one block at a time: peak memory is about one block, the "
                        "calibration activations and the embedding, never the whole model (default: automatic when "
                        "the weights in the compute dtype would take more than half of the available memory)")
    g.add_argument("--no-stream", action="store_true", help="load the whole model even if it looks too large")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype blocks are loaded and computed in (default: float32 on the CPU, the checkpoint's own "
                        "dtype on a GPU)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard of the output (default: 5GB; one model.safetensors if it fits)")
    p.add_argument("--activation-budget", default="2GiB",
                   help="calibration activations kept in memory; the rest go to files in --offload-dir (default: 2GiB)")
    p.add_argument("--offload-dir", metavar="DIR",
                   help="where spilled activations go (default: a temporary folder beside the output, removed after)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue an interrupted run of a calibrated method (GPTQ, AWQ, SparseGPT, ...) from the blocks "
                        "it finished, to the same result (--no-resume: discard them and start over; without either, "
                        "a run that finds them stops and asks)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="how often a calibrated run saves the hidden states after its last finished block for "
                        "--resume (default: 60; 0 = after every block; finished blocks are always kept)")
    p.add_argument("--reproducible", action="store_true",
                   help="matrix products that give the same bits on any number of threads (MKL's strict reproducible "
                        "mode, about 1.6x slower products), so that a torchrun run and a one-process run write the "
                        "same checkpoint at real model sizes; pass it to both")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", metavar="FILE", help="evaluate on this text file (default: bundled held-out text)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text to score (default: 16384)")
    p.add_argument("--ctx", type=int, default=512, help="context window of the perplexity protocol (default: 512)")
    p.add_argument("--no-latency", action="store_true", help="skip prefill/decode timing")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--reference", choices=("auto", "memory", "hidden", "topk"), default=None,
                   help="how the original is compared: memory = loaded beside each variant; hidden = its output-layer "
                        "inputs computed once (streamed block by block), cached, exact; topk = its top-k log-probs "
                        "+ tokens sampled from the rest, cached, compact, KL estimated (standard error and audited "
                        "error shown); auto (default) = memory when both fit, else hidden")
    p.add_argument("--topk", type=int, help="k of --reference topk: most likely tokens stored per position "
                   "(default 32; implies --reference topk)")
    p.add_argument("--tail-samples", type=int, metavar="M",
                   help="M of --reference topk: tokens sampled per position from the others to estimate their part "
                        "of the KL (default 64; 0 = one bucket, a lower bound; implies --reference topk)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where cached references live (default: $LOWBIT_CACHE/reference or ~/.cache/lowbit/reference)")
    p.add_argument("--activation-budget", type=int, metavar="MIB",
                   help="activations kept in memory while streaming the original (default: a quarter of the "
                        "available memory); the rest goes to temporary files")
    p.add_argument("--spill-dir", metavar="DIR", help="where those temporary files go (default: the temp directory)")
    p.add_argument("--int8-activations", action="store_true",
                   help="score and time quantized layers with int8-quantized activations where their format has "
                        "such a product (affine 2/4/8-bit: W4A8 as llama.cpp's Q4_0 x Q8_0): the path `lowbit "
                        "generate` takes for a checkpoint that recorded it. Default: float activations")


def scheme_from_flags(args, method_cls):
    """The method's default scheme with the command line's flags applied (None if the method
    takes no scheme)."""
    import dataclasses

    from lowbit.core.scheme import QuantScheme

    fields = {f.name: f for f in dataclasses.fields(method_cls.config_cls)}
    if args.group_size is not None and args.group_size <= 0 and args.group_size != -1:
        raise LowbitError(f"--group-size must be a positive integer or -1 (per-channel), got {args.group_size}")
    given = [args.bits is not None, args.group_size is not None, args.per_channel, args.per_tensor, args.asym,
             args.float_zero, args.sym, args.restricted]
    if "scheme" not in fields:
        if any(given[1:]) or (given[0] and "bits" not in fields):
            raise LowbitError(f"method {method_cls.name} has its own number format; it takes no "
                              f"{'' if 'bits' in fields else '--bits/'}--group-size/--asym/... flags")
        return None  # --bits, where the method has its own `bits` setting, is an option (options_from_flags)
    if sum([args.asym, args.float_zero, args.sym]) > 1:
        raise LowbitError("--asym, --float-zero and --sym are mutually exclusive")
    if sum([args.per_channel, args.per_tensor, args.group_size is not None and args.group_size != -1]) > 1:
        raise LowbitError("--per-channel, --per-tensor and --group-size N are mutually exclusive")
    base = method_cls.config_cls().scheme
    d = base.to_dict()
    if args.bits is not None:
        d["bits"] = args.bits
    if args.per_tensor:
        d.update(granularity="tensor", group_size=None)
    elif args.per_channel or args.group_size == -1:
        d.update(granularity="channel", group_size=None)
    elif args.group_size is not None:
        d.update(granularity="group", group_size=args.group_size)
    if args.sym:
        d.update(symmetric=True, zero_point="int")
    elif args.asym:
        d.update(symmetric=False, zero_point="int")
    elif args.float_zero:
        d.update(symmetric=False, zero_point="float")
    if args.restricted:
        d["restricted_range"] = True
    return QuantScheme(**d)


def options_from_flags(args, method_cls) -> dict:
    """--option KEY=VALUE pairs, converted to the type of the method's config field (or of the
    option every method takes, such as ``lkd_steps``)."""
    import dataclasses

    from lowbit.algorithms.base import wrapper_options
    from lowbit.training import lkd  # noqa: F401 (registers the lkd_* options)

    all_fields = {f.name: f for f in dataclasses.fields(method_cls.config_cls)}
    fields = {n: f for n, f in all_fields.items() if n != "scheme"}
    extra = {k: t for k, t in wrapper_options().items() if k not in fields}
    out = {}
    observer = getattr(args, "observer", None)
    if getattr(args, "bits", None) is not None and "bits" in fields and "scheme" not in all_fields:
        out["bits"] = args.bits  # a method with its own number format and a `bits` setting (QuIP#, AQLM)
    for item in list(args.option) + ([f"observer={observer}"] if observer else []):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise LowbitError(f"--option expects KEY=VALUE, got {item!r}")
        if key not in fields and key not in extra:
            raise LowbitError(f"method {method_cls.name} has no option {key!r}; options: "
                              f"{', '.join(sorted(fields) + sorted(extra)) or 'none'}")
        default = getattr(method_cls.config_cls(), key) if key in fields else extra[key]()
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                val = raw.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                val = int(raw)
            elif isinstance(default, float):
                val = float(raw)
            else:
                val = raw
        except ValueError:
            raise LowbitError(f"option {key} expects a {type(default).__name__}, got {raw!r}") from None
        out[key] = val
    return out


def eval_settings(args, latency_default=True):
    from lowbit.eval.quality import PplProtocol
    from lowbit.eval.compare import EvalSettings

    if args.max_tokens <= 0 or args.ctx <= 1:
        raise LowbitError("--max-tokens must be positive and --ctx at least 2")
    if args.text:
        from lowbit.data.texts import load_text

        load_text(args.text)  # a bundled split name or a readable text file; one-line error otherwise
    topk_flags = [f for f, v in (("--topk", args.topk), ("--tail-samples", args.tail_samples)) if v is not None]
    reference = args.reference or ("topk" if topk_flags else "auto")
    if topk_flags and reference != "topk":
        raise LowbitError(f"{topk_flags[0]} applies to --reference topk, not --reference {reference}")
    if args.topk is not None and args.topk < 1:
        raise LowbitError(f"--topk must be a positive integer, got {args.topk}")
    if args.tail_samples is not None and args.tail_samples < 0:
        raise LowbitError(f"--tail-samples must be an integer >= 0, got {args.tail_samples}")
    if args.activation_budget is not None and args.activation_budget < 0:
        raise LowbitError(f"--activation-budget must be >= 0 MiB, got {args.activation_budget}")
    if args.int8_activations:
        log("int8 activations: quantized layers whose format has an int8 product run it (prompts and decode "
            "steps alike), as `lowbit generate` does for a checkpoint that recorded it")
    return EvalSettings(text=args.text or "evaluation", protocol=PplProtocol(ctx=args.ctx, max_tokens=args.max_tokens),
                        latency=latency_default and not args.no_latency, device=args.device,
                        reference=reference, topk=args.topk or 32,
                        tail_samples=64 if args.tail_samples is None else args.tail_samples, cache_dir=args.cache_dir,
                        activation_budget=None if args.activation_budget is None else args.activation_budget * 2**20,
                        spill_dir=args.spill_dir, int8_activations=args.int8_activations)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, flag: str, allow_zero: bool = False) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``123456`` -> bytes (one-line error otherwise)."""
    import re

    mt = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = mt.group(2).upper() if mt else None
    if mt is None or unit not in _UNITS:
        raise LowbitError(f"{flag} expects a size such as 5GB, 500MB or 2GiB, got {text!r}")
    n = int(float(mt.group(1)) * _UNITS[unit])
    if n < 0 or (n == 0 and not allow_zero):
        raise LowbitError(f"{flag} must be positive, got {text!r}")
    return n


def add_activation_args(p: argparse.ArgumentParser) -> None:
    """--int8-activations / --float-activations (default: the checkpoint's measured choice)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--int8-activations", dest="int8_activations", action="store_const", const=True, default=None,
                   help="decode steps quantize activations to int8 for affine weights (W4A8, as llama.cpp's "
                        "Q4_0 x Q8_0; faster, slightly different numbers). Default: what `lowbit quantize` measured "
                        "for this checkpoint (int8 when its step KL is within 5%% of float activations')")
    g.add_argument("--float-activations", dest="int8_activations", action="store_const", const=False,
                   help="decode with float activations (W4A16) whatever the checkpoint recorded")


def int8_activations(args, m) -> bool:
    """The activation path for ``m`` (flags, else the checkpoint's measured choice), said on stderr."""
    from lowbit.runtime.defaults import has_int8_rows, resolve

    on, why = resolve(m.record, args.int8_activations)
    if has_int8_rows(m.model):
        log(f"{'int8' if on else 'float'} activations ({why})")
    return on
