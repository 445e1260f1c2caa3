"""The affine grid: the one place where real weights become integer codes and back.

Every solver (RTN, GPTQ, AWQ, HQQ, SparseGPT's joint quantization, ternary), every affine format's
dequantization and the naive test references call these functions, so a rounding convention
lives here and nowhere else.

Notation (per slice that shares one scale): x real, q integer in [qmin, qmax], s > 0 the scale,
z the zero-point.

* symmetric:  q = clamp(round(x / s), qmin, qmax),           x_hat = s * q
  s = absmax / ((qmax - qmin) / 2)   (full range:  int8 -> absmax / 127.5, the extra negative
                                       level absorbs the half step; restricted: absmax / 127)
* asymmetric: q = clamp(round(x / s) + z, qmin, qmax),       x_hat = s * (q - z)
  the range is first widened to include 0 (min <= 0 <= max), s = (max - min) / (qmax - qmin),
  z = clamp(round(qmin - min / s), qmin, qmax), an integer, so x = 0 maps to q = z and back to
  exactly 0.
* asymmetric with a float zero-point (scheme.zero_point == "float"): the range is [min, max]
  as is, s = (max - min) / (qmax - qmin), z = qmin - min / s real-valued (rounded to the scale
  dtype), q = clamp(round(x / s + z), qmin, qmax); min and max map to qmin and qmax.

Storage: scales and float zero-points are kept in ``scheme.scale_dtype``. `stored` is the one
rounding to that dtype (fp16: clamped to ±65504, round half to even); qparams come out already
rounded, so quantization uses exactly the values a checkpoint reads back.

The grouped view: the weight W[out, in] is viewed as [out, n_groups, group] where each group
holds `group_size` consecutive columns of one row; the last group of a row may be shorter when
group_size does not divide `in` (576 columns in groups of 128: four of 128 and one of 64). The
view pads that group (with zeros unless asked otherwise); ranges are taken over the real entries
only, and the padding is dropped again by `ungrouped`. Groups never straddle rows. Per-channel
is one group per row ([out, 1, in]); per-tensor one slice of everything ([1, 1, out*in]), or,
for callers that mix per-column factors in, [out, 1, in] with one scale for all rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

TINY = 1e-8            # smallest scale we allow; an all-zero slice gets this scale and q = z
FP16_MAX = 65504.0     # largest finite float16
FP16_TINY = 2.0**-24   # smallest positive float16 (subnormal): where a float16 scale underflows to


# -- storage of scales and zero-points ------------------------------------------------------------
def stored(x: Tensor, scheme: QuantScheme) -> Tensor:
    """x as it reads back from a checkpoint, where scales and float zero-points are kept in
    ``scheme.scale_dtype``: float16 clamps to ±65504 and rounds half to even; float32 is x."""
    if scheme.scale_dtype == "float16":
        return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    return x


def round_scale(s: Tensor, scheme: QuantScheme) -> Tensor:
    """A scale as stored: at least `TINY`, rounded by `stored`; a float16 underflow becomes the
    smallest subnormal, so a stored scale is never 0."""
    s = stored(s.clamp(min=TINY), scheme)
    if scheme.scale_dtype == "float16":
        s = torch.where(s > 0, s, torch.full_like(s, FP16_TINY))
    return s


# -- the grouped view -----------------------------------------------------------------------------
def group_layout(shape: tuple[int, int], scheme: QuantScheme) -> tuple[int, int]:
    """(n groups per row, group length) for a 2-D weight of ``shape`` under ``scheme``
    (per-channel and per-tensor: (1, in))."""
    rows, cols = shape
    if scheme.granularity == "group":
        g = int(scheme.group_size)
        return math.ceil(cols / g), g
    return 1, cols


def scale_shape(shape: tuple[int, int], scheme: QuantScheme) -> tuple[int, int]:
    """Shape of the scales (and zero-points) of a weight of ``shape``: [out, n_groups], or [1, 1]
    per tensor."""
    if scheme.granularity == "tensor":
        return (1, 1)
    return (int(shape[0]), group_layout(shape, scheme)[0])


def grouped(W: Tensor, scheme: QuantScheme, pad_value: float = 0.0, by_row: bool = False) -> Tensor:
    """W [out, in] viewed as [out, n, g] (a short last group padded with ``pad_value``); per
    tensor [1, 1, out*in], or with ``by_row`` [out, 1, in]. A view of W where nothing is padded."""
    if W.dim() != 2:
        raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if scheme.granularity == "tensor" and not by_row:
        return W.reshape(1, 1, rows * cols)
    n, g = group_layout((rows, cols), scheme)
    if n * g != cols:
        W = F.pad(W, (0, n * g - cols), value=pad_value)
    return W.reshape(rows, n, g)


def ungrouped(Xg: Tensor, shape: tuple[int, int]) -> Tensor:
    """Inverse of `grouped`: [out, in] with the padding dropped."""
    rows, cols = shape
    return Xg.reshape(rows, -1)[:, :cols]


def valid_mask(shape: tuple[int, int], scheme: QuantScheme, like: Tensor) -> Tensor | None:
    """[n, g] with 1 at the real entries of a row's groups and 0 at the padding (``like``'s dtype
    and device), or None when every group is full."""
    rows, cols = shape
    if scheme.granularity == "tensor":
        return None
    n, g = group_layout((rows, cols), scheme)
    if n * g == cols:
        return None
    valid = torch.ones(n * g, dtype=like.dtype, device=like.device)
    valid[cols:] = 0
    return valid.reshape(n, g)


def slice_range(Wg: Tensor, scheme: QuantScheme, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(min, max) of every slice of a grouped view, shaped like the scales; with ``valid``
    (`valid_mask`) the padding of a short last group is left out."""
    if scheme.granularity == "tensor":
        return Wg.amin().reshape(1, 1), Wg.amax().reshape(1, 1)
    if valid is None:
        return Wg.amin(dim=-1), Wg.amax(dim=-1)
    pad = valid == 0
    return Wg.masked_fill(pad, math.inf).amin(dim=-1), Wg.masked_fill(pad, -math.inf).amax(dim=-1)


