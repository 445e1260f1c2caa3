"""Peak memory and wall time of quantizing in memory vs streamed (block by block from the files).

    python bench/stream_memory.py [--model smollm2-135m] [--method rtn] [--runner] [--dtype ...]

Each mode runs ``lowbit quantize`` in a fresh process (peak RSS is a per-process number),
measured by ``/usr/bin/time -v`` where it exists (also the CPU seconds, which a busy machine
distorts less than wall time), else by the record's ``peak_rss_bytes`` (getrusage). The two checkpoints must hold the same tensors: the table says whether they do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowbit.eval.report import format_table

MiB = 2**20


def run(argv: list[str]) -> tuple[float, int | None, float | None, str]:
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    t0 = time.perf_counter()
    p = subprocess.run(timer + [sys.executable, "-m", "lowbit.cli", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"lowbit {' '.join(argv)} failed:\n{p.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    cpu = re.findall(r"(?:User|System) time \(seconds\): ([0-9.]+)", p.stderr)
    return wall, int(m.group(1)) * 1024 if m else None, sum(map(float, cpu)) if cpu else None, p.stderr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--runner", action="store_true", help="route a data-free method through the calibration runner")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowbit-stream-bench-"))
    rows, digests = [], {}
    try:
        for mode in ("in memory", "streamed"):
            for rep in range(args.repeats):
                out = work / mode.replace(" ", "-")
                argv = ["quantize", args.model, "--method", args.method, "--bits", args.bits,
                        "--group-size", args.group_size, "-o", str(out)]
                argv += ["--stream"] if mode == "streamed" else ["--no-stream"]
                argv += ["--sequential"] if args.runner else []
                argv += ["--dtype", args.dtype] if args.dtype else []
                wall, peak, cpu, _ = run(argv)
                rec = json.loads((out / "lowbit.json").read_text())
                rows.append({"mode": mode, "wall s": wall, "cpu s": cpu, "quantize s": rec["quantize_seconds"],
                             "peak RSS MiB": (peak or rec["peak_rss_bytes"]) / MiB,
                             "runner peak MiB": rec["runner"]["peak_rss_bytes"] / MiB if rec.get("runner") else None,
                             "dtype": rec["dtype"], "shards": rec["shards"]})
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.test_stream import _digest_all

            digests[mode] = _digest_all(out)
        for r in rows:
            r["same tensors"] = len(set(digests.values())) == 1
        cols = [("mode", "mode"), ("dtype", "dtype"), ("wall s", "wall s", ".1f"), ("cpu s", "CPU s (user+sys)", ".1f"),
                ("quantize s", "quantize s", ".1f"),
                ("peak RSS MiB", "peak RSS MiB", ".0f"), ("runner peak MiB", "runner peak MiB", ".0f"),
                ("shards", "shards"), ("same tensors", "same tensors")]
        print(format_table(rows, cols))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
