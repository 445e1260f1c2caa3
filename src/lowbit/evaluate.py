"""Measure variants of one model side by side: quality vs the original, size, speed.

Used by ``lowbit eval``, ``lowbit compare`` and ``lowbit demo``. All variants are evaluated in
lockstep on the same windows of held-out text, the original model being the baseline row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lowbit import api
from lowbit.eval.latency import measure_latency
from lowbit.eval.quality import PplProtocol, evaluate_quality
from lowbit.eval.report import format_table, plot_ppl_vs_bits
from lowbit.eval.size import dir_size_bytes

COLUMNS = [
    ("variant", "variant", None),
    ("bpw", "bits/w", ".3f"),
    ("size_mb", "size MB", ".1f"),
    ("ppl", "ppl", ".3f"),
    ("dppl", "Δppl", "+.3f"),
    ("kl", "KL mean", ".5f"),
    ("kl_p99", "KL p99", ".4f"),
    ("kl_rev", "KL rev", ".5f"),
    ("top1", "top-1 %", ".2f"),
    ("qtime", "quant s", ".1f"),
    ("prefill", "prefill tok/s", ".0f"),
    ("decode", "decode tok/s", ".1f"),
]


@dataclass
class EvalSettings:
    text: str = "evaluation"
    protocol: PplProtocol = PplProtocol()
    latency: bool = True
    prompt_len: int = 128
    decode_tokens: int = 16
    latency_repeats: int = 3
    device: str = "cpu"
    progress: bool = True


def compare(variants: dict[str, api.Model], baseline: str, settings: EvalSettings) -> list[dict]:
    """Rows (dicts) for every variant, baseline first."""
    from lowbit.data.texts import default_bos_id, eval_tokens, load_text

    base = variants[baseline]
    tokens = eval_tokens(base.tokenizer, load_text(settings.text))
    for m in variants.values():
        m.model.to(settings.device).eval()
    quality = evaluate_quality({k: v.model for k, v in variants.items()}, baseline, tokens,
                               settings.protocol, default_bos_id(base.tokenizer), device=settings.device,
                               progress=settings.progress)
    rows = []
    for name, m in variants.items():
        q = quality[name]
        bpw, _, _ = api.linear_bits(m.model)
        size = dir_size_bytes(m.path) if m.path else api.model_bytes(m.model)
        row = {"variant": name, "bpw": bpw, "size_mb": size / 1e6, "ppl": q.ppl,
               "dppl": q.delta_ppl, "n_tokens": q.n_tokens,
               "kl": q.kl_mean, "kl_p99": q.kl_p99, "kl_rev": q.kl_rev_mean,
               "top1": None if q.top1 is None else 100 * q.top1,
               "qtime": (m.record or {}).get("quantize_seconds"),
               "method": ((m.record or {}).get("method") or {}).get("method"),
               "token_nll": q.token_nll}
        if settings.latency:
            lat = measure_latency(m.model, prompt_len=settings.prompt_len, decode_tokens=settings.decode_tokens,
                                  vocab_size=m.model.config.vocab_size, device=settings.device,
                                  repeats=settings.latency_repeats)
            row["prefill"] = lat.prefill_tok_s
            row["decode"] = lat.decode_tok_s
        rows.append(row)
    return rows


def render(rows: list[dict], markdown: bool = False) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    return format_table(rows, cols, markdown=markdown)


def write_plot(rows: list[dict], path: str, title: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pts = [{"name": r["variant"], "ppl": r["ppl"], "bits": r["bpw"], "baseline": i == 0,
            "group": r.get("method")} for i, r in enumerate(rows)]
    plot_ppl_vs_bits(pts, path, title)
    return path


def torch_threads() -> int:
    return torch.get_num_threads()
