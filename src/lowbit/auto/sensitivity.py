"""What each way of storing each tensor costs: predicted KL and bytes, for the allocator.

An *item* is one tensor the allocator decides about (a block linear, the output head, the token
embedding); an *option* is one way to store it (`Option`: a lowbit method + bits + group size,
or a GGUF block type, encoded with the importance matrix or solved by GPTQ onto its grid). For
every (item, option) the table holds

* ``kl``: the predicted end-to-end damage of that choice alone, ½ Σ_r f_r (ΔW H ΔWᵀ)_rr
  (`lowbit.calibration.fisher`: H = the layer's input second moment, f = its output channels'
  Fisher information; both from one pass over calibration text);
* ``bytes``: what the stored tensor takes (the format's tensors, or the GGUF blocks), exactly.

`measure` computes the table once per (model, calibration, options) and keeps it in a cache file
(written as it fills, so an interrupted measurement resumes); a new budget re-reads it. `solve`
makes the weight of one (item, option), the one place that maps an option to a solver.
`rank_check` measures how well the prediction ranks the true end-to-end KL of single tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit import outputs
from lowbit.calibration.fisher import LayerStats, layer_statistics
from lowbit.errors import LowbitError
from lowbit.models.families import block_linears, family_of

TARGETS = ("lowbit", "gguf")
LOWBIT_METHODS = ("gptq", "rtn", "hqq", "awq", "nf4")
DEFAULT_LOWBIT_METHODS = ("gptq", "rtn", "hqq")
GGUF_METHODS = ("imatrix", "gptq", "awq")
DEFAULT_GGUF_METHODS = ("imatrix", "gptq")
EMBED_METHODS = ("rtn", "hqq")  # the embedding's lowbit options (a row lookup: affine rows, no solve)
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS = (32, 64, 128)
# the GGUF block types the allocator offers (a tensor gets those its row length allows)
GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q8_0", "F16")
EMBED = "embed"  # the key of the token embedding among the items
HEAD = "lm_head"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Option:
    """One way to store a tensor. lowbit target: ``method`` (gptq / rtn / hqq / awq) with ``bits``
    and ``group`` (asymmetric, integer zero-points; hqq: real zero-points; awq: AWQ's per-group
    clipping searched on the layer's inputs, on weights AWQ's channel scales were folded into),
    ``method="nf4"`` (bits 4, ``group`` = the NF4 block size, double-quantized absmax) or
    ``method="float"`` (kept as it is). GGUF target: ``gguf_type`` with ``method`` "imatrix" (the type's own
    encoder weighted by the importance matrix) or "gptq" (GPTQ onto the type's grid)."""

    method: str
    bits: int | None = None
    group: int | None = None
    gguf_type: str | None = None

    @property
    def label(self) -> str:
        if self.gguf_type is not None:
            return self.gguf_type if self.method == "imatrix" else f"{self.gguf_type}+{self.method}"
        if self.method == "float":
            return "float"
        return f"{self.method}-w{self.bits}g{self.group}"

    @classmethod
    def parse(cls, label: str) -> "Option":
        if label == "float":
            return cls("float")
        if "-w" in label:
            meth, _, rest = label.partition("-w")
            bits, _, group = rest.partition("g")
            return cls(meth, int(bits), int(group))
        t, _, meth = label.partition("+")
        return cls(meth or "imatrix", gguf_type=t)

    def scheme(self):
        from lowbit.core.scheme import QuantScheme

        return QuantScheme(bits=self.bits, symmetric=False, granularity="group", group_size=self.group,
                           zero_point="float" if self.method == "hqq" else "int")


def gguf_block(t: str) -> int:
    from lowbit.export import gguf_quants

    return gguf_quants.BLOCK_LAYOUTS[t][0] if t in gguf_quants.BLOCK_LAYOUTS else 32


def options_for(target: str, shape: tuple[int, int], *, methods=None, bits=DEFAULT_BITS,
                groups=DEFAULT_GROUPS, types=GGUF_TYPES, embedding: bool = False) -> list[Option]:
    """The options of a tensor of ``shape`` [rows, row length] for ``target``: every method x bits x
    group whose group divides the row (lowbit; NF4 once per group, at 4 bits; the embedding takes
    rtn / hqq rows or stays float), or every GGUF type whose block divides it (the embedding is
    encoded, never GPTQ-solved). "awq" adds no option of its own to the GGUF target: it is the
    channel scaling `prepare` folds into the model first."""
    n = shape[-1]
    if target == "gguf":
        methods = tuple(methods or DEFAULT_GGUF_METHODS)
        out = []
        for t in types:
            if n % gguf_block(t):
                continue
            out.append(Option("imatrix", gguf_type=t))
            if "gptq" in methods and not embedding and t != "F16":
                out.append(Option("gptq", gguf_type=t))
        return out
    if target != "lowbit":
        raise LowbitError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    methods = tuple(methods or DEFAULT_LOWBIT_METHODS)
    if embedding:
        methods = tuple(m for m in methods if m in EMBED_METHODS)
    out = []
    for m in methods:
        if m == "nf4":
            out += [Option(m, 4, g) for g in groups if n % g == 0 and g >= 16 and g & (g - 1) == 0]
        else:
            out += [Option(m, b, g) for b in bits for g in groups if n % g == 0]
    if embedding:
        out.insert(0, Option("float"))
    return out


# --------------------------------------------------------------------------------------------
# solving one (item, option)
# --------------------------------------------------------------------------------------------

def solve(W: Tensor, stats: LayerStats, opt: Option, *, clip: bool = True):
    """The stored weight of ``W`` under ``opt``: (dequantized float32 W_hat, stored object, bytes).
    The stored object is a lowbit weight format (lowbit target), the raw GGUF blocks (uint8
    [rows, bytes]) or None for "float". ``clip``: awq searches each group's clipping (AWQ leaves
    q_proj / k_proj unclipped; `item_cost` says which)."""
    W = W.detach().float()
    if opt.method == "float":
        return W, None, W.numel() * 2
    if opt.gguf_type is not None:
        from lowbit.export import gguf_imatrix
        from lowbit.export.gguf import encode_tensor

        t = opt.gguf_type
        imat = None if stats.H is None else torch.diagonal(stats.H).float().numpy()
        if opt.method == "gptq":
            from lowbit.export.gguf_grid import gptq_onto

            raw, _ = gptq_onto(W, stats.H.float(), t, imat)
        else:
            raw = encode_tensor(W.numpy(), t, imat)
        raw = np.ascontiguousarray(raw)
        if t == "F16":
            W_hat = torch.from_numpy(raw.view(np.float16).astype(np.float32)).reshape(W.shape)
        else:
            W_hat = torch.from_numpy(gguf_imatrix.dequantize(raw, t)).reshape(W.shape)  # (IQ4_NL too)
        return W_hat, raw, int(raw.nbytes)
    scheme = opt.scheme()
    if opt.method == "rtn":
        from lowbit.algorithms.rtn import RTNConfig, rtn_quantize

        fmt = rtn_quantize(W, RTNConfig(scheme=scheme))
    elif opt.method == "gptq":
        from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize

        if stats.H is None:
            raise LowbitError("gptq needs the layer's inputs; the embedding takes rtn or hqq")
        fmt, _ = gptq_quantize(W, (2 * stats.H).float(), GPTQConfig(scheme=scheme))
    elif opt.method == "hqq":
        from lowbit.algorithms.hqq import HQQConfig, hqq_quantize

        fmt, _ = hqq_quantize(W, HQQConfig(scheme=scheme))
    elif opt.method == "awq":
        from lowbit.algorithms.awq import awq_quantize, search_clip

        if stats.H is None:
            raise LowbitError("awq needs the layer's inputs; the embedding takes rtn or hqq")
        shrink = search_clip(stats.H.float(), W, scheme) if clip else None
        fmt = awq_quantize(W, shrink, scheme)
    elif opt.method == "nf4":
        from lowbit.algorithms.nf4 import NF4Config, nf4_quantize

        fmt = nf4_quantize(W, NF4Config(blocksize=opt.group))
    else:
        raise LowbitError(f"no per-tensor solver for method {opt.method!r}; choose from {', '.join(LOWBIT_METHODS)}")
    return fmt.dequantize().float(), fmt, int(fmt.nbytes)


def predicted_kl(dW: Tensor, stats: LayerStats, *, extra: LayerStats | None = None) -> float:
    """½ Σ_r f_r (ΔW H ΔWᵀ)_rr for a linear layer; for the embedding ½ Σ_r f_r s² Σ_v w_v ΔW_vr²
    with w_v half the tokens' calibration frequency and half uniform (tokens unseen in calibration
    still matter). ``extra``: a tied output head's statistics (the same tensor plays both roles)."""
    # float32 products (a vocabulary-sized tied head is 262k x 640 rows), float64 sums
    dW = dW.float()
    if stats.H is not None:
        per_row = ((dW @ stats.H.float()) * dW).sum(1, dtype=torch.float64)  # (ΔW H ΔWᵀ)_rr [out]
        kl = 0.5 * float((stats.f * per_row).sum())
    else:
        V = dW.shape[0]
        w = 0.5 * stats.counts / stats.counts.sum() + 0.5 / V          # [vocab]
        per_col = (w[:, None].float() * dW * dW).sum(0, dtype=torch.float64) * stats.scale ** 2  # [d]
        kl = 0.5 * float((stats.f * per_col).sum())
    if extra is not None:
        kl += predicted_kl(dW, extra)
    return kl


# --------------------------------------------------------------------------------------------
# the items of a model
# --------------------------------------------------------------------------------------------

def tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings()
    return out is not None and out.weight is emb.weight


def items_of(model: nn.Module, target: str, *, head: bool = True, embedding: bool | None = None) -> dict[str, nn.Module]:
    """The tensors the allocator decides about, by module name (the embedding as `EMBED`): every
    block linear, the output head (``head``), and the token embedding (default: for the GGUF
    target, where it is always written; a tied head is then the embedding itself)."""
    family_of(model)  # LowbitError for a family lowbit does not know
    out: dict[str, nn.Module] = {}
    if embedding is None:
        embedding = target == "gguf"
    is_tied = tied(model)
    if embedding:
        out[EMBED] = model.get_input_embeddings()
    out.update(block_linears(model))
    lm = model.get_output_embeddings()
    if head and isinstance(lm, nn.Linear) and not (is_tied and embedding):
        out[HEAD] = lm
    for k, mod in out.items():
        w = mod.weight
        if not torch.isfinite(w).all():
            raise LowbitError(f"{k} has NaN/Inf weights; refusing to measure it")
    return out


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

@dataclass
class Table:
    """kl[item][label], bytes[item][label], the items' shapes, and how it was measured (``key``)."""

    key: dict
    shapes: dict[str, list[int]] = field(default_factory=dict)
    kl: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def options(self, item: str) -> list[str]:
        return list(self.kl[item])

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Table":
        if d.get("version") != CACHE_VERSION:
            raise LowbitError("sensitivity cache from another version")
        return cls(d["key"], d["shapes"], d["kl"], d["bytes"], d.get("seconds", 0.0))


def cache_dir() -> Path:
    base = os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    return Path(base) / "auto"


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _save(table: Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with outputs.atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(table.to_json()))


def load_table(path: Path, key: dict) -> Table | None:
    try:
        t = Table.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, LowbitError):
        return None
    return t if t.key == key else None


