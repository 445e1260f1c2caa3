"""Kernels of the codebook formats (``csrc/codebook.c``, one native library for all of them).

E8P (QuIP#): ``y = U^T (W~ (V x)) + b``. The activation is transformed once by the layer's input
transform (``O(in log in)`` per token), multiplied by the transformed weight ``W~`` and the
product transformed back on the output side; the dense weight in the original basis is never
formed.

* CPU, float32 activations, up to ``FUSED_MAX_ROWS`` rows: the C kernel decodes ``W~`` from its
  codes into registers (a table load of the absolute pattern, an XOR with a sign mask, one FMA
  per activation row; the +-1/4 shifts are folded into per-8-vector sums of the transformed
  activation), the transforms run in C as well. It is also the C entry the native decode step
  calls for E8P layers.
* More rows (prefill): ``W~`` is decoded once in C and multiplied by torch's GEMM.
* Other devices and dtypes: the torch row below (the transforms in torch, ``W~`` decoded in
  torch); anything the C code does not take falls back to the reference.

AQLM (additive quantization, out_group_size 1), CPU, float32 activations, up to
``FUSED_MAX_ROWS`` rows: with B <= 8 bits per code (1x8, 2x8, 4x8, ...) the C kernel builds,
per activation row, a table of the dot products of every input group with every codebook vector
(``in * M * 2^B`` multiply-adds) and sums one table entry per code; with B > 8 (1x16) it adds the
codebook vectors of a group and multiplies with FMA. The codebooks are converted to float32 once
per weight (cached with the struct). More rows, other devices: the reference (dequantize, GEMM).

Opt-in row ("aqlm", "int8", "cpu"), named ``aqlm-lut8`` (`aqlm_lut8_linear`): 8-bit codes through
int8-quantized tables, summed as integers and rescaled once per block of ``LUT8_BLOCK`` groups
(csrc/codebook.c gives the exact rule); AVX-512 VBMI looks up 64 output rows per pair of
``vpermi2b``. About 1 % from the float product on random data; ``kernels.select(w, "int8")`` and
the decoder's ``int8_activations`` choose it. Its struct holds a repacked copy of the codes
(`repack_codes64`: as many bytes again as the codes, 0.25 B per weight for 2x8).

Opt-in row ("e8p", "int8", "cpu"), named ``e8p-a8`` (`e8p_a8_linear`), 2-bit E8P: the
transformed activation quantized to int8 per block of ``E8A_BLOCK`` values (affine_a8's rule), times
the weight as exact integers (4 times an E8P point is an 8-vector of odd integers in [-15, 15]),
rescaled once per block (csrc/codebook.c gives the exact rule); AVX-512 VNNI + VBMI reads the codes
in place, decodes 64 of them per pair of ``vpermi2b`` per coordinate and multiplies with
``vpdpbusd``. About 0.5 % from the float product on random data; ``kernels.select(w, "int8")`` and
the decoder's ``int8_activations`` choose it. Its struct adds only a 2 KB table (no copy of the codes).

`e8p_encode`: QuIP#'s nearest-point search (`lowbit.core.e8p.encode`) in C.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lowbit.core import e8p
from lowbit.core.hadamard import hadamard_factors, hadamard_matrix
from lowbit.errors import LowbitError
from lowbit.kernels import _native, register_kernel
from lowbit.kernels.cpu import _bias_ptr, _prepare_x

FUSED_MAX_ROWS = 32  # activation rows up to which the fused kernel runs (above: decode W~ once + GEMM)

_vp, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_W_ENTRY = [_vp, _vp, _i64, _vp, _vp, _i32]  # (weight struct, x, rows, bias, y, threads)
_FUNCTIONS = {
    "lb_e8p_linear_w": (_W_ENTRY, _i32),
    "lb_e8p_decode_w": ([_vp, _vp, _i32], _i32),
    "lb_e8p_encode": ([_vp, _vp, _i64, _vp, _i32], _i32),
    "lb_aqlm_linear_w": (_W_ENTRY, _i32),
    "lb_aqlm_lut8_linear_w": (_W_ENTRY, _i32),
    "lb_aqlm_lut8_tables": ([_vp, _vp, _vp, _vp], _i32),
    "lb_e8p_a8_linear_w": (_W_ENTRY, _i32),
    "lb_e8p_a8_activations": ([_vp, _vp, _vp, _vp, _vp], _i32),
    "lb_codebook_set_min_parallel_bytes": ([_i64], None),
}


def _run(fn, st, x: Tensor, X: Tensor, N: int, bias: Tensor | None):
    """``y [..., N]`` from a C entry ``fn(struct, X, rows, bias, y, threads)`` on the prepared
    activation ``X`` [rows, K], or NotImplemented (an unusable bias, or the C code declined)."""
    bptr, b = _bias_ptr(bias, N)
    if bptr is False:
        return NotImplemented
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    rc = fn(ctypes.addressof(st), X.data_ptr(), X.shape[0], bptr, y.data_ptr(), torch.get_num_threads())
    return NotImplemented if rc else y


def library():
    """The loaded ``_c_codebook`` `lowbit.kernels._native.NativeLibrary`, or None (not built, or
    ``LOWBIT_NATIVE=0``)."""
    return _native.library("codebook", _FUNCTIONS)


# -- E8P -----------------------------------------------------------------------------------------
class E8PWeightC(ctypes.Structure):
    """Mirror of ``lb_e8p_weight`` in csrc/codebook.c."""
    _fields_ = [(n, _vp) for n in ("codes", "residual", "scale", "du", "dv", "hu", "hv", "u_dense", "v_dense",
                                   "patterns", "signs", "pm1")] + \
               [(n, _i64) for n in ("K", "N", "bu", "pu", "bv", "pv")] + [("bits", _i32)]


_TABLES: dict = {}


def e8p_tables() -> tuple[Tensor, Tensor, Tensor]:
    """The C kernel's constant tables (see csrc/codebook.c), from `lowbit.core.e8p`'s decode rule:
    ``patterns`` [256, 8] float32, the absolute patterns with the 8th coordinate negated where the
    coordinate sum is odd; ``signs`` [256, 8] int32 sign-bit masks indexed by ``code >> 8`` (lanes
    0-6 the sign bits, lane 7 their parity; bit 7, the shift, ignored); ``pm1`` [256, 8] float32,
    the +-1 vector of a 3-bit residual's sign byte."""
    if not _TABLES:
        A = e8p.abs_patterns().clone()
        odd = torch.remainder(A.sum(1), 2) != 0
        A[odd, 7] = -A[odd, 7]
        hi = torch.arange(256)
        bits = (hi[:, None] >> torch.arange(7)) & 1                          # [256, 7]
        neg = torch.cat([bits, bits.sum(1, keepdim=True) & 1], 1)             # [256, 8]
        signs = (neg << 31).to(torch.int64)
        signs = torch.where(signs >= 2**31, signs - 2**32, signs).to(torch.int32)
        byte = (hi[:, None] >> torch.arange(8)) & 1
        _TABLES["t"] = (A.contiguous(), signs.contiguous(), (1.0 - 2.0 * byte.to(torch.float32)).contiguous())
    return _TABLES["t"]


