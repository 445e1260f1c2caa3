"""One process against torchrun: wall time of `lowbit quantize`, and the checkpoints compared byte for byte.

    python bench/scale_out.py [MODEL] [--method gptq] [--group-size 128] [--procs 2] [--samples 32] [--seq-len 512]
    python bench/scale_out.py --tiny ...        # a random 4-block model (hidden 512, MLP 1536) instead

Runs ``lowbit quantize`` once in one process (torch's default threads) and once as
``torchrun --nproc-per-node N`` (one thread per process, torchrun's default), each in a fresh
subprocess, and prints wall time (process start to exit: loading, calibration, saving), the
quantization time the checkpoint records, the speed-up, and whether the two checkpoints hold the
same tensors bit for bit and the same per-module record. Split over processes, the calibration
batches, the layer observations and the layer solves are divided (lowbit.calibration.distributed),
so the speed-up is bounded by the cores: on a 2-core machine at most ~2x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowbit.eval.report import format_table

TINY = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_checkpoint(a: Path, b: Path) -> bool:
    """Every stored tensor equal bit for bit, and the same per-module formats and method record."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), framework="pt") as fa, \
            safe_open(str(b / "model.safetensors"), framework="pt") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                    x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
                return False
    ra, rb = (json.loads((p / "lowbit.json").read_text()) for p in (a, b))
    return all(ra[k] == rb[k] for k in ("modules", "method", "tied_word_embeddings"))


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true", help="a random 4-block model (hidden 512, MLP 1536)")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = [args.model] if args.model else []
        name = args.model or "SmolLM2-135M"
        if args.tiny:
            from lowbit.models.tiny import save_tiny

            model, name = [str(save_tiny(tmp / "tiny", "llama", seed=0, **TINY))], "tiny llama 4x512"
        q = ["quantize", *model, "--method", args.method, "--bits", str(args.bits), "--group-size",
             str(args.group_size), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        rows = []
        for n in (1, args.procs):
            out = tmp / f"out{n}"
            if n == 1:
                cmd = [sys.executable, "-m", "lowbit.cli", *q, "-o", str(out)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                       str(_free_port()), "-m", "lowbit.cli", *q, "-o", str(out)]
            wall = run(cmd, env)
            rec = json.loads((out / "lowbit.json").read_text())
            rows.append({"model": name, "method": f"{args.method} w{args.bits} g{args.group_size}",
                         "samples": f"{args.samples}x{args.seq_len}", "processes": n, "wall s": wall,
                         "quantize s": rec["quantize_seconds"]})
        for r in rows:
            r["speed-up"] = rows[0]["quantize s"] / r["quantize s"]
            r["identical"] = "yes" if same_checkpoint(tmp / "out1", tmp / f"out{r['processes']}") else "NO"
        print(format_table(rows, [("model", "model"), ("method", "method"), ("samples", "samples"),
                                  ("processes", "processes"), ("wall s", "wall s", ".1f"),
                                  ("quantize s", "quantize s", ".1f"), ("speed-up", "speed-up", ".2f"),
                                  ("identical", "bit-identical")]))
    return 0 if all(r["identical"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
