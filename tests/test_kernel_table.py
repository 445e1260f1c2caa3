"""The kernel table (lowbit.kernels.KERNELS): a row for every registered format, C entries that
resolve and read their weights, and the decoder, the C decode step and `kernels.linear` choosing
kernels through the table only (a row changed in the table changes what they run)."""

import ctypes
import dataclasses

import pytest
import torch

from lowbit import api, kernels
from lowbit.formats import available_formats
from lowbit.core.scheme import QuantScheme
from lowbit.kernels import a8, cpu, reference
from lowbit.models.tiny import tiny_model
from lowbit.runtime import LeanDecoder

# formats whose kernels are C code (csrc/): each must have its own row
NATIVE_FORMATS = {"affine", "ternary", "nf4", "dynamic-int8", "half", "sparse-nm", "sparse-csr", "static-int8", "e8p",
                  "aqlm"}
SCHEME = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32)


def test_a_row_for_every_registered_format():
    formats = set(available_formats())
    own = {k.format for k in kernels.KERNELS.values() if k.default}
    assert NATIVE_FORMATS <= formats
    assert own == formats  # every format has its own product in the table (none is reference-only today)
    for (fmt, acts, dev), k in kernels.KERNELS.items():
        assert fmt in formats and (k.format, k.activations, k.device) == (fmt, acts, dev)
        assert acts in kernels.ACTIVATIONS and dev in kernels.DEVICES
    for fmt in formats:  # one own product per format, whatever the device
        assert len({k.activations for k in kernels.KERNELS.values() if k.format == fmt and k.default}) == 1


def _affine(shape=(24, 64)):
    from lowbit.formats.affine import AffineWeight

    return AffineWeight.quantize_rtn(torch.randn(shape, generator=torch.Generator().manual_seed(0)), SCHEME)


def _ternary(shape=(24, 64)):
    from lowbit.algorithms.ternary import TernaryConfig, ternary_quantize

    return ternary_quantize(torch.randn(shape, generator=torch.Generator().manual_seed(1)), TernaryConfig())


