"""Decode speed when another process is busy on one core: lowbit's lean decoder on 1 and 2 fixed
threads and with its thread chooser (`lowbit.runtime.threads`), beside llama.cpp on 1 and 2
threads, quiet and under the same competing load, in one run.

    python -P bench/shared_core.py [--new-tokens 128] [--repeats 5] [--markdown] [--no-llama]

The chooser row runs as `lowbit generate` does: timing the steps among the thread counts that
fit the cores other processes leave free (`lowbit.runtime.threads.FreeCores`).

Model: SmolLM2-135M, lowbit int4 g128 (RTN asym, the default 4-bit checkpoint) against llama.cpp
Q4_0 (requantized from the shipped Q4_1 GGUF, as in bench/decode_table.py, whose llama.cpp
worker runs it). Protocol: a 128-token prompt (the decode_table draw), then --new-tokens greedy
steps, batch 1. Each phase ("quiet", then "one core busy": a child process spinning a Python
loop for the whole phase) times every row once per round, rows interleaved, --repeats rounds
after a warm-up round; medians. The chooser probes every 64 steps, so --new-tokens should be
well above that.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.runtime import machine


def _decode_table():
    spec = importlib.util.spec_from_file_location("decode_table", Path(__file__).with_name("decode_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()

    from lowbit import api
    from lowbit.core.scheme import QuantScheme
    from lowbit.runtime import LeanDecoder
    from lowbit.runtime.threads import FreeCores, ThreadChooser
    from lowbit.runtime.timing import bench_prompt, measure_lean

    dt = _decode_table()
    torch.set_num_threads(2)
    base = api.load(None)
    q = api.Model(model=copy.deepcopy(base.model), tokenizer=base.tokenizer, name=base.name, source=base.source)
    api.quantize(q, "rtn", QuantScheme(bits=4, symmetric=False, group_size=128), progress=False)
    P, N = args.prompt_len, args.new_tokens
    prompt = bench_prompt(q.model.config.vocab_size, P)

    rows = []  # (label, run -> decode seconds, chooser or None)
    choosers = {}
    for label, fixed in (("lowbit int4 g128, 1 thread", 1), ("lowbit int4 g128, 2 threads", 2),
                         ("lowbit int4 g128, up to 2 threads (chooser)", None)):
        dec = LeanDecoder(q.model, max_len=P + N + 8)
        if dec.native_step is None:
            raise SystemExit(f"the native decode step does not run: {dec.native_reason}")
        dec.native_step.threads = ThreadChooser(2, fixed=fixed, free=FreeCores().free)  # as LeanDecoder makes it
        choosers[label] = dec.native_step.threads

        def run(dec=dec):
            r = measure_lean(dec, P, N, warmup=0, repeats=1)
            return r.decode_ms_per_token * N / 1000
        rows.append((label, run))
    runners = []
    notes = []
    if not args.no_llama:
        for threads in (1, 2):
            a = argparse.Namespace(**{**vars(args), "threads": threads})
            got = dt.llama_runners(prompt.tolist(), a, notes)
            for label, runner, _ in got:
                if label.startswith("llama.cpp Q4_0"):
                    runners.append(runner)
                    rows.append((f"llama.cpp Q4_0, {threads} thread{'s' if threads > 1 else ''}",
                                 lambda r=runner: r.run()[1]))
                else:
                    runner.close()

    results: dict[str, dict[str, float]] = {}
    for phase in ("quiet", "one core busy"):
        spin = None
        if phase != "quiet":
            spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            for _, run in rows:  # warm-up round
                run()
            times = {label: [] for label, _ in rows}
            for _ in range(args.repeats):
                for label, run in rows:
                    times[label].append(run())
            load = os.getloadavg()[0]
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
        for label, t in times.items():
            results.setdefault(label, {})[phase] = N / statistics.median(t)
        results.setdefault("_load", {})[phase] = load
        for label, ch in choosers.items():
            if ch.fixed is None:
                chosen = [c for c, _ in ch.history[-8:]]
                results.setdefault("_chosen", {})[phase] = (", ".join(map(str, chosen))
                                                            + f"; free-core limit at the end: {ch.allowed}")
        time.sleep(2.0)
    for r in runners:
        r.close()

    head = ["variant", "quiet tok/s", "one core busy tok/s", "busy / quiet", "busy vs same runtime 1 thread"]
    table = []
    for label, _ in rows:
        qv, bv = results[label]["quiet"], results[label]["one core busy"]
        one = next(results[l]["one core busy"] for l, _ in rows
                   if l.split(",")[0] == label.split(",")[0] and l.endswith(" 1 thread"))
        table.append([label, f"{qv:.1f}", f"{bv:.1f}", f"{bv / qv:.2f}x", f"{bv / one:.2f}x"])
    flags = " ".join(machine.vector_flags()) or "unknown"
    print(f"# CPU flags: {flags}; {os.cpu_count()} cores; load average at the end of each phase: "
          f"quiet {results['_load']['quiet']:.2f}, busy {results['_load']['one core busy']:.2f}; "
          f"prompt {P}, {N} new tokens, medians of {args.repeats} interleaved rounds")
    print(f"# chooser's picks (last timing probes; none run above the free-core limit): "
          f"quiet [{results['_chosen']['quiet']}], "
          f"busy [{results['_chosen']['one core busy']}]")
    print(dt.render(head, table, args.markdown))
    for n in notes:
        print(f"# {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
