"""transformers loads lowbit checkpoints with lowbit's modules, and refuses them without lowbit.

``AutoModelForCausalLM.from_pretrained(checkpoint)`` must give the model ``lowbit.api.load`` gives
(same modules, same tensors): the logits are compared with torch.equal for several methods and
formats on tiny llama / gemma3 / qwen2 models. A Python without lowbit must fail naming lowbit
instead of returning a model with random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.models import files as model_files
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import api
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.integrations import hf_config
from lowbit.models.tiny import TINY_VOCAB, save_tiny, tiny_model
from lowbit.nn.linear import QuantizedLinear

G32 = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32)
G32A = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)
CALIB = dict(n_samples=4, seq_len=32)

# (case id, method, scheme, api.quantize keyword arguments)
CASES = {
    "rtn-int4-g32-asym": ("rtn", G32A, {}),
    "gptq-int4-g32": ("gptq", G32, CALIB),
    "hqq-int4-g32": ("hqq", QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32,
                                        zero_point="float"), {}),
    "nf4": ("nf4", None, {}),
    "llm-int8": ("llm-int8", None, CALIB),
    "dynamic-int8": ("dynamic-int8", None, {}),
    "rtn-int4-head-int8": ("rtn", G32A, {"head": "int8"}),
}
FAMILIES = ["llama", "gemma3_text", "qwen2"]
# every case on llama, a spread of formats on the other two families
MATRIX = [("llama", c) for c in CASES] + [
    ("gemma3_text", "rtn-int4-g32-asym"), ("gemma3_text", "nf4"), ("gemma3_text", "rtn-int4-head-int8"),
    ("qwen2", "gptq-int4-g32"), ("qwen2", "hqq-int4-g32"), ("qwen2", "llm-int8"),
]
IDS = torch.randint(0, TINY_VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", autouse=True)
def short_calibration_text(tmp_path_factory):
    """The first 16 kB of the bundled calibration text: enough for 4 x 32 tokens, and the tiny
    byte tokenizer does not spend seconds on the whole text for every calibrated case."""
    from lowbit.data.texts import load_text

    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(load_text("calibration")[:16000], encoding="utf-8")
    CALIB["calibration_text"] = str(path)
    yield
    CALIB.pop("calibration_text", None)


def make_checkpoint(out: Path, family: str = "llama", case: str = "rtn-int4-g32-asym", **overrides) -> Path:
    method, scheme, kw = CASES[case]
    t = tiny_model(family, seed=1, **overrides)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    torch.manual_seed(0)
    api.quantize(m, method, scheme, progress=False, **kw)
    api.save(m, str(out))
    return out


def hf_load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


@pytest.mark.parametrize("family,case", MATRIX, ids=[f"{f}-{c}" for f, c in MATRIX])
def test_from_pretrained_gives_lowbit_logits_exactly(family, case, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", family, case)
    ref = api.load(str(ckpt)).model
    model = hf_load(ckpt)
    names = set(api.load(str(ckpt)).record["modules"])
    got = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert got == names  # the same layers, as lowbit modules (no float copy of any of them)
    assert not any(m.weight.is_meta for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.dtype == torch.float32
    assert model.is_quantized and model.config.quantization_config.quant_method == "lowbit"
    assert torch.equal(logits(model), logits(ref))


def test_tied_embeddings_and_quantized_head_of_a_tied_model(tmp_path):
    # tied float head: stored once, tied again on load; quantized head of a tied model: untied
    for case in ("rtn-int4-g32-asym", "rtn-int4-head-int8"):
        ckpt = make_checkpoint(tmp_path / case, "llama", case, tie_word_embeddings=True)
        model = hf_load(ckpt)
        assert torch.equal(logits(model), logits(api.load(str(ckpt)).model))
        head_is_tied = model.lm_head.weight is model.model.embed_tokens.weight if case.startswith("rtn-int4-g") else None
        assert head_is_tied in (True, None)
        assert isinstance(model.lm_head, QuantizedLinear) == (case == "rtn-int4-head-int8")


def test_config_json_names_lowbit_and_keeps_the_model_config(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "lowbit", "version": lowbit.__version__,
                                          "method": "rtn", "record": "lowbit.json"}
    assert cfg[hf_config.GUARD_KEY] == hf_config.GUARD and "lowbit" in hf_config.GUARD
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64
    # lowbit's own loader builds a plain model: no quantization_config, no guard on its config
    m = api.load(str(ckpt))
    assert not hasattr(m.model.config, "quantization_config")
    assert not hasattr(m.model.config, hf_config.GUARD_KEY)


def test_checkpoint_without_the_fields_still_loads_in_lowbit(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    want = logits(api.load(str(ckpt)).model)
    cfg_file = ckpt / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["quantization_config"], cfg[hf_config.GUARD_KEY]
    cfg_file.write_text(json.dumps(cfg))
    rec = json.loads((ckpt / "lowbit.json").read_text())
    del rec["files"]  # a checkpoint that old kept no file digests either
    (ckpt / "lowbit.json").write_text(json.dumps(rec))
    assert torch.equal(logits(api.load(str(ckpt)).model), want)


def test_resaving_a_loaded_checkpoint_writes_the_fields_once(tmp_path):
    ckpt = make_checkpoint(tmp_path / "a")
    m = api.load(str(ckpt))
    api.save(m, str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    assert torch.equal(logits(hf_load(tmp_path / "b")), logits(m.model))


def _shard(ckpt: Path) -> None:
    """Split model.safetensors into two shards + index, as transformers' sharded layout."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()


