"""Size of a model: on disk, in memory, and in bits per weight of its linear layers (counted from
what the quantized modules' formats store).

``dir_size_bytes`` counts the bytes of the regular files under a directory (or one file):
symlinks to files are followed (a Hugging Face cache snapshot is made of them), symlinks to
directories are not, and a file reached twice (hard link or two symlinks) counts once.
``human_bytes`` prints binary (IEC) units with three significant digits.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from torch import nn

from lowbit.errors import LowbitError

__all__ = ["dir_size_bytes", "human_bytes", "linear_bits", "model_bytes"]


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


def linear_bits(model: nn.Module) -> tuple[float, int, int]:
    """(bits per weight over the model's linear layers, stored bytes, number of weights).

    A quantized (or sparse-stored) layer counts what its format stores; a layer still in float
    (an unquantized model, or the layers a partly sparse model keeps dense) counts its weight.
    For a supported LLM family: the linear layers inside its blocks; for other models: the
    quantized layers."""
    from lowbit import checkpoint
    from lowbit.models.families import family_of, find_blocks
    from lowbit.nn.linear import QuantizedLinear

    try:
        family_of(model)
        modules = [m for blk in find_blocks(model) for m in blk.modules()]
    except LowbitError:
        modules = list(checkpoint.quantized_modules(model).values())
    nbytes = n = 0
    for mod in modules:
        if isinstance(mod, QuantizedLinear):
            n += mod.in_features * mod.out_features
            nbytes += mod.weight_format.nbytes
        elif isinstance(mod, nn.Linear):
            n += mod.weight.numel()
            nbytes += mod.weight.numel() * mod.weight.element_size()
    return (8 * nbytes / n if n else float("nan")), nbytes, n


def model_bytes(model: nn.Module, *, skip=(), gguf: bool = False) -> int:
    """Bytes of every stored tensor (tied tensors once): what a checkpoint holds; without the
    tensors in ``skip``; ``gguf``: as lowbit's F16 GGUF files store float tensors (vectors in
    F32, matrices in F16)."""
    from lowbit import checkpoint

    taken = {t.data_ptr() for t in skip}
    return sum(t.numel() * ((4 if t.dim() < 2 else 2) if gguf else t.element_size())
               for t in checkpoint._unique_state_dict(model).values() if t.data_ptr() not in taken)
