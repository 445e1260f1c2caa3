"""Hostile inputs against lowbit, more of them than the tests run: the table of verdicts.

    python -P bench/fuzz.py [--n 300] [--seed 1] [--markdown]

Categories and verdicts are tests/fuzz_cases.py's; the tests (tests/test_fuzz.py) run a few
hundred cases with seed 0, this runs ``--n`` per category with another seed and lists every case
that was not accepted-with-the-right-numbers or refused with a one-line error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="cases per category (default: 300)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--category", action="append", help="only these categories (repeatable)")
    args = ap.parse_args()

    import contextlib
    import io

    from tests.fuzz_cases import CATEGORIES, Workspace, render, run_category

    t0 = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as tmp:
        quiet = io.StringIO()
        with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            ws = Workspace(Path(tmp))
        for name in args.category or list(CATEGORIES):
            n = min(args.n, 60) if name == "outputs" else args.n  # each output case quantizes a model
            with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
                rows[name] = run_category(name, ws, n, seed=args.seed)
            quiet.seek(0)
            quiet.truncate()
            print(f"{name}: {rows[name].counts}", file=sys.stderr, flush=True)
    print(render(rows))
    bad = [(name, c, v, d) for name, t in rows.items() for c, v, d in t.bad]
    for name, c, v, d in bad:
        print(f"- {name}: {c}: {v}: {d}")
    print(f"\n(seed {args.seed}; {time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
