"""What each option costs in decode time on this machine: the speed budget of `lowbit auto`.

A decoded token's time is modelled as

    t = overhead + Σ_tensors kernel(shape, option)

``kernel`` is the measured time of one batch-1 product y = x Wᵀ through the kernel the format's
module runs, called as the lean decoder's Python path calls it (`lowbit.runtime.decoder.linear_fn`;
the C decode step runs the same kernels with less glue), for each distinct (shape, option):
the method does not matter (GPTQ, RTN and HQQ of one scheme store the same format), so the
weight is a random one in that format. ``overhead`` is everything else: the float model's
measured decode time per token (lean decoder) minus its float kernels' times. The measurements
are cached per machine (CPU model, threads, torch and lowbit versions).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lowbit import outputs
from lowbit.auto import sensitivity as S
from lowbit.errors import LowbitError


def machine_key(threads: int) -> dict:
    import os

    from lowbit.version import __version__

    from lowbit.runtime import machine

    return {"cpu": machine.cpu().name, "isa_cap": os.environ.get("LOWBIT_ISA"), "threads": threads,
            "torch": torch.__version__, "lowbit": __version__, "kernels": _kernel_builds()}


def _kernel_builds() -> dict:
    """Size and modification time of each native kernel library: a rebuilt kernel (same lowbit
    version, new code) invalidates the timings."""
    import glob
    import os

    from lowbit.kernels import _native

    out = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(_native.__file__), "_c_*"))):
        st = os.stat(path)
        out[os.path.basename(path)] = [st.st_size, st.st_mtime_ns]
    return out


def _weight(shape: tuple[int, int], opt: S.Option):
    """A random weight of ``shape`` stored as ``opt`` stores it (None: float)."""
    from lowbit.formats.affine import AffineWeight

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    if opt.method == "float":
        return W
    if opt.gguf_type is not None:
        raise LowbitError("a speed budget is measured on lowbit's kernels: use the lowbit target")
    return AffineWeight.quantize_rtn(W, opt.scheme())


@torch.no_grad()
def time_linear(shape: tuple[int, int], opt: S.Option, *, min_seconds: float = 0.02, rounds: int = 5) -> float:
    """Median µs of one y = x Wᵀ, x [1, in], as the lean decoder calls the module ``opt``'s format
    is run by (`lowbit.runtime.decoder.linear_fn`)."""
    from lowbit.nn.replace import replacement
    from lowbit.runtime.decoder import linear_fn

    fmt = _weight(shape, opt)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    if isinstance(fmt, torch.Tensor):
        lin.weight.data = fmt
        mod = lin
    else:
        mod = replacement(lin, fmt)
    mod = linear_fn(mod)
    x = torch.randn(1, shape[1])
    for _ in range(3):
        mod(x)
    n = 1
    while True:  # calls per round: enough for min_seconds
        t0 = time.perf_counter()
        for _ in range(n):
            mod(x)
        dt = time.perf_counter() - t0
        if dt >= min_seconds or n >= 1 << 14:
            break
        n *= 2
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            mod(x)
        times.append((time.perf_counter() - t0) / n)
    return 1e6 * statistics.median(times)


def _cache_file(key: dict) -> Path:
    return S.cache_dir() / f"kernels-{S.key_hash(key)}.json"


def kernel_costs(shapes: dict[str, list[int]], options: dict[str, list[S.Option]], *, threads: int | None = None,
                 progress: bool = True, log=print) -> dict[str, dict[str, float]]:
    """µs of every (item, option) by its shape (each distinct (shape, option) measured once, and
    cached per machine)."""
    from tqdm.auto import tqdm

    threads = threads or torch.get_num_threads()
    key = machine_key(threads)
    path = _cache_file(key)
    known: dict[str, float] = {}
    try:
        d = json.loads(path.read_text())
        if d.get("key") == key:
            known = d["us"]
    except (OSError, ValueError, KeyError):
        pass
    want = {}
    for k, opts in options.items():
        for o in opts:
            want.setdefault(f"{shapes[k][0]}x{shapes[k][1]} {o.label}", (tuple(shapes[k]), o))
    todo = [w for w in want if w not in known]
    if todo:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for w in tqdm(todo, desc="kernel timings", unit="kernel", disable=not progress):
                known[w] = time_linear(*want[w])
        finally:
            torch.set_num_threads(old)
        path.parent.mkdir(parents=True, exist_ok=True)
        with outputs.atomic_file(path) as tmp:
            Path(tmp).write_text(json.dumps({"key": key, "us": known}))
        log(f"timed {len(todo)} kernels ({threads} threads)")
    return {k: {o.label: known[f"{shapes[k][0]}x{shapes[k][1]} {o.label}"] for o in opts}
            for k, opts in options.items()}


def decode_us(model: nn.Module, *, threads: int | None = None, prompt_len: int = 32, new_tokens: int = 32,
              repeats: int = 3) -> float:
    """Measured µs per decoded token of ``model`` in the lean decoder's Python path (batch 1; the
    path whose products `time_linear` times: the C decode step, where it runs, is faster still)."""
    from lowbit.runtime import LeanDecoder, measure_lean

    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dec = LeanDecoder(model, max_len=prompt_len + new_tokens + 2, native=False)
        r = measure_lean(dec, prompt_len, new_tokens, warmup=1, repeats=repeats)
    finally:
        torch.set_num_threads(old)
    return 1e6 / r.decode_tok_s


def overhead_us(model: nn.Module, items: dict[str, nn.Module], float_us: dict[str, float], *,
                threads: int | None = None) -> float:
    """The float model's decode time per token minus its allocated tensors' float kernel times."""
    total = decode_us(model, threads=threads)
    rest = total - sum(float_us[k] for k in items)
    if rest <= 0:
        raise LowbitError("the float model decodes faster than its layers' kernels add up to; the timings are "
                          "too noisy on this machine for a speed budget (is it busy?)")
    return rest


def float_costs(shapes: dict[str, list[int]], *, threads: int | None = None, progress: bool = False,
                log=print) -> dict[str, float]:
    out = kernel_costs(shapes, {k: [S.Option("float")] for k in shapes}, threads=threads, progress=progress,
                       log=log)
    return {k: v["float"] for k, v in out.items()}


def check_items(items) -> None:
    if S.EMBED in items:
        raise LowbitError("a speed budget does not cover the embedding (a lookup, not a product)")
    if not items:
        raise LowbitError("nothing to time")


__all__ = ["kernel_costs", "decode_us", "overhead_us", "float_costs", "time_linear", "machine_key"]
