"""GGUF block types (lowbit.export.gguf_quants).

* bytes identical to gguf-py's quantizer for the types it has (legacy, ternary, F16, BF16);
* bytes identical to llama.cpp's C reference for every type (golden digests computed with the
  compiled quantize_row_*_ref, and a deliberately naive scalar transcription for the K-quants);
* dequantization identical to gguf-py for any bytes;
* error bounds, idempotence and nearest-grid properties; one-line errors for bad input."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants as gq  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import gguf_quants as G  # noqa: E402

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
TERNARY = ["TQ1_0", "TQ2_0"]
KQUANTS = ["Q6_K", "Q4_K", "Q5_K", "Q3_K", "Q2_K"]
GGUF_PY_QUANTIZES = LEGACY + TERNARY + ["F16", "BF16"]


def tricky(bs: int, seed: int = 0) -> np.ndarray:
    """Rows of blocks [n_blocks, bs] float32 covering the cases where quantizers go wrong."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(bs),                       # ordinary
        np.zeros(bs),                                  # all-zero block
        np.r_[rng.standard_normal(bs - 1) * 1e-3, 1e3],  # one huge value
        -np.abs(rng.standard_normal(bs)) - 0.1,        # negative only
        np.abs(rng.standard_normal(bs)) + 0.1,         # positive only
        rng.standard_normal(bs) * 1e-6,                # tiny
        rng.standard_normal(bs) * 1e-30,               # extreme small (scales underflow f16)
        np.clip(rng.standard_normal(bs) * 3e4, -6e4, 6e4),  # extreme large, within f16
        np.full(bs, 0.7),                              # constant
        np.r_[np.zeros(bs - 1), -2.5],                 # one negative spike in zeros
        rng.integers(-8, 8, bs) * 0.25,                # exact grid values, many ties
        rng.uniform(-1, 1, bs) * (np.arange(bs) % 7 == 0),  # sparse
    ]
    return np.stack(rows).astype(np.float32)


def cases(bs: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    rand = (rng.standard_normal((24, bs)) * rng.uniform(1e-3, 10, (24, 1))).astype(np.float32)
    return np.concatenate([tricky(bs), rand])


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
def test_bytes_identical_to_gguf_py(name):
    cls = G.get_type(name)
    x = cases(cls.block_size if cls.block_size > 1 else 64).reshape(-1)
    n_per_row = 2 * max(cls.block_size, 32)
    x = x[: x.size // n_per_row * n_per_row].reshape(-1, n_per_row)
    ours = G.quantize(x, name)
    ref = gq.quantize(x, GT[name])
    ref = np.ascontiguousarray(ref).view(np.uint8)  # gguf-py returns F16 as float16
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    deq = G.dequantize(ours, name)
    np.testing.assert_array_equal(deq.view(np.uint32), gq.dequantize(ref, GT[name]).view(np.uint32))
    assert deq.shape == x.shape


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES + KQUANTS)
def test_layout_table_matches_gguf(name):
    assert G.BLOCK_LAYOUTS[name] == tuple(gguf.GGML_QUANT_SIZES[GT[name]])


@pytest.mark.parametrize("name", list(G.BLOCK_LAYOUTS))
def test_dequantize_random_bytes_identical_to_gguf_py(name):
    """Any byte pattern dequantizes exactly as gguf-py does it (Inf/NaN where it has them)."""
    cls = G.get_type(name)
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (40, cls.bytes_per_block), dtype=np.uint8)
    ours = G.dequantize(raw, name)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, GT[name])
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), fin)
    np.testing.assert_array_equal(ours[fin].view(np.uint32), ref[fin].view(np.uint32))


