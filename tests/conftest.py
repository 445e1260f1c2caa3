"""Session-wide test settings.

Triton's interpreter (how the GPU kernels' tests run on a CPU) must be chosen before
``triton.language`` is first imported: the language's own helpers (``tl.zeros``, ``tl.sum``, ...)
are decorated when it is, in whichever mode was set then. transformers and torch may import
triton while other test modules are collected, so the mode is set here, before any of them.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
