"""The model families lowbit knows: one record per family, and everything about it in that record.

The key is the Hugging Face ``config.model_type``. Whatever walks or runs a model — the calibration
runner, AWQ's scale folding, the lean decoder's Python and C steps, the profiler, the GGUF writer
— asks the family's `Family` record where things are and how the family computes, instead of
guessing attribute names. Supporting a new family is one record in `FAMILIES` plus its test.

    family_of(model)       -> Family              (LowbitError if the model_type is not in the table)
    find_blocks(model)     -> [block0, block1, ...]  the decoder layers, in order
    linear_layers(block)   -> {"self_attn.q_proj": nn.Linear, ..., "mlp.down_proj": nn.Linear}
    block_prefix(model, i) -> "model.layers.3"
    block_linears(model)   -> {"model.layers.0.self_attn.q_proj": nn.Linear, ...}  every block's, full names
    awq_layout(model_type) -> AWQLayout          where AWQ folds its scales (derived from the record)

A record names each part of a decoder block by its *role*: the seven projections
(`PROJECTIONS`: q k v o gate up down) and up to six RMSNorms (`NORMS`). Everything else is
derived from those names: AWQ's scaling groups, the GGUF tensor names (llama.cpp's names per
role, `GGUF_NAMES`), the decoder's layer plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from torch import nn

from lowbit.errors import LowbitError

# The roles of a decoder block's parts. Projections in the order they run (attention q/k/v/o,
# then the gated MLP: down(act(gate(x)) * up(x))).
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# attn_norm: before attention; mlp_norm: before the MLP; post_*: Gemma's sandwich norms on the
# attention / MLP outputs; q_norm / k_norm: per-head norms of queries and keys before rotary.
NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")

# llama.cpp's tensor name of each role (gguf-py's MODEL_TENSOR names: the same for every
# architecture), and of the model-level tensors.
GGUF_NAMES = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "post_attn_norm": "post_attention_norm",
    "post_mlp_norm": "post_ffw_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "embed": "token_embd", "final_norm": "output_norm", "lm_head": "output",
}
_GGUF_BIASES = ("q", "k", "v")  # projections whose bias a GGUF of these architectures holds


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp writes a family: the architecture and what its loader expects."""

    name: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's "llama" rotates adjacent pairs: attn_q/attn_k rows permuted
    head_dim_keys: bool = False  # always write attention.key_length / value_length
    global_every: int | None = None  # llama.cpp fixes the local/global layer pattern (every n-th layer
    #                                  global) and reads attention.sliding_window
    omit: tuple[str, ...] = ()  # hyper-parameter keys (after "{arch}.") llama.cpp's arch does not carry


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


# -- the record --------------------------------------------------------------------------------