# -- scale and zero-point -------------------------------------------------------------------------
def qparams_from_range(lo: Tensor, hi: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Scale (fp32, already rounded to the storage dtype) and zero-point (None if symmetric; an
    integer, or with ``zero_point="float"`` a real stored like the scale) for slices whose real
    range is [lo, hi]."""
    lo = lo.float()
    hi = hi.float()
    if scheme.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        return round_scale(absmax / ((scheme.qmax - scheme.qmin) / 2), scheme), None
    if scheme.zero_point == "float":
        levels = scheme.qmax - scheme.qmin
        # A (near-)constant slice has no range to span: give it the step of a grid that reaches
        # its value from 0 instead, so the zero-point stays small (|z| <= levels) and the value
        # comes back exactly, rather than a vanishing scale with an overflowing zero-point.
        span = torch.maximum(lo.abs(), hi.abs())
        flat = (hi - lo) < span * 2.0**-10
        s = round_scale(torch.where(flat, span, hi - lo) / levels, scheme)
        return s, stored(scheme.qmin - lo / s, scheme)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    s = round_scale((hi - lo) / (scheme.qmax - scheme.qmin), scheme)
    z = torch.clamp(torch.round(scheme.qmin - lo / s), scheme.qmin, scheme.qmax)
    return s, z


def choose_qparams(W: Tensor, scheme: QuantScheme, shrink: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Min/max (asymmetric) or absmax (symmetric) qparams for each slice of a 2-D weight, from
    the slice's real entries. ``shrink`` (shaped like the scales) narrows each range to
    [f·min, f·max] first (clipping; values outside then clamp to the grid's ends).

    Returns scale [rows, n_groups] (per-tensor: [1, 1]) and zero-point of the same shape or None.
    """
    W = W.float()
    lo, hi = slice_range(grouped(W, scheme), scheme, valid_mask(tuple(W.shape), scheme, W))
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    return qparams_from_range(lo, hi, scheme)


# -- rounding to the grid and back, elementwise ---------------------------------------------------
def round_scaled(t: Tensor, z: Tensor | None, scheme: QuantScheme, inplace: bool = False,
                 clamp: bool = True) -> Tensor:
    """Codes (float, integer-valued, in [qmin, qmax]) from t = x / s: clamp(round(t)) symmetric,
    clamp(round(t) + z) with an integer zero-point, clamp(round(t + z)) with a float one.
    ``inplace`` reuses t (a temporary of the caller's); ``clamp=False`` leaves the codes
    unclamped (where they fall outside [qmin, qmax], x is clipped)."""
    if z is None:
        q = t.round_() if inplace else torch.round(t)
    elif scheme.zero_point == "float":
        q = (t.add_(z) if inplace else torch.add(t, z)).round_()
    else:
        q = (t.round_() if inplace else torch.round(t)).add_(z)
    return q.clamp_(scheme.qmin, scheme.qmax) if clamp else q


def round_codes(x: Tensor, s: Tensor, z: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Codes of x for scale s and zero-point z (broadcast against x, same dtype)."""
    return round_scaled(x / s, z, scheme, inplace=True)


def decode(q: Tensor, s: Tensor, z: Tensor | None = None, inplace: bool = False) -> Tensor:
    """Values of codes q: s·q, or s·(q − z). ``inplace`` overwrites q."""
    if z is None:
        return q.mul_(s) if inplace else q * s
    return (q.sub_(z) if inplace else q - z).mul_(s)


def round_to_grid(x: Tensor, s: Tensor, z: Tensor | None, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """(codes, values) of x's nearest grid points, s and z broadcast against x (e.g. one column of
    a weight with its rows' scales, as GPTQ's column loop quantizes)."""
    q = round_codes(x, s, z, scheme)
    return q, decode(q, s, z)


# -- whole weights --------------------------------------------------------------------------------
def quantize(W: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Integers q (int32, in [qmin, qmax]) for a 2-D weight given per-slice scale/zero."""
    q = round_codes(grouped(W.float(), scheme), scale.unsqueeze(-1),
                    None if zero is None else zero.unsqueeze(-1), scheme)
    return ungrouped(q, tuple(W.shape)).to(torch.int32)


def dequantize_(W: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """In place: a float32 [out, in] tensor holding codes becomes (codes − zero) · scale per
    slice, in float32. Works on views of W (full groups as [out, n, g], a short last group
    apart), so nothing is padded or copied."""
    if W.dim() != 2:
        raise LowbitError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    s = scale.float()
    z = None if zero is None else zero.float()

    def affine_(view: Tensor, sv: Tensor, zv: Tensor | None) -> None:
        if zv is not None:
            view.sub_(zv)
        view.mul_(sv)

    if scheme.granularity == "tensor":
        affine_(W, s.reshape(()), None if z is None else z.reshape(()))
    elif scheme.granularity == "channel":
        affine_(W, s[:, :1], None if z is None else z[:, :1])
    else:
        g = int(scheme.group_size)
        nf = cols // g  # full groups
        if nf:
            affine_(W[:, : nf * g].view(rows, nf, g), s[:, :nf, None], None if z is None else z[:, :nf, None])
        if nf * g < cols:
            affine_(W[:, nf * g:], s[:, nf:nf + 1], None if z is None else z[:, nf:nf + 1])
    return W


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Float32 weight from integers q [out, in] and per-slice scale/zero."""
    return dequantize_(q.to(torch.float32, copy=True), scale, zero, scheme)


def fake_quantize(W: Tensor, scheme: QuantScheme) -> Tensor:
    """Quantize then dequantize with min/max qparams (round-to-nearest), same dtype as W."""
    s, z = choose_qparams(W, scheme)
    return dequantize(quantize(W, s, z, scheme), s, z, scheme).to(W.dtype)


def fake_quantize_grouped(Wg: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Ŵ on a grouped view [R, n, g] (a new tensor): each slice rounded to its grid and back.
    For searches that fake-quantize one weight many times (AWQ's scales and clipping)."""
    S = scale.unsqueeze(-1)
    Z = None if zero is None else zero.unsqueeze(-1)
    return decode(round_codes(Wg, S, Z, scheme), S, Z, inplace=True)


# -- differentiable fake quantization (training: QAT, LSQ, block-wise distillation) ----------------
class _StoredSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scheme, is_scale):
        return round_scale(x, scheme) if is_scale else stored(x, scheme)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def stored_ste(x: Tensor, scheme: QuantScheme, is_scale: bool = True) -> Tensor:
    """A trainable scale (`round_scale`) or float zero-point (`stored`) as a checkpoint stores it,
    with the gradient passed straight through the storage rounding: training sees exactly the
    values that are written back."""
    return _StoredSTE.apply(x, scheme, is_scale)


def stored_qparams_ste(scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
    """Trained (scale, zero-point) as a checkpoint stores them (`stored_ste`): the scale rounded
    to its storage dtype, a float zero-point likewise; an integer zero-point is used as it is."""
    s = stored_ste(scale, scheme, is_scale=True)
    if zero is not None and scheme.zero_point == "float":
        zero = stored_ste(zero, scheme, is_scale=False)
    return s, zero


class _FakeQuantGroupedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Wg, scale, zero, scheme, scale_grad):
        S = scale.float().unsqueeze(-1)
        Z = None if zero is None else zero.float().unsqueeze(-1)
        t = Wg.float() / S
        u = round_scaled(t.clone(), Z, scheme, clamp=False)         # unclamped codes
        inside = (u >= scheme.qmin) & (u <= scheme.qmax)
        q = u.clamp_(scheme.qmin, scheme.qmax)
        ctx.save_for_backward(t, q, inside, S, Z if Z is not None else torch.empty(0))
        ctx.has_zero, ctx.scale_grad = Z is not None, scale_grad
        ctx.dtypes = (Wg.dtype, scale.dtype, None if zero is None else zero.dtype)
        return decode(q.clone(), S, Z, inplace=True).to(Wg.dtype)

    @staticmethod
    def backward(ctx, g):
        t, q, inside, S, Z = ctx.saved_tensors
        g = g.float()
        gW = gs = gz = None
        if ctx.needs_input_grad[0]:
            gW = (g * inside).to(ctx.dtypes[0])                       # clipped STE: 1 inside, 0 where clipped
        if ctx.needs_input_grad[1]:
            qz = q - Z if ctx.has_zero else q                         # q - z: the level the weight sits on
            dS = torch.where(inside, qz - t, qz)                      # LSQ: round(v/s) - v/s inside, the end outside
            gs = ((g * dS).sum(-1) * ctx.scale_grad).to(ctx.dtypes[1])
        if ctx.has_zero and ctx.needs_input_grad[2]:
            gz = (g * torch.where(inside, torch.zeros_like(S), -S)).sum(-1).to(ctx.dtypes[2])  # LSQ+: -s if clipped
        return gW, gs, gz, None, None


def fake_quantize_ste(Wg: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme,
                      scale_grad: float = 1.0) -> Tensor:
    """`fake_quantize_grouped` (the same values, bit for bit) made differentiable, for training.

    ``Wg`` [R, n, g] a grouped view, ``scale`` / ``zero`` [R, n] as stored (see `stored_ste` for
    trainable ones). Gradients (v = W / s, q the code, z the zero-point or 0):

    * W: the clipped straight-through estimator: exactly the incoming gradient where
      ``round(v) + z`` (``round(v + z)``) lies in [qmin, qmax], 0 where W is clipped;
    * s (LSQ, Esser et al. 2020, eq. 3): ``(q - z) - v`` inside, ``q - z`` (the grid's end)
      outside, summed over each slice and multiplied by ``scale_grad`` (LSQ's g = 1/sqrt(N qmax));
    * a float z (LSQ+, Bhalgat et al. 2020): 0 inside, ``-s`` where clipped; an integer z gets none.
    """
    return _FakeQuantGroupedSTE.apply(Wg, scale, zero, scheme, float(scale_grad))


def all_finite(t: Tensor) -> bool:
    """Exact, and ~8-30x faster than isfinite().all() on a CPU: a sum of finite numbers is finite
    unless it overflows, so only a non-finite sum (NaN/Inf present, or overflow) needs the full check."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(W: Tensor, name: str) -> None:
    """One-line error for NaN/Inf weights (quantizing them would silently poison the result)."""
    if not all_finite(W):
        bad = (~torch.isfinite(W)).sum().item()
        raise LowbitError(f"weight {name} has {bad} NaN/Inf values; refusing to quantize it")
