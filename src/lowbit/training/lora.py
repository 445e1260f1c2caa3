"""LoRA adapters on a frozen base, quantized or not (QLoRA: Dettmers et al. 2023; LoRA: Hu et al. 2021).

    adapters = add_lora(model, rank=16, alpha=32, targets="q,k,v,o,gate,up,down")
    ...                                       # train lora_parameters(adapters); the base stays frozen
    save_adapter(adapters, "adapter/", base_name_or_path="HuggingFaceTB/SmolLM2-135M")   # PEFT layout
    float_model = merge(model, adapters)      # W + (alpha/r)·B·A folded in, the base dequantized

A `LoRALinear` takes the place of one projection and computes

    y = base(x) + (alpha / r) · B (A dropout(x)),    A [r, in] Kaiming-uniform, B [out, r] zeros

so a fresh adapter changes nothing. ``base`` is the layer as it was: a `QuantizedLinear` of any
lowbit format (NF4, affine int2-8 of RTN/GPTQ/AWQ/HQQ, ...) or a float ``nn.Linear``; its forward
is its own (the format's kernel, `lowbit.kernels.linear`). Only A and B train.

**The gradient through a packed base.** Later layers' adapters need ``dL/dx = dL/dy · W`` through
every packed layer. Run with autograd, the kernel's reference path (dequantize, then
``F.linear``) would keep each layer's whole float weight alive from the forward to the backward
pass: the float model, in memory, for the length of the step. A packed base is therefore called
through `FrozenPackedLinear`, an autograd function whose forward is the layer's own forward
(without autograd, so the fast C kernels run too) and whose backward dequantizes the weight again
and multiplies, one layer at a time, the float weight freed as soon as the layer's gradient is
made: at most one layer's float weight exists at a time, as in bitsandbytes' 4-bit matmul. For a
format whose product is defined differently from ``x Wᵀ`` (LLM.int8()'s outliers, int8
activations) the backward is that of ``x Wᵀ`` with the dequantized W (straight through).

**PEFT's layout.** `save_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors``
as the ``peft`` package does (``PeftModel.from_pretrained`` loads them onto the float model):
tensors ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
in float32, ``target_modules`` the module names of the roles (``q_proj``, ...). Roles map to module
paths through the model family record (`lowbit.models.families`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.nn.linear import QuantizedLinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every saved tensor name (PeftModel -> LoraModel -> model)


class FrozenPackedLinear(torch.autograd.Function):
    """``y = layer(x)`` for a frozen `QuantizedLinear`, differentiable in x only (module docstring):
    the forward is the layer's own, the backward ``dL/dx = dL/dy · dequantize(W)``, the float weight
    made there and freed on return."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer(x)

    @staticmethod
    def backward(ctx, gy: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        W = ctx.layer.weight_format.dequantize(dtype=gy.dtype)  # [out, in]: this layer only
        return (gy @ W).to(ctx.x_dtype), None


def base_forward(base: nn.Module, x: Tensor) -> Tensor:
    """The frozen base layer's output, differentiable in ``x`` without keeping a float weight."""
    if isinstance(base, QuantizedLinear) and x.requires_grad and torch.is_grad_enabled():
        return FrozenPackedLinear.apply(x, base)
    return base(x)


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update (module docstring). Submodules are
    named as PEFT names them: ``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (QuantizedLinear, nn.Linear)):
            raise LowbitError(f"LoRA needs a linear base layer (packed or float), got {type(base).__name__}")
        _check_hyper(rank, alpha, dropout)
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.lora_alpha = int(rank), float(alpha)
        self.scaling = self.lora_alpha / self.r
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's (and the LoRA paper's code's) initialisation: A as nn.Linear's default, B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = base_forward(self.base_layer, x)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling · B A`` [out, in], float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def base_weight(self) -> Tensor:
        """The base layer's weight in float32 (dequantized for a packed base)."""
        b = self.base_layer
        return b.weight_format.dequantize(torch.float32) if isinstance(b, QuantizedLinear) else b.weight.float()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}"


