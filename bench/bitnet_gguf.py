"""A BitNet model in llama.cpp: GGUF TQ2_0 (+ exact Q4_0 rows) against llama.cpp running a Q4_0
export of the float model, side by side in one run.

    python -P bench/bitnet_gguf.py [--checkpoint DIR] [--model smollm2-135m] [--threads 2] [--markdown]

Steps:
1. the BitNet model: ``--checkpoint DIR`` (a lowbit checkpoint whose linears are BitNet layers,
   e.g. from ``lowbit bitnet``), or by default the float model converted with
   ``lowbit.nn.bitlinear.convert(model, 1.58, norm=False)`` and packed WITHOUT training
   (post-training ternary weights: the quality is garbage, which is fine for checking the runtime);
2. lowbit exports it as GGUF TQ2_0: every BitNet layer with its codes and scale unchanged (rows not
   a multiple of 256, SmolLM2's 576-wide inputs, as exact Q4_0), the tied embedding by the ordinary
   rule (Q8_0 where its rows are not a multiple of 256); and the float model as GGUF Q4_0;
3. llama.cpp decodes 64 tokens at batch 1 from each file (greedy; at ``--threads`` threads and at
   1, the files taking turns, best of ``--repeats``), and scores ``--tokens`` tokens of lowbit's
   held-out text; its logits are compared (KL mean, top-1 agreement) with the model each file was
   exported from, run by lowbit in torch: the BitNet file against lowbit's packed BitNet model
   (BitNet's int8-per-token activations, where llama.cpp uses Q8_K / Q8_0 blocks), the Q4_0 file
   against the float model. Two torch-only rows give the scale: the BitNet weights with float
   activations against the packed model (what activation rounding alone does to these logits),
   and the packed model against the float one (the quality the BitNet model starts from).
   Perplexities are over the same tokens.

The 1-thread column is there because llama.cpp's OpenMP threads degrade badly when other work
holds the CPUs (on a busy 2-CPU machine 2 threads were seen 8x slower than 1): read the header's
load average before the speed columns.

llama.cpp's extra CPU buffer types (AMX tiles, weight repacking) are off by default on CPUs with
AMX (``--extra-bufts auto``): a llama.cpp built natively on an AMX machine was seen to crash in
its AMX matmul. TQ2_0 never uses them; Q4_0 would (repacking), so the header says which it was.
Runs under the benchmark lock (/tmp/lowbit-bench.lock) so benchmarks never overlap.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit import api
from lowbit.cli import quiet_transformers
from lowbit.data.texts import default_bos_id, eval_tokens, load_text
from lowbit.eval.report import format_table
from lowbit.errors import LowbitError
from lowbit.export.gguf import export_gguf
from lowbit.integrations import llama_cpp as LC

DEFAULT_MODEL = "smollm2-135m"

def cpu_header(threads: int) -> str:
    """CPU model, its vector instruction sets, threads, load average (`lowbit.runtime.machine`)."""
    from lowbit.runtime import machine

    isa = " ".join(machine.vector_flags()) or "?"
    return (f"CPU: {machine.cpu().name} ({os.cpu_count()} logical CPUs); ISA: {isa}; threads: {threads}; "
            f"load average: {machine.load()}")


def load_llama(path: Path, n_ctx: int, threads: int, logits_all: bool, extra: bool):
    return LC.load(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=logits_all,
                   extra_buffer_types=extra)


def decode_speeds(paths: list[Path], prompt: list[int], n_new: int, threads: int, repeats: int,
                  extra: bool) -> list[float]:
    """Greedy decode tokens/s at batch 1 of each file, best of ``repeats``; the files take turns
    (A B A B ...) so that a change in the machine's load hits them alike. Each run evaluates the
    prompt, then times ``n_new`` single-token llama_decode calls (EOS ignored)."""
    llms = [load_llama(p, len(prompt) + n_new + 8, threads, True, extra) for p in paths]  # one token per call
    best = [0.0] * len(paths)
    try:
        for _ in range(repeats):
            for i, llm in enumerate(llms):
                llm.reset()
                llm.eval(prompt)
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                t0 = time.perf_counter()
                for _ in range(n_new):
                    llm.eval([tok])
                    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                best[i] = max(best[i], n_new / (time.perf_counter() - t0))
    finally:
        for llm in llms:
            llm.close()
    return best


def llama_logits(path: Path, ids: list[int], threads: int, extra: bool) -> torch.Tensor:
    llm = load_llama(path, len(ids) + 8, threads, True, extra)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


def compare(ref: torch.Tensor, got: torch.Tensor, ids: list[int]) -> dict:
    """KL(ref || got) mean per token, top-1 agreement, and both perplexities on the next tokens."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    nxt = torch.tensor(ids[1:])[:, None]
    ppl = lambda l: float(torch.exp(-l[:-1].gather(-1, nxt).mean()))  # noqa: E731
    return dict(kl=float(kl.mean()), kl_max=float(kl.max()), top1=100 * float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
                ppl_ref=ppl(lp), ppl=ppl(lq))


