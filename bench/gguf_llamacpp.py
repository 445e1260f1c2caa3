"""lowbit's GGUF files run in llama.cpp: perplexity, KL and generation, against llama.cpp's own
quantizer, side by side in one run.

    PYTHONPATH=<llama-cpp-python> python bench/gguf_llamacpp.py [--model MODEL] [--max-tokens 4096] [--markdown]

Needs llama-cpp-python (the optional peer, built from source). Steps:
1. export the model with lowbit as F16, Q8_0, Q4_K_M and Q4_K_M with an importance matrix
   (collected on lowbit's calibration text);
2. quantize lowbit's F16 file with llama.cpp's ``llama_model_quantize`` to Q4_K_M;
3. for each file, llama.cpp (``logits_all=True``) scores lowbit's held-out text under lowbit's
   perplexity protocol (non-overlapping windows of ``--ctx`` tokens, the same ids fed to every
   model), in lockstep with the original float model in torch, which is the KL / top-1 baseline;
4. each llama.cpp model greedily continues a prompt.
It also reports how many tensors of lowbit's Q4_K_M (made from the F16-rounded weights, i.e.
from exactly the input llama.cpp sees) are byte-identical to llama.cpp's.

Runs under the benchmark lock (/tmp/lowbit-bench.lock) so benchmarks never overlap;
``--quality-only`` drops the timing columns and the lock (the quality numbers do not depend on
the machine's load).
"""

from __future__ import annotations

import argparse
import ctypes
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
from lowbit.eval.quality import PplProtocol, evaluate_quality
from lowbit.eval.report import format_table
from lowbit.export.gguf import collect_imatrix, export_gguf
from lowbit.integrations import llama_cpp as LC

PROMPT = "It was a bright cold day in April, and"
LLAMA_FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q3_K_M": 12, "Q8_0": 7}


class LlamaCppLM:
    """A llama.cpp model called like a causal LM: ``model(ids [1, T]) -> logits [1, T, V]``."""

    training = False

    def __init__(self, path: Path, n_ctx: int, threads: int):
        self.llm = LC.load(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True)
        self.seconds = 0.0
        self.tokens = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        toks = ids[0].tolist()
        t0 = time.perf_counter()
        self.llm.reset()
        self.llm.eval(toks)
        self.seconds += time.perf_counter() - t0
        self.tokens += len(toks)
        return torch.from_numpy(np.array(self.llm.scores[: len(toks)], dtype=np.float32))[None]

    def generate(self, prompt: str, n: int = 24) -> str:
        out = self.llm.create_completion(prompt, max_tokens=n, temperature=0.0)
        return out["choices"][0]["text"]


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[qtype]
    params.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return time.perf_counter() - t0


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    same = sum(1 for n, t in ta.items() if n in tb and t.tensor_type == tb[n].tensor_type
               and np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8)))
    return same, len(ta)


