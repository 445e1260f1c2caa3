"""GPU kernels (Triton) for packed weights: y = x Wᵀ + b read straight from the packed bytes.

Rows of the kernel table for device ``"cuda"``:

* ``affine`` (`lowbit.formats.affine.AffineWeight`): every code width the format packs (2 to 8
  bits; 4 and 8 are the W4A16 / W8A16 cases), symmetric or asymmetric with integer (packed) or
  float zero-points, per-tensor, per-channel or per-group scales with any group size (a short last
  group of a row included, e.g. 576 columns in groups of 128).
* ``nf4`` (`lowbit.formats.nf4.NF4Weight`): blockwise absmax, plain or double-quantized.

Activations float16, bfloat16 or float32, shape [..., in]. Each kernel program dequantizes a tile
of the weight in registers with exactly the operations of the format's ``dequantize()`` (float32
arithmetic, then the cast to the activations' dtype that the reference path makes), and
multiplies it with the activations, accumulating in float32:

* up to ``GEMV_MAX_ROWS`` activation rows (decode): a GEMV-style reduction (each program a block
  of output channels times a slice of the input), split over the input dimension (split-K) when
  there are too few output blocks to fill the GPU; the slices' float32 partial sums are added
  afterwards;
* more rows: a tiled GEMM (``tl.dot``, float32 inputs multiplied in IEEE float32, not TF32), with
  split-K as well while the batch is at most 16 rows.

The Python entries return ``NotImplemented`` (and the reference path runs) for what they do not
handle: tensors that are not on a CUDA device (CPU tensors are run by Triton's interpreter when
``TRITON_INTERPRET=1`` is set, which is how the tests check the kernels without a GPU), other
activation dtypes, autograd through x, a weight on another device, or triton not installed.

Importing this module does not import triton: the kernel bodies below are plain functions until
the first call compiles them (`_build`).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

from lowbit.kernels import register_kernel

GEMV_MAX_ROWS = 4  # activation rows up to which the GEMV-style kernel runs (above: tl.dot tiles)
SPLIT_K_MAX_ROWS = 16  # activation rows up to which the input dimension may be split
_FLOAT_X = (torch.float16, torch.bfloat16, torch.float32)
_ZERO_SYMMETRIC, _ZERO_INT, _ZERO_FLOAT = 0, 1, 2

tl = None  # triton.language, bound by `_build`
_BODIES: list = []  # kernel bodies and their helpers, compiled by `_build`
_STATE: dict = {}  # "mode": the TRITON_INTERPRET setting the bodies were compiled under
_SM_COUNT: dict = {}


def _body(fn):
    """Marks a Triton kernel body (or helper); `_build` replaces it by its ``triton.jit`` form."""
    _BODIES.append(fn)
    return fn


def available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    if "available" not in _STATE:
        try:
            _STATE["available"] = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
            _STATE["available"] = False
    return _STATE["available"]


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set: triton then runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def _build() -> bool:
    """Compile (wrap with ``triton.jit``) every kernel body once per process and interpreter
    setting; False when triton cannot be imported."""
    mode = interpreting()
    if _STATE.get("mode") == mode:
        return True
    if not available():
        return False
    try:
        import triton
        import triton.language as language
    except Exception:  # a broken install counts as none
        _STATE["available"] = False
        return False
    g = globals()
    g["tl"] = language
    for fn in _BODIES:  # helpers are found by name in this module's globals when a kernel compiles
        g[fn.__name__] = triton.jit(fn)
    _STATE["mode"] = mode
    return True


# -- shared pieces of the kernels -----------------------------------------------------------------
@_body
def _bf16_rounded(v):
    """float32 v rounded to the nearest bfloat16 (ties to even), still as float32: bit arithmetic
    for Triton's interpreter, whose float32 -> bfloat16 cast truncates (v finite)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@_body
