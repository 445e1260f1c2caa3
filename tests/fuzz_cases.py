"""Seeded hostile inputs for lowbit, by category, and the verdict on each.

Each category is a generator of cases; `run_category` feeds them to lowbit in this process and
classifies every outcome:

* ``accepted``   - it worked (and, where the original result is known, gave the same numbers);
* ``clean``      - a LowbitError: the one-line error users see;
* ``traceback``  - any other exception (a bug: a message from deep inside);
* ``hang``       - over the time limit;
* ``memory``     - MemoryError (an allocation sized by the input);
* ``wrong``      - accepted, but the numbers differ from the original (a silently wrong result);
* ``lost``       - a file that existed before is gone or changed (data loss).

`tests/test_fuzz.py` runs a few hundred cases in CI and asserts the last five columns are zero;
`bench/fuzz.py` runs more and prints the table.
"""

from __future__ import annotations

import copy
import gzip
import json
import random
import shutil
import signal
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit import api, checkpoint
from lowbit.cli import main
from lowbit.data.texts import load_text
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny

ODD = [None, 0, -1, 1.5, 2**70, -2**70, 1e308, float("nan"), "", "x", "a" * 1000, [], {}, [1, 2], ["a", "b"],
       {"a": 1}, True, [[[[[[[[1]]]]]]]], [64, 63], [0, 0], [2**40, 2**40], [-5, 5]]
COLUMNS = ("tried", "clean", "accepted", "traceback", "hang", "memory", "wrong", "lost")


@dataclass
class Tally:
    counts: dict = field(default_factory=lambda: {c: 0 for c in COLUMNS})
    bad: list = field(default_factory=list)   # (case, verdict, detail) of every failure

    def add(self, case: str, verdict: str, detail: str = "") -> None:
        self.counts["tried"] += 1
        self.counts[verdict] += 1
        if verdict not in ("clean", "accepted"):
            self.bad.append((case, verdict, detail))


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang()


def verdict(fn, limit_s: int = 30) -> tuple[str, str, object]:
    """(verdict, detail, result) of calling fn()."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        return "accepted", "", fn()
    except LowbitError as e:
        return "clean", str(e), None
    except _Hang:
        return "hang", f"over {limit_s} s", None
    except MemoryError:
        return "memory", "MemoryError", None
    except BaseException as e:  # noqa: BLE001 - classifying is the point
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "traceback", f"{type(e).__name__}: {str(e)[:120]} at {Path(tb.filename).name}:{tb.lineno}", None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _json_mutations(obj, rng: random.Random, n: int):
    paths = []

    def walk(o, p):
        paths.append(p)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, p + [k])
        elif isinstance(o, list) and len(o) < 20:
            for i, v in enumerate(o):
                walk(v, p + [i])

    walk(obj, [])
    for _ in range(n):
        m = copy.deepcopy(obj)
        p = rng.choice(paths[1:])
        parent = m
        for k in p[:-1]:
            parent = parent[k]
        if rng.random() < 0.15 and isinstance(parent, dict):
            del parent[p[-1]]
            what = "deleted"
        else:
            parent[p[-1]] = copy.deepcopy(rng.choice(ODD))
            what = repr(parent[p[-1]])[:40]
        yield f"{'.'.join(str(x) for x in p)} = {what}", m


class Workspace:
    """A tiny model, its RTN checkpoint and the checkpoint's logits, in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.src = save_tiny(root / "tiny", "llama")
        self.ck = root / "q"
        if main(["quantize", str(self.src), "--bits", "4", "--group-size", "32", "-o", str(self.ck)]) != 0:
            raise RuntimeError("could not quantize the tiny model")
        self.ids = torch.arange(12)[None] % 50
        self.want = self.logits(checkpoint.load(self.ck)[0])

    def logits(self, model):
        with torch.no_grad():
            return model(input_ids=self.ids).logits

    def fresh(self, what: Path, name: str) -> Path:
        d = self.root / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(what, d)
        return d