_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True, eq=False)
class Family:
    """One model family. Paths are dotted attribute paths: model-level ones from the top-level
    ``*ForCausalLM`` module, block-level ones from one decoder layer. Records compare by identity."""

    model_type: str  # HF config.model_type
    gguf: GGUFArch  # how llama.cpp writes it
    # model level
    blocks: str = "model.layers"  # nn.ModuleList of decoder layers
    embed: str = "model.embed_tokens"  # token embedding
    final_norm: str = "model.norm"  # norm applied after the last block
    lm_head: str = "lm_head"  # output projection (may share its weight with `embed`)
    rotary: str = "model.rotary_emb"  # the model's rotary module (cos/sin tables)
    # block level: the projections, in the order of PROJECTIONS (= execution order)
    linears: tuple[str, ...] = _LLAMA_LINEARS
    act: str = "mlp.act_fn"  # the MLP's activation (SiLU, tanh-GELU: the model's own module)
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    norm_offset: float = 0.0  # RMSNorms compute x_hat * (norm_offset + weight) (Gemma: 1)
    # attention
    attn_scale: str | None = None  # config attribute s: scores scaled by s**-0.5 (None: head_dim)
    rope_per_layer_type: bool = False  # rotary module takes the layer type (per-type tables: Gemma 3)
    window_all_layers: bool = False  # config.sliding_window, when set, limits every layer (Mistral);
    #                                  otherwise only layers whose layer_types entry is "sliding_attention"
    scaled_embedding: bool = False  # the embedding multiplies its rows by its `embed_scale` (Gemma)
    # config overrides of lowbit.models.tiny's random model (e.g. a local and a global layer)
    tiny: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.linears) != len(PROJECTIONS):
            raise ValueError(f"{self.model_type}: linears must name the {len(PROJECTIONS)} projections {PROJECTIONS}")

    @property
    def projections(self) -> dict[str, str]:
        """role -> path inside a block, e.g. {"q": "self_attn.q_proj", ...}, in execution order."""
        return dict(zip(PROJECTIONS, self.linears))

    @property
    def norms(self) -> dict[str, str]:
        """role -> path inside a block of the norms this family has."""
        return {r: getattr(self, r) for r in NORMS if getattr(self, r) is not None}

    @property
    def awq(self) -> AWQLayout:
        """AWQ's scaling groups: norm -> q/k/v, v -> o, norm -> gate/up, up -> down."""
        p = self.projections
        return AWQLayout(
            groups=(
                ScaleGroup(self.attn_norm, (p["q"], p["k"], p["v"])),
                ScaleGroup(p["v"], (p["o"],)),
                ScaleGroup(self.mlp_norm, (p["gate"], p["up"])),
                ScaleGroup(p["up"], (p["down"],)),
            ),
            norm_offset=self.norm_offset,
            no_clip=(p["q"], p["k"]),
        )

    @property
    def gguf_block_names(self) -> dict[str, str]:
        """HF parameter name inside a block -> GGUF name inside ``blk.N.`` (weights and q/k/v biases)."""
        out = {f"{path}.weight": f"{GGUF_NAMES[r]}.weight" for r, path in {**self.norms, **self.projections}.items()}
        out.update({f"{self.projections[r]}.bias": f"{GGUF_NAMES[r]}.bias" for r in _GGUF_BIASES})
        return out

    @property
    def gguf_top_names(self) -> dict[str, str]:
        """HF parameter name of the model-level tensors -> GGUF name."""
        return {f"{getattr(self, r)}.weight": f"{GGUF_NAMES[r]}.weight" for r in ("embed", "final_norm", "lm_head")}

    def get(self, root: nn.Module, path: str, what: str = "module"):
        """``root``'s attribute at the dotted ``path`` (LowbitError naming it when absent)."""
        try:
            return reduce(getattr, path.split("."), root)
        except AttributeError:
            raise LowbitError(f"{type(root).__name__} of model family {self.model_type!r} has no {what} "
                              f"{path!r}") from None


# -- the families ------------------------------------------------------------------------------

_GEMMA3 = Family(
    "gemma3_text",  # Gemma-3-270M (text-only Gemma3ForCausalLM)
    GGUFArch("gemma3", head_dim_keys=True, global_every=6, omit=("vocab_size", "rope.dimension_count")),
    # post_attention_layernorm normalises the attention *output*; the MLP reads pre_feedforward_layernorm
    mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    norm_offset=1.0,
    attn_scale="query_pre_attn_scalar",
    rope_per_layer_type=True,
    scaled_embedding=True,
    tiny=dict(sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", GGUFArch("llama", permute_qk=True)),  # SmolLM2
    _GEMMA3,
    Family("qwen2", GGUFArch("qwen2")),  # q/k/v biases
    Family("mistral", GGUFArch("llama", permute_qk=True), window_all_layers=True),  # llama.cpp writes it as "llama"
    # Qwen3: per-head q/k norms; head_dim written always, as llama.cpp's converter does (Qwen3 configs carry it)
    Family("qwen3", GGUFArch("qwen3", head_dim_keys=True), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
)}

SUPPORTED_GGUF_ARCHS: frozenset[str] = frozenset(f.gguf.name for f in FAMILIES.values())


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def _unsupported(what: str) -> LowbitError:
    return LowbitError(f"unsupported model family {what}; supported: {', '.join(supported_families())}")


def family_for_type(model_type: str | None) -> Family:
    """The record for an HF ``model_type`` string (LowbitError if absent)."""
    if model_type is not None and not isinstance(model_type, str):
        raise _unsupported(f"{str(model_type)[:60]!r} (model_type is not a string)")
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


def block_linears(model: nn.Module, only_plain: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of every decoder block by its full module name (as in
    ``named_modules``), blocks in order and `linear_layers` order within each: the one walk the
    methods and trainers that swap a model's linear layers share. ``only_plain``: exact
    ``nn.Linear`` instances only (not subclasses)."""
    out = {}
    for i, blk in enumerate(find_blocks(model)):
        prefix = block_prefix(model, i)
        for name, lin in linear_layers(blk).items():
            if not only_plain or type(lin) is nn.Linear:
                out[f"{prefix}.{name}"] = lin
    return out


def awq_layout(model_type: str | None) -> AWQLayout:
    """The AWQ scaling groups for an HF ``model_type`` (LowbitError if lowbit has no such family)."""
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise LowbitError(f"AWQ has no scaling groups for model family {model_type!r}; "
                          f"supported: {', '.join(supported_families())}")
    return fam.awq
