"""The lean decoder's native decode step: one C call per generated token (``csrc/decode.c``).

`NativeStep.create(decoder)` describes a `LeanDecoder`'s model to the C step — pointers to the
model's own tensors (embedding, norm gains, rotary tables, the decoder's KV cache) and, for each
linear layer, the address of the native kernel lowbit runs for it plus that kernel's weight
struct. It returns (None, the reason) when any part of the
model is something the C step does not cover; the decoder then keeps its Python path, which is
also the reference the C step is tested against (tests/test_runtime_native.py).

Covered: float32 CPU models of the decoder's families whose linear layers are ``nn.Linear``
(float32) or lowbit ``QuantizedLinear``s whose format's kernel-table row has a C entry that takes
the weight (affine 2- to 8-bit, ternary, NF4, sparse N:M / CSR, E8P, AQLM), or a BitNet format (`lowbit.formats.bitnet`: b1.58 or 1-bit codes,
int8 activations, with or without the layer's own norm, run by the native BitNet kernel
`lowbit.kernels.bitnet`), a float32 ``nn.Embedding`` (Gemma's scaled one included), SiLU or
tanh-GELU gated MLPs, one RMSNorm epsilon for the whole model. Prefill (several positions at once)
stays on the Python path, where the work is matrix-matrix and torch's dispatch cost is amortised.

Threads: each step runs on the count `lowbit.runtime.threads.ThreadChooser` picks by timing the
steps (up to ``torch.get_num_threads()``) among the counts that fit the cores other processes
leave free (`lowbit.runtime.threads.FreeCores`), so that another process busy on a core does not
leave a 2-thread team waiting at every barrier; ``step.threads.fixed = n`` pins it.
"""

from __future__ import annotations

import ctypes
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.kernels import _native
from lowbit.runtime.threads import FreeCores, ThreadChooser

__all__ = ["NativeStep", "PROFILE_CATEGORIES"]

_vp, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
PROFILE_CATEGORIES = ("q/k/v projections", "attention", "o projection", "MLP (gate/up/act/down)",
                      "output head", "norms, rotary, residuals", "embedding")


class _Linear(ctypes.Structure):
    _fields_ = [("fn", _vp), ("w", _vp), ("bias", _vp)]


class _Layer(ctypes.Structure):
    _fields_ = ([(n, _Linear) for n in ("q", "k", "v", "o", "gate", "up", "down")]
                + [(n, _vp) for n in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm",
                                      "k_norm", "k_cache", "v_cache", "cos", "sin")]
                + [("window", _i64)])


class _Plan(ctypes.Structure):
    _fields_ = ([(n, _i64) for n in ("n_layers", "d", "n_heads", "n_kv", "head_dim", "ffn", "vocab", "max_len")]
                + [(n, _f32) for n in ("eps", "scaling", "attn_softcap", "final_softcap", "embed_scale")]
                + [("act", _i32), ("kv_f16", _i32), ("embed", _vp), ("final_norm", _vp), ("head", _Linear), ("layers", _vp),
                   ("work", _vp), ("prof", _vp)])


class _F32Weight(ctypes.Structure):
    _fields_ = [("W", _vp), ("K", _i64), ("N", _i64)]


_ABI = 2
_FUNCTIONS = {"lb_decode_abi": ([], ctypes.c_int), "lb_decode_step": ([_vp, _i64, _i64, _vp, ctypes.c_int], ctypes.c_int),
              "lb_decode_work_floats": ([_vp], _i64)}


def _library():
    """The decode step's `lowbit.kernels._native.NativeLibrary` (None: not built, built for another
    plan layout, or LOWBIT_NATIVE=0). Its paths ("scalar", "avx2", "avx512", `set_isa`) cover the
    step's own arithmetic; the linear layers follow their own kernels' setting."""
    lib = _native.library("decode", _FUNCTIONS)
    return lib if lib is not None and lib.lb_decode_abi() == _ABI else None


class _Unsupported(Exception):
    pass


def _f32_cpu(t: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise _Unsupported(f"{what} is not a contiguous float32 CPU tensor")
    return t


def _activation_kind(act) -> int:
    """0 for SiLU, 1 for tanh-GELU, decided by evaluating the model's own activation."""
    probe = torch.linspace(-10, 10, 401)
    with torch.inference_mode():
        try:
            y = act(probe.clone())
        except Exception as e:  # noqa: BLE001 - any failure: not a plain elementwise activation
            raise _Unsupported(f"activation {type(act).__name__} cannot be evaluated ({e})") from None
    for kind, ref in ((0, F.silu(probe)), (1, F.gelu(probe, approximate="tanh"))):
        if isinstance(y, torch.Tensor) and y.shape == probe.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-6):
            return kind
    raise _Unsupported(f"activation {type(act).__name__} is neither SiLU nor tanh-GELU")


