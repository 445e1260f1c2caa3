"""The original model's next-token distributions on the evaluation windows, computed once and cached.

:func:`lowbit.eval.quality.evaluate_quality` runs the original and its variants in lockstep, so
both are in memory together.  For a model where that is too much, the original is run once
(streaming block by block if it does not fit alone, :mod:`lowbit.eval.streaming`), what the
comparison needs is stored in a file, and each variant is later scored against that file alone.

Two kinds of reference
----------------------
``hidden`` (exact)
    The input of the original's output layer at every position (``[W, ctx, H]``, after the final
    norm) plus the output layer itself (weight, bias, Gemma's logit soft-cap).  The baseline's
    logits are recomputed window by window with the same operation on the same tensors, so they
    are bit-identical to the original's forward pass and every number (KL both ways, top-1, Δppl)
    equals the in-memory lockstep path's exactly.  Size: ``W*ctx*H + V*H`` values (SmolLM2-135M,
    default protocol: 38 MB of hidden states + the 113 MB head).
``topk`` (compact, approximate)
    Per scored position the ``k`` largest log-probabilities with their token ids, and the log of
    the mass of all other tokens (``rest``).  KL is computed with the rest as one bucket::

        KL(P||Q) ~ sum_{i in top-k} p_i log(p_i/q_i) + p_rest log(p_rest/q_rest)
        KL(Q||P) ~ sum_{i in top-k} q_i log(q_i/p_i) + q_rest log(q_rest/p_rest)

    where ``q_rest`` is the model's mass on the same complement set.  By the log-sum inequality
    both are lower bounds of the exact values (equal when ``k`` is the vocabulary size).  The
    error is *measured*: the full log-probabilities of ``audit`` evenly spaced positions are
    stored too, and scoring reports ``(exact - approx) / exact`` summed over those positions
    (``kl_rel_err``, ``kl_rev_rel_err``).  On SmolLM2-135M (flat distributions, 49k vocabulary)
    the bucket loses a lot: with RTN int4 g128, k=32 under-reports KL by ~22 % (reverse ~39 %),
    k=1024 still by ~3.5 % (reverse ~11 %); hence ``hidden`` is the default.

Both store the baseline's per-token NLL and argmax, so its perplexity and the variants' top-1
agreement are exact either way.

Cache
-----
A reference is keyed by the model (a fingerprint of its files: names, sizes, modification times,
samples of the bytes; or a hash of the tensors of a model held in memory), the exact window
token ids (text, tokenizer, protocol and BOS rule in one hash), the compute dtype, the kind and
its settings, and the torch/transformers versions.  The file is ``<cache_dir>/<kind>-<hash>.safetensors``
(default ``cache_dir``: ``$LOWBIT_CACHE/reference`` or ``~/.cache/lowbit/reference``), written to a
temporary name and renamed, with the key and a SHA-256 of its tensors in the header; a file that
does not open, names another key, or fails the checksum is reported as corrupt (and, by
:func:`cached_reference`, recomputed and replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.eval.quality import QualityResult, _exp, _kl_rows, _logits

__all__ = ["KINDS", "Reference", "build_reference", "cached_reference", "default_cache_dir", "fingerprint",
           "load_reference", "reference_key", "save_reference", "score_against_reference"]

KINDS = ("hidden", "topk")
FORMAT = 1
_NEG_INF = float("-inf")


def default_cache_dir() -> Path:
    from lowbit.models.builtin import cache_root

    return cache_root() / "reference"


# -- the model's outputs, window by window ---------------------------------------------------------
def _is_streamed(source) -> bool:
    return not isinstance(source, nn.Module) and hasattr(source, "materialize")


def _output_layer(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise LowbitError(f"{type(model).__name__} has no output layer (get_output_embeddings) to rebuild logits from")
    return head


def _outputs(source, windows: Tensor, device, want_hidden: bool, progress: bool, stream: dict
             ) -> Iterator[tuple[Tensor | None, Tensor]]:
    """``(hidden or None, logits)`` per window: ``hidden`` is the output layer's input."""
    if _is_streamed(source):
        from lowbit.eval.streaming import StreamingForward

        yield from StreamingForward(source, windows, device=device, progress=progress, **stream)
        return
    if getattr(source, "training", False):
        raise LowbitError(f"{type(source).__name__} is in training mode; call model.eval() first")
    from tqdm import tqdm

    seen: list[Tensor] = []
    handle = None
    if want_hidden:
        handle = _output_layer(source).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            for w in tqdm(range(windows.shape[0]), desc="quality", unit="window", file=sys.stderr,
                          disable=not progress, leave=False):
                seen.clear()
                logits = _logits(source, windows[w:w + 1].to(device))
                if want_hidden and len(seen) != 1:
                    raise LowbitError(f"{type(source).__name__} called its output layer {len(seen)} times in one "
                                      "forward pass; use the topk reference")
                yield (seen[0] if want_hidden else None), logits
    finally:
        if handle is not None:
            handle.remove()


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _check_logits(logits: Tensor, ctx: int, vocab: int | None) -> None:
    if logits.dim() != 3 or logits.shape[:2] != (1, ctx):
        raise LowbitError(f"the model returned logits of shape {tuple(logits.shape)}, expected (1, {ctx}, vocab)")
    if vocab is not None and logits.shape[-1] != vocab:
        raise LowbitError(f"the model has {logits.shape[-1]} logits, the reference {vocab}")