def statistics(model: nn.Module, items: dict[str, nn.Module], samples: Tensor, *, draws: int = 1, seed: int = 0,
               progress: bool = True) -> dict[str, LayerStats]:
    """`LayerStats` of every item (a tied head's statistics also kept under `HEAD` when the
    embedding stands for it)."""
    layers = {k: m for k, m in items.items() if k != EMBED}
    if EMBED in items and tied(model) and HEAD not in layers:
        layers[HEAD] = model.get_output_embeddings()
    return layer_statistics(model, layers, samples, embedding=EMBED if EMBED in items else None,
                            draws=draws, seed=seed, progress=progress)


def clips(item: str, model: nn.Module) -> bool:
    """Whether AWQ searches the clipping of ``item``'s groups (not q_proj / k_proj: their error
    passes through the softmax, which the layer-output loss does not see)."""
    from lowbit.models.families import awq_layout

    if item in (EMBED, HEAD):
        return True
    try:
        no_clip = awq_layout(getattr(getattr(model, "config", None), "model_type", None)).no_clip
    except LowbitError:
        return True
    return not any(item.endswith("." + n) for n in no_clip)


def item_cost(item: str, W: Tensor, stats: dict[str, LayerStats], opt: Option, model: nn.Module):
    """(W_hat, stored, bytes, predicted KL) of one item under one option."""
    st = stats[item]
    extra = stats.get(HEAD) if item == EMBED and HEAD in stats and tied(model) else None
    if item == EMBED and opt.method == "gptq":
        raise LowbitError("the embedding is not GPTQ-solved")
    W_hat, stored, nbytes = solve(W, st, opt, clip=clips(item, model))
    if opt.method == "float":  # kept as it is: a tied head is stored once, with the embedding
        nbytes = 0 if item == HEAD and tied(model) else W.numel() * W.element_size()
    elif item == EMBED and opt.gguf_type is None and tied(model):
        nbytes *= 2  # lowbit target: a quantized tied pair is stored twice (embedding rows, head)
    return W_hat, stored, nbytes, predicted_kl(W_hat - W.float(), st, extra=extra)