def _side(t, n: int):
    """(diagonal float32 or None, base matrix float32 or None, b, p, dense float32 or None) of one
    transform of size n, for the C struct."""
    d = t.diagonal()
    d = None if d is None else d.to(torch.float32).contiguous()
    if t.kind == "hadamard":
        b, p = hadamard_factors(n)
        H = None if b == 1 else hadamard_matrix(b).to(torch.float32).contiguous()
        return d, H, b, p, None
    return d, None, 0, 0, t.base().contiguous()


def e8p_struct(w) -> E8PWeightC | None:
    """The C view of an E8PWeight, or None when the C code cannot read it in place (tensors off
    the CPU or not contiguous)."""
    ts = [w.codes, w.residual, w.scale, w.su, w.sv, w.u_dense, w.v_dense]
    if not all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in ts):
        return None
    N, K = w.shape
    inc = w.incoherence()
    du, hu, bu, pu, ud = _side(inc.U, N)
    dv, hv, bv, pv, vd = _side(inc.V, K)
    P, S, PM = e8p_tables()
    ptr = (lambda t: None if t is None else t.data_ptr())
    st = E8PWeightC(codes=w.codes.data_ptr(), residual=ptr(w.residual), scale=w.scale.data_ptr(), du=ptr(du),
                    dv=ptr(dv), hu=ptr(hu), hv=ptr(hv), u_dense=ptr(ud), v_dense=ptr(vd), patterns=P.data_ptr(),
                    signs=S.data_ptr(), pm1=PM.data_ptr(), K=K, N=N, bu=bu, pu=pu, bv=bv, pv=pv, bits=w.bits)
    st._keep = (du, dv, hu, hv, ud, vd, P, S, PM)  # the arrays built here live as long as the struct
    return st