def _check_hyper(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LowbitError(f"the LoRA rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise LowbitError(f"the LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LowbitError(f"the LoRA dropout must lie in [0, 1), got {dropout!r}")


def parse_targets(targets) -> list[str]:
    """Projection roles (``"q,k,v"`` or a list) checked against the family roles, in block order."""
    from lowbit.models.families import PROJECTIONS

    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets or [])
    if not targets:
        raise LowbitError(f"name at least one LoRA target among {','.join(PROJECTIONS)}")
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad:
        raise LowbitError(f"unknown LoRA target {bad[0]!r}; the roles are {','.join(PROJECTIONS)}")
    return [r for r in PROJECTIONS if r in targets]


def add_lora(model: nn.Module, rank: int, alpha: float, targets, dropout: float = 0.0) -> dict[str, LoRALinear]:
    """Wrap the projections of every block whose role is in ``targets`` (q,k,v,o,gate,up,down) in
    a `LoRALinear`, in place; every other parameter of ``model`` is frozen. Returns
    {module path in ``model``: adapter}, in block order."""
    from lowbit.models.families import block_prefix, family_of, find_blocks

    _check_hyper(rank, alpha, dropout)
    roles = parse_targets(targets)
    fam = family_of(model)
    blocks = find_blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, LoRALinear] = {}
    for i, blk in enumerate(blocks):
        for role in roles:
            path = fam.projections[role]
            try:
                base = blk.get_submodule(path)
            except AttributeError:
                raise LowbitError(f"block {i} of the {fam.model_type} model has no {role} projection {path!r}") from None
            if isinstance(base, LoRALinear):
                raise LowbitError(f"{block_prefix(model, i)}.{path} has a LoRA adapter already")
            if not isinstance(base, (QuantizedLinear, nn.Linear)):
                raise LowbitError(f"{block_prefix(model, i)}.{path} is a {type(base).__name__}, not a linear layer "
                                  "LoRA can adapt")
            lora = LoRALinear(base, rank, alpha, dropout)
            blk.set_submodule(path, lora)
            out[f"{block_prefix(model, i)}.{path}"] = lora
    if not out:
        raise LowbitError(f"the {fam.model_type} model has no blocks: no linear layers to adapt")
    return out


def lora_state_dict(adapters: dict[str, LoRALinear]) -> dict[str, Tensor]:
    """{``<module path>.lora_A.weight`` / ``.lora_B.weight``: tensor} of every adapter (the
    trainable tensors themselves; detach or clone to keep a copy)."""
    return {f"{n}.lora_{w}.weight": getattr(a, f"lora_{w}").weight for n, a in adapters.items() for w in "AB"}


def lora_parameters(adapters: dict[str, LoRALinear]) -> dict[str, nn.Parameter]:
    """The trainable tensors by name (what the trainer is given): A and B of every adapter."""
    return lora_state_dict(adapters)


# -- merging -----------------------------------------------------------------------------------------

def _float_linear(W: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(bias.float())
    return lin


@torch.no_grad()
def merge(model: nn.Module, adapters: dict[str, LoRALinear]) -> nn.Module:
    """A float copy of ``model`` with every adapter folded in (``W + scaling·B·A``) and every other
    packed layer dequantized: an ordinary transformers model. ``model`` is left as it is."""
    from lowbit.nn.embedding import QuantizedEmbedding

    missing = [n for n in adapters if not isinstance(_get(model, n), LoRALinear)]
    if missing:
        raise LowbitError(f"no LoRA adapter at {missing[0]} in the model to merge")
    merged = copy.deepcopy(model)
    replaced: list[str] = []
    for name, m in list(merged.named_modules()):  # parents come before their children
        if not name or any(name.startswith(r + ".") for r in replaced):
            continue  # the base inside an adapter: gone with its adapter
        if isinstance(m, LoRALinear):
            new = _float_linear(m.base_weight() + m.delta_weight(), m.base_layer.bias)
        elif isinstance(m, QuantizedLinear):
            new = _float_linear(m.weight_format.dequantize(torch.float32), m.bias)
        elif isinstance(m, QuantizedEmbedding):
            if m.embed_scale is not None:
                raise LowbitError(f"{name} is a quantized scaled embedding; merging it into a float model is not "
                                  "supported")
            new = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx,
                               _weight=m.weight_format.dequantize(torch.float32))
        else:
            continue
        merged.set_submodule(name, new)
        replaced.append(name)
    for p in merged.parameters():
        p.requires_grad_(False)
    emb, head = merged.get_input_embeddings(), merged.get_output_embeddings()
    if getattr(merged, "config", None) is not None and emb is not None and head is not None:
        merged.config.tie_word_embeddings = head.weight is emb.weight
    return merged.eval()


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# -- PEFT's files ------------------------------------------------------------------------------------