# -- top-k + rest-mass math ------------------------------------------------------------------------
def topk_rows(lp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids [n, k] ascending, their log-probs [n, k], log of the other tokens' mass [n])``
    from float32 log-probabilities ``lp [n, V]`` (the rest is ``-inf`` when ``k == V``)."""
    ids = lp.topk(k, dim=-1).indices.sort(dim=-1).values
    logp = lp.gather(-1, ids)
    rest = torch.logsumexp(lp.scatter(-1, ids, _NEG_INF), dim=-1)
    return ids, logp, rest


def bucket_kl_rows(ids: Tensor, logp: Tensor, rest: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """KL(P||Q) and KL(Q||P) per row (float64) with P given by :func:`topk_rows` and the rest of
    each distribution as one bucket (module docstring); ``lq [n, V]`` the model's log-probs."""
    lq_top = lq.gather(-1, ids)
    lq_rest = torch.logsumexp(lq.scatter(-1, ids, _NEG_INF), dim=-1)
    fwd = _kl_rows(logp, lq_top) + _kl_rows(rest[:, None], lq_rest[:, None])
    rev = _kl_rows(lq_top, logp) + _kl_rows(lq_rest[:, None], rest[:, None])
    return fwd, rev


# -- the reference --------------------------------------------------------------------------------
@dataclass
class Reference:
    """What the comparison needs of the original (module docstring); ``key`` identifies it."""

    key: dict
    tensors: dict[str, Tensor]
    info: dict = field(default_factory=dict)  # softcap, head dtype, how it was computed
    path: Path | None = None
    _head: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.key["kind"]

    @property
    def n_windows(self) -> int:
        return int(self.key["n_windows"])

    @property
    def ctx(self) -> int:
        return int(self.key["ctx"])

    @property
    def vocab(self) -> int:
        return int(self.info["vocab"])

    def baseline_result(self) -> QualityResult:
        """The original's own row: perplexity from the stored per-token NLL (as the lockstep path sums it)."""
        nll = self.tensors["nll"].reshape(self.n_windows, self.ctx - 1)
        total = 0.0
        for w in range(self.n_windows):
            total += float(nll[w].sum(dtype=torch.float64))
        n = nll.numel()
        return QualityResult(ppl=_exp(total / n), nll=total / n, kl_mean=None, kl_p99=None, top1=None, n_tokens=n,
                             token_nll=nll.reshape(-1).numpy())

    def window_logprobs(self, w: int) -> Tensor:
        """The baseline's float32 log-probs ``[ctx-1, V]`` of window ``w`` (``hidden`` kind only)."""
        t = self.tensors
        if self._head is None:  # stored losslessly in a narrower dtype: widen once, keep only the wide copy
            weight = t["head.weight"]
            self._head = weight if weight.dtype == t["hidden"].dtype else weight.to(t["hidden"].dtype)
            t["head.weight"] = self._head
        logits = _head_logits(t["hidden"][w:w + 1], self._head, t.get("head.bias"), self.info.get("softcap"))
        return torch.log_softmax(logits[0, :-1].float(), dim=-1)


def reference_key(model_id: str, windows: Tensor, kind: str, *, k: int = 32, audit: int = 64,
                  dtype: torch.dtype | None = torch.float32) -> dict:
    """The cache key: everything the stored numbers depend on (module docstring)."""
    import transformers

    if kind not in KINDS:
        raise LowbitError(f"reference kind must be one of {', '.join(KINDS)}, got {kind!r}")
    windows = torch.as_tensor(windows).to(torch.long).contiguous()
    key = {"format": FORMAT, "kind": kind, "model": model_id, "dtype": str(dtype).removeprefix("torch."),
           "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
           "n_windows": int(windows.shape[0]), "ctx": int(windows.shape[1]),
           "torch": torch.__version__, "transformers": transformers.__version__}
    if kind == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LowbitError(f"--topk must be a positive integer, got {k!r}")
        if isinstance(audit, bool) or not isinstance(audit, int) or audit < 0:
            raise LowbitError(f"the number of audit positions must be >= 0, got {audit!r}")
        key.update(k=k, audit=audit)
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def fingerprint(obj) -> str:
    """Identity of a model for the cache key: a path (file or directory: names, sizes, mtimes,
    the first and last MiB of each file) or an ``nn.Module`` held in memory (its tensors' bytes)."""
    h = hashlib.sha256()
    if isinstance(obj, nn.Module):
        for name, t in sorted(obj.state_dict(keep_vars=False).items()):
            if t.is_meta:
                raise LowbitError(f"cannot fingerprint {type(obj).__name__}: {name} is not in memory")
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "tensors:" + h.hexdigest()
    path = Path(obj).expanduser().resolve()
    if not path.exists():
        raise LowbitError(f"cannot fingerprint {obj}: no such file or directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return "files:" + h.hexdigest()


def _positions(n: int, audit: int) -> Tensor:
    if audit == 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, n - 1, min(audit, n), dtype=torch.float64).round().long().unique()


def build_reference(source, windows: Tensor, key: dict, *, device: str | torch.device = "cpu",
                    progress: bool = True, stream: dict | None = None) -> Reference:
    """Run the original (``nn.Module`` in memory, or a lazy model streamed block by block) over
    ``windows [W, ctx]`` and keep what ``key['kind']`` needs (module docstring)."""
    kind = key["kind"]
    windows = torch.as_tensor(windows).to(torch.long)
    W, ctx = windows.shape
    if (W, ctx) != (key["n_windows"], key["ctx"]):
        raise LowbitError(f"the key is for {key['n_windows']} windows of {key['ctx']}, got {W} of {ctx}")
    n = W * (ctx - 1)
    nll = torch.empty(n, dtype=torch.float32)
    argmax = torch.empty(n, dtype=torch.int64)
    out: dict[str, Tensor] = {"nll": nll, "argmax": argmax}
    info: dict = {"streamed": _is_streamed(source)}
    audit_pos = None
    hidden = None
    vocab = None
    for w, (h, logits) in enumerate(_outputs(source, windows, device, kind == "hidden", progress, stream or {})):
        _check_logits(logits, ctx, vocab)
        if vocab is None:
            vocab = logits.shape[-1]
            info["vocab"] = vocab
            if int(windows.max()) >= vocab:
                raise LowbitError(f"token id {int(windows.max())} is out of range for a vocabulary of {vocab} logits")
            if kind == "hidden":
                model = source.model if _is_streamed(source) else source
                head = _output_layer(model)
                weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
                if not isinstance(head, nn.Linear) or weight is None:
                    raise LowbitError(f"the output layer of {type(model).__name__} is a {type(head).__name__}, "
                                      "not a float nn.Linear; use the topk reference")
                softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
                info["softcap"] = softcap
                if not torch.equal(_head_logits(h, weight, bias, softcap), logits):
                    raise LowbitError(f"the logits of {type(model).__name__} are not its output layer applied to "
                                      "that layer's input; use the topk reference")
                hidden = torch.empty((W,) + tuple(h.shape[1:]), dtype=h.dtype)
                wt = weight.detach().to("cpu")
                narrow = wt.to(torch.bfloat16)
                # bf16 holds it exactly (a bf16 checkpoint computed in float32)? Checked a slice
                # of rows at a time: a float32 copy of a 128k-vocabulary head is 2 GB.
                step = max(1, (64 << 20) // max(1, wt[0].numel() * 4))
                lossless = wt.dtype == torch.float32 and all(
                    torch.equal(narrow[r:r + step].to(wt.dtype), wt[r:r + step]) for r in range(0, wt.shape[0], step))
                info["head_dtype"] = str(wt.dtype).removeprefix("torch.")
                out["head.weight"] = narrow if lossless else wt
                del narrow
                if bias is not None:
                    out["head.bias"] = bias.detach().to("cpu")
            else:
                k = min(key["k"], vocab)
                ids_all = torch.empty((n, k), dtype=torch.int32)
                logp_all = torch.empty((n, k), dtype=torch.float32)
                rest_all = torch.empty(n, dtype=torch.float32)
                audit_pos = _positions(n, key["audit"])
                audit_lp = torch.empty((audit_pos.numel(), vocab), dtype=torch.float32)
                out.update(ids=ids_all, logp=logp_all, rest=rest_all, audit_pos=audit_pos, audit_logp=audit_lp)
        rows = slice(w * (ctx - 1), (w + 1) * (ctx - 1))
        x = windows[w]
        pred = logits[0, :-1].float()
        argmax[rows] = pred.argmax(dim=-1).cpu()
        lp = torch.log_softmax(pred, dim=-1)
        nll[rows] = (-lp.gather(-1, x[1:].to(lp.device)[:, None]).squeeze(-1)).cpu()
        if kind == "hidden":
            hidden[w] = h[0].detach().to("cpu")
        else:
            ids, logp, rest = topk_rows(lp, min(key["k"], vocab))
            out["ids"][rows] = ids.to(torch.int32).cpu()
            out["logp"][rows] = logp.cpu()
            out["rest"][rows] = rest.cpu()
            here = (audit_pos >= rows.start) & (audit_pos < rows.stop)
            if bool(here.any()):
                out["audit_logp"][here] = lp[audit_pos[here] - rows.start].cpu()
        del logits, pred, lp
    if kind == "hidden":
        out["hidden"] = hidden
    return Reference(key=key, tensors=out, info=info)


# -- scoring a model against a reference ------------------------------------------------------------
def score_against_reference(ref: Reference, source, windows: Tensor, *, device: str | torch.device = "cpu",
                            progress: bool = True, stream: dict | None = None) -> QualityResult:
    """Perplexity of ``source`` (in memory, or streamed) and its agreement with the reference's
    model, as :func:`~lowbit.eval.quality.evaluate_quality` reports them (for ``hidden``: the
    same numbers bit for bit).  With ``topk`` the KL fields are the bucket approximation and
    ``kl_rel_err``/``kl_rev_rel_err`` its measured relative error on the audit positions."""
    windows = torch.as_tensor(windows).to(torch.long)
    W, ctx = windows.shape
    if (W, ctx) != (ref.n_windows, ref.ctx):
        raise LowbitError(f"the reference holds {ref.n_windows} windows of {ref.ctx} tokens, not {W} of {ctx}")
    if hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest() != ref.key["windows_sha256"]:
        raise LowbitError("the reference was computed on other tokens (text, tokenizer or protocol differ)")
    t = ref.tensors
    nll_sum, n, top1 = 0.0, 0, 0
    kls, kl_revs, nlls = [], [], []
    audit = np.zeros(4)  # exact fwd, approx fwd, exact rev, approx rev over the audit positions
    for w, (_, logits) in enumerate(_outputs(source, windows, device, False, progress, stream or {})):
        _check_logits(logits, ctx, ref.vocab)
        rows = slice(w * (ctx - 1), (w + 1) * (ctx - 1))
        targets = windows[w, 1:].to(logits.device)
        pred = logits[0, :-1].float()
        amax = pred.argmax(dim=-1).cpu()
        lq = torch.log_softmax(pred, dim=-1)
        del logits, pred
        nll = -lq.gather(-1, targets[:, None]).squeeze(-1)
        nll_sum += float(nll.sum(dtype=torch.float64))
        nlls.append(nll.cpu())
        n += ctx - 1
        top1 += int((amax == t["argmax"][rows]).sum())
        if ref.kind == "hidden":
            lp = ref.window_logprobs(w).to(lq.device)
            kls.append(_kl_rows(lp, lq).cpu())
            kl_revs.append(_kl_rows(lq, lp).cpu())
            continue
        dev = lq.device
        fwd, rev = bucket_kl_rows(t["ids"][rows].to(dev, torch.long), t["logp"][rows].to(dev), t["rest"][rows].to(dev), lq)
        kls.append(fwd.cpu())
        kl_revs.append(rev.cpu())
        pos = t["audit_pos"]
        here = (pos >= rows.start) & (pos < rows.stop)
        if bool(here.any()):
            local = (pos[here] - rows.start).to(dev)
            lp_a = t["audit_logp"][here].to(dev)
            lq_a = lq[local]
            audit += [float(_kl_rows(lp_a, lq_a).sum()), float(fwd[local].sum()),
                      float(_kl_rows(lq_a, lp_a).sum()), float(rev[local].sum())]
    base = ref.baseline_result()
    nll_mean = nll_sum / n
    ppl = _exp(nll_mean)
    kl_all = torch.cat(kls).numpy()
    kl_rev_all = torch.cat(kl_revs).numpy()
    res = QualityResult(ppl=ppl, nll=nll_mean, kl_mean=float(kl_all.mean()), kl_p99=float(np.percentile(kl_all, 99)),
                        top1=top1 / n, n_tokens=n, delta_ppl=ppl - base.ppl, kl_rev_mean=float(kl_rev_all.mean()),
                        kl_rev_p99=float(np.percentile(kl_rev_all, 99)), token_nll=torch.cat(nlls).numpy())
    if ref.kind == "topk" and t["audit_pos"].numel():
        res.kl_rel_err = _rel(audit[0], audit[1])
        res.kl_rev_rel_err = _rel(audit[2], audit[3])
    return res


def _rel(exact: float, approx: float) -> float:
    if exact == approx:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(exact - approx) / np.float64(exact))


# -- the file --------------------------------------------------------------------------------------
def _content_sha256(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_reference(ref: Reference, path: str | os.PathLike) -> Path:
    """Write ``ref`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in ref.tensors.items()}
    meta = {"lowbit.reference": json.dumps(ref.key, sort_keys=True), "lowbit.info": json.dumps(ref.info, sort_keys=True),
            "lowbit.sha256": _content_sha256(tensors)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    ref.path = path
    return path


_REQUIRED = {"hidden": ("nll", "argmax", "hidden", "head.weight"),
             "topk": ("nll", "argmax", "ids", "logp", "rest", "audit_pos", "audit_logp")}


def load_reference(path: str | os.PathLike, key: dict | None = None) -> Reference:
    """Read a reference file; LowbitError naming the file if it is unreadable, for another key
    (when ``key`` is given), or its tensors do not match its checksum or its key's shapes."""
    from safetensors import safe_open

    path = Path(path).expanduser()

    def corrupt(why: str) -> LowbitError:
        return LowbitError(f"reference cache file {path} is corrupt ({why}); delete it to recompute")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise LowbitError(f"reference cache file {path} does not exist") from None
    except Exception as e:  # SafetensorError, OSError, ...
        raise corrupt(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__) from None
    try:
        stored_key = json.loads(meta["lowbit.reference"])
        info = json.loads(meta["lowbit.info"])
        checksum = meta["lowbit.sha256"]
    except (KeyError, json.JSONDecodeError, TypeError):
        raise corrupt("no lowbit reference header") from None
    if key is not None and stored_key != key:
        raise corrupt("it holds the reference for another model, text, protocol or setting")
    if _content_sha256(tensors) != checksum:
        raise corrupt("its tensors do not match their checksum")
    kind = stored_key.get("kind")
    missing = [n for n in _REQUIRED.get(kind, ("?",)) if n not in tensors]
    if missing:
        raise corrupt(f"missing {', '.join(missing)}")
    n = stored_key["n_windows"] * (stored_key["ctx"] - 1)
    if tensors["nll"].shape != (n,) or tensors["argmax"].shape != (n,):
        raise corrupt(f"expected {n} scored positions")
    return Reference(key=stored_key, tensors=tensors, info=info, path=path)


def cached_reference(key: dict, cache_dir: str | os.PathLike | None, build: Callable[[], Reference], *,
                     on_corrupt: str = "recompute", log: Callable[[str], None] | None = None
                     ) -> tuple[Reference, bool]:
    """The reference for ``key`` from ``cache_dir`` (hit), else ``build()`` saved there (miss).

    Returns ``(reference, hit)``.  A corrupt cache file is recomputed and replaced
    (``on_corrupt="recompute"``, with a message to ``log``) or raised (``"error"``)."""
    if on_corrupt not in ("recompute", "error"):
        raise LowbitError(f"on_corrupt must be 'recompute' or 'error', got {on_corrupt!r}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{key['kind']}-{key_hash(key)}.safetensors"
    if path.is_file():
        try:
            return load_reference(path, key), True
        except LowbitError as e:
            if on_corrupt == "error":
                raise
            if log is not None:
                log(f"{e}; recomputing it")
    ref = build()
    if ref.key != key:
        raise LowbitError("the reference built does not carry the requested key")
    try:
        save_reference(ref, path)
    except OSError as e:
        raise LowbitError(f"cannot write the reference cache file {path}: {e.strerror or e}") from None
    return ref, False