def record_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """lowbit.json with a field deleted or given an odd value (type, size, nesting)."""
    rec = json.loads((ws.ck / "lowbit.json").read_text())
    for case, m in _json_mutations(rec, rng, n):
        d = ws.fresh(ws.ck, "rec")
        (d / "lowbit.json").write_text(json.dumps(m))
        v, detail, out = verdict(lambda: ws.logits(checkpoint.load(d)[0]))  # loaded and run
        if v == "accepted" and not torch.equal(out, ws.want):
            v, detail = "wrong", "loads with other logits"
        tally.add(case, v, detail)


def config_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """config.json of a Hugging Face model folder with a field deleted or given an odd value."""
    cfg = json.loads((ws.src / "config.json").read_text())
    for case, m in _json_mutations(cfg, rng, n):
        d = ws.fresh(ws.src, "hf")
        (d / "config.json").write_text(json.dumps(m))
        v, detail, _ = verdict(lambda: ws.logits(api.load(str(d)).model))  # loaded and run
        tally.add(case, v, detail)


def weight_byte_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """A checkpoint's model.safetensors with bytes flipped, zeroed or cut anywhere (header or body)."""
    data = (ws.ck / "model.safetensors").read_bytes()
    for _ in range(n):
        b = bytearray(data)
        kind = rng.choice(["flip", "zero", "cut"])
        at = rng.randrange(len(b))
        if kind == "flip":
            b[at] ^= 1 << rng.randrange(8)
        elif kind == "zero":
            b[at:at + 64] = bytes(len(b[at:at + 64]))
        else:
            b = b[:at]
        d = ws.fresh(ws.ck, "bytes")
        (d / "model.safetensors").write_bytes(bytes(b))
        v, detail, out = verdict(lambda: ws.logits(checkpoint.load(d)[0]))
        if v == "accepted" and bytes(b) != data and not torch.equal(out, ws.want):
            v, detail = "wrong", "a damaged file loads with other logits"
        tally.add(f"{kind} at {at}", v, detail)


def text_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """Text files: random bytes, broken UTF-8, NULs, BOMs, corrupt or truncated gzip, empty."""
    good = "It is a truth universally acknowledged.\n" * 50
    for i in range(n):
        kind = rng.choice(["random", "utf8-broken", "nul", "bom", "gz-cut", "gz-garbage", "empty", "crlf", "gz-good"])
        raw = {
            "random": bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))),
            "utf8-broken": good.encode()[:100] + b"\xc3\x28" + good.encode()[100:],
            "nul": good.encode()[:50] + b"\x00" + good.encode()[50:],
            "bom": b"\xef\xbb\xbf" + good.encode(),
            "gz-cut": gzip.compress(good.encode())[: rng.randrange(1, 60)],
            "gz-garbage": b"\x1f\x8b" + bytes(rng.randrange(256) for _ in range(100)),
            "empty": b"",
            "crlf": good.replace("\n", "\r\n").encode(),
            "gz-good": gzip.compress(good.encode()),
        }[kind]
        f = ws.root / f"text-{i}{'.gz' if kind.startswith('gz') else '.txt'}"
        f.write_bytes(raw)
        v, detail, text = verdict(lambda: load_text(str(f)))
        if v == "accepted" and kind in ("bom", "crlf", "gz-good") and text != good:
            v, detail = "wrong", "the text read differs"
        tally.add(kind, v, detail)


def argument_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """Odd command-line arguments: every one is either run or refused with exit code 2."""
    odd = [["--device", "bogus"], ["--device", "mps"], ["--device", "meta"], ["--device", "cuda:99"],
           ["--group-size", str(2**40)], ["--group-size", "0"], ["--group-size", "-7"], ["--bits", "1"],
           ["--bits", "99"], ["--samples", "1000000"], ["--samples", "-1"], ["--seq-len", "1"],
           ["--max-shard-size", "0"], ["--max-shard-size", "1e99TB"], ["--activation-budget", "-5"],
           ["--option", "damp=nan"], ["--option", "damp=-1"], ["--option", "=1"], ["--method", "nonsense"]]
    for i in range(n):
        args = rng.choice(odd)
        out = ws.root / f"arg-{i}"

        def run():
            code = main(["quantize", str(ws.src), "--method", "gptq", "--samples", "2", "--seq-len", "16", *args,
                         "-o", str(out)])
            if code != 0:
                raise LowbitError(f"exit {code}")
        tally.add(" ".join(args), *verdict(run)[:2])


