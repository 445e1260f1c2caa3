"""compressed-tensors export: does transformers run the same model lowbit quantized?

    PYTHONPATH=/path/to/compressed-tensors python bench/compressed_tensors_parity.py [--tokens 256]
        [--gptq-samples 8] [--markdown]

For each variant: quantize SmolLM2 with lowbit, save a lowbit checkpoint and a compressed-tensors
export, load the export with transformers (+ the compressed-tensors package), and compare its
logits on held-out text with lowbit's own quantized model (max |Δ logit|, relative error
‖Δ‖/‖lowbit‖), and its dequantized weights with lowbit's (layers bit-identical / all). Sizes are
the weight files (model.safetensors) of both directories.
Needs the optional peer `compressed-tensors`; the quality of each variant is not measured here
(see bench/llm_methods.py), only whether the export runs the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lowbit import api, checkpoint
from lowbit.cli import quiet_transformers
from lowbit.core.scheme import QuantScheme
from lowbit.data.texts import eval_tokens, load_text
from lowbit.export.compressed_tensors import export_compressed_tensors

G128_ASYM = QuantScheme(bits=4, symmetric=False, group_size=128)
G128_SYM = QuantScheme(bits=4, symmetric=True, group_size=128)

# label, method, scheme, options, export activations
VARIANTS = [
    ("rtn int4 g128 asym", "rtn", G128_ASYM, {}, None),
    ("rtn int4 g128 asym", "rtn", G128_ASYM, {"dtype": "float16"}, None),
    ("rtn int4 g128 sym", "rtn", G128_SYM, {}, None),
    ("gptq int4 g128 asym", "gptq", G128_ASYM, {"calib": True}, None),
    ("w8a16 (rtn int8 channel)", "w8a16", None, {}, None),
    ("dynamic-int8 (W8A8)", "dynamic-int8", None, {}, None),
]


def load_hf(out: Path, dequantize: bool):
    """transformers' model of an export, in float32 (a float16 export is upcast on load)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    kw["dtype"] = torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(str(out), **kw).eval()


def fake_quant_inputs(model, names, divisor: float, lo: int, hi: int) -> None:
    """Per-token symmetric int8 fake quantization of each named linear's input:
    s = amax / divisor, x = clamp(round(x / s), lo, hi) * s (amax 0 -> inputs kept)."""
    def hook(module, args):
        (x,) = args
        s = x.abs().amax(dim=-1, keepdim=True) / divisor
        s = torch.where(s == 0, torch.ones_like(s), s)
        return (torch.clamp(torch.round(x / s), lo, hi) * s,)

    for n in names:
        model.get_submodule(n).register_forward_pre_hook(hook)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="held-out tokens compared (2 windows)")
    ap.add_argument("--gptq-samples", type=int, default=8, help="calibration samples x 256 tokens for GPTQ")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    try:
        import compressed_tensors
    except ImportError:
        print("compressed-tensors is not importable (optional peer); nothing to compare", file=sys.stderr)
        return 1
    quiet_transformers()
    t_start = time.perf_counter()
    base = api.load()
    toks = eval_tokens(base.tokenizer, load_text("evaluation"))[: args.tokens]
    x = toks.reshape(2, -1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, scheme, opts, acts in VARIANTS:
            m = api.load()
            kw = dict(n_samples=args.gptq_samples, seq_len=256) if opts.get("calib") else {}
            api.quantize(m, method, scheme, progress=False, **kw)
            ck = Path(api.save(m, f"{tmp}/{len(rows)}-ckpt"))
            dtype = opts.get("dtype")
            out = export_compressed_tensors(m, f"{tmp}/{len(rows)}-ct", activations=acts, dtype=dtype)
            sym = all(getattr(getattr(q.weight_format, "scheme", None), "symmetric", True)
                      for q in checkpoint.quantized_modules(m.model).values())
            paths = [False, True] if sym else [True]  # asymmetric: dequantize=True (compressed-tensors 0.20)
            if dtype:
                paths = [True]
            qc = json.loads((out / "config.json").read_text())["quantization_config"]
            grp = qc["config_groups"]["group_0"]["weights"]
            gdesc = grp["strategy"] if grp["strategy"] != "group" else f"group {grp['group_size']}"
            with torch.no_grad():
                ours = m.model(x).logits
            qm = checkpoint.quantized_modules(m.model)
            runs = [(deq, None) for deq in paths]
            if qc["format"] == "int-quantized":
                # the loader's own activation rule emulated on lowbit's weights (reference for the
                # "compressed" row), and lowbit's/vLLM's rule (amax/127) on transformers' weights
                runs += [(True, ("transformers' rule on lowbit's weights", 127.5, -128, 127)),
                         (True, ("lowbit/vLLM rule (amax/127) in transformers", 127.0, -127, 127))]
            for deq, emu in runs:
                hf = load_hf(out, deq)
                ref = ours
                if emu is not None and emu[1] == 127.5:
                    for n, q in qm.items():  # same float model, then transformers' activation rule
                        hf.get_submodule(n).weight.data = q.weight_format.dequantize()
                    fake_quant_inputs(hf, qm, *emu[1:])
                    with torch.no_grad():
                        ref = hf(x).logits
                    hf = load_hf(out, False)
                elif emu is not None:
                    fake_quant_inputs(hf, qm, *emu[1:])
                with torch.no_grad():
                    theirs = hf(x).logits
                d = theirs - ref
                same = sum(torch.equal(hf.get_submodule(n).weight, q.weight_format.dequantize()) for n, q in qm.items())
                load = ("dequantize=True" if deq else "compressed") + (f", {dtype} export" if dtype else "")
                rows.append({
                    "variant": label if emu is None else f"{label} vs {emu[0]}", "format": qc["format"],
                    "weights": gdesc, "load": load if emu is None or emu[1] == 127.0 else "compressed",
                    "ct_mb": (out / "model.safetensors").stat().st_size / 1e6,
                    "ckpt_mb": (ck / "model.safetensors").stat().st_size / 1e6,
                    "maxabs": float(d.abs().max()), "rel": float(d.norm() / ref.norm()),
                    "same": f"{same}/{len(qm)}",
                })
                del hf
            del m
    cols = [("variant", "variant", "{}"), ("format", "format", "{}"), ("weights", "weights", "{}"),
            ("transformers load", "load", "{}"), ("export MB", "ct_mb", "{:.1f}"),
            ("lowbit ckpt MB", "ckpt_mb", "{:.1f}"), ("max abs Δlogit", "maxabs", "{:.3g}"),
            ("rel err", "rel", "{:.3g}"), ("layers identical", "same", "{}")]
    table = [[fmt.format(r[k]) for _, k, fmt in cols] for r in rows]
    head = [c for c, _, _ in cols]
    width = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]

    def line(cells):
        padded = [f"{v:<{w}}" for v, w in zip(cells, width)]
        return "| " + " | ".join(padded) + " |" if args.markdown else "  ".join(padded)

    print(line(head))
    if args.markdown:
        print(line(["-" * w for w in width]))
    for t in table:
        print(line(t))
    import transformers

    print(f"\nSmolLM2-135M, {x.numel()} held-out tokens ({x.shape[0]} x {x.shape[1]}), float32; "
          f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, "
          f"torch {torch.__version__}; {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
