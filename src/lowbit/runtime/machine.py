"""What a speed table says about the machine it was measured on: the CPU's model name and vector
instruction sets (read once from ``/proc/cpuinfo``), and the load average. The one reader of
``/proc/cpuinfo`` for the bench scripts, `lowbit.auto.speed` and the llama.cpp integration.

    from lowbit.runtime import machine
    machine.cpu().name, machine.cpu().flags     # 'Intel(R) Xeon(R) ...', frozenset({'avx2', ...})
    machine.isa()                               # 'AVX-512 VNNI' | 'AVX-512' | 'AVX2' | 'no AVX2'
    machine.vector_flags()                      # the flags of FLAGS this CPU has, in that order
    machine.load()                              # '0.71 0.93 1.02' (1, 5, 15 minutes)

Where the file is missing (not Linux) the name is ``platform.processor()`` (or "unknown CPU")
and no flag is reported.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

__all__ = ["CPU", "FLAGS", "cpu", "isa", "load", "vector_flags"]

# the instruction-set flags speed tables name, in the order they are printed
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
         "avx512vbmi", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


@dataclass(frozen=True)
class CPU:
    name: str
    flags: frozenset


@functools.lru_cache(maxsize=None)
def cpu(path: str = "/proc/cpuinfo") -> CPU:
    """The first processor's model name and flags (x86 ``flags``, Arm ``Features``)."""
    name, flags = None, None
    try:
        with open(path) as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model name") and name is None:
                    name = val.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(val.split())
                if name is not None and flags is not None:
                    break
    except OSError:
        pass
    return CPU(name or platform.processor() or "unknown CPU", flags or frozenset())


def isa(flags: frozenset | None = None) -> str:
    """The widest vector level lowbit's kernels use here, in words."""
    f = cpu().flags if flags is None else flags
    if "avx512_vnni" in f:
        return "AVX-512 VNNI"
    if "avx512f" in f:
        return "AVX-512"
    return "AVX2" if "avx2" in f else "no AVX2"


def vector_flags(keep: tuple[str, ...] = FLAGS, flags: frozenset | None = None) -> list[str]:
    """The flags of ``keep`` this CPU has, in ``keep``'s order."""
    f = cpu().flags if flags is None else flags
    return [x for x in keep if x in f]


def load() -> str:
    """The load average over 1, 5 and 15 minutes ("?" where the system has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