def e8p_weight_struct(w) -> E8PWeightC | None:
    """`e8p_struct`, built once per stored tensors (`lowbit.kernels._native.cached_struct`)."""
    return _native.cached_struct(w, e8p_struct, (w.seed, w.bits))


def e8p_decode_c(w, st=None) -> Tensor:
    """``W~`` [out, in] float32 decoded by the C code (equal to ``w.transformed()``)."""
    lib = library()
    st = st or e8p_weight_struct(w)
    if lib is None or st is None:
        return w.transformed()
    Wt = torch.empty(w.shape, dtype=torch.float32)
    if lib.lb_e8p_decode_w(ctypes.addressof(st), Wt.data_ptr(), torch.get_num_threads()):
        raise RuntimeError("lb_e8p_decode_w failed")
    return Wt


def e8p_encode(y: Tensor) -> Tensor | None:
    """`lowbit.core.e8p.encode` in C: the code of the nearest E8P point to each row of
    ``y [N, 8]`` (int32 [N]), by the same rule (512 candidates per vector, the best signs with the
    cheapest single flip where the parity rule forbids them; lower pattern, then the +1/4 shift,
    on ties). None when the native library is absent (or ``LOWBIT_NATIVE=0``): use the torch
    encoder then. Runs on ``torch.get_num_threads()`` threads."""
    if y.dim() != 2 or y.shape[1] != e8p.DIM:
        raise LowbitError(f"E8P encodes [N, 8] vectors, got {tuple(y.shape)}")
    lib = library()
    if lib is None or y.device.type != "cpu":
        return None
    Y = y.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(Y).all()):
        raise LowbitError("E8P cannot encode NaN/Inf values")
    codes = torch.empty(Y.shape[0], dtype=torch.int32)
    if lib.lb_e8p_encode(e8p.abs_patterns().data_ptr(), Y.data_ptr(), Y.shape[0], codes.data_ptr(),
                         torch.get_num_threads()):
        raise RuntimeError("lb_e8p_encode failed")
    return codes


@register_kernel("e8p", "float", "cpu", library=library, symbol="lb_e8p_linear_w", struct=e8p_weight_struct)
def e8p_linear_cpu(x: Tensor, w, bias: Tensor | None = None):
    lib = library()
    if lib is None:
        return NotImplemented
    N, K = w.shape
    X = _prepare_x(x, K)
    if X is None:
        return NotImplemented
    st = e8p_weight_struct(w)
    if st is None:
        return NotImplemented
    if X.shape[0] > FUSED_MAX_ROWS:  # prefill: W~ decoded once in C, then the GEMM
        bptr, b = _bias_ptr(bias, N)
        if bptr is False:
            return NotImplemented
        inc = w.incoherence()
        y = inc.output(inc.input(X) @ e8p_decode_c(w, st).T)
        return (y if b is None else y + b).reshape(*x.shape[:-1], N)
    return _run(lib.lb_e8p_linear_w, st, x, X, N, bias)


@register_kernel("e8p", "float", "any")
def e8p_linear(x: Tensor, w, bias: Tensor | None = None):
    """Any device: the transforms and ``W~`` in torch."""
    inc = w.incoherence()
    y = inc.output(inc.input(x) @ w.transformed().to(x.dtype).T)
    return y if bias is None else y + bias.to(y.dtype)



# -- AQLM ----------------------------------------------------------------------------------------
class AQLMWeightC(ctypes.Structure):
    """Mirror of ``lb_aqlm_weight`` in csrc/codebook.c."""
    _fields_ = [(n, _vp) for n in ("codes", "cbt", "cb", "scales")] + [(n, _i64) for n in ("K", "N", "g", "M", "B")]


