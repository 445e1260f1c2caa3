"""NF4 with double quantization: codebooks, layout, error bounds, and byte equality with bitsandbytes.

The byte-exact checks run twice: against ``tests/data/nf4_bnb_fixture.json`` (written by
``tests/data/make_nf4_fixture.py`` with bitsandbytes 0.50.2 on CPU), always; and against
bitsandbytes itself when it can be imported (``pip install -r requirements-peers.txt``).
"""

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from lowbit import checkpoint
from lowbit.algorithms.base import make_method
from lowbit.algorithms.nf4 import NF4Config, dynamic8_encode, nf4_quantize
from lowbit.calibration.sequential import apply_data_free
from lowbit.algorithms import get_method
from lowbit.formats import get_format
from lowbit.errors import LowbitError
from lowbit.formats.nf4 import DYNAMIC_MAP_8BIT, NF4_CODEBOOK, NF4Weight, pack_nibbles, unpack_nibbles
from lowbit.nn.linear import QuantizedLinear
from lowbit.nn.replace import replacement
from tests.tiny import tiny_llama

FIXTURE = Path(__file__).parent / "data" / "nf4_bnb_fixture.json"

# the float32 constants of bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4"))
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


# -- deterministic inputs that need no RNG of torch (the fixture's inputs are rebuilt from these) --
def exact_input(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Values (2u - 1)·2^e with u from Python's MT19937 (reproducible across versions) and e in
    -4..2, rounded once to float32; one block of 64 zeros, and one block scaled by 2^-20."""
    rng = random.Random(seed)
    vals = [(2.0 * rng.random() - 1.0) * 2.0 ** rng.randrange(-4, 3) for _ in range(rows * cols)]
    x = torch.tensor(vals, dtype=torch.float64)
    x[640:704] = 0.0
    x[1024:1088] *= 2.0**-20
    return x.to(torch.float32).reshape(rows, cols)


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


# -- codebooks ---------------------------------------------------------------------------------------
def test_nf4_codebook_is_bitsandbytes_float32_table():
    assert NF4_CODEBOOK.dtype == torch.float32
    assert NF4_CODEBOOK.tolist() == BNB_NF4  # exact float32 values
    assert torch.all(NF4_CODEBOOK[1:] > NF4_CODEBOOK[:-1])
    assert NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[15] == 1.0


def test_nf4_codebook_recomputed_from_normal_quantiles():
    """QLoRA §3: 8 positive quantiles of N(0,1) at evenly spaced probabilities from 0.5 to
    delta = 0.9677083 (9 points, the 0.5 one dropped), 7 negative ones (8 points), an exact 0,
    normalised by the largest. Agrees with the stored table to ~1 float32 ulp."""
    delta = 0.9677083
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    v = v / v.max()
    assert v.numel() == 16
    err = (v - NF4_CODEBOOK.double()).abs().max().item()
    assert err < 1.5e-7, err


def test_dynamic_map_8bit():
    m = DYNAMIC_MAP_8BIT
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert torch.all(m[1:] > m[:-1])
    assert m[255] == 1.0 and (m == 0).sum() == 1
    assert m[0].item() == pytest.approx(-(1 - 0.9 / 128), abs=1e-7)  # -0.99297: no -1 in the map
    assert m[m > 0].min().item() == pytest.approx(1e-6 * 0.55, rel=1e-6)  # smallest decade: one value
    assert m.tolist() == load_fixture()["dynamic_map"]


# -- packing -----------------------------------------------------------------------------------------
def test_pack_nibbles_first_element_in_high_nibble():
    codes = torch.tensor([1, 2, 3, 4, 15, 0, 9], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0x34, 0xF0, 0x97]  # odd count padded with code 7 (= 0.0)
    assert torch.equal(unpack_nibbles(packed, 7), codes)


def test_pack_unpack_round_trip_exact():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 63, 64, 1001):
        codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        packed = pack_nibbles(codes)
        assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
        assert torch.equal(unpack_nibbles(packed, n), codes)
    with pytest.raises(LowbitError, match="0..15"):
        pack_nibbles(torch.tensor([16]))
    with pytest.raises(LowbitError, match="0..15"):
        pack_nibbles(torch.tensor([3, -1]))
    with pytest.raises(LowbitError, match="expected"):
        unpack_nibbles(torch.zeros(3, dtype=torch.uint8), 7)


# -- quantization ------------------------------------------------------------------------------------
def test_block_absmax_exact_over_flattened_tensor():
    W = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    w = nf4_quantize(W, NF4Config(double_quant=False))
    flat = W.reshape(-1)  # row-major: blocks straddle rows (100 is not a multiple of 64)
    want = torch.stack([flat[i:i + 64].abs().max() for i in range(0, 300, 64)])
    assert w.absmax.shape == (5,) and torch.equal(w.absmax, want)  # last block: 44 values
    assert torch.equal(w.block_absmax(), want)
    # the element that is a block's absmax is coded as exactly +-1
    codes = w.codes().long()
    for b in range(5):
        i = b * 64 + flat[b * 64:(b + 1) * 64].abs().argmax().item()
        assert NF4_CODEBOOK[codes[i]].item() == math.copysign(1.0, flat[i].item())


def test_codes_are_nearest_levels():
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(2)) * 0.02
    w = nf4_quantize(W, NF4Config())
    a = torch.stack([W.reshape(-1)[i:i + 64].abs().max() for i in range(0, W.numel(), 64)])
    x = W.reshape(-1) / a.repeat_interleave(64)[: W.numel()]
    dist = (x[:, None] - NF4_CODEBOOK[None, :]).abs()
    chosen = dist.gather(1, w.codes().long()[:, None]).squeeze(1)
    assert torch.all(chosen <= dist.min(dim=1).values + 1e-7)


def test_dynamic8_encode_nearest_up_to_table_resolution():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    codes, c1 = dynamic8_encode(x, 256)
    assert c1.shape == (4,)  # 1000 = 3·256 + 232
    assert torch.equal(c1, torch.stack([x[i:i + 256].abs().max() for i in range(0, 1000, 256)]))
    v = x / c1.repeat_interleave(256)[:1000]
    dist = (v[:, None] - DYNAMIC_MAP_8BIT[None, :]).abs()
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    # nearest, up to one step (2/65535) of the 65,536-point table bitsandbytes' CPU kernel rounds through
    assert torch.all(chosen <= dist.min(dim=1).values + 2.0 / 65535 + 1e-7)
    assert (chosen == dist.min(dim=1).values).float().mean() > 0.99


def test_error_bound_with_double_quant():
    """|W - Ŵ| <= (largest NF4 gap / 2) · a + |a - â|, a the true block absmax, â the decoded one,
    and |a - â| <= (largest dynamic-map gap / 2 + rounding-table step) · nested absmax."""
    W = torch.randn(64, 200, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.01, 1, 200)
    w = nf4_quantize(W, NF4Config())
    flat = W.reshape(-1)
    a = torch.stack([flat[i:i + 64].abs().max() for i in range(0, flat.numel(), 64)])
    a_hat = w.block_absmax()
    c1 = w.nested_absmax.repeat_interleave(256)[: a.numel()]
    dq_gap = (DYNAMIC_MAP_8BIT[1:] - DYNAMIC_MAP_8BIT[:-1]).max()
    assert torch.all((a - a_hat).abs() <= (dq_gap / 2 + 2 / 65535) * c1 * (1 + 1e-6))
    assert (a - a_hat).abs().max() < 0.01 * a.max()
    nf4_gap = (NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()
    assert nf4_gap.item() == pytest.approx(1 - 0.6961928009986877)
    err = (flat - w.dequantize().reshape(-1)).abs()
    block = torch.arange(flat.numel()) // 64
    bound = nf4_gap / 2 * a[block] + (a - a_hat).abs()[block]
    assert torch.all(err <= bound * (1 + 1e-6) + 1e-12)
    # and the no-double-quant version meets the tighter bound
    w1 = nf4_quantize(W, NF4Config(double_quant=False))
    err1 = (flat - w1.dequantize().reshape(-1)).abs()
    assert torch.all(err1 <= nf4_gap / 2 * a[block] * (1 + 1e-6))


def test_nf4_beats_uniform_int4_on_gaussian_weights():
    """The point of NormalFloat: on normal weights, lower MSE than symmetric absmax int4 at the
    same block size (measured ratio 0.79), about the same as asymmetric int4 g64 (1.01), which
    stores 4.31 bits/weight against NF4's 4.13."""
    from lowbit.core.primitives import fake_quantize
    from lowbit.core.scheme import QuantScheme

    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(6))
    mse = (W - nf4_quantize(W, NF4Config()).dequantize()).pow(2).mean()
    sym = (W - fake_quantize(W, QuantScheme(4, True, "group", 64))).pow(2).mean()
    asym = (W - fake_quantize(W, QuantScheme(4, False, "group", 64))).pow(2).mean()
    assert mse < 0.85 * sym
    assert mse < 1.05 * asym