def token_nll(lm: LlamaCppLM, tokens: torch.Tensor, protocol: PplProtocol, bos: int | None) -> np.ndarray:
    """Per-token NLL (nats) of ``lm`` on the protocol's windows, in order (float64)."""
    stride = protocol.stride(bos is not None)
    out = []
    for w in range(protocol.n_windows(tokens.numel(), bos is not None)):
        chunk = tokens[w * stride : (w + 1) * stride]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk])
        lp = torch.log_softmax(lm(chunk[None])[0, :-1].double(), dim=-1)
        out.append(-lp.gather(-1, chunk[1:, None]).squeeze(-1).numpy())
    return np.concatenate(out)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(ppl_a - ppl_b, two standard errors of it) from per-token NLLs on the same tokens: the
    mean NLL difference d has standard error s.e. = std(a - b) / sqrt(n); ppl_a - ppl_b is
    ~ ppl_b * (exp(d) - 1), so its 2 s.e. is ~ ppl_a * 2 s.e.(d)."""
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    return float(np.exp(a.mean()) - np.exp(b.mean())), float(np.exp(a.mean()) * 2 * se)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--imatrix-samples", type=int, default=8)
    ap.add_argument("--keep", metavar="DIR", help="write the GGUF files here (default: a temporary directory)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--quality-only", action="store_true",
                    help="no timing columns and no benchmark lock (for a busy machine: run it niced, 1 thread)")
    args = ap.parse_args()
    quiet_transformers()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not importable; set PYTHONPATH to its install directory", file=sys.stderr)
        return 2

    if not args.quality_only:
        lock = open("/tmp/lowbit-bench.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    t_all = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lowbit-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    m = api.load(args.model)
    n_weights = sum(p.numel() for p in m.model.parameters())
    rows = {}

    def log(msg):
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", file=sys.stderr, flush=True)

    files: dict[str, tuple[Path, float, str]] = {}
    for qtype in ("F16", "Q8_0", "Q4_K_M"):
        rep = export_gguf(m, work / f"lowbit-{qtype}.gguf", qtype)
        files[f"lowbit {qtype}"] = (Path(rep.path), rep.seconds, "lowbit")
        log(f"exported {qtype} in {rep.seconds:.1f} s (tokenizer {rep.tokenizer})")
    t0 = time.perf_counter()
    im = collect_imatrix(m, n_samples=args.imatrix_samples, seq_len=512)
    t_im = time.perf_counter() - t0
    rep = export_gguf(m, work / "lowbit-Q4_K_M-imatrix.gguf", "Q4_K_M", imatrix=im)
    files["lowbit Q4_K_M + imatrix"] = (Path(rep.path), rep.seconds + t_im, "lowbit")
    log(f"imatrix ({args.imatrix_samples} x 512 tokens) {t_im:.1f} s, export {rep.seconds:.1f} s")
    t_ll = llama_quantize(work / "lowbit-F16.gguf", work / "llamacpp-Q4_K_M.gguf", "Q4_K_M", args.threads)
    files["llama.cpp Q4_K_M (of lowbit F16)"] = (work / "llamacpp-Q4_K_M.gguf", t_ll, "llama.cpp")
    log(f"llama_model_quantize Q4_K_M in {t_ll:.1f} s")

    # the same input llama.cpp quantized from: F16-rounded weights
    with torch.no_grad():
        for p in m.model.parameters():
            p.copy_(p.half().float())
    export_gguf(m, work / "lowbit-Q4_K_M-from-f16.gguf", "Q4_K_M")
    same, total = identical_tensors(work / "lowbit-Q4_K_M-from-f16.gguf", work / "llamacpp-Q4_K_M.gguf")
    log(f"lowbit Q4_K_M from the F16 weights vs llama.cpp's: {same}/{total} tensors byte-identical")
    m = api.load(args.model)  # the original again, for the baseline

    tokens = eval_tokens(m.tokenizer, load_text("evaluation"))
    bos = default_bos_id(m.tokenizer)
    protocol = PplProtocol(ctx=args.ctx, max_tokens=args.max_tokens)
    models = {"original (torch fp32)": m.model}
    lms = {}
    for name, (path, _, _) in files.items():
        lms[name] = LlamaCppLM(path, args.ctx, args.threads)
        models[name] = lms[name]
    log(f"evaluating {len(models)} models on {protocol.n_scored(tokens.numel(), bos is not None)} tokens…")
    res = evaluate_quality(models, "original (torch fp32)", tokens, protocol, bos_id=bos, progress=False)

    out_rows = []
    for name, r in res.items():
        row = dict(variant=name, ppl=r.ppl, dppl=r.delta_ppl, kl=r.kl_mean, kl99=r.kl_p99,
                   top1=None if r.top1 is None else 100 * r.top1)
        if name in files:
            path, secs, who = files[name]
            size = path.stat().st_size
            row.update(mb=size / 1e6, bpw=8 * size / n_weights, qs=secs, runtime="llama.cpp",
                       tps=lms[name].tokens / lms[name].seconds)
        else:
            row.update(mb=sum(p.numel() * 4 for p in m.model.parameters()) / 1e6, bpw=32.0, runtime="torch")
        out_rows.append(row)
    cols = [("variant", "variant"), ("runtime", "runs in"), ("mb", "file MB", ".1f"), ("bpw", "bits/w", ".2f"),
            ("ppl", "ppl", ".3f"), ("dppl", "Δppl", "+.3f"), ("kl", "KL mean", ".5f"), ("kl99", "KL p99", ".4f"),
            ("top1", "top-1 %", ".2f"), ("qs", "quant s", ".1f"), ("tps", "llama.cpp tok/s", ".0f")]
    if args.quality_only:
        cols = [c for c in cols if c[0] not in ("qs", "tps")]
    print(format_table(out_rows, cols, markdown=args.markdown))
    print()
    print(f"lowbit Q4_K_M made from the F16-rounded weights (llama.cpp's input) vs llama.cpp's Q4_K_M: "
          f"{same}/{total} tensors byte-identical.")
    ours, theirs = "lowbit Q4_K_M", "llama.cpp Q4_K_M (of lowbit F16)"
    diff, two_se = paired_difference(token_nll(lms[ours], tokens, protocol, bos),
                                     token_nll(lms[theirs], tokens, protocol, bos))
    print(f"ppl({ours}) - ppl({theirs}) = {diff:+.3f} (paired over the same tokens: two standard errors "
          f"{two_se:.3f}; {'within' if abs(diff) <= two_se else 'outside'} noise).")
    diff, two_se = paired_difference(token_nll(lms[ours + ' + imatrix'], tokens, protocol, bos),
                                     token_nll(lms[theirs], tokens, protocol, bos))
    print(f"ppl({ours} + imatrix) - ppl({theirs}) = {diff:+.3f} (two standard errors {two_se:.3f}).")
    print(f"Greedy continuations of {PROMPT!r} (24 tokens):")
    for name, lm in lms.items():
        text = lm.generate(PROMPT).replace("\n", " ")
        print(f"- {name}: {text!r}")
    print()
    print(f"({time.perf_counter() - t_all:.0f} s in all; {args.threads} threads; "
          f"{protocol.n_scored(tokens.numel(), bos is not None)} scored tokens, ctx {args.ctx})")
    for lm in lms.values():
        lm.llm.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
