"""An allocation plan: which option each tensor gets, what it was predicted and measured to cost.

Written next to the output as ``auto-plan.json`` (atomically) and printed as a table:

    {"version": 1, "target": "lowbit", "budget": {...}, "calibration": {...},
     "entries": [{"tensor": ..., "option": "gptq-w4g64", "bits": 4.25, "bytes": ..., "weights": ...,
                  "predicted_kl": ..., "measured_kl": ... or null}, ...],
     "total": {"bytes": ..., "bits_per_weight": ..., "predicted_kl": ..., "measured_kl": ...},
     "rank_check": {...}, "rounds": [...]}

``measured_kl`` of an entry is the end-to-end KL of that tensor alone with its option (when the
run measured it); ``total.measured_kl`` the KL of the whole plan.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit import outputs
from lowbit.errors import LowbitError

PLAN_FILE = "auto-plan.json"
PLAN_VERSION = 1


@dataclass
class Entry:
    tensor: str
    option: str
    bytes: int
    weights: int
    predicted_kl: float
    measured_kl: float | None = None

    @property
    def bits(self) -> float:
        return 8 * self.bytes / self.weights if self.weights else float("nan")


@dataclass
class Plan:
    target: str
    budget: dict
    entries: list[Entry]
    calibration: dict = field(default_factory=dict)
    measured_kl: float | None = None      # the whole plan, end to end
    rank_check: dict | None = None
    rounds: list[dict] = field(default_factory=list)  # verification / repair rounds
    extra: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def weights(self) -> int:
        return sum(e.weights for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights if self.weights else float("nan")

    @property
    def predicted_kl(self) -> float:
        return sum(e.predicted_kl for e in self.entries)

    def choice(self) -> dict[str, str]:
        return {e.tensor: e.option for e in self.entries}

    def to_json(self) -> dict:
        d = asdict(self)
        d["version"] = PLAN_VERSION
        d["total"] = {"bytes": self.bytes, "weights": self.weights, "bits_per_weight": self.bits_per_weight,
                      "predicted_kl": self.predicted_kl, "measured_kl": self.measured_kl}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            raise LowbitError(f"not a lowbit plan of version {PLAN_VERSION}")
        try:
            entries = [Entry(**e) for e in d["entries"]]
            return cls(target=d["target"], budget=d["budget"], entries=entries, calibration=d.get("calibration", {}),
                       measured_kl=d.get("measured_kl"), rank_check=d.get("rank_check"),
                       rounds=d.get("rounds", []), extra=d.get("extra", {}))
        except (KeyError, TypeError) as e:
            raise LowbitError(f"a plan entry is malformed: {e}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        with outputs.atomic_file(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise LowbitError(f"{path}: no such plan file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LowbitError(f"{path} is not a plan file: {e}") from None
        try:
            return cls.from_json(d)
        except LowbitError as e:
            raise LowbitError(f"{path}: {e}") from None

    def table(self, markdown: bool = False) -> str:
        """Per tensor: option, bits/weight, bytes, predicted and measured KL; then the totals and
        how often each option was chosen."""
        from lowbit.eval.report import format_table

        def kl(v):
            return "" if v is None else f"{v:.2e}"

        rows = [{"t": e.tensor, "o": e.option, "b": f"{e.bits:.2f}", "n": e.bytes,
                 "p": kl(e.predicted_kl), "m": kl(e.measured_kl)} for e in self.entries]
        rows.append({"t": "total", "o": "", "b": f"{self.bits_per_weight:.3f}", "n": self.bytes,
                     "p": kl(self.predicted_kl), "m": ""})
        cols = [("t", "tensor"), ("o", "option"), ("b", "bits/w"), ("n", "bytes"), ("p", "predicted KL"),
                ("m", "measured KL (alone)")]
        out = format_table(rows, cols, markdown=markdown)
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.option] = counts.get(e.option, 0) + 1
        out += "\nchosen: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        if self.measured_kl is not None:
            out += f"\nwhole plan, measured end to end: KL {self.measured_kl:.4g} (predicted {self.predicted_kl:.4g})"
        return out