def output_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """-o onto things that are not lowbit's: a project folder, a file, a checkpoint with the user's
    notes, the input itself. Nothing that was there may be lost."""
    for i in range(n):
        kind = rng.choice(["project", "file", "notes", "input", "under-file", "bogus-record"])
        base = ws.root / f"out-{i}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        if kind == "project":
            out = base / "proj"
            out.mkdir()
            (out / "main.py").write_text("print(1)")
        elif kind == "bogus-record":
            out = base / "proj"
            out.mkdir()
            (out / "lowbit.json").write_text(rng.choice(["{}", "text", '{"lowbit_version": 1}']))
            (out / "README.md").write_text("mine")
        elif kind == "file":
            out = base / "file"
            out.write_text("mine")
        elif kind == "notes":
            out = ws.fresh(ws.ck, f"out-{i}/ck")
            (out / "notes.txt").write_text("mine")
        elif kind == "input":
            out = ws.fresh(ws.src, f"out-{i}/src")
        else:
            (base / "file").write_text("mine")
            out = base / "file" / "sub"
        before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
        v, detail, _ = verdict(lambda: _quantize_into(ws.src if kind != "input" else out, out))
        after = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
        if any(after.get(p) != b for p, b in before.items()):
            v, detail = "lost", "a file that was there is gone or changed"
        tally.add(kind, v, detail)


def _quantize_into(src: Path, out: Path) -> None:
    code = main(["quantize", str(src), "--bits", "4", "--group-size", "32", "-o", str(out)])
    if code != 0:
        raise LowbitError(f"exit {code}")


def gguf_cases(ws: Workspace, rng: random.Random, n: int, tally: Tally) -> None:
    """A GGUF file lowbit wrote, with bytes flipped, zeroed or cut; half of them in the header
    (counts, string lengths, value types, tensor dimensions, types and offsets), half anywhere."""
    from lowbit.models.gguf_check import scan_gguf

    gguf = ws.root / "q.gguf"
    if not gguf.exists():
        if main(["export", str(ws.ck), "--type", "Q8_0", "-o", str(gguf)]) != 0:
            raise RuntimeError("could not export the tiny checkpoint to GGUF")
    data = gguf.read_bytes()
    header = scan_gguf(gguf).data_start
    want = ws.logits(api.load(str(gguf)).model)
    for _ in range(n):
        b = bytearray(data)
        kind = rng.choice(["flip", "flip", "zero", "cut", "u64"])
        at = rng.randrange(header if rng.random() < 0.5 else len(b))
        if kind == "flip":
            b[at] ^= 1 << rng.randrange(8)
        elif kind == "zero":
            b[at:at + 16] = bytes(len(b[at:at + 16]))
        elif kind == "u64":  # a length, count or offset made huge, negative-looking or zero
            b[at:at + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, (2**31).to_bytes(8, "little"),
                                       (2**62 + 1).to_bytes(8, "little")])[:len(b[at:at + 8])]
        else:
            b = b[:at]
        f = ws.root / "mutated.gguf"
        f.write_bytes(bytes(b))
        v, detail, out = verdict(lambda: ws.logits(api.load(str(f)).model))
        if v == "accepted" and bytes(b) != data and not torch.equal(out, want):
            v, detail = "wrong", "a damaged GGUF file loads with other logits"
        tally.add(f"{kind} at {at}", v, detail)


CATEGORIES = {
    "lowbit.json": record_cases,
    "config.json": config_cases,
    "weight bytes": weight_byte_cases,
    "text files": text_cases,
    "arguments": argument_cases,
    "outputs": output_cases,
    "gguf files": gguf_cases,
}


def run_category(name: str, ws: Workspace, n: int, seed: int = 0) -> Tally:
    tally = Tally()
    CATEGORIES[name](ws, random.Random(f"{name}:{seed}"), n, tally)
    return tally


def render(rows: dict[str, Tally]) -> str:
    head = ["category", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "--:|" * len(COLUMNS)]
    for name, t in rows.items():
        lines.append("| " + " | ".join([name, *(str(t.counts[c]) for c in COLUMNS)]) + " |")
    return "\n".join(lines)
