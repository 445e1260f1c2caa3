"""Storing a pruned model sparse: its zeroed linear layers become QuantizedLinear modules holding
a sparse weight format, which the native sparse kernels run (`lowbit.kernels.sparse`).

Storage modes (``lowbit prune --storage ...``):

* ``dense`` — keep ordinary nn.Linear layers full of zeros (no saving, fastest at large batch);
* ``nm``    — every pruned layer as `SparseNMWeight` (its N:M pattern; the layer must follow it);
* ``csr``   — every pruned layer as `CSRWeight`;
* ``auto``  — per layer, the smaller storage where ``bench/sparse_kernels.py`` measured it no
  slower than dense fp32 at batch 1 (decoding), one thread, on the development CPU (2-core AMD
  EPYC Zen 1, AVX2, shared and busy when measured):
    - an N:M layer of at least `AUTO_LARGE` weights → ``nm`` (4096×4096 2:4: 1.85× dense, 17
      bits/weight); smaller N:M layers stay dense (SmolLM2's 576×576 … 576×1536 2:4 layers ran at
      0.4–1.0× dense: the per-call overhead and the permute work eat the halved memory traffic);
    - an unstructured layer at sparsity ≥ `AUTO_CSR_MIN_SPARSITY` (90 %) → ``csr``, or at
      ≥ `AUTO_CSR_LARGE_MIN_SPARSITY` (70 %) when it has at least `AUTO_LARGE` weights;
    - anything else stays dense (CSR at 50 % is smaller, 24 bits/weight, but slower: gathers).

Only float nn.Linear layers are converted; layers that already hold a quantized format (SparseGPT
with quantize=true) keep it. The conversion is exact: every layer's dequantized weight equals the
dense pruned weight bit for bit, so the logits of the model do not depend on the storage beyond
the order of float additions in the kernels, and a saved model reloads with bit-identical logits.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms.pruning import parse_pattern
from lowbit.errors import LowbitError
from lowbit.formats.sparse_csr import CSRWeight
from lowbit.formats.sparse_nm import SparseNMWeight, nonzero_bits
from lowbit.nn.replace import replacement

STORAGES = ("dense", "nm", "csr", "auto")
AUTO_LARGE = 1 << 20                 # weights; "large" layers amortise the per-call overhead
AUTO_CSR_MIN_SPARSITY = 0.9
AUTO_CSR_LARGE_MIN_SPARSITY = 0.7


def _is_nm(W: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = W.shape
    if cols % m:
        return False
    return bool((nonzero_bits(W.detach().float()).reshape(rows, cols // m, m).sum(-1) <= n).all())


def choose_format(W: torch.Tensor, storage: str, nm: tuple[int, int] | None, name: str = "weight"):
    """The sparse format for one pruned float weight (None = keep it dense)."""
    if storage not in STORAGES:
        raise LowbitError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    if storage == "dense":
        return None
    if storage == "nm":
        if nm is None:
            raise LowbitError("storage nm needs an N:M-pruned model (prune with --pattern N:M)")
        if not _is_nm(W, *nm):
            raise LowbitError(f"{name} is not {nm[0]}:{nm[1]} sparse; it cannot be stored as nm")
        return SparseNMWeight.from_dense(W, *nm)
    if storage == "csr":
        return CSRWeight.from_dense(W)
    # auto
    large = W.numel() >= AUTO_LARGE
    if large and nm is not None and _is_nm(W, *nm):
        return SparseNMWeight.from_dense(W, *nm)
    sparsity = 1.0 - float(nonzero_bits(W.detach().float()).sum()) / max(1, W.numel())
    if sparsity >= (AUTO_CSR_LARGE_MIN_SPARSITY if large else AUTO_CSR_MIN_SPARSITY):
        return CSRWeight.from_dense(W)
    return None


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lowbit.algorithms.magnitude import model_linear_layers

    return model_linear_layers(model)


def _pattern_of(record: dict | None) -> tuple[int, int] | None:
    cfg = ((record or {}).get("method") or {}).get("config") or {}
    return parse_pattern(cfg.get("pattern"), "storage") if cfg.get("pattern") else None


@torch.no_grad()
def convert_model(model: nn.Module, storage: str, pattern: str | tuple[int, int] | None = None) -> dict:
    """Replace the float linear layers of ``model`` by sparse-format QuantizedLinear modules as
    ``storage`` says, in place. Returns {"mode": storage, "layers": {name: format}} for the record."""
    nm = parse_pattern(pattern, "storage") if isinstance(pattern, str) else pattern
    if storage not in STORAGES:
        raise LowbitError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    chosen = {}
    for name, lin in _layers(model):
        if type(lin) is not nn.Linear:
            chosen[name] = getattr(lin, "_meta", {}).get("format", type(lin).__name__)
            continue
        fmt = choose_format(lin.weight, storage, nm, name)
        if fmt is None:
            chosen[name] = "dense"
            continue
        q = replacement(lin, fmt)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        chosen[name] = fmt.name
    return {"mode": storage, "layers": chosen}


def store(m, storage: str) -> dict:
    """Convert an `api.Model` holding a pruned model (``m.record`` from the pruning) and note the
    storage in its record."""
    if m.record is None:
        raise LowbitError("the model is not pruned (no record); prune it first")
    info = convert_model(m.model, storage, _pattern_of(m.record))
    counts: dict[str, int] = {}
    for f in info["layers"].values():
        counts[f] = counts.get(f, 0) + 1
    m.record["storage"] = {"mode": storage, "formats": counts}
    return info


def restore_checkpoint(path: str, storage: str) -> dict:
    """Rewrite a saved pruned checkpoint with another storage (atomically, like any save)."""
    from lowbit import api

    if storage not in STORAGES:
        raise LowbitError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    m = api.load(path)
    info = store(m, storage)
    api.save(m, path)
    return info
