"""Builds lowbit's native CPU kernels: every ``src/lowbit/kernels/csrc/<name>.c`` becomes the
shared library ``lowbit/kernels/_c_<name>*.so`` (pieces they share are in ``csrc/*.h``).

They are plain C with OpenMP (no Python C API, no torch headers, so the build needs only a C
compiler and never pulls torch into build isolation), loaded with ctypes by
`lowbit.kernels._native`. Instruction-set specific code is compiled with per-function target
attributes and chosen at run time, so one build runs on any x86-64 CPU. The build is optional:
without a compiler, or on an unsupported platform, lowbit installs and uses its plain-PyTorch
reference kernels.
"""

import glob
import os
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") or sys.platform == "darwin":
    for path in sorted(glob.glob(os.path.join("src", "lowbit", "kernels", "csrc", "*.c"))):
        name = os.path.splitext(os.path.basename(path))[0]
        ext_modules.append(Extension(
            f"lowbit.kernels._c_{name}",
            sources=[path],
            depends=sorted(glob.glob(os.path.join("src", "lowbit", "kernels", "csrc", "*.h"))),
            extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-fno-strict-aliasing"],
            extra_link_args=["-fopenmp"],
            optional=True,
        ))

setup(ext_modules=ext_modules)