def test_zero_weights():
    w = nf4_quantize(torch.zeros(2, 100), NF4Config())
    assert torch.equal(w.dequantize(), torch.zeros(2, 100))
    assert torch.all(w.codes() == 7)
    w1 = nf4_quantize(torch.zeros(2, 100), NF4Config(double_quant=False))
    assert w1.absmax[0] == 0.0 and w1.absmax[-1].item() == pytest.approx(1e-38, rel=1e-4)  # bnb's tail clamp
    assert torch.equal(w1.dequantize(), torch.zeros(2, 100))


def test_bits_per_weight():
    W = torch.randn(576, 576)
    n = 576 * 576
    w = nf4_quantize(W, NF4Config())
    nb = n // 64  # 5184 blocks -> 21 nested constants
    assert w.nbytes == n // 2 + nb + 4 * math.ceil(nb / 256) + 4
    assert w.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 * 21 / n + 32 / n)
    assert w.bits_per_weight == pytest.approx(4.127, abs=1e-3)
    w1 = nf4_quantize(W, NF4Config(double_quant=False))
    assert w1.bits_per_weight == 4.5
    assert nf4_quantize(W, NF4Config(blocksize=128)).bits_per_weight == pytest.approx(4 + 8 / 128 + 32 * 11 / n + 32 / n)


