"""Two bits that work: QuIP# and AQLM against GPTQ and llama.cpp's Q2_K, quality, size, time and
decode speed, side by side in one run.

    python -P bench/two_bits.py [--model smollm2-135m|gemma3-270m] [--variants all|NAME,...]
                                [--out out/two-bits] [--max-tokens 16384] [--no-speed] [--markdown]

Steps (every finished step is kept, so an interrupted run goes on where it stopped):

1. quantize the same float model with each variant (lowbit's default calibration: 32 samples of
   512 tokens of the bundled calibration text) into ``OUT/<model>/<variant>`` and append the wall
   time of quantizing (load excluded) to ``OUT/<model>/quantize.jsonl``; a variant whose
   checkpoint and time are there already is not redone. The Q2_K row is lowbit's own GGUF writer
   with an importance matrix collected on the same calibration text (llama.cpp's ``--imatrix``
   recipe), evaluated through lowbit's GGUF loader. ``quip-2-e2e`` and ``quip-2-tuned-e2e`` are
   QuIP#'s end-to-end fine-tuning (paper §5) of ``quip-2`` and of the block-tuned
   ``quip-2-tuned``: ``lowbit distill --student`` trains their sign
   vectors, scales and norms against the original's logits on the same calibration text (40
   steps of 2 windows of 512 tokens: 41k tokens), codes kept; ``quip-2-e2e-2`` is a second
   such run on ``quip-2-e2e`` (a warm restart of the schedule at twice the peak learning rate);
   a distilled variant's time is that of its distillation alone;
2. ``lowbit compare`` of the original and every variant on the held-out text under lowbit's fixed
   perplexity protocol (non-overlapping windows of 512 tokens, ``--max-tokens`` tokens): perplexity,
   KL to the original, top-1 agreement, real bits per linear weight (every stored byte: codes,
   codebooks, scales, sign vectors); rows go to ``OUT/<model>/compare.jsonl`` as they are measured;
3. decode speed (unless ``--no-speed``): lowbit's lean decoder (one C call per token, each layer
   through its format's C kernel), batch 1, a random prompt of 128 ids and 64 greedy tokens, for
   the float model, GPTQ W4 g128 (lowbit's int4) and the 2-bit variants, each also with int8
   activations in the decode step (``lowbit bench --int8-activations``: W4A8 for int4, int8
   lookup tables for AQLM, int8 E8P products where those rows exist), interleaved over
   ``--repeats`` rounds (medians), with the instruction set, threads and load average. The
   "vs int4" ratio is against int4 with float activations.

The table merges the three: each variant's bits/weight, ppl, KL, top-1, quantization time and,
where measured, decode tok/s and its ratio to int4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# name -> how it is made: ("lowbit", method, scheme or None, options), ("gguf", qtype), or
# ("distill", base variant, lowbit distill flags): QuIP#'s end-to-end fine-tuning of a finished
# variant against the original's logits (the sign vectors, scales and norms; codes kept)
VARIANTS = {
    "gptq-w2g64": ("lowbit", "gptq", dict(bits=2, group_size=64), {}),
    "gptq-w2g64-incoherent": ("lowbit", "gptq", dict(bits=2, group_size=64), {"incoherent": True}),
    "gptq-w3g64": ("lowbit", "gptq", dict(bits=3, group_size=64), {}),
    "gptq-w4g128": ("lowbit", "gptq", dict(bits=4, group_size=128), {}),
    "quip-2": ("lowbit", "quip", None, {"bits": 2}),
    "quip-2-tuned": ("lowbit", "quip", None, {"bits": 2, "finetune_steps": 100}),
    "quip-2-e2e": ("distill", "quip-2", ["--steps", "40", "--batch-size", "2", "--micro-batch", "1",
                                         "--seq-len", "512"]),
    "quip-2-e2e-2": ("distill", "quip-2-e2e", ["--steps", "40", "--batch-size", "2", "--micro-batch", "1", "--seq-len",
                                               "512", "--lr", "2e-3"]),
    "quip-2-tuned-e2e": ("distill", "quip-2-tuned", ["--steps", "40", "--batch-size", "2", "--micro-batch", "1",
                                                     "--seq-len", "512"]),
    "quip-3": ("lowbit", "quip", None, {"bits": 3}),
    "quip-4": ("lowbit", "quip", None, {"bits": 4}),
    "aqlm-2x8": ("lowbit", "aqlm", None, {"bits": 2}),
    "aqlm-2x8-tuned": ("lowbit", "aqlm", None, {"bits": 2, "finetune_steps": 100}),
    "aqlm-3x8": ("lowbit", "aqlm", None, {"bits": 3}),
    "q2_k-imatrix": ("gguf", "Q2_K"),
}
SPEED = ("gptq-w4g128", "quip-2", "aqlm-2x8", "gptq-w2g64")  # + the float model


def log(msg: str) -> None:
    print(f"[two_bits] {msg}", file=sys.stderr, flush=True)


def done_times(path: Path) -> dict:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["variant"]] = r
    return out


def variant_path(root: Path, name: str) -> Path:
    return root / (f"{name}.gguf" if VARIANTS[name][0] == "gguf" else name)


def quantize_variant(model: str, name: str, path: Path) -> tuple[float, float]:
    """Make one variant at ``path``; returns the wall and CPU seconds it took (loading excluded;
    the CPU time of all threads varies far less with the machine's load than the wall time). A
    "distill" variant's seconds are its own (the base variant's are in its row)."""
    from lowbit import api
    from lowbit.core.scheme import QuantScheme

    spec = VARIANTS[name]
    if spec[0] == "distill":
        from lowbit.cli import main as lowbit_main

        t0, c0 = time.perf_counter(), time.process_time()
        rc = lowbit_main(["distill", model, "--student", str(variant_path(path.parent, spec[1])), *spec[2],
                          "-o", str(path)])
        if rc:
            raise SystemExit(f"lowbit distill for {name} failed ({rc})")
        return time.perf_counter() - t0, time.process_time() - c0
    m = api.load(model)
    t0, c0 = time.perf_counter(), time.process_time()
    if spec[0] == "gguf":
        from lowbit.export.gguf import collect_imatrix, export_gguf

        imatrix = collect_imatrix(m)
        export_gguf(m, path, spec[1], imatrix=imatrix)
    else:
        _, method, scheme, options = spec
        api.quantize(m, method, None if scheme is None else QuantScheme(**scheme), **options)
        api.save(m, str(path))
    return time.perf_counter() - t0, time.process_time() - c0


def speed_table(model: str, root: Path, names: list[str], repeats: int, threads: int) -> list[dict]:
    """Decode tok/s of the float model and of ``names``, each with float activations and with
    int8 ones (``lowbit bench --int8-activations``: the formats' opt-in int8 rows, W4A8 for int4),
    interleaved rounds, medians."""
    import torch

    from lowbit import api
    from lowbit.runtime import LeanDecoder, measure_lean

    torch.set_num_threads(threads)
    decs = [("float32", LeanDecoder(api.load(model).model, max_len=192))]
    for n in names:
        m = api.load(str(variant_path(root, n)))
        decs += [(n, LeanDecoder(m.model, max_len=192)),
                 (f"{n} int8-act", LeanDecoder(m.model, max_len=192, int8_activations=True))]
    times = {n: [] for n, _ in decs}
    for n, d in decs:  # warm-up
        measure_lean(d, 128, 64, warmup=0, repeats=1)
    for _ in range(repeats):
        for n, d in decs:
            times[n].append(measure_lean(d, 128, 64, warmup=0, repeats=1).decode_tok_s)
    return [{"variant": n, "decode_tok_s": statistics.median(v)} for n, v in times.items()]


def gguf_linear_bits(path: Path) -> tuple[float, dict]:
    """Bits per weight of a GGUF file's block matrices (the linear layers; lowbit's loader hands
    them back dequantized, so compare's column says 32) and how many tensors of each type: a
    K-quant needs rows that are a multiple of 256, and the writer stores narrower ones in a type
    of 32-blocks instead (as llama.cpp does)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    nbytes = n = 0
    types: dict = {}
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2:
            nbytes += int(t.n_bytes)
            n += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return 8 * nbytes / max(n, 1), types


def machine_line(threads: int) -> str:
    from lowbit.kernels import _native

    lib = _native.library("codebook")
    isa = lib.isa() if lib is not None else "no native kernels"
    return f"instruction set {isa}, {threads} threads, load average {os.getloadavg()[0]:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="all", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="out/two-bits")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    from lowbit.cli import main as lowbit_main
    from lowbit.cli import quiet_transformers

    quiet_transformers()
    root = Path(args.out) / Path(args.model).name  # a model folder's name, or the bundled model's
    root.mkdir(parents=True, exist_ok=True)
    times_file = root / "quantize.jsonl"
    i = 0
    while i < len(names):  # a distilled variant needs its base (made first)
        spec = VARIANTS[names[i]]
        if spec[0] == "distill" and spec[1] not in names:
            names.insert(i, spec[1])
            continue
        i += 1
    for name in names:
        path = variant_path(root, name)
        if name in done_times(times_file) and path.exists():
            continue
        log(f"quantizing {name} -> {path}")
        seconds, cpu = quantize_variant(args.model, name, path)
        with open(times_file, "a") as f:
            f.write(json.dumps({"variant": name, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                                "load": round(os.getloadavg()[0], 2)}) + "\n")
        log(f"{name}: {seconds:.0f} s ({cpu:.0f} CPU s, load {os.getloadavg()[0]:.1f})")

    results = root / "compare.jsonl"
    rc = lowbit_main(["compare", *[str(variant_path(root, n)) for n in names], "--baseline", args.model,
                      "--max-tokens", str(args.max_tokens), "--no-latency", "--results", str(results),
                      "--plot", str(root / "compare.png")])
    if rc:
        return rc
    speed = {}
    if not args.no_speed:
        sp = [n for n in SPEED if n in names]
        speed = {r["variant"]: r["decode_tok_s"] for r in speed_table(args.model, root, sp, args.repeats, args.threads)}
    quality = {}
    for line in results.read_text().splitlines():
        r = json.loads(line).get("row") if line.strip() else None
        if r:
            quality[str(r["variant"]).removesuffix(".gguf")] = r  # the latest row of each variant
    times = done_times(times_file)
    int4 = speed.get("gptq-w4g128")
    head = ["variant", "bits/weight", "ppl", "KL", "top-1 %", "quantize s", "CPU s", "decode tok/s", "vs int4"]
    rows = []
    if "float32" in speed or "original" in quality:
        rows.append(["float32 (original)", "32", _f(quality.get("original", {}).get("ppl"), 2), "", "", "", "",
                     _f(speed.get("float32"), 1),
                     f"{speed['float32'] / int4:.2f}x" if int4 and "float32" in speed else ""])
    notes = []
    for n in names:
        q = dict(quality.get(n, {}))
        if VARIANTS[n][0] == "gguf" and variant_path(root, n).is_file():
            q["bpw"], types = gguf_linear_bits(variant_path(root, n))
            notes.append(f"{n}: block tensors {dict(sorted(types.items()))}")
        tok = speed.get(n)
        rows.append([n, _f(q.get("bpw"), 3), _f(q.get("ppl"), 2), _f(q.get("kl"), 4), _f(q.get("top1"), 1),
                     _f(times.get(n, {}).get("seconds"), 0), _f(times.get(n, {}).get("cpu_seconds"), 0),
                     _f(tok, 1), f"{tok / int4:.2f}x" if tok and int4 else ""])
        a8 = speed.get(f"{n} int8-act")
        if a8:
            rows.append([f"  {n}, int8 activations", "", "", "", "", "", "", _f(a8, 1),
                         f"{a8 / int4:.2f}x" if int4 else ""])
    print(render(head, rows, args.markdown))
    for line in notes:
        print(line)
    print(f"{args.model}; {args.max_tokens} held-out tokens; {machine_line(args.threads)}")
    return 0


def _f(v, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(n) for x, n in zip(r, w)) for r in [head, *rows])


if __name__ == "__main__":
    sys.exit(main())