def _accumulate(acc, x_ptr, w, rm, rk, k_ok, M, stride_xm, BLOCK_M: tl.constexpr, DOT: tl.constexpr,
                IEEE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[rm, rk] · w[:, rk]ᵀ, w a float32 tile [BLOCK_N, BLOCK_K]
    first cast to the activations' dtype (as the reference casts the dequantized weight).
    SOFT_BF16 (bfloat16 activations under the interpreter, which multiplies bfloat16 tiles as
    raw integers): the weight is rounded to bfloat16 values in float32 and the product is taken
    in float32, which is exact for bfloat16 inputs (what the GPU's bfloat16 dot computes)."""
    if SOFT_BF16:
        w = _bf16_rounded(w)
    if DOT:
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                     mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        if SOFT_BF16:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    else:
        if not SOFT_BF16:
            w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
        rows = tl.arange(0, BLOCK_M)
        m0 = tl.program_id(1) * BLOCK_M
        for i in tl.static_range(BLOCK_M):
            m_ok = (rk * 0 + m0 + i) < M  # a block, not a scalar, for the mask (as the interpreter needs)
            xr = tl.load(x_ptr + (m0 + i).to(tl.int64) * stride_xm + rk, mask=k_ok & m_ok, other=0.0)
            part = tl.sum(w * xr.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
            acc += tl.where((rows == i)[:, None], part[None, :], 0.0)
    return acc


@_body
def _store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_ym, stride_yk, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr):
    """y[pid_k, rm, rn] = acc (+ bias), cast to y's dtype (a split's float32 partial sums when
    the input dimension is split; the bias is added after the sum then)."""
    n_ok = rn < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SOFT_BF16:
        if y_ptr.dtype.element_ty == tl.bfloat16:
            acc = _bf16_rounded(acc)
    ptr = y_ptr + tl.program_id(2).to(tl.int64) * stride_yk + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & n_ok[None, :])


@_body
def _packed_field(ptr, row, stride, idx, mask, BITS: tl.constexpr):
    """The BITS-bit unsigned field ``idx`` of packed rows (`lowbit.core.packing`: runs of 8
    fields in BITS bytes, field j of a run at bits [j*BITS, (j+1)*BITS) of its little-endian
    integer, i.e. field idx at bit idx*BITS of the row), as int32. ``row`` [R, 1], ``idx`` [1, C]."""
    bit = idx * BITS
    p = ptr + row * stride + (bit >> 3)
    v = tl.load(p, mask=mask, other=0).to(tl.int32)
    if BITS != 8:
        if 8 % BITS != 0:  # 3, 5, 6, 7 bits: a field may continue in the next byte
            hi = tl.load(p + 1, mask=mask & ((bit & 7) + BITS > 8), other=0).to(tl.int32)
            v = v | (hi << 8)
        v = (v >> (bit & 7)) & ((1 << BITS) - 1)
    return v


@_body
def _weight_codes(qw_ptr, row, stride_qw, k0, n_ok, K, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Codes [BLOCK_N, BLOCK_K] (int32) of columns k0 .. k0 + BLOCK_K of rows ``row`` [BLOCK_N, 1]
    (k0 a multiple of 8, so the tile starts on a byte). 2 and 4 bits: whole bytes loaded (contiguous)
    and split into their fields in order, lowest bits first; other widths: `_packed_field`."""
    if BITS == 4 or BITS == 2:
        rb = k0 * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
        b = tl.load(qw_ptr + row * stride_qw + rb[None, :], mask=n_ok[:, None] & (rb * (8 // BITS) < K)[None, :],
                    other=0).to(tl.int32)
        if BITS == 4:
            u = tl.join(b & 15, b >> 4)
        else:
            # join stacks on a new last axis: [..., byte, i, j] = field 2i + j, in order once flattened
            u = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
        u = tl.reshape(u, (BLOCK_N, BLOCK_K))
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        u = _packed_field(qw_ptr, row, stride_qw, rk[None, :], n_ok[:, None] & (rk < K)[None, :], BITS)
    return u


# -- affine ---------------------------------------------------------------------------------------
@_body
def _affine_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, k_split,
                   stride_xm, stride_qw, stride_s, stride_z, stride_ym, stride_yk,
                   BITS: tl.constexpr, GROUP: tl.constexpr, GMODE: tl.constexpr, ZERO: tl.constexpr,
                   OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over the input slice [pid_k * k_split, +k_split)
    (k_split a multiple of BLOCK_K). The scale of column c is scales[r, c // GROUP], loaded
    (GMODE) 0: once per row (per channel; per tensor with stride_s = 0); 1: once per tile (the
    tile lies in one group: GROUP % BLOCK_K == 0); 2: once per group of the tile, broadcast over
    it (BLOCK_K % GROUP == 0); 3: per column. ZERO: 0 symmetric (code - OFFSET), 1 packed
    integer zero-points, 2 float zero-points; the same loads as the scales."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(2) * k_split
    n_ok = rn < N
    row = rn.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GMODE == 0:  # the row's scale and zero-point, loaded once
        s_row = tl.load(s_ptr + row * stride_s, mask=n_ok[:, None], other=0.0).to(tl.float32)
        if ZERO == 1:
            z_row = _packed_field(z_ptr, row, stride_z, tl.zeros((1, 1), dtype=tl.int32), n_ok[:, None], BITS)
            z_row = z_row.to(tl.float32)
        elif ZERO == 2:
            z_row = tl.load(z_ptr + row * stride_z, mask=n_ok[:, None], other=0.0).to(tl.float32)
    for kk in range(0, k_split, BLOCK_K):
        k0 = k_lo + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        u = _weight_codes(qw_ptr, row, stride_qw, k0, n_ok, K, BITS, BLOCK_N, BLOCK_K).to(tl.float32)
        if GMODE == 0:
            s = s_row
            if ZERO != 0:
                z = z_row
        else:
            if GMODE == 1:
                g = k0 // GROUP + tl.zeros((1, 1), dtype=tl.int32)
                gmask = n_ok[:, None]
            elif GMODE == 2:
                gk = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                g = gk[None, :]
                gmask = n_ok[:, None] & (gk * GROUP < K)[None, :]
            else:
                g = (rk // GROUP)[None, :]
                gmask = n_ok[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + row * stride_s + g, mask=gmask, other=0.0).to(tl.float32)
            if ZERO == 1:
                z = _packed_field(z_ptr, row, stride_z, g, gmask, BITS).to(tl.float32)
            elif ZERO == 2:
                z = tl.load(z_ptr + row * stride_z + g, mask=gmask, other=0.0).to(tl.float32)
        if GMODE == 2:  # [BLOCK_N, groups, GROUP] against [BLOCK_N, groups, 1]
            u = tl.reshape(u, (BLOCK_N, BLOCK_K // GROUP, GROUP))
            s = s[:, :, None]
            if ZERO != 0:
                z = z[:, :, None]
        if ZERO == 0:
            w = (u - OFFSET) * s
        else:
            w = (u - z) * s
        if GMODE == 2:
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        acc = _accumulate(acc, x_ptr, w, rm, rk, k_ok, M, stride_xm, BLOCK_M, DOT, IEEE, SOFT_BF16)
    _store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_ym, stride_yk, HAS_BIAS, SOFT_BF16)


# -- NF4 ------------------------------------------------------------------------------------------
@_body
def _nf4_kernel(x_ptr, qw_ptr, am_ptr, nest_ptr, dyn_ptr, off_ptr, cb_ptr, b_ptr, y_ptr, M, N, K, k_split,
                stride_xm, stride_ym, stride_yk,
                BS: tl.constexpr, DQBS: tl.constexpr, DQ: tl.constexpr, EVEN_ROWS: tl.constexpr,
                ROW_BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """As `_affine_kernel`, for NF4: weight i of the flattened tensor (i = r*K + c) is
    NF4[code i] * absmax of block i // BS; double-quantized: that absmax is
    DYN[absmax[b]] * nested[b // DQBS] + offset. EVEN_ROWS (K even): rows start on a byte, and
    a tile's bytes are loaded whole; ROW_BLOCKS (K and BLOCK_K multiples of BS): blocks do not
    straddle rows, and a tile loads one absmax per block."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(2) * k_split
    n_ok = rn < N
    base = rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DQ:
        offset = tl.load(off_ptr)
    for kk in range(0, k_split, BLOCK_K):
        k0 = k_lo + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        wmask = n_ok[:, None] & k_ok[None, :]
        if EVEN_ROWS:
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(qw_ptr + base // 2 + rb[None, :], mask=n_ok[:, None] & (rb * 2 < K)[None, :],
                           other=0).to(tl.int32)
            code = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_N, BLOCK_K))  # high nibble first
        else:
            i = base + rk[None, :]
            byte = tl.load(qw_ptr + (i >> 1), mask=wmask, other=0).to(tl.int32)
            code = tl.where((i & 1) == 0, byte >> 4, byte & 15)  # the first weight of a pair is the high nibble
        v = tl.load(cb_ptr + code)
        if ROW_BLOCKS:
            blk = (base + k0) // BS + tl.arange(0, BLOCK_K // BS)[None, :]
            bmask = n_ok[:, None] & ((k0 + tl.arange(0, BLOCK_K // BS) * BS) < K)[None, :]
        else:
            blk = (base + rk[None, :]) // BS
            bmask = wmask
        if DQ:
            a = tl.load(dyn_ptr + tl.load(am_ptr + blk, mask=bmask, other=0).to(tl.int32))
            a = a * tl.load(nest_ptr + blk // DQBS, mask=bmask, other=0.0) + offset
        else:
            a = tl.load(am_ptr + blk, mask=bmask, other=0.0)
        if ROW_BLOCKS:
            w = tl.reshape(tl.reshape(v, (BLOCK_N, BLOCK_K // BS, BS)) * a[:, :, None], (BLOCK_N, BLOCK_K))
        else:
            w = v * a
        w = tl.where(wmask, w, 0.0)
        acc = _accumulate(acc, x_ptr, w, rm, rk, k_ok, M, stride_xm, BLOCK_M, DOT, IEEE, SOFT_BF16)
    _store(acc, b_ptr, y_ptr, rm, rn, M, N, stride_ym, stride_yk, HAS_BIAS, SOFT_BF16)


# -- launch ---------------------------------------------------------------------------------------
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: any small number
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def plan(M: int, N: int, K: int, device: torch.device, config: dict | None = None) -> dict:
    """Launch settings for an [M, K] x [N, K]ᵀ product: tile sizes (BLOCK_M, BLOCK_N, BLOCK_K
    powers of two, BLOCK_K >= 16), DOT (tl.dot tiles, BLOCK_M >= 16; else the GEMV-style
    reduction), num_warps, num_stages (None: triton's default), split_k (input slices; by default
    enough programs for about two waves of the GPU's multiprocessors while M <=
    SPLIT_K_MAX_ROWS) and k_split (the columns of one slice). ``config`` overrides any of them
    (e.g. to tune on a GPU)."""
    if M <= GEMV_MAX_ROWS:
        p = dict(BLOCK_M=1 << (M - 1).bit_length(), BLOCK_N=16, BLOCK_K=256, num_warps=4)
    else:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64
        p = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, num_warps=4 if bm < 64 else 8)
    p.update(num_stages=None, split_k=None)
    p.update(config or {})
    p.setdefault("DOT", p["BLOCK_M"] >= 16)
    bk = p["BLOCK_K"]
    k_blocks = math.ceil(K / bk)
    split_k = p["split_k"]
    if split_k is None:
        split_k = 1
        if M <= SPLIT_K_MAX_ROWS:
            programs = math.ceil(N / p["BLOCK_N"]) * math.ceil(M / p["BLOCK_M"])
            split_k = max(1, min(2 * _sm_count(device) // max(programs, 1), k_blocks, 32))
    split_k = max(1, min(int(split_k), k_blocks))
    p["k_split"] = math.ceil(k_blocks / split_k) * bk
    p["split_k"] = math.ceil(K / p["k_split"])  # no empty slices
    return p


def _accepts(x: Tensor, interpret: bool | None, *weights: Tensor) -> bool:
    if not isinstance(x, Tensor) or x.dtype not in _FLOAT_X or x.dim() == 0 or x.numel() == 0:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # no backward here: autograd goes through the reference
    if x.device.type != "cuda" and not (x.device.type == "cpu" and (interpreting() if interpret is None else
                                                                    interpret and interpreting())):
        return False
    return all(t.device == x.device for t in weights)


def _launch(kernel, x: Tensor, N: int, K: int, bias: Tensor | None, args: tuple, consts, config: dict | None,
            target=None, out_dtype: torch.dtype | None = None, **options) -> Tensor:
    """Run ``kernel`` over x [..., K] -> y [..., N] in x's dtype (or ``out_dtype``): ``args`` the
    weight's pointers and strides between (x, ..., b, y) and (M, N, K, ...); ``consts(BLOCK_K)``
    the kernel's own compile-time constants. ``target`` (a triton ``GPUTarget``): only compile the
    kernel this call would launch, for that GPU, and return it (see `compile_for`)."""
    X = x.reshape(-1, K)
    if X.stride(-1) != 1:
        X = X.contiguous()
    M = X.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    p = plan(M, N, K, x.device, config)
    S = p.pop("split_k")
    k_split = p.pop("k_split")
    options["num_warps"] = p.pop("num_warps")
    stages = p.pop("num_stages")
    if stages is not None:
        options["num_stages"] = stages
    p["IEEE"] = x.dtype == torch.float32
    p["SOFT_BF16"] = x.dtype == torch.bfloat16 and _STATE["mode"]
    b = None if bias is None else bias.to(device=x.device, dtype=x.dtype).contiguous()
    grid = (math.ceil(N / p["BLOCK_N"]), math.ceil(M / p["BLOCK_M"]), S)
    if S == 1:
        y = torch.empty(M, N, dtype=out_dtype, device=x.device)
        out, stride_yk, has_bias = y, 0, b is not None
    else:
        out = torch.empty(S, M, N, dtype=torch.float32, device=x.device)
        stride_yk, has_bias = out.stride(0), False
    bptr = b if has_bias else out  # an unused pointer when there is no bias
    call = (X, *args[0], bptr, out, M, N, K, k_split, X.stride(0), *args[1], out.stride(-2), stride_yk)
    constants = dict(HAS_BIAS=has_bias, **consts(p["BLOCK_K"]), **p)
    if target is not None:
        return _compile(kernel, call, constants, target, **options)
    if x.device.type == "cuda" and x.device.index not in (None, torch.cuda.current_device()):
        with torch.cuda.device(x.device):  # triton launches on the current device
            kernel[grid](*call, **constants, **options)
    else:
        kernel[grid](*call, **constants, **options)
    if S > 1:
        y = out.sum(0)
        if b is not None:
            y += b.float()
        y = y.to(out_dtype)
    return y.view(*x.shape[:-1], N)


_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
              torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32"}


def _compile(kernel, call: tuple, constants: dict, target, **options):
    """Compile ``kernel`` for ``call``'s argument types and ``constants`` for GPU ``target``
    without launching it (no GPU needed: triton's own ptxas builds the binary)."""
    from triton.compiler import ASTSource, compile as triton_compile

    names = [n for n in kernel.arg_names if n not in constants]
    sig = {n: _PTR_TYPES[a.dtype] if isinstance(a, Tensor) else "i32" if abs(a) < 2**31 else "i64"
           for n, a in zip(names, call)}
    sig.update({n: "constexpr" for n in constants})
    return triton_compile(ASTSource(kernel, sig, constexprs=dict(constants)), target=target, options=options)


def compile_for(x: Tensor, w, bias: Tensor | None = None, *, arch: int = 90, config: dict | None = None):
    """Compile, without running it, the kernel that ``linear(x, w, bias)`` would launch (x and w
    may be CPU tensors) for an NVIDIA GPU of compute capability ``arch`` (80: A100, 90: H100);
    returns triton's compiled kernel (its ``asm`` holds the PTX and the binary). Checks that the
    kernels build on a machine without a GPU; not under TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("compile_for compiles real kernels: unset TRITON_INTERPRET")
    run = nf4_run if getattr(type(w), "name", None) == "nf4" else affine_run
    return run(x, w, bias, config=config, target=GPUTarget("cuda", arch, 32))


def affine_run(x: Tensor, w, bias: Tensor | None = None, *, config: dict | None = None, target=None) -> Tensor:
    """The affine kernel on x [..., in] (no checks: see `affine_linear`); ``config`` overrides
    `plan`'s settings; ``target``: see `_launch`."""
    if not _build():
        raise RuntimeError("triton is not installed")
    N, K = w.shape
    sch = w.scheme
    qw = w.qweight if w.qweight.stride(-1) == 1 else w.qweight.contiguous()
    s = w.scales if w.scales.stride(-1) == 1 else w.scales.contiguous()
    per_tensor = s.shape[0] == 1 and N > 1
    if w.zeros is not None:
        zero, z = _ZERO_FLOAT, w.zeros
    elif w.qzeros is not None:
        zero, z = _ZERO_INT, w.qzeros
    else:
        zero, z = _ZERO_SYMMETRIC, None
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    group = int(sch.group_size) if sch.granularity == "group" else 0
    stride_s = 0 if per_tensor else s.stride(0)
    stride_z = 0 if z is None or per_tensor else z.stride(0)

    def consts(bk: int) -> dict:
        gmode = 0 if group == 0 else 1 if group % bk == 0 else 2 if bk % group == 0 else 3
        return dict(BITS=int(sch.bits), GROUP=max(group, 1), GMODE=gmode, ZERO=zero, OFFSET=int(sch.code_offset))

    # fused multiply-adds may only touch the accumulation: (code - zero) * scale has no add to fuse
    return _launch(_affine_kernel, x, N, K, bias, ((qw, s, qw if z is None else z), (qw.stride(0), stride_s, stride_z)),
                   consts, config, target, enable_fp_fusion=True)


def _nf4_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    from lowbit.formats.nf4 import DYNAMIC_MAP_8BIT, NF4_CODEBOOK

    key = ("nf4", str(device))
    if key not in _STATE:
        _STATE[key] = (NF4_CODEBOOK.to(device), DYNAMIC_MAP_8BIT.to(device))
    return _STATE[key]


def nf4_run(x: Tensor, w, bias: Tensor | None = None, *, config: dict | None = None, target=None) -> Tensor:
    """The NF4 kernel on x [..., in] (no checks: see `nf4_linear`)."""
    if not _build():
        raise RuntimeError("triton is not installed")
    N, K = w.shape
    cb, dyn = _nf4_tables(x.device)
    qw, am = w.qweight.contiguous(), w.absmax.contiguous()
    dq = w.double_quant
    nest = w.nested_absmax.contiguous() if dq else am
    off = w.offset.contiguous() if dq else am
    bs = int(w.blocksize)

    def consts(bk: int) -> dict:
        return dict(BS=bs, DQBS=int(w.dq_blocksize) if dq else 1, DQ=dq, EVEN_ROWS=K % 2 == 0,
                    ROW_BLOCKS=K % bs == 0 and bk % bs == 0)

    if x.numel() // max(K, 1) <= GEMV_MAX_ROWS:  # the gathers of NF4 values need registers: half the tile
        config = {"BLOCK_K": 128, **(config or {})}
    # no fused multiply-add: the block scale DYN * nested + offset is rounded as dequantize() rounds it
    return _launch(_nf4_kernel, x, N, K, bias, ((qw, am, nest, dyn, off, cb), ()), consts, config, target,
                   enable_fp_fusion=False)


@register_kernel("affine", "float", "cuda")
def affine_linear(x: Tensor, w, bias: Tensor | None = None, *, interpret: bool | None = None):
    """y = x Wᵀ + b for an AffineWeight on the GPU, or NotImplemented (see the module docstring).
    ``interpret``: False refuses CPU tensors even when TRITON_INTERPRET is set."""
    ts = [w.qweight, w.scales] + [t for t in (w.qzeros, w.zeros, bias) if t is not None]
    if not _accepts(x, interpret, *ts) or x.shape[-1] != w.shape[1] or w.shape[0] == 0 or not _build():
        return NotImplemented
    return affine_run(x, w, bias)


@register_kernel("nf4", "float", "cuda")
def nf4_linear(x: Tensor, w, bias: Tensor | None = None, *, interpret: bool | None = None):
    """y = x Wᵀ + b for an NF4Weight (a 2-D one) on the GPU, or NotImplemented."""
    ts = [w.qweight, w.absmax] + [t for t in (w.nested_absmax, w.offset, bias) if t is not None]
    if (len(w.shape) != 2 or not _accepts(x, interpret, *ts) or x.shape[-1] != w.shape[1] or w.shape[0] == 0
            or not _build()):
        return NotImplemented
    return nf4_run(x, w, bias)
