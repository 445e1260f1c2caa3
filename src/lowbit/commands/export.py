"""``lowbit export``: write a model in a format other runtimes load.

    lowbit export [MODEL_OR_OUT] --format gguf --type Q4_K_M [--imatrix] -o model.gguf
    lowbit export OUT --format compressed-tensors [--dtype float16] [--activations int8-dynamic] -o OUT_DIR
    lowbit export OUT --format aqlm [--dtype float32] -o OUT_DIR      (a model quantized with --method aqlm)

One function per format (`EXPORTERS`); each takes the loaded model (or checkpoint) and the
parsed arguments and returns a one-line summary.
"""

from __future__ import annotations


from lowbit.commands._args import add_output_args, claimed_output
from lowbit.commands._args import log as _log
from lowbit.errors import LowbitError

GGUF_HELP = """\
GGUF types: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K TQ1_0 TQ2_0 (every 2-D
weight in that type, the output matrix in Q6_K for the quantized ones, as llama.cpp does), or the
mixes Q3_K_M Q4_K_M Q5_K_M (llama.cpp's rules for which tensors get more bits). Rows not a multiple
of 256 fall back as in llama.cpp (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> IQ4_NL).
A lowbit quantized checkpoint is exported from its dequantized weights (re-quantized to the GGUF
type), except where a layer's own codes fit the type: affine layers (GPTQ, RTN, AWQ) whose groups
are whole blocks of 32 with float16 scales keep their codes in Q8_0 (symmetric up to 8 bits),
Q5_0 (up to 5), Q4_0 (up to 4), and the summary counts them; and BitNet layers: their ternary (or binary)
codes and scale are written unchanged as TQ2_0 (TQ1_0 with --type TQ1_0), rows not a multiple of
256 as Q4_0 holding the same values exactly; --type then sets the other tensors (default Q8_0).
BitNet layers with their own norm (norm=True) cannot be exported."""


def _export_gguf(m, args) -> str:
    from lowbit.export.gguf import collect_imatrix, export_gguf

    qtype = args.type or "Q8_0"
    imatrix = None
    if args.imatrix:
        text = None
        if args.calib:
            from lowbit.data.texts import load_text

            text = load_text(args.calib)
        _log(f"collecting the importance matrix ({args.samples} x {args.seq_len} calibration tokens)…")
        imatrix = collect_imatrix(m, n_samples=args.samples, seq_len=args.seq_len, text=text)
    patterns = []
    for spec in args.tensor_type or ():
        pat, sep, t = spec.rpartition("=")
        if not sep or not pat or not t:
            raise LowbitError(f"--tensor-type takes PATTERN=TYPE (e.g. ffn_down=Q6_K), got {spec!r}")
        patterns.append((pat, t))
    rep = export_gguf(m, args.output, qtype, imatrix=imatrix, force=args.force, tensor_patterns=patterns or None)
    types = ", ".join(f"{k} x{v}" for k, v in rep.types.items())
    exact = ""
    if rep.ternary:
        counts: dict[str, int] = {}
        for t in rep.ternary.values():
            counts[t] = counts.get(t, 0) + 1
        exact = (f"; {len(rep.ternary)} BitNet layers with their codes and scale unchanged: "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if rep.carried or rep.requantized:
        counts = {}
        for t in rep.carried.values():
            counts[t] = counts.get(t, 0) + 1
        exact += (f"; {len(rep.carried)} quantized layers with their codes and scales unchanged"
                  + (": " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) if counts else "")
                  + f", {len(rep.requantized)} re-quantized")
        if rep.requantized:
            why = sorted(set(rep.requantized.values()))
            exact += f" ({why[0]}{f' and {len(why) - 1} more reasons' if len(why) > 1 else ''})"
    return (f"wrote {rep.path}: GGUF {rep.qtype} ({rep.arch}, {rep.n_tensors} tensors: {types}{exact}; "
            f"{rep.bytes / 1e6:.1f} MB; tokenizer {rep.tokenizer}{'; imatrix' if rep.imatrix else ''}; "
            f"{rep.seconds:.1f} s)")


