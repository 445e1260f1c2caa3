"""``lowbit bench [MODEL_OR_OUT]``: prefill and decode tokens/s of the lean decoder, peak memory.

Protocol: `lowbit.runtime.timing` (random prompt of --prompt-len ids, seed 0; greedy decode of
--new-tokens tokens; medians over --repeats runs after --warmup). Peak RSS is the process's
high-water mark (``getrusage``), so it includes loading the model.
"""

from __future__ import annotations

import resource
import sys

from lowbit.commands._args import add_activation_args, int8_activations
from lowbit.errors import LowbitError
from lowbit.eval import size


def _peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def bench_rows(m, prompt_len: int, new_tokens: int, warmup: int, repeats: int,
               int8_activations: bool = False, kv_cache: str = "float32") -> list[dict]:
    import torch

    from lowbit import api
    from lowbit.runtime import LeanDecoder, measure_lean

    limit = getattr(m.model.config, "max_position_embeddings", None)
    if limit and prompt_len + new_tokens > limit:
        raise LowbitError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the model's maximum "
                          f"length {limit}")
    dec = LeanDecoder(m.model, max_len=prompt_len + new_tokens, int8_activations=int8_activations,
                      kv_dtype=getattr(torch, kv_cache))
    r = measure_lean(dec, prompt_len, new_tokens, warmup=warmup, repeats=repeats)
    bits, _, _ = size.linear_bits(m.model)
    fmt = "lowbit " + (m.record or {}).get("method", {}).get("method", "float")
    return [{
        "model": m.name,
        "method": fmt,
        "bits/w": bits,
        "threads": torch.get_num_threads(),
        "prompt": prompt_len,
        "new": new_tokens,
        "prefill tok/s": r.prefill_tok_s,
        "decode tok/s": r.decode_tok_s,
        "ms/token": r.decode_ms_per_token,
        "step": "C" if dec.native_step is not None else "Python",
        "act": "int8" if int8_activations else "float",
        "KV": kv_cache.replace("float", "fp"),
        "model MB": size.model_bytes(m.model) / 1e6,
        "KV cache MB": dec.cache_bytes / 1e6,
        "peak RSS MB": _peak_rss_bytes() / 1e6,
    }]


def render(rows: list[dict], markdown: bool = False) -> str:
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, float) and v != v:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    left = {0, 1}
    just = lambda s, i: s.ljust(widths[i]) if i in left else s.rjust(widths[i])  # noqa: E731
    if markdown:
        lines = ["| " + " | ".join(just(c, i) for i, c in enumerate(cols)) + " |",
                 "| " + " | ".join(("-" * widths[i]) if i in left else ("-" * (widths[i] - 1) + ":")
                                   for i in range(len(cols))) + " |"]
        lines += ["| " + " | ".join(just(s, i) for i, s in enumerate(row)) + " |" for row in cells]
    else:
        lines = ["  ".join(just(c, i) for i, c in enumerate(cols))]
        lines += ["  ".join(just(s, i) for i, s in enumerate(row)) for row in cells]
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from lowbit.commands.generate import set_threads

    set_threads(args.threads)
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise LowbitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise LowbitError(f"--warmup must be >= 0, got {args.warmup}")
    m = _load(args.model)
    rows = bench_rows(m, args.prompt_len, args.new_tokens, args.warmup, args.repeats, int8_activations(args, m),
                      args.kv_cache)
    if args.transformers:
        rows.append(transformers_row(m, rows[0], args))
    print(render(rows, markdown=args.markdown))
    return 0


def transformers_row(m, lean: dict, args) -> dict:
    """The same measurement through transformers' own forward and cache (same prompt)."""
    from lowbit.eval.latency import measure_latency

    r = measure_latency(m.model, args.prompt_len, args.new_tokens, warmup=args.warmup, repeats=args.repeats)
    row = dict(lean, **{"method": "transformers", "step": "Python", "act": "float", "KV": "fp32",
                        "prefill tok/s": r.prefill_tok_s, "decode tok/s": r.decode_tok_s,
                        "ms/token": r.decode_ms_per_token, "KV cache MB": float("nan"),
                        "peak RSS MB": _peak_rss_bytes() / 1e6})
    return row


def _load(spec):
    from lowbit import api

    return api.load(spec)


def register(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode tokens/s and peak memory of the lean decoder")
    p.add_argument("model", nargs="?", help="model or lowbit checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens (default: 64)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; medians are reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--kv-cache", choices=["float32", "float16"], default="float32",
                   help="KV cache element type (float16: half the memory, as llama.cpp's default)")
    add_activation_args(p)
    p.add_argument("--transformers", action="store_true",
                   help="add a row measured through transformers' forward and cache (same prompt and protocol)")
    p.set_defaults(func=cmd_bench)
