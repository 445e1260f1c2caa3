"""Models: load HF directories, GGUF files and the builtin default; walk decoder blocks per family."""

from lowbit.models.builtin import DEFAULT_MODEL, builtin_models
from lowbit.models.families import (
    FAMILIES,
    Family,
    block_prefix,
    family_of,
    find_blocks,
    linear_layers,
    supported_families,
)
from lowbit.models.loading import LoadedModel, inspect_gguf, is_lowbit_checkpoint
from lowbit.models.spec import load_model

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "Family",
    "LoadedModel",
    "block_prefix",
    "builtin_models",
    "family_of",
    "find_blocks",
    "inspect_gguf",
    "is_lowbit_checkpoint",
    "linear_layers",
    "load_model",
    "supported_families",
]
