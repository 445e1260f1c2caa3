"""Prompt processing (prefill) speed on SmolLM2-135M, side by side in one run: transformers fp32,
lowbit's lean decoder on fp32 / int8 / int4 weights with float and with int8 activations, and
llama.cpp (llama-cpp-python) on Q4_0 / Q4_K_M / Q8_0 GGUFs, at several prompt lengths and
thread counts.

    python -P bench/prefill_table.py [--lengths 128,512] [--threads 1,2] [--repeats 5] [--markdown]
                                     [--no-llama]

Protocol (every cell): the prompt is --lengths random token ids (seed 0, `lowbit.runtime.bench_prompt`,
the same ids llama.cpp gets), batch 1; one timed run = reset the cache, run the whole prompt in
one forward pass and take the argmax of the last position's logits (llama.cpp: ``Llama.eval`` of
the prompt in one batch, n_batch >= the prompt, then the argmax). Every row gets a warm-up run
per (threads, length), then --repeats interleaved rounds (each round times every row once, in
table order); the table shows medians. The thread count is set per cell (torch.set_num_threads
for the lowbit/transformers rows; one llama.cpp child process per thread count and GGUF).

Rows: see `decode_table.py` for how each variant is built (RTN from the same fp32 model; "+ int8
head" = ``lowbit quantize --head int8``). "int8 act" rows run prompts through the W4A8 / W8A8
GEMM of `lowbit.kernels.a8` (activations quantized per row and block of 32, as one-token decode
steps do, so a prompt row's numbers are exactly those of a decode step); the other lowbit rows
run the format's float product (fused kernel up to ``lowbit.kernels.cpu.FUSED_MAX_ROWS`` rows,
dequantize + float GEMM above). llama.cpp's GGUFs are requantized from the shipped Q4_1 file
(the only original available offline), as in decode_table.py. On a CPU with AMX llama.cpp runs
without its repacked / AMX buffer types (they crash there; see `lowbit.integrations.llama_cpp`),
which slows its prompts: the table then says so.

The header names the CPU's instruction-set flags that matter here (avx2, avx512f, avx512_vnni,
amx_int8 ...) and the load average before and after the run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

def _decode_table():
    """bench/decode_table.py as a module (its llama.cpp child process and model helpers)."""
    spec = importlib.util.spec_from_file_location("lowbit_bench_decode_table", Path(__file__).with_name("decode_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--lengths", default="128,512", help="prompt lengths, comma-separated (default 128,512)")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default 5)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    if min(lengths) < 1 or min(threads) < 1 or args.repeats < 1:
        ap.error("lengths, threads and repeats must be positive")

    os.environ.setdefault("OMP_NUM_THREADS", str(max(threads)))
    import torch

    from lowbit import api
    from lowbit.cli import quiet_transformers
    from lowbit.core.scheme import QuantScheme
    from lowbit.eval.latency import measure_latency
    from lowbit.runtime import LeanDecoder, bench_prompt

    DT = _decode_table()
    quiet_transformers()
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    notes: list[str] = []
    base = api.load(args.model)
    vocab = base.model.config.vocab_size
    max_len = max(lengths) + 8

    g32, g128 = (QuantScheme(bits=4, symmetric=False, group_size=32),
                 QuantScheme(bits=4, symmetric=False, group_size=128))
    int8pc = QuantScheme(bits=8, symmetric=True, granularity="channel", group_size=None)
    # (label, scheme or None for fp32, int8 head, int8 activations)
    variants = [
        ("lowbit fp32 (lean loop)", None, False, False),
        ("lowbit int8 (rtn per-channel)", int8pc, False, False),
        ("lowbit int8 + int8 head, int8 act", int8pc, True, True),
        ("lowbit int4 g128 + int8 head", g128, True, False),
        ("lowbit int4 g128 + int8 head, int8 act", g128, True, True),
        ("lowbit int4 g32 + int8 head, int8 act", g32, True, True),
    ]
    quantized: dict = {}
    lean: dict[str, LeanDecoder] = {}
    for label, scheme, head, int8_act in variants:
        if scheme is None:
            model = base.model
        else:
            key = (scheme, head)
            if key not in quantized:
                q = api.Model(model=copy.deepcopy(base.model), tokenizer=base.tokenizer, name=base.name,
                              source=base.source)
                api.quantize(q, "rtn", scheme, progress=False)
                if head:
                    DT.quantize_head_int8(q.model)
                quantized[key] = q.model
            model = quantized[key]
        lean[label] = LeanDecoder(model, max_len=max_len, int8_activations=int8_act)
        gc.collect()

    prompts = {P: bench_prompt(vocab, P) for P in lengths}

    def lean_run(dec, P):
        def run():
            dec.reset()
            t0 = time.perf_counter()
            int(dec.forward(prompts[P]).argmax())
            return time.perf_counter() - t0
        return run

    def hf_run(P):
        def run():
            return measure_latency(base.model, P, 1, warmup=0, repeats=1).prefill_ms / 1000
        return run

    # llama.cpp: one child per (GGUF, threads), each holding the longest prompt's context
    llama_files = []
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401  (only: is it importable?)
            from lowbit.models.builtin import cache_root

            cache = cache_root() / "bench"
            q41 = DT.find_q41_gguf(cache)
            for label, name, ftype in (("llama.cpp Q4_0", "Q4_0-from-Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_0"),
                                       ("llama.cpp Q4_K_M", "Q4_K_M-from-Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
                                       ("llama.cpp Q8_0", "Q8_0-from-Q4_1", "LLAMA_FTYPE_MOSTLY_Q8_0")):
                path = cache / f"SmolLM2-135M-Instruct.{name}.gguf"
                if not path.is_file():
                    DT.requantize(q41, path, ftype, max(threads))
                llama_files.append((label + " (requant. from Q4_1)", path))
            from lowbit.integrations import llama_cpp as LC

            if not LC.use_extra_buffer_types():
                notes.append("llama.cpp runs without its extra CPU buffer types (weight repacking, AMX) on this "
                             "CPU: they crash a native build on CPUs with AMX (lowbit.integrations.llama_cpp); "
                             "its Q4_0 prompt GEMM is then the plain vec-dot path, slower than on CPUs "
                             "without AMX")
        except ImportError:
            notes.append("llama.cpp rows skipped: llama-cpp-python is not importable (an optional peer)")
        except Exception as e:  # noqa: BLE001  (a missing peer file must not lose the lowbit rows)
            notes.append(f"llama.cpp rows skipped: {e}")
    else:
        notes.append("llama.cpp rows skipped (--no-llama)")

    labels = ["transformers fp32 (sdpa attention)"] + list(lean) + [lb for lb, _ in llama_files]
    results: dict[tuple[str, int, int], float] = {}
    for nt in threads:
        torch.set_num_threads(nt)
        runners = {}
        for P in lengths:
            for label, path in llama_files:
                spec = types.SimpleNamespace(new_tokens=1, threads=nt)
                runners[(label, P)] = DT.LlamaRunner(path, prompts[P].tolist(), spec)
        for P in lengths:
            cells = [("transformers fp32 (sdpa attention)", hf_run(P))]
            cells += [(label, lean_run(dec, P)) for label, dec in lean.items()]
            cells += [(label, (lambda r=runners[(label, P)]: r.run()[0])) for label, _ in llama_files]
            for _, run in cells:
                run()
            times = {label: [] for label, _ in cells}
            for _ in range(args.repeats):
                for label, run in cells:
                    times[label].append(run())
            for label, ts in times.items():
                results[(label, nt, P)] = P / statistics.median(ts)
            print(f"  measured {nt} thread(s), {P} tokens", file=sys.stderr, flush=True)
        for r in runners.values():
            r.close()

    from lowbit.runtime import machine

    name, flags = machine.cpu().name, machine.vector_flags()
    load1 = os.getloadavg()
    print(f"# prefill tok/s, SmolLM2-135M, {name}; flags: {' '.join(flags)}; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; {args.repeats} interleaved rounds; "
          f"{time.perf_counter() - t_start:.0f} s")
    head = ["variant"]
    for nt in threads:
        for P in lengths:
            head += [f"{nt}t pp{P}", f"{nt}t pp{P} vs Q4_0"]
    rows = []
    for label in labels:
        row = [label]
        for nt in threads:
            for P in lengths:
                v = results[(label, nt, P)]
                ref = next((results[(lb, nt, P)] for lb, _ in llama_files if lb.startswith("llama.cpp Q4_0")), None)
                row += [f"{v:.0f}", f"{v / ref:.2f}x" if ref else "-"]
        rows.append(row)
    print(DT.render(head, rows, args.markdown))
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