class NativeStep:
    """A built plan; `step(token, pos)` returns the logits [vocab] of one decode position."""

    def __init__(self, lib, plan: _Plan, keep: list, vocab: int):
        self._lib, self._plan, self._keep, self.vocab = lib, plan, keep, vocab
        self._plan_addr = ctypes.addressof(plan)
        self._prof = None
        self.kernels: dict[str, int] = {}  # kernel kind -> number of linear layers that run it
        self.threads = ThreadChooser(torch.get_num_threads(), free=FreeCores().free)  # `.fixed = n` pins the count

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, dec) -> tuple[NativeStep | None, str | None]:
        """(the step, None) when the C step covers this decoder's model, else (None, the reason)."""
        try:
            return cls._describe(dec), None
        except _Unsupported as e:
            return None, str(e)

    @classmethod
    def _describe(cls, dec) -> NativeStep:
        lib = _library()
        if lib is None:
            raise _Unsupported("the native decode library is not built (or LOWBIT_NATIVE=0)")
        if dec.dtype != torch.float32 or dec.device.type != "cpu":
            raise _Unsupported(f"the model is {dec.dtype} on {dec.device}, the C step runs float32 on the CPU")
        if dec.kv_dtype not in (torch.float32, torch.float16):
            raise _Unsupported(f"the KV cache is {dec.kv_dtype}; the C step keeps it in float32 or float16")
        if dec.head_dim > 1024:
            raise _Unsupported(f"head_dim {dec.head_dim} is above the C step's 1024")
        keep: list = []
        eps = {dec.final_norm.eps}

        kinds: dict[str, int] = {}

        def linear(mod: nn.Module, what: str) -> _Linear:
            fn, w, b, kind = _linear_entry(mod, what, keep, dec.int8_activations)
            kinds[kind] = kinds.get(kind, 0) + 1
            return _Linear(fn, w, b)

        def norm(n, what):
            if n is None:
                return None
            eps.add(n.eps)
            return _f32_cpu(n.gain, what).data_ptr()

        fam = dec.family
        embed = dec.embed
        # the family's record says whether its embedding scales its rows (embed_scale: Gemma)
        scaled = fam.scaled_embedding and getattr(embed, "embed_scale", None) is not None
        if not isinstance(embed, nn.Embedding) or (type(embed) is not nn.Embedding and not scaled):
            raise _Unsupported(f"embedding {type(embed).__name__} is not a plain (or {fam.model_type}-scaled) "
                               "nn.Embedding")
        ew = _f32_cpu(embed.weight.detach(), "the embedding weight")
        embed_scale = float(embed.embed_scale) if scaled else 1.0

        L = len(dec.layers)
        layers = (_Layer * L)()
        act = None
        for i, ly in enumerate(dec.layers):
            c = layers[i]
            for role, path in fam.projections.items():
                setattr(c, role, linear(ly.modules[role], f"block {i} {path.rpartition('.')[2]}"))
            kind = _activation_kind(ly.act)
            if act is not None and kind != act:
                raise _Unsupported("blocks use different activations")
            act = kind
            c.attn_norm = norm(ly.attn_norm, f"block {i} norm")
            c.mlp_norm = norm(ly.mlp_norm, f"block {i} norm")
            c.post_attn_norm = norm(ly.post_attn_norm, f"block {i} norm")
            c.post_mlp_norm = norm(ly.post_mlp_norm, f"block {i} norm")
            c.q_norm = norm(ly.q_norm, f"block {i} q norm")
            c.k_norm = norm(ly.k_norm, f"block {i} k norm")
            c.k_cache, c.v_cache = dec._k[i].data_ptr(), dec._v[i].data_ptr()
            cos, sin = dec.rope[ly.rope][0], dec.rope[ly.rope][1]
            c.cos, c.sin = _f32_cpu(cos, "rotary table").data_ptr(), _f32_cpu(sin, "rotary table").data_ptr()
            c.window = int(ly.window or 0)
        if len(eps) != 1:
            raise _Unsupported(f"norms use different epsilons {sorted(eps)}")
        cfg = dec.config
        gate = fam.projections["gate"].rpartition(".")[2]
        ffn = max(_out_features(ly.modules["gate"], f"block {i} {gate}") for i, ly in enumerate(dec.layers))
        if ffn < dec.n_kv * dec.head_dim:
            raise _Unsupported("the MLP is narrower than the key/value projection (the C step reuses its buffer)")
        plan = _Plan(n_layers=L, d=int(ew.shape[1]), n_heads=dec.n_heads, n_kv=dec.n_kv, head_dim=dec.head_dim,
                     ffn=ffn, vocab=int(cfg.vocab_size), max_len=dec.max_len, eps=float(eps.pop()),
                     scaling=float(dec.scaling), attn_softcap=float(dec.attn_softcap or 0.0),
                     final_softcap=float(dec.final_softcap or 0.0), embed_scale=embed_scale, act=act,
                     kv_f16=int(dec.kv_dtype == torch.float16),
                     embed=ew.data_ptr(), final_norm=dec.final_norm.gain.data_ptr(),
                     head=linear(dec.lm_head_module, "the output head"),
                     layers=ctypes.addressof(layers))
        if int(ew.shape[0]) < plan.vocab:
            raise _Unsupported("the embedding has fewer rows than the vocabulary")
        work = torch.empty(int(lib.lb_decode_work_floats(ctypes.byref(plan))), dtype=torch.float32)
        plan.work = work.data_ptr()
        keep += [layers, work, ew]
        step = cls(lib, plan, keep, plan.vocab)
        step.kernels = dict(sorted(kinds.items()))
        return step

    # -- running --------------------------------------------------------------------------------
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits of one position, on the thread count `threads` chooses (timed: see
        `lowbit.runtime.threads`); a change of ``torch.get_num_threads()`` starts a new chooser."""
        most = torch.get_num_threads()
        if self.threads.most != most:
            self.threads = ThreadChooser(most, fixed=self.threads.fixed, free=self.threads.free)
        nt = self.threads.next()
        logits = torch.empty(self.vocab, dtype=torch.float32)
        t0 = time.perf_counter()
        rc = self._lib.lb_decode_step(self._plan_addr, token, pos, logits.data_ptr(), nt)
        self.threads.record(nt, time.perf_counter() - t0)
        if rc:
            raise RuntimeError(f"native decode step failed (code {rc})")
        return logits

    def start_profile(self) -> None:
        """Accumulate per-category seconds (see PROFILE_CATEGORIES) from the next step on."""
        self._prof = (ctypes.c_double * len(PROFILE_CATEGORIES))()
        self._plan.prof = ctypes.addressof(self._prof)

    def stop_profile(self) -> dict[str, float]:
        """Seconds per category since `start_profile`, and stop profiling."""
        out = dict(zip(PROFILE_CATEGORIES, list(self._prof))) if self._prof is not None else {}
        self._plan.prof = None
        self._prof = None
        return out


def _out_features(mod: nn.Module, what: str) -> int:
    n = getattr(mod, "out_features", None)
    if not isinstance(n, int):
        raise _Unsupported(f"{what} has no out_features")
    return n


def _linear_entry(mod: nn.Module, what: str, keep: list, int8_activations: bool = False):
    """(kernel function address, weight struct address, bias address or None, kernel kind) for one
    layer. A quantized layer runs the C entry of the kernel-table row the Python path runs
    (`lowbit.kernels.select`); the kind is that row's name ("affine", "affine-a8", "ternary"),
    "float32" for an nn.Linear (this library's own GEMV)."""
    from lowbit.nn.linear import QuantizedLinear

    lib = _library()
    if type(mod) is nn.Linear:
        W = _f32_cpu(mod.weight.detach(), f"{what} weight")
        b = _f32_cpu(None if mod.bias is None else mod.bias.detach(), f"{what} bias")
        st = _F32Weight(W=W.data_ptr(), K=int(W.shape[1]), N=int(W.shape[0]))
        keep += [st, W, b]
        return lib.address("lb_dec_f32_linear_w"), ctypes.addressof(st), None if b is None else b.data_ptr(), "float32"
    if type(mod) is QuantizedLinear and type(mod).forward is QuantizedLinear.forward:
        fmt = mod.weight_format
        k = kernels.select(fmt, "int8" if int8_activations else None, "cpu")  # the row the Python path runs
        if k is None or k.symbol is None:
            raise _Unsupported(f"{what}: format {getattr(type(fmt), 'name', None)!r} has no native decode kernel")
        fn = k.c_entry()
        if fn is None:
            raise _Unsupported("the native kernel library is not built")
        st = k.struct(fmt)
        if st is None:
            raise _Unsupported(f"{what}: the native kernel does not take this weight's storage")
        b = _f32_cpu(None if mod.bias is None else mod.bias.detach(), f"{what} bias")
        keep += [fmt, st, b]
        return fn, ctypes.addressof(st), None if b is None else b.data_ptr(), k.name
    raise _Unsupported(f"{what} is a {type(mod).__name__}, which the C step has no kernel for")
