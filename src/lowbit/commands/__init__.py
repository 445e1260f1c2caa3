"""More `lowbit` subcommands, one module each.

Each module defines ``register(sub)``, which adds its parser to the ``argparse`` subparsers
``sub`` and sets ``func`` (called with the parsed args; returns the exit code). Raise
`lowbit.errors.LowbitError` for bad input: `lowbit.cli.main` prints it as one line and exits 2.
Modules are registered in name order; keep imports of heavy packages inside the command function
so ``lowbit --help`` stays fast.
"""

import importlib
import pkgutil


def register_all(sub) -> None:
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}").register(sub)