def aqlm_struct(w) -> AQLMWeightC | None:
    """The C view of an AQLMWeight (float32 copies of its codebooks and scales, kept with the
    struct), or None when the C code cannot read its codes in place."""
    if w.codes.device.type != "cpu" or not w.codes.is_contiguous() or w.out_group_size != 1:
        return None
    N, K = w.shape
    B = w.nbits_per_codebook
    C = w.codebooks[:, :, 0, :].to(torch.float32)                         # [M, 2^B, g]
    cbt = C.transpose(1, 2).contiguous() if B <= 8 else None              # [M, g, 2^B]: the table's GEMM
    cb = C.contiguous() if B > 8 else None
    scales = w.scales.reshape(N).to(torch.float32).contiguous()
    ptr = (lambda t: None if t is None else t.data_ptr())
    st = AQLMWeightC(codes=w.codes.data_ptr(), cbt=ptr(cbt), cb=ptr(cb), scales=scales.data_ptr(), K=K, N=N,
                     g=w.in_group_size, M=w.num_codebooks, B=B)
    st._keep = (cbt, cb, scales)
    return st


def aqlm_weight_struct(w) -> AQLMWeightC | None:
    """`aqlm_struct`, built once per stored tensors (`lowbit.kernels._native.cached_struct`)."""
    return _native.cached_struct(w, aqlm_struct, (w.in_group_size, w.num_codebooks, w.nbits_per_codebook))


@register_kernel("aqlm", "float", "cpu", library=library, symbol="lb_aqlm_linear_w", struct=aqlm_weight_struct)
def aqlm_linear_cpu(x: Tensor, w, bias: Tensor | None = None):
    lib = library()
    if lib is None:
        return NotImplemented
    N, K = w.shape
    X = _prepare_x(x, K)
    if X is None or X.shape[0] > FUSED_MAX_ROWS:
        return NotImplemented  # prefill: the reference (dequantize once, GEMM)
    st = aqlm_weight_struct(w)
    if st is None:
        return NotImplemented
    return _run(lib.lb_aqlm_linear_w, st, x, X, N, bias)


# -- AQLM with int8 tables (opt-in) ----------------------------------------------------------------
class AQLM8WeightC(ctypes.Structure):
    """Mirror of ``lb_aqlm8_weight`` in csrc/codebook.c."""
    _fields_ = [(n, _vp) for n in ("codes64", "cbt", "scales")] + [(n, _i64) for n in ("K", "N", "g", "M")]


LUT8_BLOCK = 16  # groups per int8 table scale (AQLM8_BLOCK in csrc/codebook.c)


def lut8_byte_order() -> Tensor:
    """Byte position of row r (0..63) of a tile in a repacked 64-byte line: 2r for r < 32, else
    2(r - 32) + 1 (the even bytes are rows 0-31, the odd ones 32-63)."""
    r = torch.arange(64)
    return torch.where(r < 32, 2 * r, 2 * (r - 32) + 1)