def measure(model: nn.Module, items: dict[str, nn.Module], stats: dict[str, LayerStats],
            options: dict[str, list[Option]], key: dict, *, cache: Path | None = None,
            progress: bool = True, log=None, table: Table | None = None) -> Table:
    """The table of every item x option (module docstring), resumed from / saved to ``cache``
    (``table``: the cache's table, already read by the caller)."""
    if table is None and cache is not None:
        table = load_table(cache, key)
    if table is None:
        table = Table(key=key)
    todo = [k for k in items if k not in table.kl or set(table.kl[k]) != {o.label for o in options[k]}]
    t0 = time.perf_counter()
    last_save = time.monotonic()
    for k in tqdm(todo, desc="sensitivity", unit="tensor", disable=not progress):
        W = items[k].weight.detach()
        kl, nb = {}, {}
        for opt in options[k]:
            _, _, nbytes, pk = item_cost(k, W, stats, opt, model)
            kl[opt.label], nb[opt.label] = pk, nbytes
        table.shapes[k] = list(W.shape)
        table.kl[k], table.bytes[k] = kl, nb
        if cache is not None and time.monotonic() - last_save > 30:
            table.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            _save(table, cache)
            last_save = time.monotonic()
    table.seconds += time.perf_counter() - t0
    table.kl = {k: table.kl[k] for k in items}  # the model's order
    table.bytes = {k: table.bytes[k] for k in items}
    table.shapes = {k: table.shapes[k] for k in items}
    if cache is not None and todo:
        _save(table, cache)
    return table


