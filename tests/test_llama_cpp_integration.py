"""lowbit.integrations.llama_cpp: which extra-buffer-type setting a load gets, and that the patched
llama-cpp-python function is put back afterwards."""

import sys

import pytest

from lowbit.errors import LowbitError
from lowbit.integrations import llama_cpp as LC


@pytest.mark.parametrize("amx", [True, False])
def test_the_amx_rule(amx, monkeypatch):
    monkeypatch.setattr(LC, "has_amx", lambda: amx)
    assert LC.use_extra_buffer_types(None) is (not amx)  # off exactly where the AMX matmul crashes
    assert LC.use_extra_buffer_types(True) is True and LC.use_extra_buffer_types(False) is False


def test_has_amx_is_a_bool():
    assert isinstance(LC.has_amx(), bool)


def test_missing_llama_cpp_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(LowbitError, match="llama-cpp-python is not installed") as e:
        LC.load(tmp_path / "x.gguf", n_ctx=16, n_threads=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("amx, extra, want", [(True, None, False), (False, None, True),
                                              (True, True, True), (False, False, False)])
def test_load_uses_the_rule_and_restores_the_defaults(amx, extra, want, monkeypatch, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = llama_cpp.llama.llama_cpp
    orig = lib.llama_model_default_params
    seen = {}

    class FakeLlama:  # records what llama_cpp.Llama would build its model parameters from
        def __init__(self, model_path, **kw):
            seen["bufts"] = lib.llama_model_default_params().use_extra_bufts
            seen["path"], seen["kw"] = model_path, kw

    monkeypatch.setattr(LC, "has_amx", lambda: amx)
    monkeypatch.setattr(llama_cpp, "Llama", FakeLlama)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    LC.load(tmp_path / "m.gguf", n_ctx=32, n_threads=3, logits_all=True, extra_buffer_types=extra)
    assert seen["bufts"] is want
    assert seen["path"] == str(tmp_path / "m.gguf")
    assert seen["kw"] == dict(n_ctx=32, n_threads=3, n_threads_batch=3, logits_all=True, verbose=False)
    assert lib.llama_model_default_params is orig
    assert orig().use_extra_bufts is True  # llama.cpp's own default, untouched


def test_a_file_llama_cpp_refuses_is_a_lowbit_error_and_the_defaults_come_back(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = llama_cpp.llama.llama_cpp
    orig = lib.llama_model_default_params
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all" * 8)
    with pytest.raises(LowbitError, match="llama.cpp could not load it"):
        LC.load(tmp_path / "bad.gguf", n_ctx=16, n_threads=1, extra_buffer_types=False)
    with pytest.raises(LowbitError, match="no such GGUF file"):
        LC.load(tmp_path / "missing.gguf", n_ctx=16, n_threads=1)
    assert lib.llama_model_default_params is orig
    with pytest.raises(RuntimeError), LC.extra_buffer_types(False):
        assert lib.llama_model_default_params().use_extra_bufts is False
        raise RuntimeError
    assert lib.llama_model_default_params is orig
