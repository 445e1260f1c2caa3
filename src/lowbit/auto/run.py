"""`lowbit auto`: the best mix of per-tensor choices for a size budget, measured.

1. measure (`lowbit.auto.sensitivity`): one pass over calibration text for every tensor's H and
   output Fisher, then the predicted KL and bytes of every option of every tensor (cached per
   model, calibration and option set: a new budget costs no new measurement);
2. allocate (`lowbit.auto.knapsack`): the least total predicted KL within the budget, exactly;
3. verify: the whole plan's KL measured end to end on calibration windows the statistics did not
   see (every tensor's dequantized choice in place at once), against the sum predicted;
4. repair (greedy, ``repair_rounds``): the tensors that carry most of the predicted KL are each
   measured alone; each one's options are re-scaled by its measured/predicted ratio, the
   knapsack is solved again, and the new plan is kept only if its measured KL is lower;
5. the plan is applied (lowbit target: quantized modules; GGUF target: the chosen types and
   GPTQ-solved blocks) and written with ``auto-plan.json`` next to it; a budget the written
   output misses on disk (headers, tokenizer) is tightened by the excess and solved again.

``rank_check`` (optional, ``rank_items`` > 0) reports how well the prediction ranks the true KL of
single tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.auto import knapsack
from lowbit.auto import sensitivity as S
from lowbit.auto.plan import Entry, Plan
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class AutoConfig:
    target: str = "lowbit"
    bits: float | None = None          # budget: bits per weight over the allocated tensors
    size: int | None = None            # budget: bytes of the whole output on disk
    tok_s: float | None = None         # budget: decoded tokens per second (lean decoder, batch 1)
    threads: int | None = None         # for the speed budget's timings (default: torch's)
    methods: tuple[str, ...] | None = None
    bit_choices: tuple[int, ...] = S.DEFAULT_BITS
    groups: tuple[int, ...] = S.DEFAULT_GROUPS
    gguf_types: tuple[str, ...] = S.GGUF_TYPES
    head: bool = True                  # allocate the output head too
    embedding: bool = True             # and the token embedding (lowbit target: not under a speed budget, and
                                       # with a tied head only when the head is allocated; GGUF: always)
    n_samples: int = 16
    seq_len: int = 256
    seed: int = 0
    draws: int = 1
    verify_samples: int = 4            # windows (a different seed) for the end-to-end checks
    repair_rounds: int = 1
    repair_items: int = 8
    uniform_check: bool = True         # also measure the best uniform plan of each method that fits
    rank_items: int = 0
    cache: bool = True

    def __post_init__(self) -> None:
        if self.target not in S.TARGETS:
            raise LowbitError(f"unknown target {self.target!r}; choose one of {', '.join(S.TARGETS)}")
        if sum(b is not None for b in (self.bits, self.size, self.tok_s)) != 1:
            raise LowbitError("give exactly one budget: bits per weight, a size or a speed")
        if self.tok_s is not None and (self.tok_s <= 0 or self.target != "lowbit"):
            raise LowbitError("a speed budget is a positive tokens/s, timed on lowbit's kernels (the lowbit target)")
        if self.bits is not None and not 1 <= self.bits <= 32:
            raise LowbitError(f"the bits budget must be between 1 and 32 bits per weight, got {self.bits}")
        if self.size is not None and self.size <= 0:
            raise LowbitError(f"the size budget must be positive, got {self.size}")
        known = S.LOWBIT_METHODS if self.target == "lowbit" else S.GGUF_METHODS
        bad = [m for m in self.methods or () if m not in known]
        if bad:
            raise LowbitError(f"method(s) {', '.join(bad)} are not offered for the {self.target} target; "
                              f"choose from {', '.join(known)}")


@dataclass
class Measured:
    """What `prepare` found: the items, their statistics, options, the table and the KL meter."""

    items: dict[str, nn.Module]
    stats: dict
    options: dict[str, list[S.Option]]
    table: S.Table
    meter: S.KLMeter
    calibration: dict
    rank: dict | None = None
    cache_path: str | None = None
    solved: dict = field(default_factory=dict)  # (item, label) -> (W_hat, stored, bytes), the current plan's
    kernel_us: dict | None = None  # item -> label -> µs per decoded token (speed budget)
    overhead_us: float = 0.0       # the rest of a decoded token's time
    tied_head: nn.Module | None = None  # the float head tied to the allocated embedding, if any
    keep_all: bool = False  # keep every solved weight (a benchmark comparing many plans), not only the plan's


def _model_id(m) -> dict:
    from lowbit.api import _with_fingerprint

    src = _with_fingerprint(dict(m.source or {}))
    return {k: v for k, v in src.items() if k in ("kind", "path", "name", "fingerprint", "spec")}


def prepare(m, cfg: AutoConfig, *, progress: bool = True, log=print) -> Measured:
    from lowbit.data.texts import calibration_samples, load_text

    if m.record is not None:
        raise LowbitError(f"{m.name} is already quantized; auto-compress the original model")
    model = m.model
    smooth = "awq" in (cfg.methods or ())
    items = S.items_of(model, cfg.target, head=cfg.head, embedding=allocates_embedding(model, cfg))
    if cfg.size is not None:  # a size nothing fits is refused before any measurement
        budget_bytes(cfg, S.Table(key={}), fixed_bytes(m, items, cfg.target))
    text = load_text("calibration")
    samples = calibration_samples(m.tokenizer, n_samples=cfg.n_samples, seq_len=cfg.seq_len, text=text, seed=cfg.seed)
    if smooth:  # AWQ's channel scales folded in first: every option is then chosen on the scaled weights
        t0 = time.perf_counter()
        alphas = awq_scales(model, samples, progress=progress)
        log(f"AWQ channel scales folded into {len(alphas)} producers (4-bit g{AWQ_GROUP} search) in "
            f"{time.perf_counter() - t0:.0f} s")
        items = S.items_of(model, cfg.target, head=cfg.head, embedding=allocates_embedding(model, cfg))
    verify_ids = calibration_samples(m.tokenizer, n_samples=cfg.verify_samples, seq_len=cfg.seq_len, text=text,
                                     seed=cfg.seed + 1)
    calib = {"text": "calibration", "n_samples": cfg.n_samples, "seq_len": cfg.seq_len, "seed": cfg.seed,
             "draws": cfg.draws}
    options = {k: S.options_for(cfg.target, tuple(mod.weight.shape), methods=cfg.methods, bits=cfg.bit_choices,
                                groups=cfg.groups, types=cfg.gguf_types, embedding=k == S.EMBED)
               for k, mod in items.items()}
    if cfg.target == "lowbit" and S.HEAD in items:
        options[S.HEAD].insert(0, S.Option("float"))
    for k, o in options.items():
        if not o:
            raise LowbitError(f"{k} ({tuple(items[k].weight.shape)}) has no option: no group size or block type "
                              f"divides its rows of {items[k].weight.shape[-1]}")
    from lowbit.version import __version__

    key = {"model": _model_id(m), "calibration": calib, "target": cfg.target, "version": __version__,
           "options": {k: [o.label for o in v] for k, v in options.items()},
           **({"transform": f"awq-w4g{AWQ_GROUP}"} if smooth else {})}
    cache = S.cache_dir() / f"sensitivity-{S.key_hash(key)}.json" if cfg.cache else None
    t0 = time.perf_counter()
    stats = S.statistics(model, items, samples, draws=cfg.draws, seed=cfg.seed, progress=progress)
    log(f"statistics of {len(items)} tensors over {samples.numel()} tokens in {time.perf_counter() - t0:.0f} s")
    prior = S.load_table(cache, key) if cache is not None else None  # read once
    cached = prior is not None and set(prior.kl) >= set(items)
    table = S.measure(model, items, stats, options, key, cache=cache, progress=progress, table=prior)
    log(f"sensitivity table: {sum(len(v) for v in options.values())} (tensor, option) pairs "
        f"({'from the cache ' + str(cache) if cached else f'measured in {table.seconds:.0f} s'})")
    meter = S.KLMeter(model, verify_ids)
    out = Measured(items, stats, options, table, meter, calib, cache_path=None if cache is None else str(cache))
    if S.EMBED in items and S.tied(model):
        out.tied_head = model.get_output_embeddings()
    if cfg.tok_s is not None:
        from lowbit.auto import speed

        speed.check_items(items)
        out.kernel_us = speed.kernel_costs(table.shapes, options, threads=cfg.threads, progress=progress, log=log)
        float_us = speed.float_costs(table.shapes, threads=cfg.threads, log=log)
        out.overhead_us = speed.overhead_us(model, items, float_us, threads=cfg.threads)
        log(f"decode model: {out.overhead_us:.0f} µs per token besides the allocated tensors' products "
            f"(float: {sum(float_us.values()):.0f} µs)")
    if cfg.rank_items:
        out.rank = S.rank_check(model, items, stats, options, meter, n_items=cfg.rank_items, progress=progress)
        log(f"proxy vs true single-tensor KL on {len(out.rank['rows'])} (tensor, option) pairs: Spearman "
            f"{out.rank['spearman']:.3f} (within a tensor {out.rank['spearman_within']:.3f}, across tensors "
            f"{out.rank['spearman_across']:.3f})")
    return out


AWQ_GROUP = 128  # the grid AWQ's scale search assumes (AWQ's default: 4 bits, groups of 128)


def awq_scales(model, samples, *, progress: bool = True) -> dict[str, float]:
    """AWQ's channel scaling folded into ``model`` (it computes the same; its linears hold the
    scaled weights), searched on ``samples``; the α chosen per scaling group."""
    from lowbit.algorithms.awq import AWQConfig, ScalesOnly
    from lowbit.calibration.sequential import run_sequential
    from lowbit.core.scheme import QuantScheme

    method = ScalesOnly(AWQConfig(scheme=QuantScheme(4, False, "group", AWQ_GROUP)))
    run_sequential(model, method, samples, progress=progress)
    return method.alphas


def allocates_embedding(model, cfg: AutoConfig) -> bool:
    """Whether the token embedding is one of the allocated tensors (see `AutoConfig.embedding`)."""
    if cfg.target == "gguf":
        return True  # always written; a tied head is the embedding itself
    return cfg.embedding and cfg.tok_s is None and (cfg.head or not S.tied(model))


def fixed_bytes(m, items: dict[str, nn.Module], target: str) -> int:
    """Bytes of what the output stores besides the allocated tensors (an estimate: the float
    tensors outside them, in the checkpoint's dtype; the writer's headers come on top)."""
    from lowbit.eval.size import model_bytes

    return model_bytes(m.model, skip=[mod.weight for mod in items.values()], gguf=target == "gguf")


def budget_units(cfg: AutoConfig, meas: "Measured", fixed: int) -> int:
    """The knapsack's capacity: bytes (bits or size budget) or kernel time in `SPEED_UNIT` (speed)."""
    if cfg.tok_s is not None:
        us = 1e6 / cfg.tok_s - meas.overhead_us
        fastest = sum(min(v.values()) for v in meas.kernel_us.values())
        if 0 < us < fastest:
            raise LowbitError(f"{cfg.tok_s:g} tokens/s is out of reach with these options: the fastest choice of every "
                              f"tensor takes {fastest:.0f} µs per token and the rest {meas.overhead_us:.0f} µs "
                              f"(at most {1e6 / (fastest + meas.overhead_us):.1f} tokens/s)")
        if us <= 0:
            raise LowbitError(f"{cfg.tok_s} tokens/s leaves no time for the products: the rest of a token takes "
                              f"{meas.overhead_us:.0f} µs here (at most {1e6 / meas.overhead_us:.0f} tokens/s)")
        return int(us / SPEED_UNIT)
    return budget_bytes(cfg, meas.table, fixed)


