"""Measure variants of one model side by side: quality vs the original, size, speed.

Used by ``lowbit eval``, ``lowbit compare`` and ``lowbit demo``.  Two ways to get the quality
numbers, the original model being the baseline row either way:

* ``memory``: the original and all variants are loaded together and run in lockstep on the same
  windows (:func:`lowbit.eval.quality.evaluate_quality`);
* ``hidden`` / ``topk``: the original's reference is computed once (streamed block by block from
  its files when it is a Hugging Face directory, so it never has to fit in memory), cached on
  disk, and each variant is then loaded alone, scored against it and dropped
  (:mod:`lowbit.eval.reference`).  ``hidden`` gives the same numbers as ``memory`` bit for bit;
  ``topk`` is compact, its KL an estimate (its standard error and its error on audit positions
  are in the table).  A
  checkpoint is itself streamed block by block (:class:`lowbit.checkpoint.LazyCheckpoint`) when
  no latency is asked for or it would take more than half the free memory; the original's
  latency is not measured in these modes (it is never loaded whole).

``auto`` picks ``memory`` when the original and the largest variant fit in the memory available
(float32 weights), else ``hidden`` (exact; its file holds ``W*ctx*H`` float32 hidden states and the
``V*H`` output layer: for any model a small fraction of the model itself), and ``topk`` only when
that file would take more than half the free space of the cache directory.  ``topk`` is not
picked for size alone: its KL is an estimate (about 0.1 % off forward and 1-2 % reverse on a few
thousand positions of SmolLM2, see :mod:`lowbit.eval.reference`) and it cannot see the rare tokens
a variant makes likely that the original finds nearly impossible, which ``hidden`` keeps.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit import api, kernels
from lowbit.eval.latency import measure_latency
from lowbit.eval.quality import PplProtocol, evaluate_quality
from lowbit.eval.report import format_table, plot_ppl_vs_bits
from lowbit.eval.size import dir_size_bytes, linear_bits, model_bytes

COLUMNS = [
    ("variant", "variant", None),
    ("bpw", "bits/w", ".3f"),
    ("size_mb", "size MB", ".1f"),
    ("ppl", "ppl", ".3f"),
    ("dppl", "Δppl", "+.3f"),
    ("kl", "KL mean", ".5f"),
    ("kl_p99", "KL p99", ".4f"),
    ("kl_rev", "KL rev", ".5f"),
    ("kl_se", "KL ±%", ".2f"),
    ("kl_rev_se", "KL rev ±%", ".2f"),
    ("kl_err", "KL err %", ".2f"),
    ("kl_rev_err", "KL rev err %", ".2f"),
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
    reference: str = "auto"  # auto | memory | hidden | topk (module docstring)
    topk: int = 32  # most likely tokens stored per position (topk reference)
    tail_samples: int = 64  # tokens sampled per position from the others (topk reference)
    audit: int = 64  # positions whose full distribution checks the topk estimate
    cache_dir: str | None = None  # default: lowbit.eval.reference.default_cache_dir()
    activation_budget: int | None = None  # bytes of activations kept in memory when streaming
    spill_dir: str | None = None  # where activations beyond the budget go (default: the temp dir)
    int8_activations: bool = False  # score and time quantized layers with int8 activations where
    # their format has such a product (`lowbit.kernels.prefer`), the path `lowbit generate` takes

    def activations(self) -> str | None:
        return "int8" if self.int8_activations else None


REFERENCES = ("auto", "memory", "hidden", "topk")


def _row(name: str, m: api.Model | None, q, settings: EvalSettings, *, lazy=None) -> dict:
    """A table row; ``lazy`` (a :class:`lowbit.checkpoint.LazyCheckpoint`) stands for ``m`` when
    the checkpoint was streamed (no latency then: that needs the model whole)."""
    if lazy is not None:
        m = api.Model(model=lazy.model, tokenizer=None, name=name, source={}, record=lazy.record, path=str(lazy.path))
        bpw, _, _ = lazy.linear_bits()
    else:
        bpw, _, _ = linear_bits(m.model)
    size = dir_size_bytes(m.path) if m.path else model_bytes(m.model)
    row = {"variant": name, "bpw": bpw, "size_mb": size / 1e6, "ppl": q.ppl,
           "dppl": q.delta_ppl, "n_tokens": q.n_tokens,
           "kl": q.kl_mean, "kl_p99": q.kl_p99, "kl_rev": q.kl_rev_mean,
           "top1": None if q.top1 is None else 100 * q.top1,
           "qtime": (m.record or {}).get("quantize_seconds"),
           "method": ((m.record or {}).get("method") or {}).get("method"),
           "token_nll": q.token_nll}
    if q.nonfinite is not None:
        row["nonfinite"] = q.nonfinite
    if q.kl_rel_se is not None:
        row["kl_se"] = 100 * q.kl_rel_se
        row["kl_rev_se"] = 100 * q.kl_rev_rel_se
    if q.kl_rel_err is not None:
        row["kl_err"] = 100 * q.kl_rel_err
        row["kl_rev_err"] = 100 * q.kl_rev_rel_err
    if settings.latency and lazy is None:
        lat = measure_latency(m.model, prompt_len=settings.prompt_len, decode_tokens=settings.decode_tokens,
                              vocab_size=m.model.config.vocab_size, device=settings.device,
                              repeats=settings.latency_repeats)
        row["prefill"] = lat.prefill_tok_s
        row["decode"] = lat.decode_tok_s
    return row


def compare(variants: dict[str, api.Model], baseline: str, settings: EvalSettings, on_row=None) -> list[dict]:
    """Rows (dicts) for every variant, baseline first; ``on_row(i, row)`` is called as each
    one is done (the quality numbers come in one lockstep pass, the latency row by row)."""
    from lowbit.data.texts import default_bos_id, eval_tokens, load_text

    base = variants[baseline]
    tokens = eval_tokens(base.tokenizer, load_text(settings.text))
    for m in variants.values():
        m.model.to(settings.device).eval()
    with kernels.prefer(settings.activations()):
        quality = evaluate_quality({k: v.model for k, v in variants.items()}, baseline, tokens,
                                   settings.protocol, default_bos_id(base.tokenizer), device=settings.device,
                                   progress=settings.progress)
        rows = []
        for i, (name, m) in enumerate(variants.items()):
            rows.append(_row(name, m, quality[name], settings))
            if on_row is not None:
                on_row(i, rows[-1])
    return rows


# -- from model specs: choose memory or a cached reference --------------------------------------------
def _streamable(spec: str | None) -> bool:
    """A builtin or a Hugging Face directory: the original can be read one block at a time."""
    from lowbit import checkpoint
    from lowbit.models import builtin

    if spec is None or spec in builtin.BUILTINS:
        return True
    p = Path(spec).expanduser()
    return p.is_dir() and not checkpoint.is_checkpoint(p)


def compute_bytes(spec: str | None) -> int | None:
    """Rough bytes ``spec`` takes in memory once loaded (float32 weights for an original, the
    checkpoint's size for a quantized one); None when unknown."""
    from lowbit import checkpoint
    from lowbit.models.spec import weights_on_disk

    if spec is not None and checkpoint.is_checkpoint(spec):
        return dir_size_bytes(spec)
    found = weights_on_disk(spec)
    if found is not None:
        nbytes, dtype = found
        return nbytes * 4 // torch.empty(0, dtype=dtype).element_size()
    if spec is not None and Path(spec).expanduser().is_file():
        return 8 * os.path.getsize(Path(spec).expanduser())  # a GGUF of ~4-bit weights, dequantized
    return None


def base_spec_of(spec: str) -> str | None:
    """The original model a lowbit checkpoint was made from (as :func:`lowbit.api.base_spec`),
    read from its record without loading it; None for anything else."""
    from lowbit import checkpoint

    if spec is None or not checkpoint.is_checkpoint(spec):
        return None
    rec = checkpoint.read_record(spec)
    return api.base_spec(api.Model(model=None, tokenizer=None, name="", source={}, record=rec, path=str(spec)))


def choose_reference(base_spec: str | None, specs: list[str], settings: EvalSettings) -> str:
    """``settings.reference``, with ``auto`` resolved (module docstring)."""
    from lowbit.errors import LowbitError

    if settings.reference not in REFERENCES:
        raise LowbitError(f"--reference must be one of {', '.join(REFERENCES)}, got {settings.reference!r}")
    if settings.reference != "auto":
        return settings.reference
    sizes = [compute_bytes(base_spec)] + [compute_bytes(s) for s in specs]
    if sizes[0] is None:
        return "memory"
    need = sizes[0] + max([b or 0 for b in sizes[1:]], default=0)
    return "memory" if need < 0.6 * api.available_memory() else "hidden"


def stream_variant(spec: str, settings: EvalSettings) -> bool:
    """Score a checkpoint block by block (:class:`lowbit.checkpoint.LazyCheckpoint`) rather than
    loading it: when no latency is measured (which needs it whole), or when it would take more
    than half the memory available."""
    from lowbit import checkpoint

    if not checkpoint.is_checkpoint(spec):
        return False
    return not settings.latency or (compute_bytes(spec) or 0) > 0.5 * api.available_memory()


def _open_original(spec: str | None):
    """``(source, tokenizer, fingerprint, name, model)``: a builtin or Hugging Face directory
    opened lazily (streamed when the reference is computed, never loaded whole) or, for other
    kinds of model (GGUF, checkpoint), the model loaded in memory."""
    from lowbit.models.files import fingerprint
    from lowbit.models.spec import load_model_lazy

    if _streamable(spec):
        lazy = load_model_lazy(spec)
        return lazy, lazy.tokenizer, fingerprint(lazy.path), lazy.name, lazy.model
    m = api.load(spec)
    m.model.eval()
    return m.model, m.tokenizer, fingerprint(spec), m.name, m.model


def _skeleton_bytes(model) -> int:
    """Bytes of a model's tensors (tied ones once), also for parameters on the meta device."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


_SAME = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


def _config_of(spec: str | None) -> dict | None:
    """config.json of a builtin, a Hugging Face directory or a checkpoint; None for others."""
    import json

    from lowbit.models.spec import spec_path

    try:
        cfg = json.loads((spec_path(spec) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def check_original(base_spec: str | None, specs: list[str], log=None) -> None:
    """Checkpoints are compared with the model they were made from: one of another shape is an
    error (the numbers would mean nothing); an original whose files changed since a checkpoint
    recorded them is said (the numbers are against the files as they are now). The original's
    config and fingerprint are read once for all of ``specs``."""
    from lowbit import checkpoint
    from lowbit.errors import LowbitError
    from lowbit.models.files import fingerprint
    from lowbit.models.spec import spec_path

    where = spec_path(base_spec)
    base, now = _config_of(base_spec), None
    for spec in specs:
        if not checkpoint.is_checkpoint(spec):
            continue
        own = _config_of(spec)
        if base is not None and own is not None:
            for k in _SAME:
                if k in base and k in own and base[k] != own[k]:
                    raise LowbitError(f"{spec} was made from a model with {k} {own[k]}, but the original it is "
                                      f"compared with ({base_spec or 'the default model'}) has {base[k]}; give its "
                                      "original with --baseline")
        recorded = (checkpoint.read_record(spec).get("base_model") or {}).get("fingerprint")
        if not recorded or not where.exists() or log is None:
            continue
        now = now or fingerprint(where, mtimes=False)
        if now != recorded:
            log(f"note: {where} is not the original {spec} was made from, or it has changed since (its files "
                "differ from those recorded then); the comparison is with the files as they are now")


class _Rows:
    """The rows of one evaluation: those a results file already holds, and each new one logged
    and appended to it as soon as it is done (`lowbit.eval.results`)."""

    def __init__(self, base_spec, specs, settings, kind, results, log):
        from lowbit.eval.results import row_key, run_key

        self.results, self.log = results, log
        self.rows: list[dict | None] = [None] * (len(specs) + 1)  # the original's row first
        self.keys: list[str | None] = [None] * (len(specs) + 1)
        if results is not None:
            rk = run_key(base_spec, settings, kind)
            self.keys = [row_key(rk, None)] + [row_key(rk, s) for s in specs]
            self.rows = [results.get(k) for k in self.keys]
            n = sum(r is not None for r in self.rows)
            if n and log is not None:
                log(f"{n} of {len(self.rows)} rows read from {results.path} (measured earlier with the same "
                    "models and settings; --fresh measures them again)")

    def todo(self, i: int) -> bool:
        return self.rows[i] is None

    def names(self) -> set[str]:
        return {r["variant"] for r in self.rows if r is not None}

    def done(self, i: int, row: dict) -> None:
        from lowbit.eval.results import summary

        self.rows[i] = row
        if self.log is not None:
            self.log(summary(row))
        if self.results is not None:
            self.results.add(self.keys[i], row)


def evaluate_specs(base_spec: str | None, specs: list[str], settings: EvalSettings, *,
                   base_label: str = "original", log=None, results=None) -> tuple[list[dict], dict]:
    """Rows for the original (``base_spec``) and every model in ``specs`` (checkpoints or models),
    baseline first, plus what was done (``{"reference": kind, "base_name": ..., "cache": path,
    "hit": bool}``).

    With no ``specs`` the original is evaluated alone (perplexity) under its own name. Each row
    is logged as it is done; with ``results`` (a `lowbit.eval.results.ResultsFile`) it is also
    appended there, and rows the file already holds for the same models and settings are taken
    from it instead of being measured again."""
    from lowbit.data.texts import default_bos_id, eval_tokens, load_text
    from lowbit.eval.quality import protocol_windows
    from lowbit.eval.reference import build_reference, cached_reference, reference_key, score_against_reference

    check_original(base_spec, specs, log)
    kind = choose_reference(base_spec, specs, settings)
    out = _Rows(base_spec, specs, settings, kind, results, log)
    if not any(out.todo(i) for i in range(len(out.rows))):
        return list(out.rows), {"reference": kind, "base_name": out.rows[0].get("base_name", out.rows[0]["variant"]),
                                "resumed": len(out.rows)}
    if kind == "memory":
        variants = {}
        base = api.load(base_spec)
        variants[base_label if specs else base.name] = base
        index = [0]  # which row each loaded model fills
        taken = out.names() - {base_label if specs else base.name}
        for j, spec in enumerate(specs, 1):
            if not out.todo(j):
                continue
            m = api.load(spec)
            name = m.name
            while name in variants or name in taken:
                name += "'"
            variants[name] = m
            index.append(j)
        compare(variants, next(iter(variants)), settings,
                on_row=lambda i, row: out.done(index[i], dict(row, base_name=base.name) if i == 0 else row))
        return list(out.rows), {"reference": "memory", "base_name": base.name}

    source, tokenizer, model_id, name, skeleton = _open_original(base_spec)
    text = load_text(settings.text)
    windows = protocol_windows(eval_tokens(tokenizer, text), settings.protocol, default_bos_id(tokenizer))
    if kind == "hidden" and settings.reference == "auto":
        from lowbit.eval.reference import default_cache_dir, free_bytes, hidden_reference_bytes

        folder = settings.cache_dir if settings.cache_dir is not None else default_cache_dir()
        need, free = hidden_reference_bytes(skeleton, *windows.shape), free_bytes(folder)
        if need is not None and free is not None and need > 0.5 * free:
            kind = "topk"
            if log is not None:
                log(f"reference: the hidden-state reference would take {need / 1e9:.2f} GB, more than half the "
                    f"{free / 1e9:.2f} GB free in {folder}; using the compact topk reference")
    key = reference_key(model_id, windows, kind, k=settings.topk, m=settings.tail_samples, audit=settings.audit,
                        dtype=torch.float32)
    stream = {"budget_bytes": settings.activation_budget, "spill_dir": settings.spill_dir}
    if log is not None:
        log(f"reference: {kind} of {name} on {windows.shape[0]} windows of {windows.shape[1]} tokens")
    ref, hit = cached_reference(key, settings.cache_dir,
                                lambda: build_reference(source, windows, key, device=settings.device,
                                                        progress=settings.progress, stream=stream), log=log)
    if log is not None:
        log(f"reference {'read from' if hit else 'written to'} {ref.path}")
    q = ref.baseline_result()
    bpw, _, _ = linear_bits(skeleton)
    if out.todo(0):
        out.done(0, {"variant": base_label if specs else name, "bpw": bpw,
                     "size_mb": _skeleton_bytes(skeleton) / 1e6, "ppl": q.ppl, "dppl": None, "n_tokens": q.n_tokens,
                     "kl": None, "kl_p99": None, "kl_rev": None, "top1": None, "qtime": None, "method": None,
                     "token_nll": q.token_nll, "base_name": name})
    del source, skeleton
    gc.collect()
    names = out.names()
    for j, spec in enumerate(specs, 1):  # one variant at a time: loaded whole, or streamed block by block
        from lowbit import checkpoint

        if not out.todo(j):
            continue
        streamed = stream_variant(spec, settings)
        if streamed:
            lz = checkpoint.open_lazy(spec)
            vname = os.path.basename(os.path.normpath(spec))
            if settings.latency and log is not None:
                log(f"{vname} does not fit in memory: streamed block by block, no latency measured")
        else:
            m = api.load(spec)
            m.model.to(settings.device).eval()
            vname = m.name
        while vname in names:
            vname += "'"
        names.add(vname)
        with kernels.prefer(settings.activations()):
            q = score_against_reference(ref, lz if streamed else m.model, windows, device=settings.device,
                                        progress=settings.progress, stream=stream)
            out.done(j, _row(vname, None, q, settings, lazy=lz) if streamed else _row(vname, m, q, settings))
        lz = m = None
        gc.collect()
    return list(out.rows), {"reference": kind, "cache": str(ref.path), "hit": hit, "base_name": name}


def render(rows: list[dict], markdown: bool = False) -> str:
    """The table, and below it a note for each row whose logits went NaN/Inf (where they did)."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    notes = [f"{r['variant']}: NaN/Inf logits from {r['nonfinite']}; its numbers are not meaningful"
             for r in rows if r.get("nonfinite")]
    return "\n".join([format_table(rows, cols, markdown=markdown)] + notes)


def write_plot(rows: list[dict], path: str, title: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pts = [{"name": r["variant"], "ppl": r["ppl"], "bits": r["bpw"], "baseline": i == 0,
            "group": r.get("method")} for i, r in enumerate(rows)]
    plot_ppl_vs_bits(pts, path, title)
    return path


def torch_threads() -> int:
    return torch.get_num_threads()
