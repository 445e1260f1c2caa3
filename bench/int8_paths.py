"""Float16/bfloat16, W8A16 and dynamic int8 against fp32: kernel speed and SmolLM2 end to end.

    python bench/int8_paths.py [--markdown] [--max-tokens 4096] [--skip-e2e] [--skip-kernels]

Part 1 — one linear (4096×4096) and one SmolLM2 block's seven linears (q,k,v,o: 576→576/192,
gate/up: 576→1536, down: 1536→576), y = x Wᵀ at batch 1 and batch 512, every path timed side by
side in this run (median of repeats, torch's thread count). Batch 1 is shown twice:
"hot" repeats the call on the same weight, which then sits in the last-level cache whenever it
fits (an int8 4096² weight is 16 MB, the fp32 one 64 MB); "cold" evicts the caches before every
call, as a decode step over a whole model does (SmolLM2's weights are far larger than the cache).

Paths: fp32 F.linear; fp16/bf16 weights (lowbit's "half" format) widened to a float32 copy per
call (the reference), through lowbit's default kernel (compute=fp32: the fused C kernel widens in
registers for up to 8 rows, larger batches take the upcast path), and computed natively in the
16-bit type by torch (compute=native: activations and outputs rounded to 16 bits); w8a16 through the
reference kernel (dequantize, fp32 GEMM) and through the registered fast kernel for the affine
format, if any; lowbit dynamic int8 (per-token and per-tensor activation scales; the native
kernel's code path is printed); static W8A8 (the full-integer static-int8 linear, its input range
calibrated with min-max: asymmetric activations on the exact plain-torch integer path, symmetric
restricted ones on the native int8 GEMM); and fbgemm's dynamic int8 linear (torch.ops.quantized, a peer
column, not part of lowbit).

Part 2 — SmolLM2-135M end to end with lowbit's perplexity protocol (held-out text, ctx 512):
ppl, KL to fp32, top-1 agreement, size, prefill and decode tokens/s (best of ``--rounds``, the
variants interleaved) for fp32, fp16, bf16, w8a16 and dynamic int8 (per token, per tensor).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from lowbit.algorithms.static_int8 import quantize_linears_static
from lowbit.core.scheme import QuantScheme
from lowbit.eval.report import format_table
from lowbit.formats.dynamic_int8 import DynamicInt8Weight
from lowbit.formats.floatw import FloatWeight
from lowbit.kernels import find
from lowbit.kernels import dynamic_int8 as kdyn
from lowbit.kernels import linear as kernel_linear
from lowbit.kernels import reference
from lowbit.runtime import machine

SMOL_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
FLUSH = torch.empty(0)


def flush_caches() -> None:
    FLUSH.add_(1.0)  # touches 128 MB: evicts every cache level of this machine


def timed(fn, cold: bool, budget_s: float = 1.5, max_reps: int = 30) -> float:
    """Fastest of the repeats, seconds per call (best-of-N: on a shared machine the median mostly
    measures other processes)."""
    fn()
    ts = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < 3 or (len(ts) < max_reps and time.perf_counter() < t_end):
        if cold:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def fbgemm_linear(W: torch.Tensor):
    """fbgemm's dynamic int8 linear on W (per-channel int8 weights), or None if unavailable."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale = W.abs().amax(1).clamp_min(1e-12).double() / 127
            qw = torch.quantize_per_channel(W, scale, torch.zeros(W.shape[0], dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qw, None)
            torch.ops.quantized.linear_dynamic(torch.zeros(1, W.shape[1]), packed)
    except Exception:  # noqa: BLE001 (any failure means: no peer column)
        return None
    return lambda X: torch.ops.quantized.linear_dynamic(X, packed)


def make_paths(W: torch.Tensor) -> dict:
    """name -> (callable X -> Y) for one weight, or None where the path is unavailable."""
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.algorithms.w8a16 import W8A16Config

    w8 = rtn_quantize(W, W8A16Config())
    h16 = {(dt, c): FloatWeight.cast(W, dt, c) for dt in ("float16", "bfloat16") for c in ("fp32", "native")}
    dyn_t, dyn_T = DynamicInt8Weight.quantize(W, "token"), DynamicInt8Weight.quantize(W, "tensor")
    return {
        "fp32": lambda X: F.linear(X, W),
        "fp16 store, upcast per call": lambda X: reference.linear(X, h16["float16", "fp32"]),
        "fp16 store, fused C (default)": lambda X: kernel_linear(X, h16["float16", "fp32"]),
        "fp16 compute (torch)": lambda X: kernel_linear(X, h16["float16", "native"]),
        "bf16 store, upcast per call": lambda X: reference.linear(X, h16["bfloat16", "fp32"]),
        "bf16 store, fused C (default)": lambda X: kernel_linear(X, h16["bfloat16", "fp32"]),
        "bf16 compute (torch)": lambda X: kernel_linear(X, h16["bfloat16", "native"]),
        "w8a16 reference": lambda X: reference.linear(X, w8),
        "w8a16 fast": (lambda X: kernel_linear(X, w8)) if find("affine") else None,
        "dynamic int8 per-token": lambda X: kernel_linear(X, dyn_t),
        "dynamic int8 per-tensor": lambda X: kernel_linear(X, dyn_T),
        "static W8A8 asym (torch exact)": _static_linear(W, None),
        "static W8A8 sym-restricted (native GEMM)": _static_linear(W, _SYM_RESTRICTED),
        "fbgemm dynamic int8 (peer)": fbgemm_linear(W),
    }


_SYM_RESTRICTED = QuantScheme(bits=8, symmetric=True, granularity="channel", restricted_range=True,
                              scale_dtype="float32")


def _static_linear(W: torch.Tensor, scheme):
    """The static-int8 QuantizedLinear of W, its input range calibrated (min-max) on 64 random rows."""
    lin = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False))
    lin[0].weight.data.copy_(W)
    calib = torch.randn(64, W.shape[1], generator=torch.Generator().manual_seed(1))
    opts = {} if scheme is None else {"scheme": scheme}
    quantize_linears_static(lin, lambda m: m(calib), observer="minmax", **opts)
    return lin[0]


