"""lowbit command line: quantize, eval, compare, demo.

Every command accepts an optional MODEL; omitted, it means the embedded default model
(SmolLM2-135M-Instruct). Bad input ends with a one-line ``lowbit: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from lowbit import __version__
from lowbit.errors import LowbitError


def _log(msg: str) -> None:
    from lowbit.core.processes import is_main

    if is_main():  # split over processes (torchrun): process 0 speaks for all
        print(f"lowbit: {msg}", file=sys.stderr, flush=True)


# -- argument groups -----------------------------------------------------------------------------
def _add_scheme_args(p: argparse.ArgumentParser) -> None:
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


def _add_large_model_args(p: argparse.ArgumentParser) -> None:
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


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", metavar="FILE", help="evaluate on this text file (default: bundled held-out text)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text to score (default: 16384)")
    p.add_argument("--ctx", type=int, default=512, help="context window of the perplexity protocol (default: 512)")
    p.add_argument("--no-latency", action="store_true", help="skip prefill/decode timing")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def _scheme(args, method_cls):
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
        if any(given):
            raise LowbitError(f"method {method_cls.name} has its own number format; it takes no --bits/--group-size/"
                              "--asym/... flags")
        return None
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


def _options(args, method_cls) -> dict:
    """--option KEY=VALUE pairs, converted to the type of the method's config field."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(method_cls.config_cls) if f.name != "scheme"}
    out = {}
    observer = getattr(args, "observer", None)
    for item in list(args.option) + ([f"observer={observer}"] if observer else []):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise LowbitError(f"--option expects KEY=VALUE, got {item!r}")
        if key not in fields:
            raise LowbitError(f"method {method_cls.name} has no option {key!r}; options: {', '.join(sorted(fields)) or 'none'}")
        default = getattr(method_cls.config_cls(), key)
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


def _settings(args, latency_default=True):
    from lowbit.eval.quality import PplProtocol
    from lowbit.evaluate import EvalSettings

    if args.max_tokens <= 0 or args.ctx <= 1:
        raise LowbitError("--max-tokens must be positive and --ctx at least 2")
    if args.text:
        from lowbit.data.texts import load_text

        load_text(args.text)  # a bundled split name or a readable text file; one-line error otherwise
    return EvalSettings(text=args.text or "evaluation", protocol=PplProtocol(ctx=args.ctx, max_tokens=args.max_tokens),
                        latency=latency_default and not args.no_latency, device=args.device)


# -- commands ------------------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    from lowbit import api
    from lowbit.core.registry import get_method

    method_cls = get_method(args.method)  # unknown method -> clear error before any loading
    scheme = _scheme(args, method_cls)
    options = _options(args, method_cls)
    try:
        from lowbit.algorithms.base import make_method

        make_method(args.method, scheme, **options)  # invalid settings -> clear error before loading
    except TypeError as e:
        raise LowbitError(f"invalid settings for {args.method}: {e}") from None
    if args.samples <= 0 or args.seq_len <= 1:
        raise LowbitError("--samples must be positive and --seq-len at least 2")
    if args.calib:
        from lowbit.data.texts import load_text

        load_text(args.calib)  # a bundled split name or a readable text file; one-line error otherwise
    max_shard = parse_bytes(args.max_shard_size, "--max-shard-size")
    budget = parse_bytes(args.activation_budget, "--activation-budget", allow_zero=True)
    stream = args.stream
    if not stream and args.no_stream is False:
        dtype = api.compute_dtype(args.dtype, args.device)
        stream = api.should_stream(args.model, dtype)
        if stream:
            _log(f"the weights would take more than half of the available memory in {str(dtype)[6:]}: streaming "
                 "them block by block (--no-stream to load them whole)")
    m = api.load(args.model, dtype=args.dtype, device=args.device, stream=stream)
    fields = method_cls.config_cls.__dataclass_fields__
    # a pruner's scheme only matters when it also quantizes (SparseGPT's quantize=true)
    quantizes = options.get("quantize", getattr(method_cls.config_cls(), "quantize", True))
    shown = scheme if scheme is not None and quantizes else None
    verb = "pruning" if "sparsity" in fields else "quantizing"
    how = f"{str(m.extra['dtype'])[6:]}{', streamed' if stream else ''}"
    _log(f"{verb} {m.name} with {args.method}{' ' + shown.short_name() if shown else ''} on {args.device} ({how})")
    rec = api.quantize(m, args.method, scheme, calibration_text=args.calib, n_samples=args.samples,
                       seq_len=args.seq_len, device=args.device, force_runner=args.sequential,
                       head=getattr(args, "head", None), embed=getattr(args, "embed", None),
                       output=args.output if stream else None, max_shard_size=max_shard,
                       activation_budget=budget, offload_dir=args.offload_dir, **options)
    out = args.output if stream else api.save(m, args.output, max_shard_size=max_shard)
    bpw, nbytes, n = api.linear_bits(m.model)
    sparsity = rec["method"].get("sparsity")
    what = f"{bpw:.3f} bits/weight" + (f", {100 * sparsity:.1f}% zeros" if sparsity is not None else "")
    _log(f"done in {rec['quantize_seconds']:.1f} s: {what} over {n / 1e6:.1f}M linear weights -> {out}")
    if rec.get("runner"):
        r = rec["runner"]
        spilled = f", {r['spilled_bytes'] / 2**20:.0f} MiB of them spilled to disk" if r.get("spilled_bytes") else ""
        _log(f"runner peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB (start {r['rss_at_start_bytes'] / 2**20:.0f} MiB, "
             f"activations {r['activation_bytes'] / 2**20:.0f} MiB{spilled})")
    _log(f"process peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB; checkpoint {rec.get('shards', 1)} shard(s)")
    return 0


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


