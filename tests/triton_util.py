"""Shared by the Triton kernel tests: run code in a fresh Python process."""

import os
import subprocess
import sys


def run_python(code: str, interpret: bool) -> subprocess.CompletedProcess:
    """``python -c code`` in a new process, with Triton's interpreter on (``interpret``) or off
    (TRITON_INTERPRET removed from its environment)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
