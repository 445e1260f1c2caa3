"""On-disk size of a saved model (bits per weight come from the quantized modules themselves).

``dir_size_bytes`` counts the bytes of the regular files under a directory (or one file):
symlinks to files are followed (a Hugging Face cache snapshot is made of them), symlinks to
directories are not, and a file reached twice (hard link or two symlinks) counts once.
``human_bytes`` prints binary (IEC) units with three significant digits.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["dir_size_bytes", "human_bytes"]


def dir_size_bytes(path: str | os.PathLike) -> int:
    """Total bytes of the distinct regular files under ``path`` (or of ``path`` if it is a file)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise LowbitError(f"no such file or directory: {root}")
    if root.is_file():
        return root.stat().st_size
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):  # does not descend into dir symlinks
        for name in filenames:
            try:
                st = os.stat(os.path.join(dirpath, name))  # follows file symlinks
            except OSError:  # dangling symlink or vanished file
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float) -> str:
    """``512 B``, ``1.50 KiB``, ``23.4 MiB``, ``135 MiB``, ``1.07 GiB`` (powers of 1024)."""
    if n < 0:
        return "-" + human_bytes(-n)
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024.0
        # pick the unit where the rounded value stays below 1024 (so never "1024 KiB")
        if round(value, 2 if value < 10 else 1 if value < 100 else 0) < 1024 or unit == _UNITS[-1]:
            if round(value, 2) < 10:
                return f"{value:.2f} {unit}"
            if round(value, 1) < 100:
                return f"{value:.1f} {unit}"
            return f"{value:.0f} {unit}"
    raise AssertionError("unreachable")
