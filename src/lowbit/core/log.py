"""The one stderr line every part of lowbit speaks with: ``lowbit: <message>``, printed by
process 0 only when a run is split over processes (torchrun)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    from lowbit.core.processes import is_main

    if is_main():  # split over processes (torchrun): process 0 speaks for all
        print(f"lowbit: {msg}", file=sys.stderr, flush=True)