def _export_compressed_tensors(m, args) -> str:
    try:
        from lowbit.export.compressed_tensors import export_compressed_tensors
    except ImportError:
        raise LowbitError("the compressed-tensors exporter is not available in this version") from None
    if args.type or args.tensor_type:
        raise LowbitError("--type and --tensor-type apply to --format gguf only")
    if args.imatrix or args.calib:
        raise LowbitError("--imatrix and --calib apply to --format gguf only")
    out = export_compressed_tensors(m, args.output, dtype=args.dtype, activations=args.activations,
                                    force=args.force)
    return f"wrote {out if out is not None else args.output}: compressed-tensors"


# -- AQLM (transformers + the aqlm package) ------------------------------------------------------
def _export_aqlm(m, args) -> str:
    from lowbit.export.aqlm import export_aqlm

    if args.type or args.tensor_type or args.imatrix or args.calib or args.activations:
        raise LowbitError("--type, --tensor-type, --imatrix, --calib and --activations do not apply to --format aqlm")
    out = export_aqlm(m, args.output, dtype=args.dtype, force=args.force)
    return f"wrote {out}: AQLM (transformers + aqlm)"
# -- end AQLM ------------------------------------------------------------------------------------


EXPORTERS = {"gguf": _export_gguf, "compressed-tensors": _export_compressed_tensors, "aqlm": _export_aqlm}


def run(args) -> int:
    from lowbit import api

    if args.format not in EXPORTERS:
        raise LowbitError(f"unknown export format {args.format!r}; choose one of {', '.join(EXPORTERS)}")
    if args.format == "gguf":
        from lowbit.export.gguf import EXPORT_TYPES

        if args.dtype is not None or args.activations is not None:
            raise LowbitError("--dtype and --activations apply to --format compressed-tensors only")

        if args.type is not None and args.type not in EXPORT_TYPES:
            raise LowbitError(f"unknown GGUF type {args.type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    with claimed_output(args, args.format):
        m = api.load(args.model)
        _log(EXPORTERS[args.format](m, args))
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser(
        "export",
        help="write a model as GGUF (llama.cpp), compressed-tensors (transformers/vLLM) or AQLM (transformers + aqlm)",
        description="Write MODEL_OR_OUT (a model, or a lowbit checkpoint directory) for another runtime.\n\n"
                    + GGUF_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="MODEL_OR_OUT",
                   help="builtin name, HF directory, .gguf file or lowbit checkpoint (default: the embedded model)")
    p.add_argument("--format", default="gguf", help="gguf (default), compressed-tensors or aqlm")
    p.add_argument("--type", help="GGUF tensor type or mix, e.g. Q4_K_M, Q8_0, F16, TQ2_0 (default: Q8_0; BitNet layers: TQ2_0, "
                        "or TQ1_0 if asked)")
    p.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="gguf: write the tensors whose GGUF name matches the regular expression PATTERN as TYPE "
                        "(repeatable, later ones win; as llama.cpp's --tensor-type), e.g. ffn_down=Q6_K "
                        r"'blk\.(0|1)\.attn_.*=Q8_0'")
    p.add_argument("--imatrix", action="store_true",
                   help="collect an importance matrix on calibration text and weight the GGUF scale searches by it")
    p.add_argument("--calib", metavar="FILE", help="calibration text for --imatrix (default: bundled text)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples for --imatrix (default: 16)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sample length (default: 512)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="compressed-tensors, aqlm: dtype of the float tensors and scales (default: the model's)")
    p.add_argument("--activations", choices=("int8-dynamic",),
                   help="compressed-tensors: int8-dynamic writes W8A8 (int8 weights per channel, int8 "
                        "activations per token at run time); default weight-only")
    add_output_args(p, "output file (.gguf) or directory")
    p.set_defaults(func=run)
