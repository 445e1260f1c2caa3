"""A real classifier: a small CNN on scikit-learn's digits, fp32 vs dynamic int8 vs full-integer
static int8 (each observer) vs PTQ 4-bit vs QAT at 8 and 4 bits: test accuracy and size.

    python bench/classifier_table.py [--seed 0] [--epochs 30] [--qat-epochs 15] [--markdown]

1797 8x8 images, seeded 70/30 split (1258 train / 539 test); calibration: the first 200 training
images. Static rows: int8 in / int8 weights per output channel / int32 accumulation / int32 bias
/ fixed-point requantization / int8 out, activations asymmetric (the accuracy is the integer
model's). "W4A4" rows: 4-bit weights and 4-bit activations in the same integer pipeline. QAT starts
from the trained fp32 model and fine-tunes through fake quantization for --qat-epochs more epochs,
then converts to the integer model. Size: what an integer runtime stores (weight codes packed at
their bit width, int32 bias, int32 multiplier and shift per output channel); fp32: the parameters.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from lowbit.algorithms import available_methods
from lowbit.algorithms.static_int8 import StaticInt8Config
from lowbit.cnn.ptq import quantize_static
from lowbit.cnn.qat import QATConfig, qat
from lowbit.core.scheme import QuantScheme
from lowbit.eval.report import format_table
from lowbit.models.digits import accuracy, digits_cnn, digits_split, float_bytes, train
from lowbit.nn.replace import replacement

OBSERVERS = ["minmax", "moving-minmax", "percentile", "entropy", "mse"]


def _scheme(bits: int, symmetric: bool = False, restricted: bool = False) -> QuantScheme:
    return QuantScheme(bits=bits, symmetric=symmetric, granularity="channel", group_size=None,
                       restricted_range=restricted, scale_dtype="float32")


def dynamic_int8_row(model: nn.Sequential, Xte, yte) -> dict | None:
    """The dynamic-int8 method on the network's Linear layers (convolutions stay fp32), if registered."""
    if "dynamic-int8" not in available_methods():
        return None
    from lowbit.algorithms.base import make_method

    m = copy.deepcopy(model)
    meth = make_method("dynamic-int8")
    for i, layer in enumerate(m):
        if isinstance(layer, nn.Linear):
            m[i] = replacement(layer, meth.apply(str(i), layer))
    size = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return {"variant": "dynamic int8 (linears; convs fp32)", "acc": accuracy(m, Xte, yte), "size_kb": size / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--qat-epochs", type=int, default=15)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = digits_split(seed=args.seed)
    model = train(digits_cnn(seed=args.seed), Xtr, ytr, epochs=args.epochs, seed=args.seed)
    calib = Xtr[:200]
    rows = [{"variant": "fp32", "acc": accuracy(model, Xte, yte), "size_kb": float_bytes(model) / 1e3}]
    dyn = dynamic_int8_row(model, Xte, yte)
    if dyn is not None:
        rows.append(dyn)
    for obs in OBSERVERS:
        qm, _ = quantize_static(model, calib, StaticInt8Config(scheme=_scheme(8), observer=obs))
        rows.append({"variant": f"static int8 {obs}", "acc": accuracy(qm, Xte, yte), "size_kb": qm.stored_bytes() / 1e3})
    qm, _ = quantize_static(model, calib, StaticInt8Config(scheme=_scheme(8, True, True), observer="minmax"))
    rows.append({"variant": "static int8 minmax sym restricted", "acc": accuracy(qm, Xte, yte),
                 "size_kb": qm.stored_bytes() / 1e3})
    for obs in OBSERVERS:
        qm, _ = quantize_static(model, calib, StaticInt8Config(scheme=_scheme(4), observer=obs))
        rows.append({"variant": f"PTQ W4A4 {obs}", "acc": accuracy(qm, Xte, yte), "size_kb": qm.stored_bytes() / 1e3})
    for bits in (8, 4):
        qm, _ = qat(model, Xtr, ytr, QATConfig(bits=bits, epochs=args.qat_epochs, seed=args.seed))
        name = "QAT int8" if bits == 8 else "QAT W4A4"
        rows.append({"variant": name, "acc": accuracy(qm, Xte, yte), "size_kb": qm.stored_bytes() / 1e3})
    base = rows[0]["acc"]
    for r in rows:
        r["dacc"] = None if r is rows[0] else r["acc"] - base
    cols = [("variant", "variant", None), ("acc", "test acc %", ".2f"), ("dacc", "Δ vs fp32", "+.2f"),
            ("size_kb", "size KB", ".1f")]
    print(format_table(rows, cols, markdown=args.markdown))
    if dyn is None:
        print("\n(dynamic int8 row skipped: no 'dynamic-int8' method registered)", file=sys.stderr)
    print(f"\n{len(yte)} test images, seed {args.seed}, fp32 trained {args.epochs} epochs, QAT {args.qat_epochs} "
          f"more; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