def repack_codes64(codes: Tensor) -> Tensor:
    """AQLM codes [N, G, M] (8-bit) -> the lut8 kernel's copy [ceil(N / 64), G, M, 64] uint8: one
    64-byte line per (tile of 64 rows, group, codebook), row r at byte `lut8_byte_order`[r]; rows
    past N are code 0. As many bytes as the codes (plus the padding of the last tile)."""
    N, G, M = codes.shape
    NT = -(-N // 64)
    c = torch.zeros(NT * 64, G, M, dtype=torch.uint8)
    c[:N] = codes.view(torch.uint8) if codes.dtype == torch.int8 else (codes.to(torch.int64) & 255).to(torch.uint8)
    c = c.reshape(NT, 64, G, M).permute(0, 2, 3, 1)                    # [NT, G, M, row]
    out = torch.empty(NT, G, M, 64, dtype=torch.uint8)
    out[..., lut8_byte_order()] = c
    return out.contiguous()


def aqlm8_supports(w) -> bool:
    """The lut8 row takes 8-bit codes (any number of codebooks up to 8, any group size), out
    groups of 1, CPU tensors."""
    return (library() is not None and w.nbits_per_codebook == 8 and w.out_group_size == 1 and 1 <= w.num_codebooks <= 8
            and w.codes.device.type == "cpu")


def aqlm8_struct(w) -> AQLM8WeightC | None:
    """The C view of an AQLMWeight for the lut8 kernel: the repacked codes (`repack_codes64`: a
    second copy of the codes, as many bytes), float32 codebooks (transposed) and scales."""
    if w.nbits_per_codebook != 8 or w.out_group_size != 1 or w.codes.device.type != "cpu" or not 1 <= w.num_codebooks <= 8:
        return None
    N, K = w.shape
    codes64 = repack_codes64(w.codes)
    cbt = w.codebooks[:, :, 0, :].to(torch.float32).transpose(1, 2).contiguous()   # [M, g, 256]
    scales = w.scales.reshape(N).to(torch.float32).contiguous()
    st = AQLM8WeightC(codes64=codes64.data_ptr(), cbt=cbt.data_ptr(), scales=scales.data_ptr(), K=K, N=N,
                      g=w.in_group_size, M=w.num_codebooks)
    st._keep = (codes64, cbt, scales)
    return st


def aqlm8_weight_struct(w) -> AQLM8WeightC | None:
    """`aqlm8_struct`, built once per stored tensors."""
    return _native.cached_struct(w, aqlm8_struct, ("lut8", w.in_group_size, w.num_codebooks, w.nbits_per_codebook))


def aqlm_lut8_tables(x: Tensor, w) -> tuple[Tensor, Tensor]:
    """The int8 tables the lut8 kernel builds for one activation row ``x [K]`` (float32): q
    [G, M, 256] int8 and the block scales [ceil(G / LUT8_BLOCK)] float32 (for tests)."""
    lib = library()
    st = aqlm8_weight_struct(w)
    if lib is None or st is None:
        raise LowbitError("the lut8 kernel does not take this weight (or the native library is not built)")
    K = w.shape[1]
    G, M = K // w.in_group_size, w.num_codebooks
    X = x.detach().reshape(K).to(torch.float32).contiguous()
    q = torch.empty(G, M, 256, dtype=torch.int8)
    sb = torch.empty(-(-G // LUT8_BLOCK), dtype=torch.float32)
    if lib.lb_aqlm_lut8_tables(ctypes.addressof(st), X.data_ptr(), q.data_ptr(), sb.data_ptr()):
        raise RuntimeError("lb_aqlm_lut8_tables failed")
    return q, sb


@register_kernel("aqlm", "int8", "cpu", default=False, name="aqlm-lut8", library=library,
                 symbol="lb_aqlm_lut8_linear_w", struct=aqlm8_weight_struct, supports=aqlm8_supports)
def aqlm_lut8_linear(x: Tensor, w, bias: Tensor | None = None):
    """y = x W^T + bias of AQLM weights with 8-bit codes through int8-quantized lookup tables
    (csrc/codebook.c: the float table of each group's dot products, quantized per block of
    ``LUT8_BLOCK`` groups, summed as integers, rescaled once per block; 64 rows per pair of
    AVX-512 VBMI byte permutes). Not the float product: an opt-in row (``activations="int8"``,
    the decoder's ``int8_activations``), ``NotImplemented`` for what it does not take."""
    lib = library()
    if lib is None or not aqlm8_supports(w):
        return NotImplemented
    N, K = w.shape
    X = _prepare_x(x, K)
    if X is None:
        return NotImplemented
    st = aqlm8_weight_struct(w)
    if st is None:
        return NotImplemented
    return _run(lib.lb_aqlm_lut8_linear_w, st, x, X, N, bias)


# -- E8P with int8 activations (opt-in) ------------------------------------------------------------
class E8P8WeightC(ctypes.Structure):
    """Mirror of ``lb_e8p8_weight`` in csrc/codebook.c: the float kernel's view and the int8 table."""
    _fields_ = [("e", E8PWeightC), ("t8", _vp), ("tn", _vp)]


E8A_BLOCK = 32  # transformed activations per int8 scale (E8A_QB in csrc/codebook.c)


def e8p_int8_table() -> Tensor:
    """[8, 256] int8: ``4 * patterns[p][i]`` at [i, p] (`e8p_tables`' patterns, the 8th coordinate
    negated where the pattern's sum is odd): 2, 6, 10 or 14 up to sign; with the signs and the
    shift (``+-1``) the decoded ``4 v`` is odd, in [-15, 15]."""
    if "t8" not in _TABLES:
        P = e8p_tables()[0]
        _TABLES["t8"] = (4 * P).round().to(torch.int8).T.contiguous()
    return _TABLES["t8"]


def e8p_nibble_table() -> Tensor:
    """[4, 256] uint8, the AVX-512 path's per-pattern magnitude indices: ``t_2j | t_2j+1 << 4`` at
    [j, p] with ``t_i = (|t8[i, p]| - 2) / 4`` in 0..3 (`e8p_int8_table`), and in row 3 bit 6 set
    where ``t8[7, p] < 0`` (the pattern's parity sign of coordinate 7)."""
    if "tn" not in _TABLES:
        T = e8p_int8_table().to(torch.int64)                                  # [8, 256]
        t = (T.abs() - 2) // 4
        tn = t[0::2] | (t[1::2] << 4)
        tn[3] |= (T[7] < 0).to(torch.int64) << 6
        _TABLES["tn"] = tn.to(torch.uint8).contiguous()
    return _TABLES["tn"]


def e8p8_supports(w) -> bool:
    """The e8p-a8 row takes 2-bit E8P weights (any width the format takes) whose tensors the C code
    reads in place."""
    ts = [w.codes, w.scale, w.su, w.sv, w.u_dense, w.v_dense]
    return library() is not None and w.bits == 2 and all(
        t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in ts)


def e8p8_struct(w) -> E8P8WeightC | None:
    """The C view of a 2-bit E8PWeight for the int8-activation kernel: `e8p_struct` and the int8
    pattern tables (3 KB, shared by every weight)."""
    if w.bits != 2:
        return None
    base = e8p_struct(w)
    if base is None:
        return None
    t8, tn = e8p_int8_table(), e8p_nibble_table()
    st = E8P8WeightC(e=base, t8=t8.data_ptr(), tn=tn.data_ptr())
    st._keep = (base, base._keep, t8, tn)
    return st


def e8p8_weight_struct(w) -> E8P8WeightC | None:
    """`e8p8_struct`, built once per stored tensors."""
    return _native.cached_struct(w, e8p8_struct, ("a8", w.seed, w.bits))


def e8p_a8_activations(x: Tensor, w) -> tuple[Tensor, Tensor, Tensor]:
    """What the e8p-a8 kernel makes of one activation row ``x [K]``: the transformed row ``V x``
    [K] float32, its int8 codes [K] and the block scales [ceil(K / E8A_BLOCK)] float32 (for tests)."""
    lib = library()
    st = e8p8_weight_struct(w) if w.bits == 2 else None
    if lib is None or st is None:
        raise LowbitError("the e8p-a8 kernel does not take this weight (or the native library is not built)")
    K = w.shape[1]
    X = x.detach().reshape(K).to(torch.float32).contiguous()
    xt = torch.empty(K, dtype=torch.float32)
    q = torch.empty(K, dtype=torch.int8)
    sx = torch.empty(-(-K // E8A_BLOCK), dtype=torch.float32)
    if lib.lb_e8p_a8_activations(ctypes.addressof(st), X.data_ptr(), xt.data_ptr(), q.data_ptr(), sx.data_ptr()):
        raise RuntimeError("lb_e8p_a8_activations failed")
    return xt, q, sx


@register_kernel("e8p", "int8", "cpu", default=False, name="e8p-a8", library=library, symbol="lb_e8p_a8_linear_w",
                 struct=e8p8_weight_struct, supports=e8p8_supports)
def e8p_a8_linear(x: Tensor, w, bias: Tensor | None = None):
    """y = x W^T + bias of 2-bit E8P weights with the transformed activation quantized to int8 per
    block of ``E8A_BLOCK`` (csrc/codebook.c: exact integer sums per block, rescaled once per
    block; AVX-512 VNNI + VBMI). Not the float product: an opt-in row (``activations="int8"``, the
    decoder's ``int8_activations``), ``NotImplemented`` for what it does not take."""
    lib = library()
    if lib is None or not e8p8_supports(w):
        return NotImplemented
    N, K = w.shape
    X = _prepare_x(x, K)
    if X is None:
        return NotImplemented
    st = e8p8_weight_struct(w)
    if st is None:
        return NotImplemented
    return _run(lib.lb_e8p_a8_linear_w, st, x, X, N, bias)