def test_sharded_checkpoint_loads_exactly(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen2", "gptq-int4-g32")
    want = logits(api.load(str(ckpt)).model)
    _shard(ckpt)
    from lowbit import checkpoint

    rec = json.loads((ckpt / "lowbit.json").read_text())
    rec["files"] = checkpoint.file_digests(ckpt)  # as if it had been written sharded
    (ckpt / "lowbit.json").write_text(json.dumps(rec))
    # a quantized layer's tensors are spread over both shards (keys are split in sorted order)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2
    assert torch.equal(logits(hf_load(ckpt)), want)


def test_refuses_checkpoints_whose_tensors_do_not_match(tmp_path, monkeypatch):
    from lowbit import checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.down_proj.scales"]
    save_file(missing, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="model.safetensors is corrupt"):  # the recorded digest, first
        hf_load(ckpt)
    monkeypatch.setattr(model_files, "VERIFY_FILES", False)  # past it: the tensors' own checks
    with pytest.raises(LowbitError, match="module model.layers.1.mlp.down_proj lacks tensor 'scales'"):
        hf_load(ckpt)
    missing = dict(tensors)
    del missing["model.norm.weight"]
    save_file(missing, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="lacks tensors, e.g. model.norm.weight"):
        hf_load(ckpt)
    extra = dict(tensors, **{"model.layers.0.extra": torch.zeros(3)})
    save_file(extra, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="unexpected tensors, e.g. model.layers.0.extra"):
        hf_load(ckpt)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.scales"] = torch.full_like(bad["model.layers.0.self_attn.q_proj.scales"],
                                                                    float("nan"))
    save_file(bad, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="NaN/Inf"):
        hf_load(ckpt)


def test_no_other_loader_path_is_silently_wrong(tmp_path):
    from transformers import AutoModel, LlamaForCausalLM

    ckpt = make_checkpoint(tmp_path / "ckpt")
    ref = logits(api.load(str(ckpt)).model)
    assert torch.equal(logits(LlamaForCausalLM.from_pretrained(str(ckpt))), ref)  # the class itself
    assert torch.equal(logits(hf_load(ckpt, dtype=torch.bfloat16)), ref)  # a dtype asked for: float32 anyway
    with pytest.raises(LowbitError, match="load it with AutoModelForCausalLM"):
        AutoModel.from_pretrained(str(ckpt))  # the bare decoder: refused, not half-loaded
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # a flipped bit in a tensor's bytes
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="model.safetensors is corrupt: its sha256 differs"):
        hf_load(ckpt)


def test_refuses_to_quantize_a_float_model(tmp_path):
    from lowbit.integrations.transformers import LowbitConfig

    src = save_tiny(tmp_path / "float", "llama")
    with pytest.raises(ValueError, match="pre-quantized"):
        hf_load(src, quantization_config=LowbitConfig())


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


def test_without_lowbit_loading_fails_naming_lowbit(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    # lowbit is installed and on the path here: sys.modules[...] = None makes every import of it fail
    code = (
        "import sys\n"
        "sys.modules['lowbit'] = None\n"
        "try:\n"
        "    import lowbit\n"
        "    raise SystemExit('lowbit is importable')\n"
        "except ImportError:\n"
        "    pass\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "assert 'lowbit' not in AUTO_QUANTIZER_MAPPING\n"
        f"AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
        "print('LOADED')\n"
    )
    r = _python(code, tmp_path)
    assert r.returncode != 0 and "LOADED" not in r.stdout and "lowbit is importable" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "lowbit is required to load this checkpoint" in last, r.stderr[-2000:]


def test_import_lowbit_registers_lazily(tmp_path):
    code = (
        "import sys\n"
        "import lowbit\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'import lowbit got heavy'\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "assert AUTO_QUANTIZER_MAPPING['lowbit'].__name__ == 'LowbitHfQuantizer'\n"
        "assert AUTO_QUANTIZATION_CONFIG_MAPPING['lowbit'].__name__ == 'LowbitConfig'\n"
        "import transformers.quantizers.auto as a\n"
        "assert type(a.__loader__).__module__ != 'lowbit.integrations'\n"
        "print('OK')\n"
    )
    r = _python(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]
    # transformers first, lowbit second: registered on import
    code = (
        "import transformers.quantizers.auto as a\n"
        "assert 'lowbit' not in a.AUTO_QUANTIZER_MAPPING\n"
        "import lowbit\n"
        "assert 'lowbit' in a.AUTO_QUANTIZER_MAPPING and 'lowbit' in a.AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print('OK')\n"
    )
    r = _python(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from lowbit.integrations.transformers import LowbitHfQuantizer, register

    register()
    register()
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is LowbitHfQuantizer
