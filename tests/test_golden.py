"""Every method's checkpoint is byte-for-byte what it was: the stored tensors (names, dtypes,
shapes, bytes) and each quantized module's recorded format and shape hash to the values in
``tests/data/golden_checkpoints.json``, written once before lowbit's internals were reorganised
and kept since. A refactor that changes a single rounding, a packed bit or a stored field fails
here, naming the case.

Regenerate only for an intended change of output (say why in the commit):
``LOWBIT_GOLDEN_UPDATE=1 python -m pytest tests/test_golden.py``.

HQQ has two digests per case: its PyTorch loop (the reference, ``LOWBIT_NATIVE=0``) and its native
iteration (key suffix ``@native``), which agree to float32 rounding, not bit for bit; the one in use
is checked. The native one is the same on every instruction-set path and thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowbit import api
from lowbit.core.scheme import QuantScheme
from lowbit.kernels import hqq_solver
from lowbit.models.tiny import tiny_model

GOLDEN = Path(__file__).parent / "data" / "golden_checkpoints.json"
UPDATE = os.environ.get("LOWBIT_GOLDEN_UPDATE") == "1"

G32 = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32)
G32A = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)
CALIB = dict(n_samples=4, seq_len=32)

# (case id, method, scheme, api.quantize keyword arguments, sparse storage or None)
CASES = [
    ("rtn-int4-g32", "rtn", G32, {}, None),
    ("rtn-int3-g48-asym", "rtn", QuantScheme(bits=3, symmetric=False, granularity="group", group_size=48), {}, None),
    ("rtn-int8-channel-head8", "rtn", QuantScheme(bits=8, granularity="channel", group_size=None), {"head": "int8"}, None),
    ("rtn-int2-g16-asym-head4", "rtn", QuantScheme(bits=2, symmetric=False, granularity="group", group_size=16),
     {"head": "int4"}, None),
    ("rtn-int4-tensor-restricted", "rtn", QuantScheme(bits=4, granularity="tensor", group_size=None,
                                                      restricted_range=True), {}, None),
    ("gptq-int4-g32", "gptq", G32, CALIB, None),
    ("gptq-int3-g32-asym-noact", "gptq", QuantScheme(bits=3, symmetric=False, granularity="group", group_size=32),
     dict(CALIB, act_order=False), None),
    ("awq-int4-g32-asym", "awq", G32A, CALIB, None),
    ("hqq-int4-g32", "hqq", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32,
                                         zero_point="float"), {}, None),
    ("nf4", "nf4", None, {}, None),
    ("llm-int8", "llm-int8", None, CALIB, None),
    ("fp16", "fp16", None, {}, None),
    ("bf16", "bf16", None, {}, None),
    ("w8a16", "w8a16", None, {}, None),
    ("dynamic-int8", "dynamic-int8", None, {}, None),
    ("static-int8", "static-int8", None, CALIB, None),
    ("ternary", "ternary", None, {}, None),
    ("magnitude-50", "magnitude", None, {"sparsity": 0.5}, None),
    ("magnitude-2of4-nm", "magnitude", None, {"pattern": "2:4"}, "nm"),
    ("magnitude-90-csr", "magnitude", None, {"sparsity": 0.9}, "csr"),
    ("wanda-50", "wanda", None, dict(CALIB, sparsity=0.5), None),
    ("sparsegpt-2of4", "sparsegpt", None, dict(CALIB, pattern="2:4"), None),
    ("sparsegpt-50-int4", "sparsegpt", G32, dict(CALIB, sparsity=0.5, quantize=True), None),
]
FAMILIES = ["llama", "gemma3_text", "qwen2"]

# The real default model (SmolLM2-135M), a few methods with short calibration.
SMOL_CALIB = dict(n_samples=4, seq_len=64)
SMOL_CASES = [
    ("rtn-int4-g128", "rtn", QuantScheme(bits=4, group_size=128), {}, None),
    ("gptq-int4-g128", "gptq", QuantScheme(bits=4, group_size=128), SMOL_CALIB, None),
    ("awq-int4-g128-asym", "awq", QuantScheme(bits=4, symmetric=False, group_size=128), SMOL_CALIB, None),
    ("hqq-int4-g64", "hqq", QuantScheme(bits=4, symmetric=False, group_size=64, zero_point="float"), {}, None),
    ("nf4", "nf4", None, {}, None),
]


def checkpoint_digest(path: Path) -> str:
    """sha256 over every stored tensor (sorted by name: name, dtype, shape, bytes) and the
    record's per-module formats; independent of how the file orders its tensors."""
    h = hashlib.sha256()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rec = json.loads((path / "lowbit.json").read_text())
    h.update(json.dumps({"modules": rec["modules"], "method": rec["method"],
                         "tied": rec.get("tied_word_embeddings")}, sort_keys=True).encode())
    return h.hexdigest()


# The digests were recorded with torch on 2 threads. Float sums (calibration statistics) depend on
# the thread count, and discrete choices (SparseGPT's 2:4 masks) follow them, so every case runs
# on 2 threads whatever an earlier test (an in-process `lowbit generate --threads 1`) left set.
THREADS = 2


def golden_model(family: str) -> api.Model:
    """The model a golden case quantizes: SmolLM2, or the tiny model of ``family`` (seed 3)."""
    if family == "smollm2":
        return api.load()
    t = tiny_model(family, seed=3)
    return api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


def quantize_as_recorded(m: api.Model, method: str, scheme, **kw) -> dict:
    """``api.quantize`` as the digests were recorded: seed 0, THREADS threads (put back after)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return api.quantize(m, method, scheme, progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def build(family: str, case, out: Path) -> str:
    _, method, scheme, kw, storage = case
    m = golden_model(family)
    quantize_as_recorded(m, method, scheme, **kw)
    if storage is not None:
        from lowbit.algorithms.sparse_storage import store

        store(m, storage)
    api.save(m, str(out))
    return checkpoint_digest(out)


def _golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checkpoint_bytes_unchanged(family, case, tmp_path):
    _check(family, case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", SMOL_CASES, ids=[c[0] for c in SMOL_CASES])
def test_smollm2_checkpoint_bytes_unchanged(case, tmp_path):
    _check("smollm2", case, tmp_path)


def _check(family, case, tmp_path):
    key = f"{family}/{case[0]}"
    if case[1] == "hqq" and hqq_solver.native_lib() is not None:
        key += "@native"
    digest = build(family, case, tmp_path / "ckpt")
    if UPDATE:
        table = _golden()
        table[key] = digest
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
        return
    golden = _golden()
    assert key in golden, f"no golden digest for {key}; generate it (see the module docstring)"
    assert digest == golden[key], f"{key}: checkpoint bytes changed"
