"""The format schema (lowbit.formats.base): every registered format round-trips through
to_state_dict / from_state_dict exactly, records the same meta keys as before, and validate()
rejects a wrong shape, a wrong dtype or a missing tensor with a one-line error naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.models import files as model_files

from lowbit.algorithms.nf4 import NF4Config, nf4_quantize
from lowbit.algorithms.quip import QuIPConfig, quip_quantize
from lowbit.algorithms.ternary import TernaryConfig, ternary_quantize
from lowbit.formats.bitnet import BitNetWeight
from lowbit.formats import available_formats, get_format
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.aqlm import AQLMWeight
from lowbit.formats.incoherent import IncoherentAffineWeight
from lowbit.formats.base import WeightFormat, param, shape_param, tensor
from lowbit.formats.dynamic_int8 import DynamicInt8Weight
from lowbit.formats.floatw import FloatWeight
from lowbit.formats.gguf_blocks import GGUFBlockWeight
from lowbit.formats.int8 import Int8Weight
from lowbit.formats.sparse_csr import CSRWeight
from lowbit.formats.sparse_nm import SparseNMWeight
from lowbit.formats.static_int8 import StaticInt8Weight


def _W(rows=6, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _static_int8(matmul="auto", smooth=True):
    W = _W()
    s_w = W.abs().amax(1) / 127
    return StaticInt8Weight(qweight=torch.round(W / s_w[:, None]).to(torch.int8), w_scale=s_w,
                            act_qparams=torch.tensor([0.02, 3.0]), shape=(6, 40), act_qmin=-128, act_qmax=127,
                            smooth=torch.rand(40) + 0.5 if smooth else None, observer="mse", matmul=matmul, w_min=-127)


def _tuned(w):
    """An E8P weight with fine-tuned (continuous) sign vectors."""
    import dataclasses

    return dataclasses.replace(w, su=torch.linspace(-1.2, 1.1, w.shape[0]), sv=torch.linspace(0.9, -1.0, w.shape[1]))


def _gguf_blocks(W, t):
    from lowbit.export.gguf import encode_tensor

    return GGUFBlockWeight.from_raw(encode_tensor(W.numpy(), t), t, tuple(W.shape))


def _two_of_four():
    W = _W()
    W.view(6, 10, 4)[..., 1::2] = 0.0
    return W


# one weight per format and setting that changes which tensors are stored; (id, weight, meta keys)
CASES = [
    ("affine-sym", AffineWeight.quantize_rtn(_W(), QuantScheme(bits=4, group_size=16)), {"shape", "scheme"}),
    ("affine-asym", AffineWeight.quantize_rtn(_W(), QuantScheme(bits=3, symmetric=False, group_size=16)),
     {"shape", "scheme"}),
    ("affine-float-zero", AffineWeight.quantize_rtn(_W(), QuantScheme(bits=4, symmetric=False, zero_point="float",
                                                                     granularity="channel")), {"shape", "scheme"}),
    ("affine-tensor", AffineWeight.quantize_rtn(_W(), QuantScheme(bits=8, symmetric=False, granularity="tensor",
                                                                 scale_dtype="float32")), {"shape", "scheme"}),
    ("nf4-dq", nf4_quantize(_W(), NF4Config()), {"shape", "blocksize", "dq_blocksize"}),
    ("nf4", nf4_quantize(_W(), NF4Config(double_quant=False)), {"shape", "blocksize", "dq_blocksize"}),
    ("llm-int8", Int8Weight.quantize(_W(), threshold=4.5), {"shape", "threshold"}),
    ("half", FloatWeight.cast(_W(), "float16"), {"shape", "dtype", "compute"}),
    ("bf16", FloatWeight.cast(_W(), "bfloat16", compute="native"), {"shape", "dtype", "compute"}),
    ("dynamic-int8", DynamicInt8Weight.quantize(_W(), activations="tensor"), {"shape", "activations"}),
    ("static-int8", _static_int8("int"), {"shape", "act_qmin", "act_qmax", "observer", "matmul", "w_min"}),
    ("static-int8-nosmooth", _static_int8(smooth=False),
     {"shape", "act_qmin", "act_qmax", "observer", "matmul", "w_min"}),
    ("ternary", ternary_quantize(_W(), TernaryConfig()), {"shape", "granularity"}),
    ("ternary-channel", ternary_quantize(_W(), TernaryConfig("channel")), {"shape", "granularity"}),
    ("sparse-nm", SparseNMWeight.from_dense(_two_of_four(), 2, 4), {"shape", "pattern"}),
    ("sparse-csr", CSRWeight.from_dense(_two_of_four()), {"shape", "nnz"}),
    ("e8p", quip_quantize(_W(8, 64), torch.eye(64), QuIPConfig(), 1)[0], {"shape", "seed", "bits"}),
    ("e8p-3bit-tuned", _tuned(quip_quantize(_W(8, 64), torch.eye(64), QuIPConfig(bits=3), 1)[0]),
     {"shape", "seed", "bits"}),
    ("e8p-4bit-orthogonal", quip_quantize(_W(7, 64), torch.eye(64), QuIPConfig(bits=4), 1)[0],
     {"shape", "seed", "bits"}),
    ("affine-incoherent", IncoherentAffineWeight.wrap(AffineWeight.quantize_rtn(_W(8, 64), QuantScheme(bits=3,
     group_size=32)), 5), {"shape", "scheme", "seed"}),
    ("aqlm", AQLMWeight.from_codes(torch.randint(0, 16, (6, 5, 2), generator=torch.Generator().manual_seed(0)),
                                   torch.randn(2, 16, 8), torch.rand(6) + 0.5, (6, 40)),
     {"shape", "in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook"}),
    ("bitnet-b1.58", BitNetWeight.from_float(_W(), 1.58), {"shape", "bits", "norm", "norm_gain", "norm_eps"}),
    ("bitnet-1bit-norm", BitNetWeight.from_float(_W(), 1, norm=True, norm_weight=torch.rand(40)),
     {"shape", "bits", "norm", "norm_gain", "norm_eps"}),
    ("gguf-blocks-q4_k", _gguf_blocks(_W(6, 256), "Q4_K"), {"shape", "type"}),
    ("gguf-blocks-iq4_nl", _gguf_blocks(_W(6, 64), "IQ4_NL"), {"shape", "type"}),
]
IDS = [c[0] for c in CASES]
WEIGHTS = {c[0]: c[1] for c in CASES}


def test_every_registered_format_is_covered():
    assert {type(w).name for _, w, _ in CASES} == set(available_formats())
    for name in available_formats():
        cls = get_format(name)
        assert issubclass(cls, WeightFormat) and cls.name == name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip_through_state_dict(case):
    _, w, keys = case
    w.validate()
    tensors, meta = w.to_state_dict()
    assert set(meta) == {"format"} | keys and meta["format"] == type(w).name
    assert tuple(tensors) == tuple(n for n in type(w).tensor_names if getattr(w, n) is not None)
    meta = json.loads(json.dumps(meta))                               # as lowbit.json holds it
    copies = {k: t.clone() for k, t in tensors.items()}
    back = WeightFormat.from_state_dict(copies, meta)                 # the class from meta["format"]
    assert type(back) is type(w)
    assert back.meta() == meta
    for k, t in back.tensors().items():
        assert t.dtype == tensors[k].dtype and torch.equal(t, tensors[k])
    for n in type(w).param_names:
        assert getattr(back, n) == getattr(w, n), n
    assert torch.equal(back.dequantize(), w.dequantize())
    assert back.nbytes == w.nbytes and back.bits_per_weight == w.bits_per_weight
    assert type(w).from_state_dict(copies, meta).meta() == meta
    with pytest.raises(LowbitError, match="not"):
        (StaticInt8Weight if type(w) is not StaticInt8Weight else AffineWeight).from_state_dict(copies, meta)


def _bad_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _bad_shape(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t[:1]])          # one more entry (1-D) or row (2-D)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_validate_names_the_field(case):
    _, w, _ = case
    tensors, meta = w.to_state_dict()
    for n, t in tensors.items():
        for bad, field in ((_bad_shape(t), n), (_bad_dtype(t), n)):
            if type(w) is CSRWeight and n == "values" and bad.dtype == t.dtype:
                field = "col_idx"  # the values' length is nnz: the columns then have the wrong length
            with pytest.raises(LowbitError, match=rf"^{type(w).name} {field} has shape"):
                type(w).from_tensors(dict(tensors, **{n: bad}), meta)
        if n not in ("smooth", "su", "sv"):  # every stored tensor is needed by its settings, but the optional ones
            always = type(w).__dataclass_fields__[n].default is not None
            with pytest.raises(KeyError if always else LowbitError, match=rf"'{n}'"):
                type(w).from_tensors({k: v for k, v in tensors.items() if k != n}, meta)
    with pytest.raises(LowbitError, match="unexpected tensor"):
        type(w).from_tensors(dict(tensors, extra=torch.zeros(1)), meta)
    with pytest.raises(LowbitError, match="malformed"):
        type(w).from_tensors(tensors, {k: v for k, v in meta.items() if k != "shape"})
    with pytest.raises(LowbitError, match="shape"):
        type(w).from_tensors(tensors, dict(meta, shape=[w.shape[0], 0]))


def test_optional_tensors_follow_the_settings():
    t, meta = WEIGHTS["affine-asym"].to_state_dict()
    assert set(t) == {"qweight", "scales", "qzeros"}
    with pytest.raises(LowbitError, match="tensor 'zeros', which its settings do not use"):
        AffineWeight.from_tensors(dict(t, zeros=t["scales"]), meta)
    sym = WEIGHTS["affine-sym"]
    with pytest.raises(LowbitError, match="tensor 'qzeros'"):
        AffineWeight.from_tensors(dict(sym.tensors(), qzeros=t["qzeros"]), sym.meta())
    # smooth is optional either way
    assert "smooth" not in _static_int8(smooth=False).tensors()


def test_static_int8_saves_matmul_and_reads_old_records():
    w = _static_int8("float")
    t, meta = w.to_state_dict()
    assert meta["matmul"] == "float" and StaticInt8Weight.from_tensors(t, meta).matmul == "float"
    old = {k: v for k, v in meta.items() if k not in ("matmul", "w_min")}   # records of older versions
    back = StaticInt8Weight.from_tensors(t, old)
    assert back.matmul == "auto" and back.w_min == -128
    with pytest.raises(LowbitError, match="matmul"):
        StaticInt8Weight.from_tensors(t, dict(meta, matmul="fast"))
    with pytest.raises(LowbitError, match="act_qparams"):
        StaticInt8Weight.from_tensors(dict(t, act_qparams=torch.tensor([0.02, 300.0])), meta)
    with pytest.raises(LowbitError, match="w_min"):
        StaticInt8Weight.from_tensors(dict(t, qweight=torch.full_like(t["qweight"], -128)), meta)


def test_a_format_is_declared_once_and_registered_by_its_name():
    from lowbit.core import registry

    try:
        class Tiny(WeightFormat, name="test-tiny"):
            codes: torch.Tensor = tensor(torch.int8, lambda w: tuple(w.shape))
            scale: torch.Tensor | None = tensor(torch.float32, lambda w: (1,), optional=True, finite=True)
            shape: tuple[int, int] = shape_param()
            flavour: str = param("plain")

            def dequantize(self, dtype=torch.float32):
                return self.codes.to(dtype) * (1.0 if self.scale is None else self.scale)

        assert get_format("test-tiny") is Tiny and Tiny.name == "test-tiny"
        assert Tiny.tensor_names == ("codes", "scale") and Tiny.param_names == ("shape", "flavour")
        w = Tiny(codes=torch.ones(2, 3, dtype=torch.int8), shape=(2, 3))
        assert w.meta() == {"format": "test-tiny", "shape": [2, 3], "flavour": "plain"}
        assert set(w.tensors()) == {"codes"} and w.nbytes == 6 and w.bits_per_weight == 8.0
        back = WeightFormat.from_state_dict(*w.to_state_dict())
        assert isinstance(back, Tiny) and torch.equal(back.codes, w.codes)
        with pytest.raises(LowbitError, match="test-tiny scale contains NaN/Inf"):
            Tiny.from_tensors(dict(w.tensors(), scale=torch.tensor([float("nan")])), w.meta())
        with pytest.raises(TypeError):
            Tiny(torch.ones(2, 3, dtype=torch.int8), None, (2, 3))       # keyword-only
        with pytest.raises(RuntimeError, match="registered twice"):
            class Other(WeightFormat, name="test-tiny"):
                shape: tuple[int, int] = shape_param()
    finally:
        registry._REGISTRIES["format"].pop("test-tiny", None)
    with pytest.raises(LowbitError, match="unknown format 'test-tiny'"):
        get_format("test-tiny")


def test_a_corrupt_checkpoint_names_the_module_and_the_field(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from lowbit import checkpoint
    from lowbit.algorithms.base import make_method
    from lowbit.calibration.sequential import apply_data_free
    from tests.tiny import tiny_llama

    model = tiny_llama()
    method = make_method("rtn", QuantScheme(bits=4, group_size=32))
    apply_data_free(model, method, progress=False)
    out = checkpoint.save(model, None, tmp_path / "q", {"method": method.describe(), "calibration": None})
    f = out / "model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith(".scales"))
    t[key] = t[key].float()
    save_file(t, str(f))
    with pytest.raises(LowbitError, match="no-verify"):  # a rewritten file: the recorded digest says so first
        checkpoint.load(out)
    monkeypatch.setattr(model_files, "VERIFY_FILES", False)  # the format's own validation, behind it
    module = key[: -len(".scales")]
    with pytest.raises(LowbitError, match=rf"module {module}: affine scales has shape .*float32, expected .*float16"):
        checkpoint.load(out)
    del t[key]
    save_file(t, str(f))
    with pytest.raises(LowbitError, match=rf"module {module} lacks tensor 'scales'"):
        checkpoint.load(out)