PRUNERS = ("magnitude", "wanda", "sparsegpt")


def cmd_prune(args) -> int:
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
    rc = cmd_quantize(ns)
    if args.storage != "dense":  # rewrite the pruned layers in a sparse format (lowbit.algorithms.sparse_storage)
        from lowbit.algorithms.sparse_storage import restore_checkpoint
        from lowbit.core import processes

        # split over processes: process 0 rewrites the checkpoint it wrote, the others wait
        info = processes.gather(lambda: restore_checkpoint(args.output, args.storage) if processes.is_main()
                                else None)[0]
        _log(f"stored {args.storage}: " + ", ".join(f"{sum(1 for f in info['layers'].values() if f == k)} {k}"
                                                    for k in sorted(set(info["layers"].values()))))
    return rc


def cmd_eval(args) -> int:
    from lowbit import api
    from lowbit.evaluate import compare, render

    settings = _settings(args)
    m = api.load(args.model)
    variants = {}
    if m.record is not None:
        base = api.load(api.base_spec(m))
        variants["original"] = base
        variants[m.name] = m
    else:
        variants[m.name] = m
    rows = compare(variants, next(iter(variants)), settings)
    print(render(rows, markdown=args.markdown))
    return 0


def cmd_compare(args) -> int:
    from lowbit import api
    from lowbit.evaluate import compare, render, write_plot

    settings = _settings(args)
    loaded = [api.load(s) for s in args.models]
    bases = {api.base_spec(m) for m in loaded if m.record is not None}
    base_spec = args.baseline or (bases.pop() if len(bases) == 1 else None)
    if base_spec is None and not args.baseline:
        raise LowbitError("the variants come from different base models; name the original with --baseline")
    variants = {"original": api.load(base_spec)}
    for m in loaded:
        name = m.name
        while name in variants:
            name += "'"
        variants[name] = m
    rows = compare(variants, "original", settings)
    print(render(rows, markdown=args.markdown))
    if args.plot:
        write_plot(rows, args.plot, f"{variants['original'].name}: perplexity vs bits/weight")
        _log(f"plot written to {args.plot}")
    return 0


DEMO_VARIANTS = [
    ("rtn-int8-channel", dict(bits=8, group_size=None, asym=False)),
    ("rtn-int4-g128", dict(bits=4, group_size=128, asym=False)),
    ("rtn-int4-g128-asym", dict(bits=4, group_size=128, asym=True)),
    ("rtn-int3-g128-asym", dict(bits=3, group_size=128, asym=True)),
]


