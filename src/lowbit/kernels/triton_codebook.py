"""GPU kernels (Triton) for the codebook formats: y = x Wᵀ + b read straight from the codes.

Rows of the kernel table for device ``"cuda"``:

* ``e8p`` (`lowbit.formats.e8p.E8PWeight`, QuIP#'s E8P lattice codebook: 2 bits, 3 and 4 with a
  residual): ``y = U^T (W~ (V x)) + b`` as the CPU rows compute it (`lowbit.kernels.codebook`).
  The two transforms run in torch on the GPU, in float32 (`DeviceIncoherence`: the diagonals and
  small Hadamard factors are kept on the device per weight, so a call does no host work and can
  be captured in a CUDA graph); the product with ``W~`` is a Triton kernel that decodes the
  16-bit codes in registers: the absolute pattern from a 1 KB table (2 bits per coordinate),
  the seven sign bits and the parity sign of the eighth coordinate, the +-1/4 shift, times the
  scale; 3 bits add the +-scale of a sign byte, 4 bits a second E8P code. Activations are
  transformed in float32 and handed to the kernel in their own dtype (16-bit ones feed the
  ``tl.dot`` tiles as 16-bit values); the kernel's output stays float32 for the output transform;
  the result has x's dtype.
* ``aqlm`` (`lowbit.formats.aqlm.AQLMWeight`, additive codebooks, out_group_size 1): each group
  of ``in_group_size`` weights of a row is the float32 sum of one codebook vector per codebook
  (in codebook order, as ``dequantize()`` adds them), times the row's scale, gathered from the
  codebooks (float16, bfloat16 or float32) by the codes; any number of codebooks, 1 to 16 bits
  per code, any group size (a power of two that divides the tile: each code loaded once and its
  vector gathered whole; other sizes: per column).

The launch is `lowbit.kernels.triton_gpu`'s (`plan`, `_launch`): up to ``GEMV_MAX_ROWS``
activation rows a GEMV-style reduction, more rows ``tl.dot`` tiles, split-K while the batch is
at most 16 rows; the decoded weight tile is multiplied by `triton_gpu`'s shared ``_accumulate``
(cast to the activations' dtype as the reference casts the dequantized weight; float32
accumulation; the same bfloat16 emulation under Triton's interpreter).

The decoded tiles equal the formats' own decoding bit for bit (``w.transformed()`` for E8P,
``w.dequantize()`` for AQLM). Inputs the kernels do not take return ``NotImplemented`` (the next
row or the reference runs), as in `triton_gpu`: tensors not on a CUDA device (CPU tensors are
run by Triton's interpreter under ``TRITON_INTERPRET=1``), other dtypes, autograd through x,
weight tensors on another device, triton not installed. Importing this module does not import
triton.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.core import e8p
from lowbit.core.hadamard import hadamard_factors, hadamard_matrix
from lowbit.kernels import _native, register_kernel, triton_gpu
from lowbit.kernels.triton_gpu import GEMV_MAX_ROWS, _accepts, _launch, interpreting

tl = None  # triton.language, bound by `_build`
_BODIES: list = []  # kernel bodies, compiled by `_build`
_STATE: dict = {}  # "mode": the TRITON_INTERPRET setting the bodies were compiled under
MAX_FACTOR = 128  # largest Sylvester factor of a power-of-two transform applied as one matmul


def _config(rows: int, gemv_block_k: int, config: dict | None) -> dict:
    """`triton_gpu.plan` overrides for the decoding kernels (their decode needs registers): the
    GEMV-style tile's ``BLOCK_K``, and 8 warps for the ``tl.dot`` tiles (first guesses, no
    spills in ptxas for sm_90); ``config`` wins."""
    base = {"BLOCK_K": gemv_block_k} if rows <= GEMV_MAX_ROWS else {"num_warps": 8}
    return {**base, **(config or {})}


def _body(fn):
    """Marks a Triton kernel body; `_build` replaces it by its ``triton.jit`` form."""
    _BODIES.append(fn)
    return fn


def _build() -> bool:
    """Compile `triton_gpu`'s kernels and helpers, then this module's bodies (calling the shared
    ``_accumulate`` / ``_store``), once per process and interpreter setting."""
    if not triton_gpu._build():
        return False
    mode = triton_gpu._STATE["mode"]
    if _STATE.get("mode") == mode:
        return True
    import triton

    g = globals()
    g["tl"] = triton_gpu.tl
    for name in ("_accumulate", "_store"):
        g[name] = getattr(triton_gpu, name)  # the jitted helpers, found by name when a kernel compiles
    for fn in _BODIES:
        g[fn.__name__] = triton.jit(fn)
    _STATE["mode"] = mode
    return True


# -- E8P ------------------------------------------------------------------------------------------
@_body
def _e8p_points(c, tab_ptr):
    """The E8P points of 16-bit codes ``c`` [R, C] (int32, 0..65535) as float32 [R, C, 8], equal
    to `lowbit.core.e8p.decode`: ``tab[c & 255]`` holds the absolute pattern as 2-bit indices
    (coordinate j: |a_j| = idx_j + 1/2 at bits 2j, 2j+1) and at bit 16 whether the pattern's sum is
    odd; coordinate 7 is negative when that bit and the parity of the seven sign bits differ
    (the point's sum must be even). Computed as 4 x the point (odd integers), then exactly / 4."""
    t = tl.load(tab_ptr + (c & 255))
    s = (c >> 8) & 127
    p = s ^ (s >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    neg = s | (((p ^ (t >> 16)) & 1) << 7)  # bit j: coordinate j is negative
    lane = tl.arange(0, 8)[None, None, :]
    mag4 = ((t[:, :, None] >> (2 * lane)) & 3) * 4 + 2  # 4 |a_j|: 2, 6, 10, 14
    v4 = tl.where(((neg[:, :, None] >> lane) & 1) != 0, -mag4, mag4)
    v4 = v4 + 1 - 2 * ((c[:, :, None] >> 15) & 1)  # the shift: +1/4, or -1/4 with bit 15
    return v4.to(tl.float32) * 0.25


@_body
def _e8p_kernel(x_ptr, codes_ptr, res_ptr, scale_ptr, tab_ptr, b_ptr, y_ptr, M, N, K, k_split,
                stride_xm, stride_c, stride_r, stride_ym, stride_yk,
                BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of x W~ᵀ over the input slice [pid_k * k_split, +k_split): the
    tile's codes [BLOCK_N, BLOCK_K / 8] decoded to W~ = scale[0] * point (BITS 2), + scale[1] *
    (+-1 per bit of the residual sign byte) (3), + scale[1] * point of the residual code (4)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(2) * k_split
    n_ok = rn < N
    row = rn.to(tl.int64)[:, None]
    s0 = tl.load(scale_ptr)
    if BITS > 2:
        s1 = tl.load(scale_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_split, BLOCK_K):
        k0 = k_lo + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rv = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # the tile's 8-vectors
        vmask = n_ok[:, None] & (rv * 8 < K)[None, :]
        c = tl.load(codes_ptr + row * stride_c + rv[None, :], mask=vmask, other=0).to(tl.int32) & 0xFFFF
        w = _e8p_points(c, tab_ptr) * s0
        if BITS == 4:
            r = tl.load(res_ptr + row * stride_r + rv[None, :], mask=vmask, other=0).to(tl.int32) & 0xFFFF
            w = w + _e8p_points(r, tab_ptr) * s1
        elif BITS == 3:
            r = tl.load(res_ptr + row * stride_r + rv[None, :], mask=vmask, other=0).to(tl.int32)
            lane = tl.arange(0, 8)[None, None, :]
            w = w + tl.where(((r[:, :, None] >> lane) & 1) != 0, -s1, s1)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        acc = _accumulate(acc, x_ptr, w, rm, rk, k_ok, M, stride_xm, BLOCK_M, DOT, IEEE, SOFT_BF16)
    _store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_ym, stride_yk, HAS_BIAS, SOFT_BF16)


def e8p_table(device: torch.device) -> Tensor:
    """int32 [256]: the absolute pattern p of `lowbit.core.e8p.abs_patterns` as 2-bit indices
    (|a_j| - 1/2 at bits 2j, 2j+1) and bit 16 set where its coordinate sum is odd; cached per device."""
    key = ("e8p", str(device))
    if key not in _STATE:
        A = e8p.abs_patterns()
        idx = (A - 0.5).round().to(torch.int64)                                 # [256, 8] in 0..3
        odd = torch.remainder(A.sum(1), 2).round().to(torch.int64)              # [256] 0 or 1
        t = (idx << (2 * torch.arange(e8p.DIM))).sum(1) | (odd << 16)
        _STATE[key] = t.to(torch.int32).to(device)
    return _STATE[key]


class DeviceTransform:
    """One side's transform (`lowbit.core.hadamard.Transform`, ``T = M D``) held on a device in
    float32, applied as `Transform.apply` / `apply_t` apply it: the diagonal (the Hadamard kind's
    ``1 / sqrt(n)`` folded in) and ``M`` as Kronecker factors (``H_b``, then Sylvester matrices of
    at most ``MAX_FACTOR``: ``H_n = H_b (x) H_p1 (x) H_p2 ...``), each a small matmul over its axis,
    or the dense matrix of the orthogonal kind."""

    def __init__(self, t, device: torch.device):
        d = t.diagonal()
        self.n = t.n
        if t.kind == "hadamard":
            b, p = hadamard_factors(t.n)
            sizes = [b] if b > 1 else []
            r = p.bit_length() - 1
            parts = -(-r // (MAX_FACTOR.bit_length() - 1)) if r else 0
            sizes += [1 << (r * (i + 1) // parts - r * i // parts) for i in range(parts)]
            mats = [hadamard_matrix(s).to(torch.float32) for s in sizes]
            self.fwd = [m.to(device) for m in mats]
            self.bwd = [m.T.contiguous().to(device) for m in mats]
            self.dense = None
            d = d / math.sqrt(t.n)
        else:
            self.fwd = self.bwd = None
            self.dense = t.base().to(device=device, dtype=torch.float32)
        self.d = None if d is None else d.to(device=device, dtype=torch.float32)

    @staticmethod
    def _kron(x: Tensor, mats: list[Tensor]) -> Tensor:
        """Rows of x [R, n] times (F_0 (x) F_1 (x) ...)ᵀ: factor i applied over its axis."""
        R, n = x.shape
        post = n
        for F in mats:
            f = F.shape[0]
            post //= f
            x = x.reshape(-1, f) @ F.T if post == 1 else torch.matmul(F, x.reshape(-1, f, post))
        return x.reshape(R, n)

    def apply(self, x: Tensor) -> Tensor:
        """``x @ Tᵀ`` for float32 x [R, n]."""
        if self.d is not None:
            x = x * self.d
        return self._kron(x, self.fwd) if self.dense is None else x @ self.dense.T

    def apply_t(self, x: Tensor) -> Tensor:
        """``x @ T`` for float32 x [R, n]."""
        x = self._kron(x, self.bwd) if self.dense is None else x @ self.dense
        return x if self.d is None else x * self.d


class DeviceIncoherence:
    """A weight's `lowbit.core.hadamard.Incoherence` on its tensors' device: ``input`` = V x,
    ``output`` = U^T z, float32 [R, n]."""

    def __init__(self, inc, device: torch.device):
        self.U, self.V = DeviceTransform(inc.U, device), DeviceTransform(inc.V, device)

    def input(self, x: Tensor) -> Tensor:
        return self.V.apply(x)

    def output(self, z: Tensor) -> Tensor:
        return self.U.apply_t(z)


def _build_incoherence(w) -> DeviceIncoherence:
    return DeviceIncoherence(w.incoherence(), w.codes.device)


def device_incoherence(w) -> DeviceIncoherence:
    """`DeviceIncoherence` of an E8PWeight on its codes' device, built once per stored tensors."""
    return _native.cached_struct(w, _build_incoherence, ("device-incoherence", w.seed, str(w.codes.device)))


def e8p_transformed_run(xt: Tensor, w, *, config: dict | None = None, target=None,
                        out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``xt @ W~ᵀ`` [..., out] in ``out_dtype`` by the E8P kernel, xt [..., in] the activations
    already in the transformed basis (no checks; ``config``, ``target``: see `triton_gpu._launch`)."""
    if not _build():
        raise RuntimeError("triton is not installed")
    N, K = w.shape
    codes = w.codes.contiguous()
    res = codes if w.residual is None else w.residual.contiguous()
    args = ((codes, res, w.scale.contiguous(), e8p_table(xt.device)), (codes.stride(0), res.stride(0)))
    # no fused multiply-add where a residual is added: scale[0] * p + scale[1] * r rounds as transformed() does
    config = _config(xt.numel() // K, 256 if w.bits == 2 else 128, config)
    return _launch(_e8p_kernel, xt, N, K, None, args, lambda bk: dict(BITS=int(w.bits)), config, target,
                   out_dtype=out_dtype, enable_fp_fusion=w.bits == 2)


def e8p_run(x: Tensor, w, bias: Tensor | None = None, *, config: dict | None = None, target=None) -> Tensor:
    """y = U^T (W~ (V x)) + b on x [..., in] (no checks: see `e8p_linear`); ``target``: compile the
    inner kernel only and return it (`compile_for`)."""
    N, K = w.shape
    inc = device_incoherence(w)
    xt = inc.input(x.reshape(-1, K).to(torch.float32))
    z = e8p_transformed_run(xt.to(x.dtype), w, config=config, target=target)
    if target is not None:
        return z
    y = inc.output(z)
    if bias is not None:
        y = y + bias.to(y)
    return y.to(x.dtype).view(*x.shape[:-1], N)


@register_kernel("e8p", "float", "cuda")
def e8p_linear(x: Tensor, w, bias: Tensor | None = None, *, interpret: bool | None = None):
    """y = x Wᵀ + b for an E8PWeight on the GPU, or NotImplemented (see the module docstring).
    ``interpret``: False refuses CPU tensors even when TRITON_INTERPRET is set."""
    ts = [w.codes, w.scale] + [t for t in (w.residual, w.su, w.sv, w.u_dense, w.v_dense, bias) if t is not None]
    if not _accepts(x, interpret, *ts) or x.shape[-1] != w.shape[1] or w.shape[0] == 0 or not _build():
        return NotImplemented
    return e8p_run(x, w, bias)


# -- AQLM -----------------------------------------------------------------------------------------
@_body
def _aqlm_kernel(x_ptr, codes_ptr, cb_ptr, s_ptr, b_ptr, y_ptr, M, N, K, k_split,
                 stride_xm, stride_c, stride_ym, stride_yk,
                 NCB: tl.constexpr, CBSIZE: tl.constexpr, G: tl.constexpr, GROUPED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT: tl.constexpr, IEEE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over the input slice [pid_k * k_split, +k_split): weight
    (r, c) = scales[r] * sum_m codebooks[m, codes[r, c // G, m] & (CBSIZE - 1), 0, c % G] (float32,
    m in order). GROUPED (G a power of two dividing BLOCK_K): a [BLOCK_N, BLOCK_K / G] tile of
    codes per codebook, each code's G values gathered together; else one code load per column."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(2) * k_split
    n_ok = rn < N
    row = rn.to(tl.int64)[:, None]
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_split, BLOCK_K):
        k0 = k_lo + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        if GROUPED:
            rg = k0 // G + tl.arange(0, BLOCK_K // G)
            gmask = n_ok[:, None] & (rg * G < K)[None, :]
            lane = tl.arange(0, G)[None, None, :]
            v = tl.zeros((BLOCK_N, BLOCK_K // G, G), dtype=tl.float32)
            for m in tl.static_range(NCB):
                code = tl.load(codes_ptr + row * stride_c + rg[None, :] * NCB + m, mask=gmask, other=0)
                entry = m * CBSIZE + (code.to(tl.int32) & (CBSIZE - 1))
                v += tl.load(cb_ptr + entry[:, :, None] * G + lane).to(tl.float32)
            w = tl.reshape(v, (BLOCK_N, BLOCK_K)) * s
        else:
            grp = rk // G
            lane = (rk - grp * G)[None, :]
            wmask = n_ok[:, None] & k_ok[None, :]
            w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for m in tl.static_range(NCB):
                code = tl.load(codes_ptr + row * stride_c + (grp * NCB + m)[None, :], mask=wmask, other=0)
                entry = m * CBSIZE + (code.to(tl.int32) & (CBSIZE - 1))
                w += tl.load(cb_ptr + entry * G + lane).to(tl.float32)
            w = w * s
        acc = _accumulate(acc, x_ptr, w, rm, rk, k_ok, M, stride_xm, BLOCK_M, DOT, IEEE, SOFT_BF16)
    _store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_ym, stride_yk, HAS_BIAS, SOFT_BF16)


def aqlm_run(x: Tensor, w, bias: Tensor | None = None, *, config: dict | None = None, target=None) -> Tensor:
    """The AQLM kernel on x [..., in] (no checks: see `aqlm_linear`)."""
    if not _build():
        raise RuntimeError("triton is not installed")
    N, K = w.shape
    g = int(w.in_group_size)
    codes, cb, s = w.codes.contiguous(), w.codebooks.contiguous(), w.scales.reshape(N).contiguous()

    def consts(bk: int) -> dict:
        return dict(NCB=int(w.num_codebooks), CBSIZE=int(w.codebook_size), G=g,
                    GROUPED=g & (g - 1) == 0 and bk % g == 0)

    config = _config(x.numel() // K, 128, config)
    return _launch(_aqlm_kernel, x, N, K, bias, ((codes, cb, s), (codes.stride(0),)), consts, config, target,
                   enable_fp_fusion=True)


@register_kernel("aqlm", "float", "cuda")
def aqlm_linear(x: Tensor, w, bias: Tensor | None = None, *, interpret: bool | None = None):
    """y = x Wᵀ + b for an AQLMWeight (out_group_size 1) on the GPU, or NotImplemented."""
    ts = [w.codes, w.codebooks, w.scales] + ([] if bias is None else [bias])
    if (not _accepts(x, interpret, *ts) or x.shape[-1] != w.shape[1] or w.shape[0] == 0 or w.out_group_size != 1
            or w.codebooks.numel() >= 2**31 or not _build()):
        return NotImplemented
    return aqlm_run(x, w, bias)


# -- compile check --------------------------------------------------------------------------------
def compile_for(x: Tensor, w, bias: Tensor | None = None, *, arch: int = 90, config: dict | None = None):
    """As `triton_gpu.compile_for`, for E8P and AQLM weights: compile, without running it, the
    Triton kernel that ``linear(x, w, bias)`` would launch (the inner W~ product for E8P) for an
    NVIDIA GPU of compute capability ``arch``; no GPU needed, not under TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("compile_for compiles real kernels: unset TRITON_INTERPRET")
    if not _build():
        raise RuntimeError("triton is not installed")
    run = e8p_run if getattr(type(w), "name", None) == "e8p" else aqlm_run
    return run(x, w, bias, config=config, target=GPUTarget("cuda", arch, 32))
