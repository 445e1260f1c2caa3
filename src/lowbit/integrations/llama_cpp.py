"""Load a GGUF file in llama.cpp (the optional ``llama-cpp-python`` package): the one place that does.

    from lowbit.integrations import llama_cpp as LC
    llm = LC.load("model.gguf", n_ctx=512, n_threads=2, logits_all=True)
    try:
        llm.eval(ids)
        logits = llm.scores[: len(ids)]
    finally:
        llm.close()

Why not ``llama_cpp.Llama(path, ...)`` directly: llama.cpp's extra CPU buffer types (AMX tiles,
weight repacking; ``llama_model_params.use_extra_bufts``, on by default) crash a llama.cpp built
natively on a CPU with AMX: SIGSEGV in ``ggml_backend_amx_mul_mat``, even for ordinary Q8_0 / Q4_0
files, which kills the whole process (pytest included). llama-cpp-python has no constructor
argument for ``use_extra_bufts``, so `extra_buffer_types` sets it on the default model
parameters that ``Llama`` asks for while the model loads, and puts the original function back
afterwards. `load` turns them off on CPUs with AMX and leaves them on elsewhere (where repacking
is what makes Q4_0 fast), unless told otherwise. TQ1_0 / TQ2_0 never use them either way.

llama-cpp-python is imported only when a model is loaded; without it `load` raises a one-line
`LowbitError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["has_amx", "extra_buffer_types", "use_extra_buffer_types", "load"]

# one patch of llama-cpp-python's module at a time (a reentrant lock: nesting in one thread is fine)
_PATCH_LOCK = threading.RLock()


def _import_llama_cpp():
    try:
        import llama_cpp
        import llama_cpp.llama  # noqa: F401  (the module whose default-params lookup is patched)
    except ImportError as e:
        raise LowbitError(f"llama-cpp-python is not installed (pip install llama-cpp-python); it is needed to "
                          f"run GGUF files in llama.cpp ({e})") from None
    return llama_cpp


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (``amx_tile`` in /proc/cpuinfo's flags; False where that
    file is missing, e.g. not Linux)."""
    from lowbit.runtime import machine

    return "amx_tile" in machine.cpu().flags


def use_extra_buffer_types(extra_buffer_types: bool | None = None) -> bool:
    """What `load` does with llama.cpp's extra CPU buffer types: ``extra_buffer_types`` if given,
    else off on a CPU with AMX (the crash) and on otherwise."""
    if extra_buffer_types is not None:
        return bool(extra_buffer_types)
    return not has_amx()


@contextlib.contextmanager
def extra_buffer_types(on: bool):
    """While the block runs, models llama-cpp-python loads get ``use_extra_bufts = on``.

    ``llama_cpp.Llama`` builds its model parameters from
    ``llama_cpp.llama.llama_cpp.llama_model_default_params()``; that function is replaced by one
    that sets the flag, and restored when the block exits, error or not. Only loading reads it: a
    model keeps the setting it was loaded with after the block."""
    llama_cpp = _import_llama_cpp()
    lib = llama_cpp.llama.llama_cpp  # the ctypes bindings module, as llama.py sees it
    with _PATCH_LOCK:
        orig = lib.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = bool(on)
            return p

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = orig


def load(path: str | os.PathLike, *, n_ctx: int, n_threads: int, n_threads_batch: int | None = None,
         n_batch: int | None = None, logits_all: bool = False, extra_buffer_types: bool | None = None, **kw):
    """A ``llama_cpp.Llama`` for the GGUF file at ``path``; close it with ``.close()``.

    ``n_threads_batch`` defaults to ``n_threads`` (llama-cpp-python's own default is every CPU),
    ``n_batch`` to llama-cpp-python's (512). ``extra_buffer_types``: llama.cpp's AMX / repacking
    buffer types; None: off on a CPU with AMX, on otherwise (see the module docstring). Other
    keywords go to ``Llama`` as they are (``verbose`` defaults to False). A file llama.cpp cannot
    load raises `LowbitError`."""
    llama_cpp = _import_llama_cpp()
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{p}: no such GGUF file")
    args = dict(n_ctx=n_ctx, n_threads=n_threads,
                n_threads_batch=n_threads if n_threads_batch is None else n_threads_batch,
                logits_all=logits_all, verbose=False)
    if n_batch is not None:
        args["n_batch"] = n_batch
    args.update(kw)
    on = use_extra_buffer_types(extra_buffer_types)
    with _extra_buffer_types(on):
        try:
            return llama_cpp.Llama(model_path=str(p), **args)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file: ..."
            raise LowbitError(f"{p}: llama.cpp could not load it ({e})") from None


_extra_buffer_types = extra_buffer_types  # `load`'s keyword argument shadows the name inside it
