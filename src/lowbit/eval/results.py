"""Evaluation rows on disk as each one finishes, so that a long ``lowbit compare`` / ``eval`` resumes.

A results file is JSON Lines: a header line, then one line per finished row::

    {"lowbit_results": 1}
    {"key": "<hash>", "row": {"variant": "q4", "ppl": 39.1, "kl": 0.081, ...}}

A row's key hashes everything its numbers depend on: the original model's and the variant's
files (`lowbit.models.files.fingerprint`: names, sizes, modification times, samples of the
bytes), the evaluation text, the perplexity protocol, how the original is compared (``exact``
for the memory and hidden references, which give the same numbers, or topk with its settings),
the latency settings, the device and the lowbit version.  A run that finds a row with its key
takes it instead of measuring again (and says so); anything else is measured and appended.  A
line is appended and fsync'ed as soon as its row is done, so a killed run loses at most the
row it was working on; a torn last line (the kill came mid-write) is skipped.  Per-token
values (``token_nll``) are not stored: a row read back has none.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from lowbit.errors import LowbitError

MAGIC = b'{"lowbit_results": 1}'
_SKIP = ("token_nll",)


def _h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(spec: str | None) -> str:
    """What a model spec names, for a key: its files' fingerprint (a builtin: its cached folder's)."""
    from lowbit.models import builtin
    from lowbit.models.files import fingerprint
    from lowbit.models.spec import spec_path

    p = spec_path(spec)
    if spec is None or spec in builtin.BUILTINS:
        return f"builtin:{spec or builtin.DEFAULT_MODEL}:" + (fingerprint(p) if p.exists() else "")
    return fingerprint(p) if p.exists() else f"spec:{spec}"


def run_key(base_spec: str | None, settings, kind: str) -> dict:
    """The settings part of every row's key (``kind``: the resolved reference)."""
    from lowbit.data.texts import load_text
    from lowbit.version import __version__

    ref = {"kind": "exact"} if kind in ("memory", "hidden") else {
        "kind": kind, "k": settings.topk, "m": settings.tail_samples, "audit": settings.audit}
    latency = {"prompt": settings.prompt_len, "decode": settings.decode_tokens,
               "repeats": settings.latency_repeats} if settings.latency else None
    key = {"base": model_identity(base_spec), "text": hashlib.sha256(load_text(settings.text).encode()).hexdigest(),
           "protocol": asdict(settings.protocol), "reference": ref, "latency": latency,
           "device": settings.device, "lowbit": __version__}
    if settings.int8_activations:  # absent for float: earlier files' keys stay valid
        key["activations"] = "int8"
    return key


def row_key(run: dict, variant: str | None) -> str:
    """``variant``: a model spec, or None for the original's own row."""
    return _h({"run": run, "variant": None if variant is None else model_identity(variant)})


def summary(row: dict) -> str:
    """One line for the log as a row finishes."""
    parts = [f"{row['variant']}:"]
    for k, label, fmt in (("ppl", "ppl", ".3f"), ("kl", "KL", ".5f"), ("top1", "top-1 %", ".2f"),
                          ("bpw", "bits/w", ".3f"), ("decode", "decode tok/s", ".1f")):
        v = row.get(k)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {v:{fmt}}")
    line = " ".join(parts[:1]) + " " + ", ".join(parts[1:])
    if row.get("nonfinite"):
        line += f" - NaN/Inf logits from {row['nonfinite']}"
    return line


class ResultsFile:
    """Rows already measured (read at open) and new rows appended as they finish.

    ``fresh``: ignore the rows in the file (they stay; new ones are appended after them, and the
    last row of a key is the one read)."""

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False):
        self.path = Path(path).expanduser()
        self.rows: dict[str, dict] = {}
        self.skipped = 0
        if self.path.exists():
            self._read(fresh)

    def _read(self, fresh: bool) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise LowbitError(f"cannot read the results file {self.path}: {e.strerror or e}") from None
        if not data.startswith(MAGIC):
            raise LowbitError(f"{self.path} is not a lowbit results file; choose another --results path")
        lines = data.split(b"\n")[1:]
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key, row = entry["key"], entry["row"]
                if not isinstance(key, str) or not isinstance(row, dict) or not isinstance(row.get("variant"), str):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1:]):
                    self.skipped += 1  # a torn last line: the run was killed while writing it
                    continue
                raise LowbitError(f"{self.path} line {i + 2} is not a results row; the file is corrupt") from None
            if not fresh:
                self.rows[key] = row

    def get(self, key: str) -> dict | None:
        row = self.rows.get(key)
        return None if row is None else dict(row)

    def add(self, key: str, row: dict) -> None:
        clean = {k: v for k, v in row.items() if k not in _SKIP}
        line = json.dumps({"key": key, "row": clean}, default=float, allow_nan=True).encode() + b"\n"
        new = not self.path.exists() or self.path.stat().st_size == 0
        try:
            if not new:
                self._drop_torn_tail()
            with open(self.path, "ab") as f:
                if new:
                    f.write(MAGIC + b"\n")
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise LowbitError(f"cannot write the results file {self.path}: {e.strerror or e}") from None
        self.rows[key] = dict(clean)

    def _drop_torn_tail(self) -> None:
        """A last line without its newline is what a killed write left: cut it off."""
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            back = min(size, 1 << 20)
            f.seek(size - back)
            tail = f.read(back)
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            if cut < 0:
                raise LowbitError(f"{self.path} is not a lowbit results file; choose another --results path")
            f.truncate(size - back + cut + 1)
