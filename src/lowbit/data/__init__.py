"""Bundled calibration and evaluation text (disjoint Jane Austen novels) and tokenisation.

See :mod:`lowbit.data.texts` for the split and the tokenisation rules.
"""

from lowbit.data.texts import (  # noqa: F401
    SPLITS,
    calibration_samples,
    default_bos_id,
    eval_tokens,
    load_text,
    tokenize,
)

__all__ = ["SPLITS", "load_text", "default_bos_id", "tokenize", "eval_tokens", "calibration_samples"]
