"""Where a causal LM keeps its decoder blocks, per architecture family (one table).

The key is the Hugging Face ``config.model_type``. Everything that walks a model block by block
(calibration, per-layer quantization, export) asks this module instead of guessing attribute
names, so supporting a new family is one row here plus a test.

    family_of(model)      -> Family              (LowbitError if the model_type is not in the table)
    find_blocks(model)    -> [block0, block1, ...]  the decoder layers, in order
    linear_layers(block)  -> {"self_attn.q_proj": nn.Linear, ..., "mlp.down_proj": nn.Linear}
    block_prefix(model, i) -> "model.layers.3"
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError

# The seven projections of a Llama-style decoder block (attention q/k/v/o + gated MLP), in the
# order they run. Every family below has exactly these.
_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Family:
    """Attribute paths (dotted, from the top-level ``*ForCausalLM`` module) for one family."""

    model_type: str  # HF config.model_type
    blocks: str  # nn.ModuleList of decoder layers
    embed: str  # token embedding
    final_norm: str  # norm applied after the last block
    lm_head: str  # output projection (may share its weight with `embed`)
    linears: tuple[str, ...]  # expected nn.Linear names inside one block, in execution order
    gguf_arch: str  # `general.architecture` of a llama.cpp GGUF of this family


def _decoder(model_type: str, gguf_arch: str) -> Family:
    return Family(
        model_type=model_type,
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        linears=_LLAMA_LINEARS,
        gguf_arch=gguf_arch,
    )


FAMILIES: dict[str, Family] = {
    "llama": _decoder("llama", "llama"),  # SmolLM2
    "gemma3_text": _decoder("gemma3_text", "gemma3"),  # Gemma-3-270M (text-only Gemma3ForCausalLM)
    "qwen2": _decoder("qwen2", "qwen2"),
    "mistral": _decoder("mistral", "llama"),  # llama.cpp writes Mistral GGUFs as "llama"
}

SUPPORTED_GGUF_ARCHS: frozenset[str] = frozenset(f.gguf_arch for f in FAMILIES.values())


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def _unsupported(what: str) -> LowbitError:
    return LowbitError(f"unsupported model family {what}; supported: {', '.join(supported_families())}")


def family_for_type(model_type: str | None) -> Family:
    """The table row for an HF ``model_type`` string (LowbitError if absent)."""
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise _unsupported(repr(model_type))
    return fam


def family_of(model: nn.Module) -> Family:
    """The family of an HF model, from ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise LowbitError(
            f"cannot tell the family of a {type(model).__name__} (no config.model_type); "
            f"supported: {', '.join(supported_families())}"
        )
    return family_for_type(model_type)


def _submodule(model: nn.Module, path: str, fam: Family) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LowbitError(
            f"{type(model).__name__} (model_type {fam.model_type!r}) has no submodule {path!r}; "
            "expected a *ForCausalLM model"
        ) from None


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model``, in execution order."""
    fam = family_of(model)
    blocks = _submodule(model, fam.blocks, fam)
    if not isinstance(blocks, nn.ModuleList):
        raise LowbitError(f"{fam.blocks} of {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList")
    return list(blocks)


def block_prefix(model: nn.Module, i: int) -> str:
    """Fully qualified name of block ``i``, e.g. ``"model.layers.3"`` (as in ``named_modules``)."""
    fam = family_of(model)
    n = len(_submodule(model, fam.blocks, fam))
    if not 0 <= i < n:
        raise LowbitError(f"block index {i} out of range: the model has {n} blocks")
    return f"{fam.blocks}.{i}"


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``block``, keyed by its name relative to the block, in module order.

    Only genuine ``nn.Linear`` instances are returned, so layers already replaced by a quantized
    module are skipped."""
    return {name: mod for name, mod in block.named_modules() if name and isinstance(mod, nn.Linear)}


# -- AWQ scaling groups ------------------------------------------------------------------------
# Read by algorithms/awq.py. AWQ multiplies the input columns of linears that read the same tensor
# by per-channel scales s and folds 1/s into the op that produced that tensor (a norm's weight, or
# the output rows of the previous linear), which leaves the float block unchanged.


@dataclass(frozen=True)
class ScaleGroup:
    """``linears`` (paths inside one block) all read the output of the op at ``prev``."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class AWQLayout:
    """Where AWQ may fold scales inside one block of a family.

    ``norm_offset``: the block's RMSNorms compute ``x_hat * (norm_offset + weight)`` (Gemma: 1).
    A group whose shapes do not chain (``v_proj -> o_proj`` under grouped-query attention) is
    skipped by AWQ at run time. ``no_clip``: linears left out of AWQ's clipping search."""

    groups: tuple[ScaleGroup, ...]
    norm_offset: float = 0.0
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")


def _awq_layout(attn_norm: str, mlp_norm: str, norm_offset: float = 0.0) -> AWQLayout:
    return AWQLayout(
        groups=(
            ScaleGroup(attn_norm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        norm_offset=norm_offset,
    )


AWQ_LAYOUTS: dict[str, AWQLayout] = {
    "llama": _awq_layout("input_layernorm", "post_attention_layernorm"),
    "qwen2": _awq_layout("input_layernorm", "post_attention_layernorm"),
    "mistral": _awq_layout("input_layernorm", "post_attention_layernorm"),
    # Gemma 3: post_attention_layernorm normalises the attention *output*; the MLP reads
    # pre_feedforward_layernorm. Its RMSNorm multiplies by (1 + weight).
    "gemma3_text": _awq_layout("input_layernorm", "pre_feedforward_layernorm", norm_offset=1.0),
}


def awq_layout(model_type: str | None) -> AWQLayout:
    """The AWQ scaling groups for an HF ``model_type`` (LowbitError if the family has none)."""
    layout = AWQ_LAYOUTS.get(model_type or "")
    if layout is None:
        raise LowbitError(f"AWQ has no scaling groups for model family {model_type!r}; "
                          f"supported: {', '.join(sorted(AWQ_LAYOUTS))}")
    return layout