def _e8p(shape=(24, 64)):
    from lowbit.formats.e8p import E8PWeight

    codes = torch.randint(0, 65536, (shape[0], shape[1] // 8), generator=torch.Generator().manual_seed(3))
    return E8PWeight.from_codes(codes, 0.5, shape, seed=4)


def _aqlm(shape=(24, 64)):
    from lowbit.formats.aqlm import AQLMWeight

    g = torch.Generator().manual_seed(5)
    return AQLMWeight.from_codes(torch.randint(0, 256, (shape[0], shape[1] // 8, 2), generator=g),
                                 torch.randn(2, 256, 8, generator=g), torch.rand(shape[0], generator=g), shape)


def _bitnet(shape=(24, 64)):
    from lowbit.formats.bitnet import BitNetWeight

    g = torch.Generator().manual_seed(6)
    return BitNetWeight.from_codes(torch.randint(-1, 2, shape, generator=g).float(), torch.tensor(0.05))


def _nf4(shape=(24, 64)):
    from lowbit.algorithms.nf4 import NF4Config, nf4_quantize

    return nf4_quantize(torch.randn(shape, generator=torch.Generator().manual_seed(7)), NF4Config())


def _pruned(shape=(24, 64)):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    keep = W.abs().reshape(shape[0], -1, 4).argsort(dim=-1)[..., 2:]          # 2 of every 4 kept
    mask = torch.zeros(W.shape, dtype=torch.bool).reshape(shape[0], -1, 4).scatter_(-1, keep, True).reshape(shape)
    return torch.where(mask, W, torch.zeros(()))  # +0.0 where pruned (a stored -0.0 counts as a nonzero)


def _sparse_nm():
    from lowbit.formats.sparse_nm import SparseNMWeight

    return SparseNMWeight.from_dense(_pruned(), 2, 4)


def _sparse_csr():
    from lowbit.formats.sparse_csr import CSRWeight

    return CSRWeight.from_dense(_pruned())


@pytest.mark.skipif(not (cpu.available() and a8.available()), reason="native kernels not built")
def test_c_entries_resolve_and_match_their_python_entries():
    samples = {"affine": _affine, "ternary": _ternary, "e8p": _e8p, "aqlm": _aqlm, "bitnet": _bitnet, "nf4": _nf4,
               "sparse-nm": _sparse_nm, "sparse-csr": _sparse_csr}
    rows = [k for k in kernels.KERNELS.values() if k.symbol is not None]
    assert {(k.format, k.activations) for k in rows} == {("affine", "float"), ("affine", "int8"), ("ternary", "float"),
                                                         ("e8p", "float"), ("aqlm", "float"),
                                                         ("e8p", "int8"), ("aqlm", "int8"), ("bitnet", "int8"),
                                                         ("nf4", "float"), ("sparse-nm", "float"),
                                                         ("sparse-csr", "float")}
    fn_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int)
    for k in rows:
        w = samples[k.format]()
        assert k.takes(w)
        st = k.struct(w)
        assert st is k.struct(w)  # built once per stored tensors
        view = getattr(st, "e", st)  # the int8 E8P struct holds the float kernel's view
        dims = (view.out_f, view.in_f) if hasattr(view, "out_f") else (view.N, view.K)
        assert dims == tuple(w.shape)
        x = torch.randn(1, w.shape[1], generator=torch.Generator().manual_seed(2))
        y = torch.full((1, w.shape[0]), float("nan"))
        assert fn_t(k.c_entry())(ctypes.addressof(st), x.data_ptr(), 1, None, y.data_ptr(), 1) == 0
        assert torch.equal(y, k.linear(x, w, None))  # the C entry is the Python entry's kernel


def test_linear_runs_the_format_row_for_the_device(monkeypatch):
    w = _affine()
    x = torch.randn(3, 64)
    calls = []
    row = kernels.find("affine")
    spy = dataclasses.replace(row, linear=lambda x, w, b: calls.append(x.shape) or NotImplemented)
    monkeypatch.setitem(kernels.KERNELS, ("affine", "float", "cpu"), spy)
    monkeypatch.setattr(kernels, "_ROUTES", {})
    y = kernels.linear(x, w)
    assert calls == [(3, 64)] and torch.equal(y, reference.linear(x, w))  # NotImplemented: the reference
    # a row for "any" device serves devices without their own row
    monkeypatch.delitem(kernels.KERNELS, ("affine", "float", "cpu"))
    monkeypatch.setitem(kernels.KERNELS, ("affine", "float", "any"), spy)
    monkeypatch.setattr(kernels, "_ROUTES", {})
    kernels.linear(x, w)
    assert len(calls) == 2
    # the opt-in int8 row is never the format's own product
    assert kernels.find("affine", "int8").default is False and kernels.select(w).activations == "float"


def test_registration_errors():
    with pytest.raises(RuntimeError, match="registered twice"):
        kernels.register_kernel("affine")(lambda x, w, b: None)
    with pytest.raises(RuntimeError, match="own product"):
        kernels.register_kernel("affine", "int8", "any")(lambda x, w, b: None)
    with pytest.raises(RuntimeError, match="activations must be"):
        kernels.register_kernel("affine", "int4")
    with pytest.raises(RuntimeError, match="C entry needs"):
        kernels.register_kernel("affine", symbol="lb_affine_linear_w")


def _quantized_llama():
    lm = tiny_model("llama", seed=21)
    api.quantize(api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source), "rtn", SCHEME,
                 progress=False)
    return lm.model


@pytest.mark.skipif(not cpu.available(), reason="native kernels not built")
def test_decoder_and_c_step_choose_kernels_through_the_table(monkeypatch):
    model = _quantized_llama()
    ids = torch.arange(5)
    base = LeanDecoder(model, max_len=8, native=False).forward(ids)
    nat = LeanDecoder(model, max_len=8)
    assert nat.native_step is not None and nat.native_step.kernels == {"affine": 14, "float32": 1}

    # the Python path calls the row's Python entry
    row = kernels.find("affine")
    calls = []

    def spy(x, w, b):
        calls.append(1)
        return row.linear(x, w, b)

    monkeypatch.setitem(kernels.KERNELS, ("affine", "float", "cpu"), dataclasses.replace(row, linear=spy, name="spy"))
    monkeypatch.setattr(kernels, "_ROUTES", {})
    dec = LeanDecoder(model, max_len=8)
    assert torch.equal(dec.forward(ids), base) and len(calls) == 14  # 2 blocks x 7 (the head stays float)
    # the C step takes the row's C entry and struct, and reports the row's name
    assert dec.native_step.kernels == {"spy": 14, "float32": 1}
    # a row without a C entry: the C step declines the model, the Python path still runs it
    monkeypatch.setitem(kernels.KERNELS, ("affine", "float", "cpu"), dataclasses.replace(row, symbol=None, struct=None))
    dec = LeanDecoder(model, max_len=8)
    assert dec.native_step is None and "no native decode kernel" in dec.native_reason
    # no row at all: the reference path (same numbers up to float rounding)
    monkeypatch.delitem(kernels.KERNELS, ("affine", "float", "cpu"))
    monkeypatch.setattr(kernels, "_ROUTES", {})
    dec = LeanDecoder(model, max_len=8)
    assert dec.native_step is None
    torch.testing.assert_close(dec.forward(ids), base, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not (cpu.available() and a8.available()), reason="native kernels not built")
def test_int8_activations_come_from_the_opt_in_row(monkeypatch):
    model = _quantized_llama()
    flt = LeanDecoder(model, max_len=12)
    dec = LeanDecoder(model, max_len=12, int8_activations=True)
    assert dec.native_step.kernels == {"affine-a8": 14, "float32": 1}
    ids = torch.arange(5)
    a, b = flt.forward(ids), dec.forward(ids)
    a, b = flt.forward([int(a.argmax())]), dec.forward([int(a.argmax())])
    assert not torch.equal(a, b)  # int8 activations change the product
    # without the opt-in row, int8_activations runs the float kernels
    monkeypatch.delitem(kernels.KERNELS, ("affine", "int8", "cpu"))
    for native in (True, False):
        f = LeanDecoder(model, max_len=12, native=native)
        d = LeanDecoder(model, max_len=12, int8_activations=True, native=native)
        assert native is False or d.native_step.kernels == {"affine": 14, "float32": 1}
        x, y = f.forward(ids), d.forward(ids)
        assert torch.equal(x, y)
        tok = int(x.argmax())
        assert torch.equal(f.forward([tok]), d.forward([tok]))


def test_prefer_int8_routes_linear_to_the_opt_in_row():
    """Inside kernels.prefer("int8"), kernels.linear runs the affine int8 row (one row and, with
    its batched product, many rows); formats without such a row keep their own product; outside,
    the own product again."""
    import torch

    from lowbit import kernels
    from lowbit.algorithms.nf4 import NF4Config, nf4_quantize
    from lowbit.core.scheme import QuantScheme
    from lowbit.formats.affine import AffineWeight
    from lowbit.kernels import a8

    if not a8.available():
        pytest.skip("native affine_a8 library not built")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 128, generator=g)
    w = AffineWeight.quantize_rtn(W, QuantScheme(bits=4, symmetric=False, group_size=32))
    nf = nf4_quantize(W, NF4Config())
    for rows in (1, 40):
        x = torch.randn(rows, 128, generator=g)
        own, own_nf = kernels.linear(x, w), kernels.linear(x, nf)
        with kernels.prefer("int8"):
            y = kernels.linear(x, w)
            assert torch.equal(kernels.linear(x, nf), own_nf)  # NF4 has no int8 row
        assert torch.equal(y, a8.affine_a8_linear(x, w))
        assert not torch.equal(y, own)
        assert torch.equal(kernels.linear(x, w), own)
        with kernels.prefer("float"):
            assert torch.equal(kernels.linear(x, w), own)
    with pytest.raises(ValueError):
        with kernels.prefer("int4"):
            pass