def kernel_table(markdown: bool) -> str:
    global FLUSH
    FLUSH = torch.zeros(32 * 1024 * 1024)
    g = torch.Generator().manual_seed(0)
    cases = {"4096²": [(4096, 4096)], "SmolLM2 block": SMOL_BLOCK}
    layers = {k: [make_paths(torch.randn(o, i, generator=g) * 0.02) for o, i in shapes] for k, shapes in cases.items()}
    names = list(layers["4096²"][0])
    cols = [("4096²", 1, False), ("4096²", 1, True), ("4096²", 512, False),
            ("SmolLM2 block", 1, False), ("SmolLM2 block", 1, True), ("SmolLM2 block", 512, False)]
    res: dict = {}
    for case, M, cold in cols:
        xs = [torch.randn(M, i, generator=g) for _, i in cases[case]]
        for name in names:
            fns = [p[name] for p in layers[case]]
            if any(f is None for f in fns):
                res[name, case, M, cold] = None
                continue
            with torch.inference_mode():
                res[name, case, M, cold] = timed(lambda: [f(x) for f, x in zip(fns, xs)], cold,
                                                 budget_s=1.0 if M == 1 else 2.0, max_reps=40 if M == 1 else 5)
    rows = []
    for name in names:
        row = {"path": name}
        for case, M, cold in cols:
            t, base = res[name, case, M, cold], res["fp32", case, M, cold]
            key = f"{case} b{M}{' cold' if cold else (' hot' if M == 1 else '')}"
            row[key] = "-" if t is None else f"{1e3 * t:.3f} ms ({base / t:.2f}×)"
        rows.append(row)
    columns = [("path", "path", "s")] + [(k, k, "s") for k in rows[0] if k != "path"]
    return format_table(rows, columns, markdown=markdown)


def decode_speed(variants: dict, rounds: int) -> dict:
    """Best prefill / decode tokens/s of each variant over ``rounds`` rounds (128-token prompt,
    16 greedy decode tokens), the variants interleaved so that load on a shared machine hits all
    of them alike."""
    from lowbit.eval.latency import measure_latency

    best = {k: [0.0, 0.0] for k in variants}
    for _ in range(rounds):
        for name, m in variants.items():
            lat = measure_latency(m.model, prompt_len=128, decode_tokens=16, repeats=1)
            best[name][0] = max(best[name][0], lat.prefill_tok_s)
            best[name][1] = max(best[name][1], lat.decode_tok_s)
    return best


def e2e_table(markdown: bool, max_tokens: int, model_spec: str | None, quality: bool, rounds: int) -> str:
    from lowbit import api
    from lowbit.eval.size import linear_bits, model_bytes
    from lowbit.cli import quiet_transformers
    from lowbit.eval.quality import PplProtocol
    from lowbit.eval.compare import COLUMNS, EvalSettings, compare

    quiet_transformers()
    variants = {"fp32": api.load(model_spec)}
    for label, method, opts in (("fp16", "fp16", {}), ("bf16", "bf16", {}), ("w8a16", "w8a16", {}),
                                ("dynamic int8 per-token", "dynamic-int8", {"activations": "token"}),
                                ("dynamic int8 per-tensor", "dynamic-int8", {"activations": "tensor"})):
        m = api.load(model_spec)
        api.quantize(m, method, progress=False, **opts)
        variants[label] = m
    if quality:
        settings = EvalSettings(protocol=PplProtocol(ctx=512, max_tokens=max_tokens), latency=False, progress=False)
        rows = compare(variants, "fp32", settings)
    else:
        rows = [{"variant": k, "bpw": linear_bits(m.model)[0], "size_mb": model_bytes(m.model) / 1e6}
                for k, m in variants.items()]
    speed = decode_speed(variants, rounds)
    for r in rows:
        r["prefill"], r["decode"] = speed[r["variant"]]
        r["decode_x"] = r["decode"] / speed["fp32"][1]
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)] + [("decode_x", "decode × fp32", ".2f")]
    note = f"{rows[0]['n_tokens']} held-out tokens, ctx 512; " if quality else ""
    return format_table(rows, cols, markdown=markdown) + f"\n\n{note}speed: best of {rounds} rounds"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--model", default=None)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--no-quality", action="store_true", help="end to end: speed only (skip ppl/KL)")
    ap.add_argument("--rounds", type=int, default=5, help="end to end: speed rounds (best of)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and lowbit kernel) threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    flags = " ".join(machine.vector_flags()) or "?"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {flags}; "
          f"lowbit dynamic int8 path: {kdyn.native_lib().isa() if kdyn.native_lib() else 'reference (torch)'}; "
          f"w8a16 fast kernel: {'yes' if find('affine') else 'none registered'}\n")
    if not args.skip_kernels:
        print(kernel_table(args.markdown))
        print(f"\n(kernels: {time.perf_counter() - t0:.0f} s)\n", file=sys.stderr)
    if not args.skip_e2e:
        print(e2e_table(args.markdown, args.max_tokens, args.model, not args.no_quality, args.rounds))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