def test_config_and_input_errors():
    for bad in (dict(blocksize=48), dict(blocksize=8), dict(blocksize=0), dict(blocksize=True),
                dict(blocksize=64.0), dict(dq_blocksize=100), dict(dq_blocksize=-256), dict(double_quant="yes")):
        with pytest.raises(LowbitError, match="nf4"):
            NF4Config(**bad)
    with pytest.raises(LowbitError, match="NaN/Inf"):
        nf4_quantize(torch.tensor([[1.0, float("nan")]]), NF4Config())
    with pytest.raises(LowbitError, match="empty"):
        nf4_quantize(torch.zeros(0, 4), NF4Config())
    with pytest.raises(LowbitError, match="does not take"):
        make_method("nf4", bits=4)
    assert make_method("nf4", blocksize=128, double_quant=False).config == NF4Config(128, False)


def test_from_tensors_validates():
    w = nf4_quantize(torch.randn(4, 100), NF4Config())
    t, meta = w.tensors(), w.meta()
    assert set(t) == {"qweight", "absmax", "nested_absmax", "offset"} and meta["format"] == "nf4"
    assert json.loads(json.dumps(meta)) == meta
    w2 = get_format("nf4").from_tensors(t, meta)
    assert torch.equal(w2.dequantize(), w.dequantize())
    cases = [
        (dict(t, qweight=t["qweight"][:-1]), meta, "qweight"),
        (dict(t, absmax=t["absmax"].float()), meta, "absmax"),
        ({k: v for k, v in t.items() if k != "offset"}, meta, "lacks"),
        (dict(t, nested_absmax=torch.full_like(t["nested_absmax"], float("inf"))), meta, "NaN/Inf"),
        (t, dict(meta, blocksize=48), "power of two"),
        (t, dict(meta, shape=[4, 0]), "shape"),
        (t, {"format": "nf4"}, "malformed"),
    ]
    for tensors, m, msg in cases:
        with pytest.raises(LowbitError, match=msg):
            NF4Weight.from_tensors(tensors, m)
    w1 = nf4_quantize(torch.randn(4, 100), NF4Config(double_quant=False))
    with pytest.raises(LowbitError, match="tensor .offset."):  # only double quantization stores it
        NF4Weight.from_tensors(dict(w1.tensors(), offset=torch.zeros(1)), w1.meta())