def float_activation_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose BitNet layers are plain linears with weight β·W~ (float activations)."""
    from lowbit.formats.bitnet import BitNetWeight
    from lowbit.nn.linear import QuantizedLinear

    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, QuantizedLinear) and isinstance(mod.weight_format, BitNetWeight):
            out_f, in_f = mod.weight_format.shape
            lin = torch.nn.Linear(in_f, out_f, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight_format.dequantize())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            twin.set_submodule(name, lin)
    return twin


def bitnet_model(args, log):
    """(model, description): the checkpoint, or the float model converted and packed untrained."""
    from lowbit.formats.bitnet import BitNetWeight
    from lowbit.nn.linear import QuantizedLinear

    if args.checkpoint:
        q = api.load(args.checkpoint, dtype="float32")
        n = sum(isinstance(mod, QuantizedLinear) and isinstance(mod.weight_format, BitNetWeight)
                for mod in q.model.modules())
        if not n:
            raise SystemExit(f"{args.checkpoint} has no BitNet layers")
        method = ((q.record or {}).get("method") or {}).get("method", "?")
        return q, f"checkpoint {Path(args.checkpoint).name} (method {method}, {n} BitNet layers)"
    from lowbit.nn.bitlinear import convert

    q = api.load(args.model or DEFAULT_MODEL, dtype="float32")
    t0 = time.perf_counter()
    layers = convert(q.model, 1.58, norm=False)
    for name, bl in layers.items():
        q.model.set_submodule(name, QuantizedLinear(bl.packed(), bl.bias))
    log(f"converted and packed {len(layers)} layers to BitNet b1.58 in {time.perf_counter() - t0:.1f} s")
    return q, f"{q.name} converted to b1.58, untrained ({len(layers)} layers)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="the float model (default: the checkpoint's original, else smollm2-135m)")
    ap.add_argument("--checkpoint", metavar="DIR", help="a trained BitNet checkpoint instead of the untrained conversion")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="held-out tokens scored (default: 128)")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded for the speed column (default: 64)")
    ap.add_argument("--decode-threads", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="comma-separated thread counts for the decode columns (default: --threads, then 1)")
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per file; the best counts (default: 3)")
    ap.add_argument("--extra-bufts", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's extra CPU buffer types (AMX, repacking); auto: off on AMX CPUs")
    ap.add_argument("--keep", metavar="DIR", help="write the GGUF files here (default: a temporary directory)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    quiet_transformers()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not importable", file=sys.stderr)
        return 2
    if args.decode_threads is None:
        args.decode_threads = sorted({args.threads, 1}, reverse=True)
    extra = LC.use_extra_buffer_types({"on": True, "off": False}.get(args.extra_bufts))

    lock = open("/tmp/lowbit-bench.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    t_all = time.perf_counter()
    header = cpu_header(args.threads)
    torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lowbit-bitnet-gguf-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", file=sys.stderr, flush=True)

    q, what = bitnet_model(args, log)
    spec = args.model
    if spec is None and args.checkpoint:
        try:
            spec = api.base_spec(q)  # the checkpoint's original
        except LowbitError as e:  # e.g. trained from scratch: no original to compare with
            log(f"{e}; comparing with {DEFAULT_MODEL}")
    m = api.load(spec or DEFAULT_MODEL, dtype="float32")
    rep_b = export_gguf(q, work / "bitnet-TQ2_0.gguf", "TQ2_0", force=True)
    log(f"exported the BitNet model: {rep_b.types} in {rep_b.seconds:.1f} s")
    rep_f = export_gguf(m, work / "float-Q4_0.gguf", "Q4_0", force=True)
    log(f"exported the float model: {rep_f.types} in {rep_f.seconds:.1f} s")

    def held_out(tok) -> list[int]:
        bos = default_bos_id(tok)
        return ([bos] if bos is not None else []) + eval_tokens(tok, load_text("evaluation"))[: args.tokens].tolist()

    ids_b, ids_f = held_out(q.tokenizer), held_out(m.tokenizer)  # the same text; the same ids unless the tokenizers differ
    with torch.no_grad():
        ref_b = q.model(torch.tensor([ids_b])).logits[0].float()
        ref_f = m.model(torch.tensor([ids_f])).logits[0].float()
    log(f"lowbit's logits on {len(ids_b)} tokens done")

    # the BitNet weights with float activations: how much BitNet's int8 activations alone move the logits
    fa = float_activation_twin(q.model)
    with torch.no_grad():
        ref_fa = fa(torch.tensor([ids_b])).logits[0].float()
    del fa

    variants = [(f"BitNet: {what}", rep_b, ref_b, ids_b, "lowbit packed BitNet (torch)"),
                (f"float {m.name} Q4_0", rep_f, ref_f, ids_f, "float model (torch)")]
    paths = [Path(rep.path) for _, rep, _, _, _ in variants]
    speeds = {th: decode_speeds(paths, ids_b[:8], args.decode, th, args.repeats, extra) for th in args.decode_threads}
    rows = []
    for i, (name, rep, ref, ids, vs) in enumerate(variants):
        got = llama_logits(paths[i], ids, args.threads, extra)
        c = compare(ref, got, ids)
        types = ", ".join(f"{k} x{v}" for k, v in rep.types.items())
        row = dict(variant=name, runs="llama.cpp", mb=paths[i].stat().st_size / 1e6, types=types, vs=vs, **c)
        row.update({f"tps{th}": speeds[th][i] for th in args.decode_threads})
        rows.append(row)
        log(f"{name}: {', '.join(f'{speeds[th][i]:.1f} tok/s at {th} threads' for th in args.decode_threads)}, "
            f"KL {c['kl']:.4g}, top-1 {c['top1']:.1f} %")
    rows.append(dict(variant="BitNet weights, float activations", runs="torch", types="",
                     vs="lowbit packed BitNet (torch)", **compare(ref_b, ref_fa, ids_b)))
    # how far the BitNet model is from the float one: the quality it starts from
    if ids_b == ids_f and ref_b.shape == ref_f.shape:
        rows.append(dict(variant="lowbit packed BitNet", runs="torch", types="", vs="float model (torch)",
                         **compare(ref_f, ref_b, ids_f)))

    cols = ([("variant", "variant"), ("runs", "runs in"), ("mb", "file MB", ".1f"), ("types", "GGUF types (tensors)")]
            + [(f"tps{th}", f"decode tok/s {th}T", ".1f") for th in args.decode_threads]
            + [("vs", "logits compared with"), ("kl", "KL mean", ".4g"), ("top1", "top-1 %", ".1f"),
               ("ppl_ref", "ppl (compared with)", ".4g"), ("ppl", "ppl", ".4g")])
    sysinfo = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(header)
    print(f"llama.cpp {getattr(llama_cpp, '__version__', '?')}: {sysinfo}; extra buffer types (AMX/repack) "
          f"{'on' if extra else 'off'}; decode: batch 1, {args.decode} tokens, best of {args.repeats}, files in "
          f"turn, at {' and '.join(str(th) for th in args.decode_threads)} threads (columns nT); "
          f"{len(ids_b)} held-out tokens scored ({args.threads} threads)")
    print(format_table(rows, cols, markdown=args.markdown))
    tern = {}
    for t in rep_b.ternary.values():
        tern[t] = tern.get(t, 0) + 1
    print(f"BitNet file: {len(rep_b.ternary)} BitNet layers with codes and scale unchanged "
          f"({', '.join(f'{k} x{v}' for k, v in sorted(tern.items()))}); token embedding "
          f"{rep_b.tensor_types.get('token_embd.weight')}; output "
          f"{rep_b.tensor_types.get('output.weight', 'tied to the embedding')}.")
    print(f"({time.perf_counter() - t_all:.0f} s in all; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
