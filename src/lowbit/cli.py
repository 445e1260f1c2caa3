"""lowbit command line: the parser and the dispatch; each subcommand lives in ``lowbit.commands.<name>``.

Every command accepts an optional MODEL; omitted, it means the embedded default model
(SmolLM2-135M-Instruct). Bad input ends with a one-line ``lowbit: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from lowbit.version import __version__
from lowbit.errors import LowbitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs and measure what it cost, on a CPU.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    from lowbit.commands import register_all

    register_all(sub)
    for name in READS_CHECKPOINTS:
        sub.choices[name].add_argument(
            "--no-verify", action="store_true",
            help="skip checking each checkpoint file against the sha256 its lowbit.json records (faster for "
                 "large models; a corrupt file then goes unnoticed)")
    return p


def quiet_transformers() -> None:
    """lowbit prints its own progress; transformers' per-load bars and warnings are noise here."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present, but never fatal
        pass


# Commands that read lowbit checkpoints (and take --no-verify).
READS_CHECKPOINTS = ("eval", "compare", "generate", "bench", "export")
# Commands that split their work over the processes torchrun starts (`lowbit.core.processes`).
SCALE_OUT = ("quantize", "prune")


def main(argv: list[str] | None = None) -> int:
    from lowbit.core import processes

    args = build_parser().parse_args(argv)
    if getattr(args, "reproducible", False):  # before any matrix product of this process
        processes.thread_invariant_products()
    quiet_transformers()
    from lowbit.models import files as model_files

    verify = model_files.VERIFY_FILES
    model_files.VERIFY_FILES = verify and not getattr(args, "no_verify", False)
    clean = False
    try:
        from lowbit.commands._args import check_common_args

        check_common_args(args)
        if processes.launched_by_torchrun():
            if args.command not in SCALE_OUT:
                raise LowbitError(f"lowbit {args.command} runs in one process; only {' and '.join(SCALE_OUT)} "
                                  "split over the processes torchrun starts")
            args.device = processes.init_from_env(args.device)
        rc = args.func(args)
        clean = True
        return rc
    except processes.PeerError as e:  # the failing process prints its own error
        if processes.is_main():
            print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    finally:
        model_files.VERIFY_FILES = verify
        processes.finish(clean)


if __name__ == "__main__":
    sys.exit(main())
