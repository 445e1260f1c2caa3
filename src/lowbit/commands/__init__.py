"""The `lowbit` subcommands, one module each.

Each module defines ``register(sub)``, which adds its parser to the ``argparse`` subparsers
``sub`` and sets ``func`` (called with the parsed args; returns the exit code). Raise
`lowbit.errors.LowbitError` for bad input: `lowbit.cli.main` prints it as one line and exits 2.
``lowbit --help`` lists the commands of `FIRST` in that order, then the others in name order;
modules whose name starts with ``_`` hold shared helpers. Keep imports of heavy packages inside
the command function so ``lowbit --help`` stays fast.
"""

import importlib
import pkgutil

FIRST = ("quantize", "prune", "eval", "compare", "methods", "demo")


def register_all(sub) -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]:
        importlib.import_module(f"{__name__}.{name}").register(sub)