def adapter_config(adapters: dict[str, LoRALinear], base_name_or_path: str | None,
                   config: dict | None = None) -> dict:
    """The ``adapter_config.json`` PEFT writes for these adapters: ``target_modules`` are the last
    components of their module paths (``q_proj``, ...); ``config``: fields to add or override."""
    if not adapters:
        raise LowbitError("no adapters to save")
    ranks = {a.r for a in adapters.values()}
    alphas = {a.lora_alpha for a in adapters.values()}
    drops = {a.lora_dropout.p if isinstance(a.lora_dropout, nn.Dropout) else 0.0 for a in adapters.values()}
    if len(ranks) != 1 or len(alphas) != 1 or len(drops) != 1:
        raise LowbitError("adapters of several ranks, alphas or dropouts cannot be saved in one PEFT config")
    alpha = alphas.pop()
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "r": ranks.pop(),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(drops.pop()),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapters}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }
    cfg.update(config or {})
    return cfg


def save_adapter(adapters: dict[str, LoRALinear], out_dir, base_name_or_path: str | None,
                 config: dict | None = None, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write the adapters in PEFT's layout to the directory ``out_dir``, atomically:
    ``adapter_config.json`` (`adapter_config`) and ``adapter_model.safetensors`` (module
    docstring). ``extra_files``: {file name: text} written beside them (a run's record)."""
    from safetensors.torch import save_file

    from lowbit import outputs

    cfg = adapter_config(adapters, base_name_or_path, config)
    tensors = {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(adapters).items()}
    with outputs.atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


# Options of a PEFT LoRA config that change what the adapter computes; lowbit loads only adapters
# that have their default values.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "fan_in_fan_out": False,
                "bias": "none", "layers_to_transform": None, "modules_to_save": None, "rank_pattern": {},
                "alpha_pattern": {}, "use_qalora": False, "target_parameters": None, "layer_replication": None,
                "trainable_token_indices": None}


def read_adapter_config(adapter_dir) -> dict:
    p = Path(adapter_dir) / CONFIG_FILE
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LowbitError(f"{adapter_dir} is not a PEFT adapter (no {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LowbitError(f"{p} cannot be read: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise LowbitError(f"{p} is not a LoRA adapter config (peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    for k, default in _UNSUPPORTED.items():
        v = cfg.get(k, default)
        if v != default and not (v in (None, {}, []) and default in (None, {}, [])):
            raise LowbitError(f"{p}: {k}={v!r} is not supported (lowbit loads plain LoRA adapters)")
    if not isinstance(cfg.get("target_modules"), list):
        raise LowbitError(f"{p}: target_modules must be a list of module names, got {cfg.get('target_modules')!r}")
    return cfg


def load_adapter(model: nn.Module, adapter_dir) -> dict[str, LoRALinear]:
    """Add the adapters saved in ``adapter_dir`` (PEFT's layout) to ``model`` (float or a lowbit
    checkpoint's model of the same architecture); returns them as `add_lora` does."""
    from safetensors.torch import load_file

    from lowbit.models.families import family_of

    cfg = read_adapter_config(adapter_dir)
    proj = family_of(model).projections
    by_name = {path.rsplit(".", 1)[-1]: role for role, path in proj.items()}
    unknown = [t for t in cfg["target_modules"] if t not in by_name]
    if unknown:
        raise LowbitError(f"{adapter_dir}: target module {unknown[0]!r} is not a projection of this model "
                          f"({', '.join(sorted(by_name))})")
    roles = [by_name[t] for t in cfg["target_modules"]]
    try:
        tensors = load_file(str(Path(adapter_dir) / WEIGHTS_FILE))
    except FileNotFoundError:
        raise LowbitError(f"{adapter_dir} has no {WEIGHTS_FILE}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: one line
        raise LowbitError(f"{adapter_dir}/{WEIGHTS_FILE} cannot be read: {e}") from None
    adapters = add_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), roles, float(cfg.get("lora_dropout") or 0.0))
    want = {PREFIX + k: v for k, v in lora_state_dict(adapters).items()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise LowbitError(f"{adapter_dir}: the adapter does not fit this model: "
                          + (f"no tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"))
    with torch.no_grad():
        for k, p in want.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(p.shape):
                raise LowbitError(f"{adapter_dir}: {k} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
    return adapters


def remove_lora(model: nn.Module, adapters: dict[str, LoRALinear]) -> None:
    """Put the base layers back in place of the adapters (the adapters are discarded)."""
    for n, a in adapters.items():
        model.set_submodule(n, a.base_layer)


__all__ = ["LoRALinear", "FrozenPackedLinear", "add_lora", "merge", "lora_state_dict", "lora_parameters",
           "save_adapter", "load_adapter", "read_adapter_config", "adapter_config", "remove_lora", "parse_targets"]