# --------------------------------------------------------------------------------------------
# the true KL, and how well the prediction ranks it
# --------------------------------------------------------------------------------------------

class KLMeter:
    """Mean KL (nats per position) of a model's next-token distributions from the original's on
    fixed token windows ``ids`` [n, L]; the original's log-probabilities are computed once."""

    def __init__(self, model: nn.Module, ids: Tensor, batch_size: int = 1):
        self.model, self.ids, self.batch_size = model, ids, batch_size
        self.ref = [lp for lp in self._logprobs()]

    @torch.no_grad()
    def _logprobs(self):
        self.model.eval()
        for i in range(0, self.ids.shape[0], self.batch_size):
            logits = self.model(input_ids=self.ids[i:i + self.batch_size], use_cache=False).logits
            yield torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def kl(self, model: nn.Module | None = None) -> float:
        """KL of ``model`` (default: the meter's model as it is now) from the reference."""
        if model is not None:
            self.model = model
        total, n = 0.0, 0
        for ref, lq in zip(self.ref, self._logprobs()):
            total += float((ref.exp() * (ref - lq)).sum())
            n += ref.shape[0] * ref.shape[1]
        if not np.isfinite(total):
            raise LowbitError("the model's log-probabilities are not finite; the KL cannot be measured")
        return total / n


def swapped_weight(module: nn.Module, W_hat: Tensor):
    """A context in which ``module.weight`` holds ``W_hat`` (restored after)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = module.weight.data
        module.weight.data = W_hat.to(old.dtype).reshape(old.shape)
        try:
            yield
        finally:
            module.weight.data = old
    return ctx()


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties: their mean rank
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if len(ra) < 3 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_check(model: nn.Module, items: dict[str, nn.Module], stats: dict[str, LayerStats],
               options: dict[str, list[Option]], meter: KLMeter, *, n_items: int = 8, n_options: int = 4,
               seed: int = 0, progress: bool = True) -> dict:
    """Quantize each of ``n_items`` sampled tensors alone with ``n_options`` of its options
    (spread over its range), measure the true end-to-end KL (``meter``) and compare with the
    prediction: {"rows": [(item, label, predicted, measured)], "spearman": ρ over all rows,
    "spearman_within": mean ρ within each tensor, "spearman_across": ρ across tensors at one option}."""
    rng = random.Random(seed)
    keys = list(items)
    picked = sorted(rng.sample(keys, min(n_items, len(keys))), key=keys.index)
    rows = []
    for k in tqdm(picked, desc="rank check", unit="tensor", disable=not progress):
        opts = [o for o in options[k] if o.method != "float" and o.gguf_type != "F16"]
        if len(opts) > n_options:
            idx = np.linspace(0, len(opts) - 1, n_options).round().astype(int)
            opts = [opts[i] for i in sorted(set(idx))]
        W = items[k].weight.detach()
        for opt in opts:
            W_hat, _, _, pk = item_cost(k, W, stats, opt, model)
            with swapped_weight(items[k], W_hat):
                kl = meter.kl()
            rows.append((k, opt.label, pk, kl))
    within = []
    for k in picked:
        r = [x for x in rows if x[0] == k]
        rho = spearman([x[2] for x in r], [x[3] for x in r])
        if np.isfinite(rho):
            within.append(rho)
    # across tensors: the one option every picked tensor was measured with most often
    labels = {}
    for x in rows:
        labels.setdefault(x[1], []).append(x)
    common = max(labels.values(), key=len)
    return {"rows": rows, "spearman": spearman([x[2] for x in rows], [x[3] for x in rows]),
            "spearman_within": float(np.mean(within)) if within else float("nan"),
            "spearman_across": spearman([x[2] for x in common], [x[3] for x in common]),
            "across_option": common[0][1] if common else None}