def cmd_demo(args) -> int:
    from lowbit import api
    from lowbit.core.scheme import scheme_from_args
    from lowbit.eval.quality import PplProtocol
    from lowbit.evaluate import EvalSettings, compare, render, write_plot

    t0 = time.perf_counter()
    base = api.load(args.model)
    variants = {"original (fp32)": base}
    for name, kw in DEMO_VARIANTS:
        m = api.load(args.model)
        api.quantize(m, "rtn", scheme_from_args(**kw), progress=False)
        m.path = api.save(m, os.path.join(args.out_dir, name))
        m.name = name
        variants[name] = m
        _log(f"{name}: quantized in {m.record['quantize_seconds']:.1f} s -> {m.path}")
    settings = EvalSettings(protocol=PplProtocol(ctx=512, max_tokens=args.max_tokens), device=args.device,
                            decode_tokens=8, latency_repeats=2)
    rows = compare(variants, "original (fp32)", settings)
    table = render(rows)
    print(table)
    plot = write_plot(rows, os.path.join(args.out_dir, "ppl_vs_bits.png"), f"{base.name}: RTN perplexity vs bits/weight")
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(render(rows, markdown=True) + "\n")
    _log(f"{rows[0]['n_tokens']} held-out tokens scored; plot {plot}; total {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_methods(args) -> int:
    import dataclasses

    from lowbit.core.registry import available, get_method

    width = max(len(n) for n in available("method"))
    for name in available("method"):
        cls = get_method(name)
        cfg = cls.config_cls()
        settings = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "scheme")
        scheme = getattr(cfg, "scheme", None)
        data = "calibration data" if cls.needs_calibration else "data-free"
        line = f"{name:{width}s} {data:16s} {scheme.short_name() if scheme else '(own format)'}"
        print(line + (f"  [{settings}]" if settings else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs and measure what it cost, on a CPU.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", nargs="?", help="model (default: the embedded SmolLM2-135M-Instruct)")
    _add_scheme_args(q)
    q.add_argument("--head", choices=("int8", "int6", "int4"),
                   help="also quantize the output layer (lm_head) with RTN: int8 per channel, int6 g16 (Q6_K-like) "
                        "or int4 g32 (untied from the embedding; default: keep it in float)")
    q.add_argument("--embed", choices=("int8", "int6", "int4"),
                   help="also quantize the token embedding, row by row, as --head does (default: keep it in float, "
                        "in the source's dtype)")
    _add_large_model_args(q)
    q.add_argument("-o", "--output", required=True, help="output directory")
    q.set_defaults(func=cmd_quantize)

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
    _add_large_model_args(pr)
    pr.add_argument("-o", "--output", required=True, help="output directory")
    pr.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="perplexity, KL to the original, size and speed of one model")
    e.add_argument("model", nargs="?", help="model or lowbit checkpoint (default: embedded model)")
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="one table for several quantized variants of one model")
    c.add_argument("models", nargs="+", help="lowbit checkpoints (and/or models) to compare")
    c.add_argument("--baseline", help="original model (default: the one the checkpoints record)")
    c.add_argument("--plot", default="compare.png", help="PNG plot of perplexity vs bits/weight (default: compare.png)")
    _add_eval_args(c)
    c.set_defaults(func=cmd_compare)

    mt = sub.add_parser("methods", help="list the quantization methods and their default settings")
    mt.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="quantize the embedded model with RTN at 8/4/3 bits and print the table")
    d.add_argument("model", nargs="?", help="model (default: embedded SmolLM2-135M-Instruct)")
    d.add_argument("--out-dir", default="lowbit-demo", help="where checkpoints, table and plot go")
    d.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens to score (default: 8192)")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)

    from lowbit.commands import register_all

    register_all(sub)
    return p


def quiet_transformers() -> None:
    """lowbit prints its own progress; transformers' per-load bars and warnings are noise here."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present, but never fatal
        pass


# Commands that split their work over the processes torchrun starts (`lowbit.core.processes`).
SCALE_OUT = ("quantize", "prune")


def main(argv: list[str] | None = None) -> int:
    from lowbit.core import processes

    args = build_parser().parse_args(argv)
    quiet_transformers()
    try:
        if processes.launched_by_torchrun():
            if args.command not in SCALE_OUT:
                raise LowbitError(f"lowbit {args.command} runs in one process; only {' and '.join(SCALE_OUT)} "
                                  "split over the processes torchrun starts")
            args.device = processes.init_from_env(args.device)
        return args.func(args)
    except processes.PeerError as e:  # the failing process prints its own error
        if processes.is_main():
            print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    finally:
        processes.finish()


if __name__ == "__main__":
    sys.exit(main())