def budget_bytes(cfg: AutoConfig, table: S.Table, fixed: int) -> int:
    if cfg.bits is not None:
        n = sum(r * c for r, c in table.shapes.values())
        return int(cfg.bits * n // 8)
    b = cfg.size - fixed
    if b <= 0:
        raise LowbitError(f"the size budget {cfg.size} is below what the model stores besides its quantized tensors "
                          f"({fixed} bytes)")
    return int(b)


SPEED_UNIT = 0.01  # µs: the speed budget's knapsack counts hundredths of a microsecond


def units(meas: "Measured") -> dict[str, dict[str, int]] | None:
    """The knapsack sizes of a speed budget (kernel time in `SPEED_UNIT`), or None (bytes)."""
    if meas.kernel_us is None:
        return None
    return {k: {lab: int(round(us / SPEED_UNIT)) for lab, us in v.items()} for k, v in meas.kernel_us.items()}


def allocate(table: S.Table, budget: int, scale: dict[str, float] | None = None,
             sizes: dict[str, dict[str, int]] | None = None) -> tuple[dict[str, str], knapsack.Solution]:
    """The option of every item minimising Σ predicted KL (each item's row times ``scale[item]``)
    within ``budget`` bytes (or ``budget`` units of ``sizes``, e.g. kernel time)."""
    keys = list(table.kl)
    labels = [table.options(k) for k in keys]
    scale = scale or {}
    sizes = sizes or table.bytes
    opts = [[(table.kl[k][lab] * scale.get(k, 1.0), int(sizes[k][lab])) for lab in labs]
            for k, labs in zip(keys, labels)]
    sol = knapsack.solve(opts, budget)
    return {k: labels[i][c] for i, (k, c) in enumerate(zip(keys, sol.choice))}, sol


def _solved(meas: Measured, item: str, label: str, model):
    key = (item, label)
    if key not in meas.solved:
        W = meas.items[item].weight.detach()
        # the table already holds the bytes and the prediction: only the weight is made here
        W_hat, stored, _ = S.solve(W, meas.stats[item], S.Option.parse(label), clip=S.clips(item, model))
        meas.solved[key] = (W_hat, stored, int(meas.table.bytes[item][label]))
    return meas.solved[key]


def plan_kl(meas: Measured, choice: dict[str, str], model, meter: S.KLMeter | None = None) -> float:
    """The KL of the whole plan, every item's dequantized choice in place at once (measured by
    ``meter``, default the calibration windows kept for verification)."""
    import contextlib

    with contextlib.ExitStack() as stack:
        for k, lab in choice.items():
            stack.enter_context(S.swapped_weight(meas.items[k], _solved(meas, k, lab, model)[0]))
        kl = (meter or meas.meter).kl()
    if not meas.keep_all:
        keep = set(choice.items())
        for key in list(meas.solved):  # only the current plan's weights are kept
            if key not in keep:
                del meas.solved[key]
    return kl


def alone_kl(meas: Measured, item: str, label: str, model) -> float:
    with S.swapped_weight(meas.items[item], _solved(meas, item, label, model)[0]):
        return meas.meter.kl()


def uniform_seeds(table: S.Table, budget: int, sizes=None) -> list[str]:
    """Per method, the option every item offers whose uniform plan is the largest within the
    budget (the best uniform setting of that method that fits)."""
    sizes = sizes or table.bytes
    common = set.intersection(*(set(v) for v in table.kl.values())) - {"float"} if table.kl else set()
    best: dict[str, tuple[int, str]] = {}
    for lab in common:
        total = sum(sizes[k][lab] for k in table.kl)
        meth = S.Option.parse(lab).method
        if total <= budget and (meth not in best or total > best[meth][0]):
            best[meth] = (total, lab)
    return sorted(lab for _, lab in best.values())


def greedy_fill(table: S.Table, choice: dict[str, str], budget: int, sizes=None,
                scale: dict[str, float] | None = None, method: str | None = None) -> dict[str, str]:
    """``choice`` improved one tensor at a time within the budget: each step takes the change of
    one item's option with the most predicted KL saved per byte added (or any saving at no cost);
    ``method``: only that method's options (a uniform plan that beat the allocated one did so
    where the proxy misjudged methods against each other: within one method it ranks well)."""
    sizes = sizes or table.bytes
    scale = scale or {}
    choice = dict(choice)
    used = sum(sizes[k][v] for k, v in choice.items())
    while True:
        step = None
        for k, cur in choice.items():
            f = scale.get(k, 1.0)
            for lab, kl in table.kl[k].items():
                if method is not None and S.Option.parse(lab).method != method:
                    continue
                gain = (table.kl[k][cur] - kl) * f
                extra = sizes[k][lab] - sizes[k][cur]
                if gain <= 0 or used + extra > budget:
                    continue
                rate = float("inf") if extra <= 0 else gain / extra
                if step is None or rate > step[0]:
                    step = (rate, k, lab, extra)
        if step is None:
            return choice
        _, k, lab, extra = step
        choice[k] = lab
        used += extra


def _uniform_check(meas: Measured, best: tuple[float, dict], budget: int, sizes, scale: dict, rounds: list,
                   model, log) -> tuple[float, dict]:
    """The end-to-end check against uniform settings: the best uniform plan of each method that
    fits is measured on the verification windows; one that beats the allocated plan (the proxy
    misses how errors compound, most at 2 bits) becomes the plan, filled greedily with the bytes
    it leaves (kept only if that measures lower still)."""
    table = meas.table
    for lab in uniform_seeds(table, budget, sizes):
        uni = {k: lab for k in table.kl}
        kl_u = plan_kl(meas, uni, model)
        row = {"round": f"uniform {lab}", "measured_kl": kl_u, "kept": kl_u < best[0]}
        if kl_u < best[0]:
            filled = greedy_fill(table, uni, budget, sizes, scale, method=S.Option.parse(lab).method)
            if filled != uni:
                kl_f = plan_kl(meas, filled, model)
                row.update({"filled_kl": kl_f, "changed": sum(filled[k] != lab for k in filled)})
                if kl_f < kl_u:
                    uni, kl_u = filled, kl_f
            best = (kl_u, uni)
        rounds.append(row)
        log(f"uniform {lab} measured {kl_u:.4g}" + (": better than the allocated plan, taken" if row["kept"] else ""))
    return best


def search(m, meas: Measured, cfg: AutoConfig, budget: int, *, log=print) -> Plan:
    """Allocate, verify end to end, repair; the best plan found (module docstring, steps 2-4)."""
    model = m.model
    table = meas.table
    scale: dict[str, float] = {}
    sizes = units(meas)
    choice, sol = allocate(table, budget, sizes=sizes)
    kl = plan_kl(meas, choice, model)
    rounds = [{"round": 0, "predicted_kl": sol.cost, "measured_kl": kl, "bytes": sol.size, "gap": sol.gap}]
    nbytes = sum(table.bytes[k][v] for k, v in choice.items())
    log(f"plan: {8 * nbytes / max(1, sum(r * c for r, c in table.shapes.values())):.3f} bits/weight, "
        f"predicted KL {sol.cost:.4g} (no plan within the budget can be predicted below {sol.lower_bound:.4g}), "
        f"measured {kl:.4g}")
    alone: dict[tuple[str, str], float] = {}
    best = (kl, choice)
    for r in range(1, cfg.repair_rounds + 1):
        heavy = sorted(choice, key=lambda k: -table.kl[k][choice[k]] * scale.get(k, 1.0))[:cfg.repair_items]
        for k in heavy:
            if (k, choice[k]) not in alone:
                alone[(k, choice[k])] = alone_kl(meas, k, choice[k], model)
            pred = table.kl[k][choice[k]]
            if pred > 0:
                scale[k] = max(alone[(k, choice[k])], 1e-12) / pred
        new, sol2 = allocate(table, budget, scale, sizes=sizes)
        if new == best[1]:
            rounds.append({"round": r, "predicted_kl": sol2.cost, "measured_kl": best[0], "bytes": sol2.size,
                           "changed": 0})
            log(f"repair round {r}: measured {len(heavy)} tensors alone; the plan stays")
            break
        kl2 = plan_kl(meas, new, model)
        changed = sum(new[k] != best[1][k] for k in new)
        rounds.append({"round": r, "predicted_kl": sol2.cost, "measured_kl": kl2, "bytes": sol2.size,
                       "changed": changed, "kept": kl2 < best[0]})
        log(f"repair round {r}: {changed} tensors changed, measured KL {kl2:.4g} "
            f"({'kept' if kl2 < best[0] else 'not better: the previous plan stays'})")
        if kl2 < best[0]:
            best = (kl2, new)
        choice = new
    if cfg.uniform_check:
        best = _uniform_check(meas, best, budget, sizes, scale, rounds, model, log)
    kl, choice = best
    entries = []
    for k, lab in choice.items():
        rows, cols = table.shapes[k]
        entries.append(Entry(k, lab, int(table.bytes[k][lab]), rows * cols, float(table.kl[k][lab]),
                             alone.get((k, lab))))
    extra = {"lower_bound": sol.lower_bound}
    budget_d = {"bits": cfg.bits, "size": cfg.size, "bytes": budget}
    if meas.kernel_us is not None:
        us = sum(meas.kernel_us[k][v] for k, v in choice.items())
        budget_d.update({"tok_s": cfg.tok_s, "bytes": None, "kernel_us": budget * SPEED_UNIT})
        extra.update({"kernel_us": us, "overhead_us": meas.overhead_us,
                      "predicted_tok_s": 1e6 / (us + meas.overhead_us)})
    return Plan(target=cfg.target, budget=budget_d, entries=entries, calibration=meas.calibration,
                measured_kl=kl, rank_check=meas.rank, rounds=rounds, extra=extra)


# --------------------------------------------------------------------------------------------
# applying a plan
# --------------------------------------------------------------------------------------------

def apply_lowbit(m, meas: Measured, plan: Plan, cfg: AutoConfig) -> None:
    """Put every tensor's chosen format in the model (quantized modules) and give it its record."""
    import datetime as _dt

    from lowbit.api import _float_dtype, _with_fingerprint
    from lowbit.nn.replace import replacement

    model = m.model
    dtype = str(m.extra.get("dtype") or _float_dtype(model)).removeprefix("torch.")
    names = {mod: n for n, mod in model.named_modules()}
    for e in plan.entries:
        if e.option == "float":
            continue
        mod = meas.items[e.tensor]
        _, fmt, _ = _solved(meas, e.tensor, e.option, model)
        if e.tensor == S.EMBED:
            _install_embedding(model, mod, fmt)
            continue
        new = replacement(mod, fmt)
        if e.tensor == S.HEAD:
            model.set_output_embeddings(new)
            continue
        model.set_submodule(names[mod], new)
    m.record = {
        "method": {"method": "auto", "config": {"budget": plan.budget, "target": plan.target,
                                                "options": sorted({e.option for e in plan.entries})}},
        "base_model": _with_fingerprint(m.source),
        "calibration": plan.calibration,
        "runner": None,
        "quantize_seconds": 0.0,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "dtype": dtype,
        "streaming": False,
        "auto": {"bits_per_weight": plan.bits_per_weight, "predicted_kl": plan.predicted_kl,
                 "measured_kl": plan.measured_kl},
    }


def _install_embedding(model, emb: nn.Embedding, fmt) -> None:
    """The quantized embedding in place of ``emb``; a head tied to it gets the same table as a
    quantized linear (its own copy: the checkpoint stores both, untied)."""
    from lowbit.models.families import family_of
    from lowbit.nn.embedding import QuantizedEmbedding
    from lowbit.nn.replace import replacement

    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        tensors, meta = fmt.to_state_dict()
        model.set_output_embeddings(replacement(head, type(fmt).from_state_dict(
            {k: v.clone() for k, v in tensors.items()}, meta)))
        model.config.tie_word_embeddings = False
    model.set_submodule(family_of(model).embed, QuantizedEmbedding.replacing(emb, fmt))


def gguf_blocks(meas: Measured, plan: Plan, model) -> tuple[dict[str, str], dict[str, object]]:
    """(GGUF type of every allocated tensor by GGUF name, the GPTQ-solved blocks by HF module name)."""
    from lowbit.export.gguf import gguf_name
    from lowbit.models.families import family_of

    fam = family_of(model)
    names = {mod: n for n, mod in model.named_modules()}
    types, solved = {}, {}
    for e in plan.entries:
        opt = S.Option.parse(e.option)
        mod = meas.items[e.tensor]
        hf = fam.embed if e.tensor == S.EMBED else names[mod]
        types[gguf_name(hf + ".weight", fam)] = opt.gguf_type
        if opt.method == "gptq":
            solved[hf] = _solved(meas, e.tensor, e.option, model)[1]
    return types, solved


def plan_path(output, target: str):
    from pathlib import Path

    from lowbit.auto.plan import PLAN_FILE

    return Path(output) / PLAN_FILE if target == "lowbit" else Path(str(output) + ".plan.json")


def _module_names(model, meas: Measured) -> dict[str, str]:
    names = {mod: n for n, mod in model.named_modules()}
    return {k: names[mod] for k, mod in meas.items.items() if mod in names}


def _restore(model, meas: Measured, names: dict[str, str]) -> None:
    """Put the original float modules back (after a plan was applied)."""
    from lowbit.models.families import family_of

    for k, mod in meas.items.items():
        if k == S.HEAD:
            model.set_output_embeddings(mod)
        elif k == S.EMBED:
            if model.get_input_embeddings() is not mod:  # the lowbit target replaced it (and a tied head)
                model.set_submodule(family_of(model).embed, mod)
                if meas.tied_head is not None:
                    model.set_output_embeddings(meas.tied_head)
                    model.config.tie_word_embeddings = True
        else:
            model.set_submodule(names[k], mod)


def _apply_gguf_blocks(model, meas: Measured, plan: Plan, names: dict[str, str]) -> tuple[dict, dict]:
    """Install the GPTQ-solved GGUF blocks as modules; (per-GGUF-name types, imatrix by GGUF name)."""
    import numpy as np

    from lowbit.export.gguf import gguf_name
    from lowbit.formats.gguf_blocks import GGUFBlockWeight
    from lowbit.models.families import family_of
    from lowbit.nn.replace import replacement

    fam = family_of(model)
    types, imatrix = {}, {}
    for e in plan.entries:
        opt = S.Option.parse(e.option)
        hf = fam.embed if e.tensor == S.EMBED else names[e.tensor]
        g = gguf_name(hf + ".weight", fam)
        types[g] = opt.gguf_type
        st = meas.stats[e.tensor]
        if st.H is not None:
            imatrix[g] = torch.diagonal(st.H).float().numpy().astype(np.float32)
        if opt.method == "gptq":
            raw = _solved(meas, e.tensor, e.option, model)[1]
            mod = meas.items[e.tensor]
            fmt = GGUFBlockWeight.from_raw(raw, opt.gguf_type, tuple(mod.weight.shape))
            new = replacement(mod, fmt)
            if e.tensor == S.HEAD:
                model.set_output_embeddings(new)
            else:
                model.set_submodule(hf, new)
    return types, imatrix


def write(m, meas: Measured, cfg: AutoConfig, output, *, force: bool = False, log=print):
    """Search, apply and write the output; a size budget the written output misses on disk is
    tightened by the excess and the search runs again (at most 3 times). Returns (plan, path)."""
    from pathlib import Path

    from lowbit.eval.size import dir_size_bytes

    model = m.model
    names = _module_names(model, meas)
    fixed = fixed_bytes(m, meas.items, cfg.target)
    budget = budget_units(cfg, meas, fixed)
    decode_ref = None
    if cfg.target == "lowbit" and m.tokenizer is not None:
        from lowbit.runtime import defaults

        if defaults.decodable(model):  # the float model's steps, for the checkpoint's decode default
            ids = defaults.measurement_ids(m.tokenizer)
            decode_ref = (ids, defaults.reference_steps(model, ids))
    for attempt in range(3):
        plan = search(m, meas, cfg, budget, log=log)
        if cfg.target == "lowbit":
            from lowbit import api

            apply_lowbit(m, meas, plan, cfg)
            if decode_ref is not None:
                d = defaults.choose(model, *decode_ref)
                if d is not None:
                    m.record["decode"] = d
            out = api.save(m, str(output), force=force or attempt > 0)
            plan.extra.update({"on_disk_bytes": dir_size_bytes(out), "fixed_bytes": fixed})
            plan.save(plan_path(output, cfg.target))  # inside the checkpoint: it counts too
            on_disk = dir_size_bytes(out)
            slack = 64  # the plan file is written again below with the final size in it
        else:
            from lowbit.export.gguf import export_gguf

            types, imatrix = _apply_gguf_blocks(model, meas, plan, names)
            rep = export_gguf(m, output, "F16", imatrix=imatrix, tensor_types=types, force=force or attempt > 0)
            out = rep.path
            on_disk = Path(out).stat().st_size
            slack = 0
        plan.extra.update({"on_disk_bytes": on_disk, "fixed_bytes": fixed})
        if cfg.tok_s is not None:
            from lowbit.auto import speed

            us = speed.decode_us(model, threads=cfg.threads)
            plan.extra["measured_tok_s"] = 1e6 / us
            log(f"decode: {1e6 / us:.1f} tokens/s measured (predicted {plan.extra['predicted_tok_s']:.1f}, "
                f"budget {cfg.tok_s:g})")
            if 1e6 / us >= cfg.tok_s or attempt == 2:
                if 1e6 / us < cfg.tok_s:
                    log(f"warning: still {cfg.tok_s - 1e6 / us:.1f} tokens/s short of the budget after 3 attempts "
                        "(is the machine busy? the timings are per machine and cached)")
                break
            short = us - 1e6 / cfg.tok_s
            log(f"{short:.0f} µs per token slower than the budget: tightening it by that much")
            budget -= int(short / SPEED_UNIT)
            _restore(model, meas, names)
            m.record = None
            continue
        if cfg.size is None or on_disk + slack <= cfg.size:
            break
        excess = on_disk + slack - cfg.size
        log(f"the output takes {on_disk} bytes on disk, {excess} over the budget (headers, tokenizer, plan): "
            "tightening the budget by that much")
        budget -= excess
        _restore(model, meas, names)
        m.record = None
    else:
        raise LowbitError(f"the output still exceeds the size budget after 3 attempts ({on_disk} > {cfg.size} bytes)")
    plan.save(plan_path(output, cfg.target))
    return plan, out
