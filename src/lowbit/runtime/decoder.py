"""LeanDecoder: batch-1 causal-LM inference over a model's own modules, with a preallocated KV cache.

    dec = LeanDecoder(model, max_len=512)      # model: a float or lowbit-quantized HF *ForCausalLM
    logits = dec.forward(prompt_ids)           # prefill: [vocab] logits of the last prompt position
    logits = dec.forward(next_id)              # decode: one position more
    dec.reset()                                # forget the cache (nothing is reallocated)

Why a second forward pass next to transformers': at batch 1 a 135M model spends more time in
transformers' per-token bookkeeping (mask construction, cache objects, output dataclasses, hooks)
than in its matrix products. This decoder does only the arithmetic:

* **Weights are the model's own.** Every projection calls the layer it finds: ``F.linear`` on an
  ``nn.Linear``'s weight, `lowbit.kernels.linear` on a `QuantizedLinear`'s packed format (built
  once, so the kernel registered for the format runs — fast native paths included), or the module
  itself for anything else. Embedding, activation and rotary frequencies come from the model.
  Nothing is copied or fused: only the norm weights' gain (``offset + weight``, a few KB) and the
  rotary cos/sin tables ([max_len, head_dim] per rotary variant) are new tensors.
* **KV cache preallocated** at ``max_len`` positions, [layers, max_len, kv_heads, head_dim] for K
  and for V, written in place; attention reads views of the filled prefix. Grouped-query
  attention is computed without repeating K/V: queries are viewed as [kv_heads, group, ...].
* **One token = one pass of plain tensor ops** under ``torch.inference_mode``: no mask is built
  for decode (a single query attends to the whole filled prefix, or its sliding window), rotary
  tables are indexed, not recomputed.

The arithmetic follows transformers' eager implementation of each family (RMSNorm in float32,
``rotate_half`` rotary, softmax in float32, Gemma's ``(1 + w)`` norms, sandwich norms, q/k norms,
scaled embedding, query_pre_attn_scalar, sliding windows as ``kv > q - window``), so logits agree
with ``model(ids).logits`` to float32 rounding (tests/test_runtime.py). Prompts (several positions)
run attention through torch's fused ``scaled_dot_product_attention`` (same numbers to float
rounding; eager where logits are soft-capped).

Families: those in `lowbit.models.families`; the family's record says where each part of a block
is and which of the variants above the family uses. The decoder holds references to the model's
tensors at construction: build it after quantizing or moving the model, not before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.families import NORMS, family_of

__all__ = ["LeanDecoder", "linear_fn"]


def linear_fn(mod: nn.Module, int8_activations: bool = False):
    """A callable x -> mod(x) with the least per-call overhead that gives the same result.

    ``nn.Linear`` -> ``F.linear`` on its tensors; ``QuantizedLinear`` (whose forward is exactly
    ``kernels.linear(x, self.weight_format, self.bias)``) -> that dispatch with the format built
    once; anything else (or a subclass with its own forward) -> the module.

    ``int8_activations``: where the kernel table has an opt-in int8-activation row that takes the
    layer's weight (`lowbit.kernels.select`; for affine weights `lowbit.kernels.a8`, the W4A8
    product llama.cpp's Q4_0 x Q8_0 dot computes), a single activation row (decode) runs it, and
    so do several (prompts) where the row has a batched product (``Kernel.prompts``: the affine
    row's int8 GEMM; each prompt row's numbers are those of a one-row call, since the activation
    rounding is per row); the format's own product runs where it returns ``NotImplemented``."""
    from lowbit import kernels
    from lowbit.kernels import linear as kernel_linear
    from lowbit.nn.linear import QuantizedLinear

    if type(mod) is nn.Linear:
        wt, b = mod.weight.t(), mod.bias  # a transposed view, not a copy: what F.linear passes to BLAS
        if b is None:
            return lambda x: torch.mm(x, wt) if x.dim() == 2 else F.linear(x, wt.t())
        return lambda x: torch.addmm(b, x, wt) if x.dim() == 2 else F.linear(x, wt.t(), b)
    if type(mod) is QuantizedLinear and type(mod).forward is QuantizedLinear.forward:
        fmt, b = mod.weight_format, mod.bias
        dev = next((t.device.type for t in mod.buffers()), "cpu")
        k = kernels.select(fmt, "int8", dev) if int8_activations else None  # decided once, as the C step decides
        if k is not None and not k.default:
            opt_in, runs = k.linear, kernels.runs

            def run(x):
                if runs(k, x.numel() // x.shape[-1]):
                    y = opt_in(x, fmt, b)
                    if y is not NotImplemented:
                        return y
                return kernel_linear(x, fmt, b)
            return run
        return lambda x: kernel_linear(x, fmt, b)
    return mod


@dataclass(frozen=True)
class _Norm:
    gain: Tensor  # offset + weight, float32
    eps: float
    shape: tuple[int, ...]


def _norm(mod: nn.Module, offset: float) -> _Norm:
    w = getattr(mod, "weight", None)
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    if w is None or eps is None:
        raise LowbitError(f"{type(mod).__name__} is not an RMSNorm lowbit's decoder understands (no weight/eps)")
    gain = w.detach().float() + offset if offset else w.detach().float()
    return _Norm(gain, float(eps), tuple(gain.shape))


def _rms(x: Tensor, n: _Norm) -> Tensor:
    """transformers' RMSNorm, x * rsqrt(mean(x²) + eps) * gain in float32, as torch's fused op
    (bit-identical to the three-op form on float32 here, and one dispatch instead of five)."""
    return F.rms_norm(x, n.shape, n.gain, n.eps)


@dataclass
class _Layer:
    q: object  # the projections (models.families.PROJECTIONS): x -> the layer's output
    k: object
    v: object
    o: object
    gate: object
    up: object
    down: object
    act: object
    attn_norm: _Norm
    mlp_norm: _Norm
    post_attn_norm: _Norm | None  # sandwich norms (Gemma 3)
    post_mlp_norm: _Norm | None
    q_norm: _Norm | None  # per-head q/k norms (Gemma 3)
    k_norm: _Norm | None
    window: int | None  # sliding window (keys with pos > q_pos - window), None = full causal
    rope: str  # key into the decoder's rotary tables
    modules: dict  # projection role -> the model's own module (for the C step)


class LeanDecoder:
    """Batch-1 decoder with a preallocated KV cache; see the module docstring."""

    def __init__(self, model: nn.Module, max_len: int | None = None, native: bool | None = None,
                 int8_activations: bool = False, kv_dtype: torch.dtype | None = None):
        fam = family_of(model)  # LowbitError for an unsupported family
        offset = fam.norm_offset
        cfg = model.config
        self.model = model
        self.family = fam
        self.model_type = fam.model_type
        self.config = cfg
        limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if max_len is None:
            max_len = limit or 2048
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise LowbitError(f"max_len must be a positive integer, got {max_len!r}")
        if limit and max_len > limit:
            raise LowbitError(f"max_len {max_len} exceeds the model's max_position_embeddings {limit}")
        self.max_len = max_len

        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        if self.n_heads % self.n_kv:
            raise LowbitError(f"{self.n_heads} attention heads are not a multiple of {self.n_kv} key/value heads")
        self.group = self.n_heads // self.n_kv
        if fam.attn_scale:
            self.scaling = float(getattr(cfg, fam.attn_scale)) ** -0.5
        else:
            self.scaling = self.head_dim ** -0.5
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)

        self.embed = fam.get(model, fam.embed)
        self.final_norm = _norm(fam.get(model, fam.final_norm), offset)
        self.lm_head_module = fam.get(model, fam.lm_head)
        self.int8_activations = bool(int8_activations)
        lin = lambda m: linear_fn(m, self.int8_activations)  # noqa: E731
        self.lm_head = lin(self.lm_head_module)
        embed_w = getattr(self.embed, "weight", None)
        self.dtype = embed_w.dtype if embed_w is not None else torch.float32
        self.device = embed_w.device if embed_w is not None else torch.device("cpu")

        layer_types = list(getattr(cfg, "layer_types", None) or [])
        blocks = list(fam.get(model, fam.blocks))
        self.blocks = blocks
        if layer_types and len(layer_types) < len(blocks):
            raise LowbitError(f"config.layer_types lists {len(layer_types)} layers for {len(blocks)} blocks")
        self.layers: list[_Layer] = []
        for i, blk in enumerate(blocks):
            ltype = layer_types[i] if layer_types else "full_attention"
            window = None
            if ltype == "sliding_attention":
                window = getattr(cfg, "sliding_window", None)
            elif fam.window_all_layers and getattr(cfg, "sliding_window", None):
                window = cfg.sliding_window
            mods = {role: fam.get(blk, path, "projection") for role, path in fam.projections.items()}
            norms = {role: _norm(fam.get(blk, path, "norm"), offset) for role, path in fam.norms.items()}
            self.layers.append(_Layer(
                **{role: lin(m) for role, m in mods.items()}, act=fam.get(blk, fam.act, "activation"),
                **{role: norms.get(role) for role in NORMS},
                window=int(window) if window else None,
                rope=ltype if fam.rope_per_layer_type else "default",
                modules=mods,
            ))

        # Rotary tables from the model's own rotary module (so every rope_type / scaling it
        # implements is honoured): cos/sin [max_len, head_dim] per variant.
        rot = fam.get(model, fam.rotary, "rotary module")
        pos = torch.arange(max_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        self.rope: dict[str, tuple[Tensor, Tensor]] = {}
        with torch.inference_mode():
            for name in sorted({layer.rope for layer in self.layers}):
                cos, sin = rot(probe, pos, name) if fam.rope_per_layer_type else rot(probe, position_ids=pos)
                cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]
                if cos.shape != (max_len, self.head_dim):
                    raise LowbitError(f"rotary table has shape {tuple(cos.shape)}, "
                                      f"expected ({max_len}, {self.head_dim})")
                half = self.head_dim // 2
                # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]
                sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).contiguous()
                # q's tables also carry the attention scaling (q·k·s == (s·q)·k), saving one op per layer
                self.rope[name] = (cos, sin_signed, cos * self.scaling, sin_signed * self.scaling)

        L = len(self.layers)
        # [layer, position, kv_head, head_dim]: the positions written by one pass are one contiguous
        # block (written in place by the rotary arithmetic), attention reads strided views.
        # kv_dtype=torch.float16 stores K/V at half the bytes (as llama.cpp does by default): every
        # write rounds the float32 result once, every read widens back to the compute dtype.
        self.kv_dtype = self.dtype if kv_dtype is None else kv_dtype
        if self.kv_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LowbitError(f"kv_dtype must be torch.float32, float16 or bfloat16, got {kv_dtype!r}")
        shape = (L, max_len, self.n_kv, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self._k = list(self.k_cache.unbind(0))  # per-layer views
        self._v = list(self.v_cache.unbind(0))
        self._half = self.head_dim // 2
        self._masks: dict = {}  # (start, T, window) -> the prompt's attention mask (shared by the layers)
        self.pos = 0  # positions filled

        # One-token steps run in C when every part of the model is something the C step covers
        # (lowbit.runtime.native); `native_reason` says why not otherwise. native=False keeps the
        # Python path (the reference); native=True raises if the C step cannot be used.
        from lowbit.runtime.native import NativeStep

        if native is False:
            self.native_step, self.native_reason = None, "disabled (native=False)"
        else:
            self.native_step, self.native_reason = NativeStep.create(self)
        if native is True and self.native_step is None:
            raise LowbitError(f"lowbit's native decode step cannot run this model: {self.native_reason}")

    # -- cache ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached position (the buffers are reused, not reallocated)."""
        self.pos = 0

    @property
    def cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # -- forward ----------------------------------------------------------------------------------
    _rms = staticmethod(_rms)

    def _rotate_and_store(self, i: int, q: Tensor, k: Tensor, v: Tensor, tables, start: int, T: int) -> Tensor:
        """Rotate q and k (x·cos + rotate_half(x)·sin, with rotate_half(x)·sin = roll(x, half)·sin_signed,
        the halves swapped: a copy, ~10x cheaper than the equivalent index_select on prompts);
        write k and v into layer i's cache at [start, start+T). Returns the rotated, scaled q."""
        cos, sin, cos_q, sin_q = tables
        half = self._half
        kdst = self._k[i][start:start + T]  # [T, kv, hd], contiguous
        if kdst.dtype == k.dtype:
            torch.mul(k, cos, out=kdst)
            kdst.addcmul_(torch.roll(k, half, -1), sin)
        else:  # rotate in the compute dtype, round once into the cache
            kdst.copy_(torch.addcmul(k * cos, torch.roll(k, half, -1), sin))
        self._v[i][start:start + T].copy_(v)
        return torch.addcmul(q * cos_q, torch.roll(q, half, -1), sin_q)

    def _mask(self, start: int, T: int, window: int | None) -> Tensor | None:
        """Boolean mask [T, start+T] (True = attend), None when every key is allowed. Built once
        per forward and window (the last few are kept: every layer of a prompt shares them)."""
        S = start + T
        if T == 1 and (window is None or window >= S):
            return None
        key = (start, T, window)
        m = self._masks.get(key)
        if m is None:
            if len(self._masks) > 8:
                self._masks.clear()
            m = self._masks[key] = self._build_mask(start, T, window)
        return m

    def _build_mask(self, start: int, T: int, window: int | None) -> Tensor:
        S = start + T
        q = torch.arange(start, S, device=self.device)[:, None]
        k = torch.arange(S, device=self.device)[None]
        m = k <= q
        if window is not None and window < S:
            m &= k > q - window
        return m

    def _attention(self, layer: int, q: Tensor, start: int, T: int, window: int | None) -> Tensor:
        """q [T, heads, head_dim] (rotated); keys/values of positions [0, start+T) are cached.
        Returns [T, heads*head_dim]. Queries are grouped per key/value head ([kv, group*T, hd]), so
        grouped-query attention needs no copy of K/V."""
        S = start + T
        KV, g, hd = self.n_kv, self.group, self.head_dim
        lo = max(0, S - window) if (window is not None and T == 1) else 0  # one query: slice its window
        K = self._k[layer][lo:S].transpose(0, 1)  # [kv, S', hd] (strided view)
        V = self._v[layer][lo:S].transpose(0, 1)
        if K.dtype != q.dtype:
            K, V = K.to(q.dtype), V.to(q.dtype)
        if T > 1 and self.attn_softcap is None:
            # prompts: torch's fused attention (blocked, skips fully masked blocks; ~3.5x the
            # eager product at 512 positions, the same numbers to float rounding)
            mask = None if (start == 0 and window is None) else self._mask(start, T, window)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[None], V[None], attn_mask=mask,
                                                 is_causal=mask is None, scale=1.0, enable_gqa=g > 1)
            return out[0].transpose(0, 1).reshape(T, -1)
        if T == 1:
            qg = q.view(KV, g, hd)
        else:
            qg = q.view(T, KV, g, hd).permute(1, 2, 0, 3).reshape(KV, g * T, hd)
        scores = torch.bmm(qg, K.transpose(1, 2))  # [kv, g*T, S'] (q carries the scaling)
        if self.attn_softcap is not None:
            scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        if T > 1:
            mask = self._mask(start, T, window)
            scores = scores.view(KV, g, T, S).masked_fill_(~mask, float("-inf")).view(KV, g * T, S)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs.dtype != q.dtype:
            probs = probs.to(q.dtype)
        out = torch.bmm(probs, V)  # [kv, g*T, hd]
        if T == 1:
            return out.view(1, KV * g * hd)
        return out.view(KV, g, T, hd).permute(2, 0, 1, 3).reshape(T, -1)

    def forward(self, ids, all_logits: bool = False) -> Tensor:
        """Run the next positions ``ids`` (int list or 1-D LongTensor) through the model, extending
        the cache. Returns the logits of the last position [vocab] (``all_logits``: [T, vocab])."""
        if not isinstance(ids, Tensor):
            ids = torch.tensor(ids, dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise LowbitError(f"expected a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        T = int(ids.numel())
        start = self.pos
        if start + T > self.max_len:
            raise LowbitError(f"sequence of {start + T} tokens exceeds the decoder's max length {self.max_len}")
        vocab = self.config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise LowbitError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab})")
        with torch.inference_mode():
            if T == 1 and self.native_step is not None:
                out = self.native_step.step(hi, start)
                out = out[None] if all_logits else out
            else:
                out = self._forward(ids.to(self.device), start, T, all_logits)
        self.pos = start + T
        return out

    def _forward(self, ids: Tensor, start: int, T: int, all_logits: bool) -> Tensor:
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed(ids)  # [T, d] (Gemma's embedding scales itself)
        ropes = {name: tuple(t[start:start + T, None] for t in tabs) for name, tabs in self.rope.items()}
        for i, L in enumerate(self.layers):
            h = self._rms(x, L.attn_norm)
            q = L.q(h).view(T, H, hd)
            k = L.k(h).view(T, KV, hd)
            v = L.v(h).view(T, KV, hd)
            if L.q_norm is not None:
                q = self._rms(q, L.q_norm)
                k = self._rms(k, L.k_norm)
            q = self._rotate_and_store(i, q, k, v, ropes[L.rope], start, T)
            a = L.o(self._attention(i, q, start, T, L.window))
            if L.post_attn_norm is not None:
                a = self._rms(a, L.post_attn_norm)
            x += a
            h = self._rms(x, L.mlp_norm)
            m = L.down(L.act(L.gate(h)).mul_(L.up(h)))
            if L.post_mlp_norm is not None:
                m = self._rms(m, L.post_mlp_norm)
            x += m
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(self._rms(x, self.final_norm))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits if all_logits else logits[0]

    __call__ = forward
