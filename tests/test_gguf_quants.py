"""GGUF block types: bytes identical to gguf-py where it can quantize, dequantization identical
to gguf-py everywhere, llama.cpp reference behaviour (error bounds, idempotence) for the rest."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants as gq  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export import gguf_quants as G  # noqa: E402

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
TERNARY = ["TQ1_0", "TQ2_0"]
KQUANTS: list[str] = []  # grows type by type
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


@pytest.mark.parametrize("name", LEGACY + KQUANTS + TERNARY)
def test_dequantize_random_bytes_identical_to_gguf_py(name):
    """Any byte pattern (finite scales) dequantizes exactly as gguf-py does it."""
    cls = G.get_type(name)
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (40, cls.bytes_per_block), dtype=np.uint8)
    ours = G.dequantize(raw, name)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(raw, GT[name])
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), fin)
    np.testing.assert_array_equal(ours[fin].view(np.uint32), ref[fin].view(np.uint32))


@pytest.mark.parametrize("name", LEGACY + TERNARY)
def test_shapes_keep_leading_axes(name):
    cls = G.get_type(name)
    x = np.random.default_rng(3).standard_normal((2, 3, 2 * cls.block_size)).astype(np.float32)
    raw = G.quantize(x, name)
    assert raw.shape == (2, 3, 2 * cls.bytes_per_block)
    assert G.dequantize(raw, name).shape == x.shape


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


@pytest.mark.parametrize("name", LEGACY + TERNARY)
def test_zero_block_is_all_zero_codes(name):
    cls = G.get_type(name)
    raw = G.quantize(np.zeros((1, cls.block_size), np.float32), name)
    assert np.all(G.dequantize(raw, name) == 0)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0", "TQ1_0", "TQ2_0"])
def test_symmetric_types_idempotent(name):
    """Quantizing a dequantized tensor again gives the same bytes where the largest magnitude
    is on the grid exactly (absmax types: it maps back to the same scale)."""
    cls = G.get_type(name)
    x = cases(cls.block_size)
    x = x[np.abs(x).max(-1) > 1e-20]  # f16-underflowed scales dequantize to zero blocks
    raw = G.quantize(x, name)
    y = G.dequantize(raw, name)
    raw2 = G.quantize(y, name)
    np.testing.assert_array_equal(G.dequantize(raw2, name), y)


def test_bad_input_one_line_errors():
    with pytest.raises(LowbitError, match="not a multiple of the block size 32") as e:
        G.quantize(np.zeros((2, 33), np.float32), "Q4_0")
    assert "\n" not in str(e.value)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((1, 256), np.float32)
        x[0, 5] = bad
        for name in ("Q8_0", "TQ2_0", "F16", "BF16"):
            with pytest.raises(LowbitError, match="NaN/Inf") as e:
                G.quantize(x, name)
            assert "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="bytes per block"):
        G.dequantize(np.zeros((1, 35), np.uint8), "Q8_0")
    with pytest.raises(LowbitError, match="uint8"):
        G.dequantize(np.zeros((1, 34), np.float32), "Q8_0")
    with pytest.raises(LowbitError, match="unknown GGUF block type"):
        G.quantize(np.zeros(32, np.float32), "Q9_9")
    with pytest.raises(LowbitError, match="too large"):
        G.quantize(np.full((1, 32), 1e7, np.float32), "Q8_0")