@pytest.mark.parametrize("name", list(G.BLOCK_LAYOUTS))
def test_shapes_keep_leading_axes(name):
    cls = G.get_type(name)
    x = np.random.default_rng(3).standard_normal((2, 3, 2 * cls.block_size)).astype(np.float32)
    raw = G.quantize(x, name)
    assert raw.shape == (2, 3, 2 * cls.bytes_per_block) and raw.dtype == np.uint8
    y = G.dequantize(raw, name)
    assert y.shape == x.shape and y.dtype == np.float32
    # rows are independent: quantizing one row alone gives that row's bytes
    np.testing.assert_array_equal(G.quantize(x[1, 2], name), raw[1, 2])
    for shape in [(0, cls.block_size), (3, 0)]:
        empty = G.quantize(np.zeros(shape, np.float32), name)
        assert empty.shape == shape[:-1] + (shape[-1] // cls.block_size * cls.bytes_per_block,)
        assert G.dequantize(empty, name).shape == shape


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_error_bound(name):
    """|x - deq| <= d/2 per block (plus f16 rounding of the scale), for ordinary blocks."""
    cls = G.get_type(name)
    x = cases(cls.block_size)
    # scales in f16's normal range (tiny blocks lose precision in the f16 scale: bytes are
    # still checked against gguf-py above)
    x = x[np.abs(x).max(-1) > 1e-2]
    y = G.dequantize(G.quantize(x, name), name)
    span = {"Q8_0": 2 * 127, "Q4_0": 16, "Q5_0": 32, "Q4_1": 15, "Q5_1": 31}[name]
    if name.endswith("_0"):
        rng_ = 2 * np.abs(x).max(-1)
    else:
        rng_ = x.max(-1) - x.min(-1)
    step = rng_ / span
    err = np.abs(x - y).max(-1)
    # Q4_0/Q5_0: the largest value sits on the grid end; the far side may clip by one step
    slack = {"Q8_0": 0.51, "Q4_1": 0.51, "Q5_1": 0.51, "Q4_0": 1.01, "Q5_0": 1.01}[name]
    assert np.all(err <= slack * step + 2e-3 * np.abs(x).max(-1) + 1e-30)


@pytest.mark.parametrize("name", list(G.BLOCK_LAYOUTS))
def test_zero_block_comes_back_zero(name):
    cls = G.get_type(name)
    raw = G.quantize(np.zeros((1, cls.block_size), np.float32), name)
    assert np.all(G.dequantize(raw, name) == 0)


@pytest.mark.parametrize("name", LEGACY + TERNARY)
def test_requantizing_is_idempotent(name):
    """quantize(dequantize(quantize(x))) == quantize(x), byte for byte, for the legacy and
    ternary types (the grid end that set the scale comes back exactly, so the scale does too).
    Blocks whose scale falls below f16's normal range are left out: there the f16 scale itself
    has lost the value (checked against gguf-py byte for byte above)."""
    cls = G.get_type(name)
    x = cases(cls.block_size) if cls.block_size == 32 else np.concatenate([cases(256), tricky(256, 7)])
    x = x[np.abs(x).max(-1) > 1e-2]
    raw = G.quantize(x, name)
    np.testing.assert_array_equal(G.quantize(G.dequantize(raw, name), name), raw)


def test_bad_input_one_line_errors():
    with pytest.raises(LowbitError, match="not a multiple of the block size 32") as e:
        G.quantize(np.zeros((2, 33), np.float32), "Q4_0")
    assert "\n" not in str(e.value)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((1, 256), np.float32)
        x[0, 5] = bad
        for name in ("Q8_0", "Q6_K", "Q2_K", "TQ2_0", "F16", "BF16"):
            with pytest.raises(LowbitError, match="NaN/Inf") as e:
                G.quantize(x, name)
            assert "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="bytes per block"):
        G.dequantize(np.zeros((1, 35), np.uint8), "Q8_0")
    with pytest.raises(LowbitError, match="uint8"):
        G.dequantize(np.zeros((1, 34), np.float32), "Q8_0")
    with pytest.raises(LowbitError, match="unknown GGUF block type"):
        G.quantize(np.zeros(32, np.float32), "Q9_9")
    for name, big in (("Q8_0", 1e7), ("Q4_1", 7e4), ("Q6_K", 1e9), ("Q4_K", 1e8), ("F16", 7e4),
                      ("BF16", 3.4e38)):
        x = np.zeros((1, 256), np.float32)
        x[0, 3] = -big
        with pytest.raises(LowbitError, match="too large") as e:
            G.quantize(x, name)
        assert "\n" not in str(e.value)
    # the largest values that fit come back within one f16 step
    x = np.full((1, 32), 6e4, np.float32)
    assert np.allclose(G.dequantize(G.quantize(x, "Q8_0"), "Q8_0"), 6e4, rtol=1e-3)


# -- K-quants: a deliberately naive scalar transcription of llama.cpp's quantize_row_q*_K_ref ----
# One block at a time, one value at a time, numpy float32 scalars (IEEE single, no FMA), exactly
# the statement order of ggml-quants.c. The vectorised code in lowbit must agree bit for bit.
f = np.float32
EPS = f(1e-15)


def nint(v):  # nearest_int: round half to even
    return int(np.rint(f(v)))


def f16(v):  # GGML_FP32_TO_FP16 then back
    return f(np.float16(f(v)))


def f16b(v):
    return list(np.array([v], np.float32).astype("<f2").view(np.uint8))


def ref_make_qx_quants(x, nmax):
    n = len(x)
    mx, amax = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < EPS:
        return f(0), [0] * n
    iscale = f(-nmax) / mx
    L = [0] * n
    sumlx = suml2 = f(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nint(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * f(l)
        suml2 = suml2 + w * f(l) * f(l)
    scale = sumlx / suml2 if suml2 else f(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f(nmax) + f(0.1) * f(step)) / mx
        sumlx = suml2 = f(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nint(iscale * x[i])))
            w = x[i] * x[i]
            sumlx = sumlx + w * x[i] * f(l)
            suml2 = suml2 + w * f(l) * f(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nint(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def ref_make_q3_quants(x, nmax):
    n = len(x)
    mx, amax = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < EPS:
        return f(0), [0] * n
    iscale = f(-nmax) / mx
    L = [0] * n
    sumlx = suml2 = f(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nint(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * f(l)
        suml2 = suml2 + w * f(l) * f(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * f(L[i])
            if slx > 0:
                sl2 = suml2 - w * f(L[i]) * f(L[i])
                new_l = max(-nmax, min(nmax - 1, nint(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx = slx + w * x[i] * f(new_l)
                    sl2 = sl2 + w * f(new_l) * f(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else f(0)), [l + nmax for l in L]


def ref_make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    n = len(x)
    mn = mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = sum_w + weights[i]
        sum_x = sum_x + weights[i] * x[i]
    if mn > 0:
        mn = f(0)
    if mx == mn:
        return f(0), -mn, [0] * n
    iscale = f(nmax) / (mx - mn)
    scale = f(1) / iscale
    L = [0] * n
    best = f(0)
    for i in range(n):
        L[i] = max(0, min(nmax, nint(iscale * (x[i] - mn))))
        diff = scale * f(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best = best + weights[i] * diff
    for step in range(nstep + 1):
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / (mx - mn)
        aux = [max(0, min(nmax, nint(iscale * (x[i] - mn)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = f(0)
        for i in range(n):
            w, l = weights[i], f(aux[i])
            sum_l = sum_l + w * l
            sum_l2 = sum_l2 + w * l * l
            sum_xl = sum_xl + w * l * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = f(0)
                this_scale = sum_xl / sum_l2
            cur = f(0)
            for i in range(n):
                diff = this_scale * f(aux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur = cur + weights[i] * diff
            if cur < best:
                L, best, scale, mn = aux, cur, this_scale, this_min
    return scale, -mn, L


def ref_q6_k(x):
    L = [0] * 256
    scales = [f(0)] * 16
    max_scale = max_abs = f(0)
    for ib in range(16):
        s, Lb = ref_make_qx_quants(x[16 * ib:16 * ib + 16], 32)
        scales[ib] = s
        L[16 * ib:16 * ib + 16] = Lb
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < EPS:
        return [0] * 210
    iscale = f(-128) / max_scale
    d = f(1) / iscale
    sc = [min(127, nint(iscale * scales[ib])) for ib in range(16)]
    for j in range(16):
        dj = f16(d) * f(sc[j])
        if not dj:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nint(x[16 * j + ii] / dj))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        j = 128 * h
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + 32 * k] for k in range(4))
            ql[64 * h + l] = (q1 & 15) | ((q3 & 15) << 4)
            ql[64 * h + l + 32] = (q2 & 15) | ((q4 & 15) << 4)
            qh[32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    return ql + qh + [s & 0xFF for s in sc] + f16b(d)


def ref_scale_min_k4(j, s):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def ref_q45_k(x, nmax, rmin, nstep):
    L = [0] * 256
    scales, mins = [f(0)] * 8, [f(0)] * 8
    max_scale = max_min = f(0)
    for j in range(8):
        xb = x[32 * j:32 * j + 32]
        sum_x2 = f(0)
        for v in xb:
            sum_x2 = sum_x2 + v * v
        av_x = np.sqrt(sum_x2 / f(32))
        w = [av_x + abs(v) for v in xb]
        scales[j], mins[j], L[32 * j:32 * j + 32] = ref_make_qkx2_quants(xb, w, nmax, rmin, 0.1, nstep, False)
        max_scale = max(max_scale, scales[j])
        max_min = max(max_min, mins[j])
    inv_scale = f(63) / max_scale if max_scale > 0 else f(0)
    inv_min = f(63) / max_min if max_min > 0 else f(0)
    s = [0] * 12
    for j in range(8):
        ls = min(63, nint(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nint(inv_min * mins[j]) & 0xFF)
        if j < 4:
            s[j], s[j + 4] = ls, lm
        else:
            s[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            s[j - 4] |= (ls >> 4) << 6
            s[j] |= (lm >> 4) << 6
    d, dmin = max_scale / f(63), max_min / f(63)
    for j in range(8):
        sc, m = ref_scale_min_k4(j, s)
        dj = f16(d) * f(sc)
        if not dj:
            continue
        dm = f16(dmin) * f(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nint((x[32 * j + ii] + dm) / dj)))
    head = f16b(d) + f16b(dmin) + s
    if nmax == 15:
        qs = []
        for c in range(4):
            qs += [L[64 * c + l] | (L[64 * c + l + 32] << 4) for l in range(32)]
        return head + qs
    qh, ql = [0] * 32, []
    for c in range(4):
        for l in range(32):
            l1, l2 = L[64 * c + l], L[64 * c + l + 32]
            if l1 > 15:
                l1 -= 16
                qh[l] |= 1 << (2 * c)
            if l2 > 15:
                l2 -= 16
                qh[l] |= 2 << (2 * c)
            ql.append(l1 | (l2 << 4))
    return head + qh + ql


def ref_pack_2bit(L):
    qs = []
    for j in (0, 128):
        qs += [L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6) for l in range(32)]
    return qs


def ref_q3_k(x):
    L = [0] * 256
    scales = [f(0)] * 16
    max_scale = amax = f(0)
    for j in range(16):
        scales[j], L[16 * j:16 * j + 16] = ref_make_q3_quants(x[16 * j:16 * j + 16], 4)
        if abs(scales[j]) > amax:
            amax, max_scale = abs(scales[j]), scales[j]
    s = [0] * 12
    if max_scale:
        iscale = f(-32) / max_scale
        for j in range(16):
            l = max(-32, min(31, nint(iscale * scales[j]))) + 32
            if j < 8:
                s[j] = l & 0xF
            else:
                s[j - 8] |= (l & 0xF) << 4
            s[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
        d = f(1) / iscale
    else:
        d = f(0)
    for j in range(16):
        sc = s[j] & 0xF if j < 8 else s[j - 8] >> 4
        sc = (sc | (((s[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dj = f16(d) * f(sc)
        if not dj:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nint(x[16 * j + ii] / dj))) + 4
    hmask = [0] * 32
    for j in range(256):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    return hmask + ref_pack_2bit(L) + s + f16b(d)


def ref_q2_k(x):
    L = [0] * 256
    scales, mins = [f(0)] * 16, [f(0)] * 16
    max_scale = max_min = f(0)
    for j in range(16):
        xb = x[16 * j:16 * j + 16]
        scales[j], mins[j], L[16 * j:16 * j + 16] = ref_make_qkx2_quants(xb, [abs(v) for v in xb], 3, -0.5, 0.1, 15, True)
        max_scale = max(max_scale, scales[j])
        max_min = max(max_min, mins[j])
    s = [0] * 16
    d = dmin = f(0)
    if max_scale > 0:
        iscale = f(15) / max_scale
        s = [nint(iscale * scales[j]) & 0xFF for j in range(16)]
        d = max_scale / f(15)
    if max_min > 0:
        iscale = f(15) / max_min
        s = [(s[j] | (nint(iscale * mins[j]) << 4)) & 0xFF for j in range(16)]
        dmin = max_min / f(15)
    for j in range(16):
        dj = f16(d) * f(s[j] & 0xF)
        if not dj:
            continue
        dm = f16(dmin) * f(s[j] >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nint((x[16 * j + ii] + dm) / dj)))
    return s + ref_pack_2bit(L) + f16b(d) + f16b(dmin)


REF_K = {
    "Q6_K": ref_q6_k,
    "Q5_K": lambda x: ref_q45_k(x, 31, -0.5, 15),
    "Q4_K": lambda x: ref_q45_k(x, 15, -1.0, 20),
    "Q3_K": ref_q3_k,
    "Q2_K": ref_q2_k,
}


def k_cases(seed=0):
    """Super-blocks [n, 256]: the tricky rows, plus rows whose 16/32-value sub-blocks mix the
    tricky cases (an all-zero sub-block next to a spike, positive-only next to negative-only)."""
    t = tricky(256, seed)
    rng = np.random.default_rng(seed + 10)
    mixed = np.concatenate([tricky(16, seed + 1).reshape(-1), tricky(16, seed + 2)[::-1].reshape(-1),
                            rng.standard_normal(128)]).reshape(2, 256).astype(np.float32)
    heavy = (rng.standard_t(2, (3, 256)) * rng.uniform(1e-2, 1e2, (3, 1))).astype(np.float32)
    return np.concatenate([t, mixed, heavy])


@pytest.mark.parametrize("name", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_kquant_bytes_identical_to_naive_reference(name):
    x = k_cases()
    ours = G.quantize(x, name)
    with np.errstate(all="ignore"):
        ref = np.array([REF_K[name]([f(v) for v in row]) for row in x], dtype=np.uint8)
    assert ours.shape == ref.shape == (len(x), G.BLOCK_LAYOUTS[name][1])
    for i in range(len(x)):
        np.testing.assert_array_equal(ours[i], ref[i], err_msg=f"{name} block {i}")


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("name", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_kquant_random_bytes_identical_to_naive_reference(name, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal((2, 256)) * 0.02,
                        rng.laplace(size=(1, 256)) + 0.5,
                        rng.uniform(-1, 3, (1, 256))]).astype(np.float32)
    ours = G.quantize(x, name)
    with np.errstate(all="ignore"):
        ref = np.array([REF_K[name]([f(v) for v in row]) for row in x], dtype=np.uint8)
    np.testing.assert_array_equal(ours, ref)


def kquant_grid(raw: np.ndarray, name: str):
    """Per sub-block affine grid of a K-quant: (a, b, levels) with y = a * q + b, q in 0..levels-1,
    read from the bytes field by field."""
    d = lambda lo: raw[:, lo:lo + 2].copy().view("<f2").astype(np.float32)  # noqa: E731
    if name == "Q6_K":
        a = d(208) * raw[:, 192:208].view(np.int8).astype(np.float32)
        return a, -32 * a, 64
    if name in ("Q4_K", "Q5_K"):
        sc, m = G._unpack_scales_k4(raw[:, 4:16])
        return d(0) * sc.astype(np.float32), -(d(2) * m.astype(np.float32)), 16 if name == "Q4_K" else 32
    if name == "Q3_K":
        a = d(108) * (G._unpack_scales_q3(raw[:, 96:108]).astype(np.float32) - 32)
        return a, -4 * a, 8
    sc = raw[:, :16]
    return d(80) * (sc & 0xF).astype(np.float32), -(d(82) * (sc >> 4).astype(np.float32)), 4


@pytest.mark.parametrize("name", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_kquant_values_land_on_nearest_grid_point(name):
    """After the scale search, every value is rounded to the nearest point of its sub-block's
    final grid (the reference re-quantizes with the stored scales): |x - y| <= |x - g| for
    every grid point g, and y is itself a grid point."""
    x = np.concatenate([k_cases(), np.random.default_rng(5).standard_normal((8, 256))]).astype(np.float32)
    raw = G.quantize(x, name)
    y = G.dequantize(raw, name)
    a, b, levels = kquant_grid(raw, name)
    n_sub = a.shape[1]
    xs = x.reshape(len(x), n_sub, -1)
    ys = y.reshape(len(x), n_sub, -1)
    grid = a[:, :, None] * np.arange(levels, dtype=np.float32) + b[:, :, None]  # [n, sub, levels]
    live = a != 0
    dist = np.abs(xs[..., None] - grid[:, :, None, :]).min(-1)  # [n, sub, per]
    tol = 1e-5 * np.abs(a)[:, :, None] + 1e-30
    assert np.all((np.abs(xs - ys) <= dist + tol)[live])
    on_grid = np.abs(ys[..., None] - grid[:, :, None, :]).min(-1) <= tol
    assert np.all(on_grid[live])
    assert live.any(axis=1)[np.abs(x).max(-1) > 1e-3].all()  # ordinary blocks use their grids


@pytest.mark.parametrize("name,rel", [("Q6_K", 0.008), ("Q5_K", 0.016), ("Q4_K", 0.032), ("Q3_K", 0.07),
                                      ("Q2_K", 0.14)])
def test_kquant_error_on_gaussian_blocks(name, rel):
    """RMS error relative to the block's max |x| on Gaussian data: about half a step of the
    format's bit width (measured: 0.006, 0.012, 0.024, 0.049, 0.10)."""
    x = np.random.default_rng(6).standard_normal((64, 256)).astype(np.float32)
    y = G.dequantize(G.quantize(x, name), name)
    err = np.sqrt(((x - y) ** 2).mean(-1)) / np.abs(x).max(-1)
    assert np.all(err < rel)
    assert np.median(err) > rel / 4  # and the bound is not vacuous for the bit width


# -- golden bytes from llama.cpp's compiled reference ---------------------------------------------
def golden_input(bs: int, n_blocks: int = 64) -> np.ndarray:
    """Platform-independent test blocks [n_blocks, bs] float32 (integer hashing and exact float
    operations only, no random generator or libm): Irwin-Hall(4) values at scales 2^-10..2^10,
    plus an all-zero block, a spike, positive-only, negative-only, tiny, constant and sparse blocks."""
    k = np.arange(n_blocks * bs, dtype=np.uint64)

    def uniform(salt: int) -> np.ndarray:  # splitmix64 -> 24-bit fraction in [0, 1)
        z = (k + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return (z >> np.uint64(40)).astype(np.float64) / 2.0**24

    x = (uniform(1) + uniform(2) + uniform(3) + uniform(4) - 2.0).reshape(n_blocks, bs)
    x = x * np.ldexp(1.0, (np.arange(n_blocks) % 21) - 10)[:, None]
    x[0] = 0.0
    x[1] *= 1e-3
    x[1, bs // 3] = 1000.0
    x[2] = np.abs(x[2]) + 0.25
    x[3] = -np.abs(x[3]) - 0.25
    x[4] *= 1e-30
    x[5] = 0.7
    x[6, (np.arange(bs) % 5) != 0] = 0.0
    x[7] = np.clip(x[7] * 4e4, -6e4, 6e4)
    return x.astype(np.float32)


# sha256 (first 32 hex digits) of quantize_row_<type>_ref(golden_input(block_size)) computed by
# llama.cpp's C reference (libggml-base 0.20.2 from PyPI libggml-python); lowbit must match it.
GGML_REFERENCE_SHA256 = {
    "Q8_0": "ae9b9757cf000c1460776aced45abfa6",
    "Q4_0": "ba0de82baf437edee3ca9f5602ddcabb",
    "Q4_1": "309762a15b6b8112806ef26138cc6549",
    "Q5_0": "849d058c33d67b46b5619bf5ab23bf66",
    "Q5_1": "df6da29390737ed233ea52cd3be17e75",
    "Q6_K": "76aa716112f6e050ead1255e9630c2d0",
    "Q5_K": "0cd8ba74cf19b5bedc8a01f161e3f292",
    "Q4_K": "e30a94f31d66b66a2b3ac4d8196a06e5",
    "Q3_K": "1efcfb239156a2ee3c50c9d51d932662",
    "Q2_K": "3f78d2e45c2ff0ff1a3b4f5c337637e2",
    "TQ1_0": "b89cad4bd602fca029c762e7afde1c4e",
    "TQ2_0": "36f181049a343f43aa508b31bb62bd85",
}


@pytest.mark.parametrize("name", LEGACY + KQUANTS + TERNARY)
def test_bytes_identical_to_ggml_c_reference(name):
    import hashlib

    x = golden_input(G.BLOCK_LAYOUTS[name][0])
    digest = hashlib.sha256(G.quantize(x, name).tobytes()).hexdigest()[:32]
    assert digest == GGML_REFERENCE_SHA256[name]


@pytest.mark.parametrize("name", LEGACY + KQUANTS + TERNARY)
def test_bytes_identical_to_ggml_c_reference_live(name):
    """The same against the compiled C reference on fresh random blocks, where PyPI's
    libggml-python is installed (`pip install libggml-python`)."""
    libggml = pytest.importorskip("libggml")
    import ctypes
    import pathlib

    so = next(pathlib.Path(libggml.__file__).parent.glob("lib*/libggml-base.so"), None)
    if so is None:
        pytest.skip("libggml-base.so not found in the libggml package")
    fn = getattr(ctypes.CDLL(str(so)), "quantize_row_%s_ref" % name.lower().replace("_k", "_K"))
    fn.restype = None
    bs, bpb = G.BLOCK_LAYOUTS[name]
    rng = np.random.default_rng(11)
    x = np.concatenate([tricky(bs, 12), rng.standard_normal((300, bs)) * rng.uniform(1e-3, 10, (300, 1)),
                        rng.standard_t(3, (100, bs))]).astype(np.float32)
    ref = np.zeros((len(x), bpb), np.uint8)
    fn(x.ctypes.data_as(ctypes.c_void_p), ref.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    np.testing.assert_array_equal(G.quantize(x, name), ref)