# -- byte equality with bitsandbytes -----------------------------------------------------------------
def _check_case(case: dict, W: torch.Tensor):
    w = nf4_quantize(W, NF4Config())
    w1 = nf4_quantize(W, NF4Config(double_quant=False))
    if "qweight_hex" in case:
        assert w.qweight.numpy().tobytes().hex() == case["qweight_hex"]
        assert w.absmax.numpy().tobytes().hex() == case["absmax_codes_hex"]
        assert w1.absmax.tolist() == case["absmax_fp32"]
        assert w.dequantize().reshape(-1).tolist() == case["dequant_fp32"]
    else:
        assert sha(w.qweight) == case["qweight_sha256"]
        assert sha(w.absmax) == case["absmax_codes_sha256"]
        assert sha(w1.absmax) == case["absmax_fp32_sha256"]
        assert sha(w.dequantize()) == case["dequant_fp32_sha256"]
    assert torch.equal(w1.qweight, w.qweight)
    assert w.nested_absmax.tolist() == case["nested_absmax"]
    assert w.offset.tolist() == [case["offset"]]
    assert sha(w1.dequantize()) == case["dequant_nodq_fp32_sha256"]
    assert sha(w.dequantize(torch.float16)) == case["dequant_fp16_sha256"]
    assert sha(w.dequantize(torch.bfloat16)) == case["dequant_bf16_sha256"]


def test_matches_stored_bitsandbytes_fixture():
    fx = load_fixture()
    assert fx["bitsandbytes"].startswith("0.50")
    small = fx["cases"]["small_3x100"]
    W = torch.tensor(small["input"], dtype=torch.float32).reshape(small["shape"])
    _check_case(small, W)
    odd = fx["cases"]["odd_7x9"]
    _check_case(odd, torch.tensor(odd["input"], dtype=torch.float32).reshape(odd["shape"]))
    large = fx["cases"]["large_37x1001"]
    W = exact_input(37, 1001, seed=large["seed"])
    assert sha(W) == large["input_sha256"]
    _check_case(large, W)


@pytest.mark.parametrize("shape", [(3, 100), (7, 9), (5,), (300, 301), (64, 576), (2, 64 * 256 * 2 + 5)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_matches_bitsandbytes(shape, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    W.view(-1)[:64] = 0.0  # one all-zero block
    q, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=double_quant)
    w = nf4_quantize(W, NF4Config(double_quant=double_quant))
    assert torch.equal(q.reshape(-1), w.qweight)
    if double_quant:
        assert torch.equal(st.absmax, w.absmax)
        assert torch.equal(st.state2.absmax, w.nested_absmax)
        assert torch.equal(st.offset.reshape(1), w.offset)
        assert torch.equal(st.state2.code, DYNAMIC_MAP_8BIT)
    else:
        assert torch.equal(st.absmax, w.absmax)
    assert torch.equal(st.code, NF4_CODEBOOK)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        st.dtype = dtype
        assert torch.equal(F.dequantize_4bit(q, st).reshape(shape), w.dequantize(dtype))


# -- the method in a model ---------------------------------------------------------------------------
def test_quantized_linear_uses_nf4():
    lin = torch.nn.Linear(100, 12)
    qm = replacement(lin, get_method("nf4")(NF4Config()).apply("x", lin))
    assert isinstance(qm, QuantizedLinear) and isinstance(qm.weight_format, NF4Weight)
    x = torch.randn(5, 100)
    want = torch.nn.functional.linear(x, nf4_quantize(lin.weight, NF4Config()).dequantize(), lin.bias)
    assert torch.equal(qm(x), want)
    assert qm.weight_format.dq_blocksize == 256 and qm.weight_format.shape == (12, 100)


@pytest.mark.parametrize("double_quant", [True, False])
def test_save_load_tiny_model_identical_logits(tmp_path, double_quant):
    model = tiny_llama()
    meth = make_method("nf4", double_quant=double_quant)
    apply_data_free(model, meth, progress=False)
    qmods = checkpoint.quantized_modules(model)
    assert len(qmods) == 3 * 7 and all(isinstance(m.weight_format, NF4Weight) for m in qmods.values())
    rec = {"method": meth.describe(), "base_model": {"kind": "test"}, "calibration": None}
    out = checkpoint.save(model, None, tmp_path / "q", rec)
    loaded, _, rec2 = checkpoint.load(out)
    x = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert rec2["method"] == {"method": "nf4", "config": {"blocksize": 64, "double_quant": double_quant,
                                                          "dq_blocksize": 256}}
    meta = next(iter(rec2["modules"].values()))
    assert meta["format"] == "nf4" and meta["dq_blocksize"] == (256 if double_quant else None)
