"""Calibration observers: hand-computed ranges on small tensors, known distributions for the
histogram searches (Gaussian with planted outliers, uniform), exact re-binning, qparams parity."""

import math

import numpy as np
import pytest
import torch

from lowbit.core.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    get_observer,
    kl_clip_divergence,
)
from lowbit.core.primitives import dequantize, qparams_from_range, quantize
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

INT8_SYM = QuantScheme(bits=8, symmetric=True, granularity="tensor", scale_dtype="float32")
INT8_ASYM = QuantScheme(bits=8, symmetric=False, granularity="tensor", scale_dtype="float32")
INT4_SYM = QuantScheme(bits=4, symmetric=True, granularity="tensor", scale_dtype="float32")
INT4_ASYM = QuantScheme(bits=4, symmetric=False, granularity="tensor", scale_dtype="float32")


def _gaussian_with_outliers(n=1_000_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:5] = 1000.0
    x[5:10] = -1000.0
    return x


@pytest.fixture(scope="module")
def outliers():
    return _gaussian_with_outliers()


@pytest.fixture(scope="module")
def uniform():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1_000_000, generator=g) * 2 - 1


def _feed(obs, x, chunks=4):
    for c in x.chunk(chunks):
        obs.update(c)
    return obs


def _lohi(obs, scheme=None):
    lo, hi = obs.range(scheme)
    return float(lo), float(hi)


# -- min / max ---------------------------------------------------------------------------------


def test_minmax_running_per_tensor():
    o = MinMaxObserver()
    o.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    assert _lohi(o) == (-2.0, 3.0)
    o.update(torch.tensor([-5.0, 2.0]))
    assert _lohi(o) == (-5.0, 3.0)
    o.update(torch.tensor([[[0.0]]]))
    assert _lohi(o) == (-5.0, 3.0)


def test_minmax_per_channel_hand_values_and_torch():
    o = MinMaxObserver(axis=1)
    o.update(torch.tensor([[1.0, -2.0, 4.0], [3.0, 0.5, -1.0]]))
    o.update(torch.tensor([[0.0, 7.0, -3.0]]))
    lo, hi = o.range()
    assert lo.tolist() == [0.0, -2.0, -3.0]
    assert hi.tolist() == [3.0, 7.0, 4.0]

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g) * 3
    o = MinMaxObserver(axis=1)
    o.update(a)
    o.update(b)
    both = torch.cat([a, b])
    lo, hi = o.range()
    assert torch.equal(lo, torch.amin(both, dim=(0, 2)))
    assert torch.equal(hi, torch.amax(both, dim=(0, 2)))
    # negative axis, and per-channel qparams are per channel
    o = MinMaxObserver(axis=-1)
    o.update(a)
    lo, hi = o.range()
    assert torch.equal(lo, a.amin(dim=(0, 1))) and torch.equal(hi, a.amax(dim=(0, 1)))
    s, z = o.qparams(INT8_ASYM)
    s_ref, z_ref = qparams_from_range(lo, hi, INT8_ASYM)
    assert s.shape == (6,) and torch.equal(s, s_ref) and torch.equal(z, z_ref)


def test_minmax_per_channel_mismatch_and_bad_axis():
    o = MinMaxObserver(axis=1)
    o.update(torch.zeros(2, 3))
    with pytest.raises(LowbitError, match="3"):
        o.update(torch.zeros(2, 4))
    with pytest.raises(LowbitError, match="axis 5"):
        MinMaxObserver(axis=5).update(torch.zeros(2, 3))


def test_moving_average_hand_values():
    o = MovingAverageMinMaxObserver(averaging_constant=0.5)
    o.update(torch.tensor([-1.0, 2.0]))
    assert _lohi(o) == (-1.0, 2.0)  # the first batch sets them
    o.update(torch.tensor([-3.0, 4.0]))
    assert _lohi(o) == (-2.0, 3.0)  # -1 + 0.5 * (-3 + 1), 2 + 0.5 * (4 - 2)
    o.update(torch.tensor([1.0, 1.0]))
    assert _lohi(o) == (-0.5, 2.0)  # -2 + 0.5 * (1 + 2), 3 + 0.5 * (1 - 3)
    # default constant 0.01
    o = MovingAverageMinMaxObserver()
    o.update(torch.tensor([-1.0, 1.0]))
    o.update(torch.tensor([-101.0, 101.0]))
    lo, hi = _lohi(o)
    assert lo == pytest.approx(-2.0, abs=1e-6) and hi == pytest.approx(2.0, abs=1e-6)


def test_moving_average_per_channel():
    o = MovingAverageMinMaxObserver(averaging_constant=0.25, axis=0)
    o.update(torch.tensor([[0.0, 4.0], [-4.0, 0.0]]))
    o.update(torch.tensor([[-8.0, 8.0], [-8.0, 8.0]]))
    lo, hi = o.range()
    assert lo.tolist() == [-2.0, -5.0]  # 0 + .25 * -8, -4 + .25 * -4
    assert hi.tolist() == [5.0, 2.0]    # 4 + .25 * 4, 0 + .25 * 8
    with pytest.raises(LowbitError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)


def test_qparams_agree_with_primitives_for_known_range():
    o = MinMaxObserver()
    o.update(torch.tensor([-1.0, 0.25, 3.0]))
    s, z = o.qparams(INT8_ASYM)
    assert float(s) == pytest.approx(4.0 / 255.0, rel=1e-7)
    assert float(z) == 64.0  # round(0 - (-1) / (4 / 255)) = round(63.75)
    s, z = o.qparams(INT8_SYM)
    assert z is None and float(s) == pytest.approx(3.0 / 127.5, rel=1e-7)
    restricted = QuantScheme(bits=8, symmetric=True, granularity="tensor", restricted_range=True,
                             scale_dtype="float32")
    s, _ = o.qparams(restricted)
    assert float(s) == pytest.approx(3.0 / 127.0, rel=1e-7)
    for scheme in (INT8_SYM, INT8_ASYM, INT4_ASYM, restricted, QuantScheme(bits=4, symmetric=False, zero_point="float"),
                   QuantScheme(bits=3, symmetric=True)):
        s, z = o.qparams(scheme)
        s_ref, z_ref = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), scheme)
        assert torch.equal(s, s_ref)
        assert (z is None and z_ref is None) or torch.equal(z, z_ref)


# -- errors and registry -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_nan_inf_refused_with_one_line_error(name):
    o = get_observer(name)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(LowbitError) as e:
            o.update(torch.tensor([1.0, bad, 2.0]))
        assert "1 NaN/Inf" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="no data"):
        o.range()
    o.update(torch.tensor([1.0, -2.0]))  # still usable afterwards: the bad batches left no trace
    lo, hi = o.range(INT8_ASYM)
    assert -2.0 <= float(lo) <= 0.0 and 0.0 < float(hi) <= 1.0


def test_registry_names_and_unknown():
    assert sorted(OBSERVERS) == ["entropy", "minmax", "moving-minmax", "mse", "percentile"]
    assert isinstance(get_observer("percentile", percentile=99.9), PercentileObserver)
    assert get_observer("percentile", percentile=99.9).percentile == 99.9
    assert isinstance(get_observer("moving-minmax", averaging_constant=0.1), MovingAverageMinMaxObserver)
    with pytest.raises(LowbitError) as e:
        get_observer("kl")
    msg = str(e.value)
    assert "'kl'" in msg and "entropy, minmax, moving-minmax, mse, percentile" in msg
    with pytest.raises(LowbitError, match="bad options"):
        get_observer("minmax", percentile=3)


# -- histogram ---------------------------------------------------------------------------------


def test_histogram_rebinning_exact_count_and_mass():
    g = torch.Generator().manual_seed(2)
    # multiples of 1/64 in [-1, 1] with both ends present: R = 1, bin width 1/8, all exact
    a = torch.cat([torch.tensor([-1.0, 1.0]), torch.randint(-64, 65, (5000,), generator=g).float() / 64])
    o = HistogramObserver(n_bins=8)
    o.update(a)
    assert o.R == 1.0 and o.count == 5002
    before = o.counts.clone()
    o.update(torch.tensor([3.0]))  # R grows 1 -> 4 (two doublings): 4 old bins per new bin
    assert o.R == 4.0 and o.count == 5003
    expected = torch.zeros(16, dtype=torch.float64)
    expected[6:10] = before.reshape(4, 4).sum(dim=1)  # old [-1, 1] is new bins 6..9 ([-1, -.5) ...)
    expected[14] += 1  # 3.0 is in [3, 3.5)
    assert torch.equal(o.counts, expected)
    # more data, more growth (4 -> 16): equals the histogram built at the final range directly
    b = torch.randint(-16 * 64, 16 * 64 + 1, (3000,), generator=g).float() / 64
    b[0] = 16.0
    o.update(b)
    assert o.R == 16.0 and o.count == 8003
    allx = torch.cat([a, torch.tensor([3.0]), b]).double().numpy()
    direct, _ = np.histogram(allx, bins=16, range=(-16.0, 16.0))
    assert torch.equal(o.counts, torch.from_numpy(direct).double())
    assert (o.data_min, o.data_max) == (float(allx.min()), 16.0)
    # |x| folding: 8 bins over [0, 16]; a negative value on an edge, -k w, counts in the |x| bin
    # below k w (the signed bins are [k w, (k + 1) w), mirrored they are (k w, (k + 1) w])
    pos, _ = np.histogram(allx[allx >= 0], bins=8, range=(0.0, 16.0))
    neg, _ = np.histogram(allx[allx < 0], bins=8, range=(-16.0, 0.0))
    assert torch.equal(o.abs_counts(), torch.from_numpy(pos + neg[::-1].copy()).double())
    assert float(o.abs_counts().sum()) == 8003


def test_histogram_zeros_before_range_is_known():
    o = HistogramObserver(n_bins=8)
    o.update(torch.zeros(5))
    assert o.count == 5 and o.R is None
    o.update(torch.tensor([-2.0, 2.0]))
    assert o.count == 7 and o.counts[8] == 5  # the five zeros, in bin n = [0, w)
    assert o.counts[15] == 1 and o.counts[0] == 1 and o.counts.sum() == 7  # 2.0 = R: last bin


# -- percentile --------------------------------------------------------------------------------


def test_percentile_uniform(uniform):
    o = _feed(PercentileObserver(percentile=99.0), uniform)
    lo, hi = _lohi(o, INT8_SYM)
    assert hi == -lo and hi == pytest.approx(0.99, abs=2e-3)  # P(|x| <= .99) = .99
    lo, hi = _lohi(o, INT8_ASYM)
    assert lo == pytest.approx(-0.98, abs=2e-3) and hi == pytest.approx(0.98, abs=2e-3)


def test_percentile_clips_planted_outliers(outliers):
    o = _feed(PercentileObserver(), outliers)
    lo, hi = _lohi(o, INT8_SYM)
    # 99.99th percentile of |N(0,1)| is 3.8906 (the 10 outliers move it by ~1e-5 in mass)
    assert 2 < hi < 20 and hi == pytest.approx(3.89, abs=0.1) and lo == -hi
    lo, hi = _lohi(o, INT8_ASYM)
    assert -20 < lo < -2 and 2 < hi < 20  # 0.01% / 99.99% of N(0,1): -/+3.719
    assert lo == pytest.approx(-3.72, abs=0.15) and hi == pytest.approx(3.72, abs=0.15)
    with pytest.raises(LowbitError, match="percentile"):
        PercentileObserver(percentile=30)


# -- min-max keeps the outliers ----------------------------------------------------------------


def test_minmax_keeps_planted_outliers(outliers):
    o = _feed(MinMaxObserver(), outliers)
    assert _lohi(o) == (-1000.0, 1000.0)
    s, _ = o.qparams(INT8_SYM)
    assert float(s) == pytest.approx(1000.0 / 127.5, rel=1e-7)


# -- entropy -----------------------------------------------------------------------------------


def test_kl_divergence_hand_values():
    # window = whole histogram, one bin per level: Q == P, KL = 0
    h = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert kl_clip_divergence(h, 0, 4, 4) == pytest.approx(0.0, abs=1e-15)
    # two levels over four bins: chunks {1,2} and {3,4} flattened to {1.5,1.5}, {3.5,3.5}
    p = np.array([1, 2, 3, 4]) / 10
    q = np.array([1.5, 1.5, 3.5, 3.5]) / 10
    assert kl_clip_divergence(h, 0, 4, 2) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12)
    # clip to [0, 2) with 2 levels: P = (1, 2 + 3 + 4) / 10, Q = in-window (1, 2) / 3
    p = np.array([1, 9]) / 10
    q = np.array([1, 2]) / 3
    assert kl_clip_divergence(h, 0, 2, 2) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12)
    # an empty bin inside a chunk stays empty in Q: 3 levels over 4 bins -> chunks {0, 1}, {2}, {3};
    # chunk {0, 1} puts all its mass 4 on bin 0, so Q == P
    h = torch.tensor([4.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    assert kl_clip_divergence(h, 0, 4, 3) == pytest.approx(0.0, abs=1e-15)
    # 2 levels over 4 bins: chunk {0, 1} -> (4, 0) stays, chunk {2, 3} -> (2, 2) stays: KL 0 ...
    assert kl_clip_divergence(h, 0, 4, 2) == pytest.approx(0.0, abs=1e-15)
    # ... but with h = (4, 1, 2, 2) chunk {0, 1} is flattened to (2.5, 2.5)
    h1 = torch.tensor([4.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    p = np.array([4, 1, 2, 2]) / 9
    q = np.array([2.5, 2.5, 2, 2]) / 9
    assert kl_clip_divergence(h1, 0, 4, 2) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12)
    # a tail folded into a chunk with no in-window mass: Q has nothing there -> 1e-4
    h2 = torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)
    expected = 0.4 * math.log(0.4 / 1.0) + 0.6 * math.log(0.6 / 1e-4)
    assert kl_clip_divergence(h2, 0, 2, 2) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(LowbitError, match="narrower"):
        kl_clip_divergence(h, 0, 2, 3)


def _naive_kl(h, a, b, m):
    """The definition, one bin at a time."""
    h = [float(v) for v in h]
    L = b - a
    P = h[a:b]
    P[0] += sum(h[:a])
    P[-1] += sum(h[b:])
    chunks = {}
    for i in range(L):
        chunks.setdefault(i * m // L, []).append(i)
    Q = [0.0] * L
    for bins in chunks.values():
        mass = sum(h[a + i] for i in bins)
        full = [i for i in bins if P[i] > 0]
        for i in full:
            Q[i] = mass / len(full)
    sp, sq = sum(P), sum(h[a:b])
    kl = 0.0
    for pi, qi in zip(P, Q):
        if pi > 0:
            q = qi / sq if qi > 0 else 1e-4
            kl += pi / sp * math.log(pi / sp / q)
    return kl


def test_kl_divergence_matches_naive_definition():
    g = torch.Generator().manual_seed(8)
    for trial in range(40):
        n = int(torch.randint(8, 60, (1,), generator=g))
        h = torch.randint(0, 6, (n,), generator=g).double() * (torch.rand(n, generator=g) < 0.7)
        h[int(torch.randint(0, n, (1,), generator=g))] += 1  # never all empty
        m = int(torch.randint(2, 9, (1,), generator=g))
        a = int(torch.randint(0, n - m + 1, (1,), generator=g))
        b = int(torch.randint(a + m, n + 1, (1,), generator=g))
        if h[a:b].sum() == 0:
            continue
        assert kl_clip_divergence(h, a, b, m) == pytest.approx(_naive_kl(h.tolist(), a, b, m), rel=1e-10, abs=1e-12)


def test_entropy_uniform_threshold_is_one(uniform):
    for scheme in (INT8_SYM, INT4_SYM, INT8_ASYM, INT4_ASYM):
        o = EntropyObserver()
        o.update(uniform)
        lo, hi = _lohi(o, scheme)
        assert hi == pytest.approx(1.0, rel=0.03), scheme
        assert lo == pytest.approx(-1.0, rel=0.03), scheme


def test_entropy_clips_planted_outliers(outliers):
    # default 2048 bins over |x| <= 1000: bin width 0.488. int4 needs >= 8 bins per window
    o = _feed(EntropyObserver(), outliers)
    lo, hi = _lohi(o, INT4_SYM)
    assert 2 < hi < 20 and lo == -hi
    # int8 needs >= 128 bins (62.5): the outliers are clipped, but the 2048-bin resolution
    # does not allow a threshold below 128 * 1000 / 2048 ...
    lo, hi = _lohi(o, INT8_SYM)
    assert 128 * 1000 / 2048 <= hi < 100
    # ... 65536 bins (width 0.0153) do
    o = _feed(EntropyObserver(n_bins=65536), outliers)
    lo, hi = _lohi(o, INT8_SYM)
    assert 2 < hi < 20 and lo == -hi
    lo, hi = _lohi(o, INT8_ASYM)
    assert -20 < lo < -2 and 2 < hi < 20


# -- MSE ---------------------------------------------------------------------------------------


def _true_mse(x, lo, hi, scheme):
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), scheme)
    s, z = s.reshape(1, 1), None if z is None else z.reshape(1, 1)
    X = x.reshape(1, -1)
    Xh = dequantize(quantize(X, s, z, scheme), s, z, scheme)
    return float(((X.double() - Xh.double()) ** 2).mean())


@pytest.mark.parametrize("scheme,lo,hi", [
    (INT4_SYM, -2.5, 2.5), (INT4_ASYM, -2.0, 3.0), (INT8_SYM, -1.0, 1.0),
    (QuantScheme(bits=4, symmetric=False, zero_point="float", granularity="tensor"), -1.7, 2.3),
    (QuantScheme(bits=3, symmetric=True, restricted_range=True, granularity="tensor"), -3.0, 3.0),
])
def test_mse_estimate_matches_fake_quantized_samples(scheme, lo, hi):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200_000, generator=g)
    o = MSEObserver()
    o.update(x)
    est = float(o.expected_mse(torch.tensor([lo]), torch.tensor([hi]), scheme)[0])
    assert est == pytest.approx(_true_mse(x, lo, hi, scheme), rel=0.01)


def test_mse_uniform_threshold_is_one(uniform):
    for scheme in (INT8_SYM, INT4_SYM, INT8_ASYM, INT4_ASYM):
        o = MSEObserver()
        o.update(uniform)
        lo, hi = _lohi(o, scheme)
        assert hi == pytest.approx(1.0, rel=0.03), scheme
        assert lo == pytest.approx(-1.0, rel=0.03), scheme


def test_mse_gaussian_optimum_matches_brute_force():
    # 4-bit symmetric on N(0,1) (s = T / 7.5): the sample MSE scanned over T in steps of 0.01 is
    # smallest at T = 2.55; the observer, from its histogram alone, must land there
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300_000, generator=g)
    o = MSEObserver()
    o.update(x)
    lo, hi = _lohi(o, INT4_SYM)
    grid = np.arange(1.5, 4.51, 0.01)
    true = [_true_mse(x, -t, t, INT4_SYM) for t in grid]
    best = grid[int(np.argmin(true))]
    assert best == pytest.approx(2.55, abs=0.015)
    assert hi == pytest.approx(best, abs=0.03) and lo == -hi
    assert _true_mse(x, lo, hi, INT4_SYM) <= min(true) * 1.001
    # asymmetric (two free ends): no worse than the best of a 21 x 21 grid of (lo, hi) pairs
    x = x[:100_000]
    o = MSEObserver()
    o.update(x)
    lo, hi = _lohi(o, INT4_ASYM)
    grid = [(a, b) for a in np.arange(-3.6, -1.99, 0.08) for b in np.arange(2.0, 3.61, 0.08)]
    best = min(_true_mse(x, a, b, INT4_ASYM) for a, b in grid)
    assert _true_mse(x, lo, hi, INT4_ASYM) <= best * 1.001
    assert -3.0 < lo < -2.0 and 2.0 < hi < 3.0


def test_mse_planted_outliers(outliers):
    # ±1000 outliers, 10 of 1e6: clipping them to T ~ 4 costs 10 * 996^2 ~ 1e7 squared error,
    # while keeping them costs at most the Gaussian's own energy (~1e6: everything rounds to 0).
    # So the MSE optimum honestly keeps them, at every bit width ...
    o = _feed(MSEObserver(), outliers)
    for scheme in (INT8_SYM, INT4_SYM):
        lo, hi = _lohi(o, scheme)
        assert hi > 900 and lo == -hi
    # ... and clips them once clipping is cheaper than the rounding noise it removes:
    # 10 outliers at ±30 with int4: clipping at ~4 costs 10 * 26^2 ~ 7e3, keeping them costs
    # ~1e6 (step 4 rounds N(0,1) to 0)
    x = outliers.clone()
    x[:10] = torch.sign(x[:10]) * 30
    o = _feed(MSEObserver(), x)
    lo, hi = _lohi(o, INT4_SYM)
    assert 2 < hi < 20 and lo == -hi
    lo, hi = _lohi(o, INT4_ASYM)
    assert -20 < lo < -2 and 2 < hi < 20


# -- more distributions and inputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def relu():
    g = torch.Generator().manual_seed(6)
    return torch.relu(torch.randn(1_000_000, generator=g))  # half the samples exactly 0


def test_relu_outputs_asymmetric_ranges(relu):
    o = _feed(EntropyObserver(), relu)
    assert o.exact_zeros == int((relu == 0).sum()) and o.count == 1_000_000
    lo, hi = _lohi(o, INT8_ASYM)
    # the spike of exact zeros is left out of the KL: without that the threshold fell to ~1.9
    assert lo == 0.0 and 3.0 < hi < 6.0
    o = _feed(MSEObserver(), relu)
    lo, hi = _lohi(o, INT8_ASYM)
    assert lo == 0.0 and 3.0 < hi < 6.0
    lo, hi = _lohi(o, INT4_ASYM)
    assert lo == 0.0 and 2.0 < hi < 4.0
    o = _feed(PercentileObserver(), relu)
    lo, hi = _lohi(o, INT8_ASYM)
    # P(max(0, X) <= t) = Phi(t) for t >= 0, so the 99.99% point is Phi^-1(.9999) = 3.719
    assert 0.0 <= lo < 1e-3 and hi == pytest.approx(3.72, abs=0.05)


def test_mse_exact_zeros_are_a_point_mass():
    # zeros are on every integer-zero-point grid: adding 3 exact zeros to (-1, 1) changes the
    # summed squared error by exactly nothing (spread over their bin [0, 1/8) they would add
    # ~3 s^2 / 12), so mean * count agrees
    with_zeros, without = MSEObserver(n_bins=8), MSEObserver(n_bins=8)
    with_zeros.update(torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0]))
    without.update(torch.tensor([-1.0, 1.0]))
    for scheme in (INT8_ASYM, INT4_SYM):
        for hi in (1.0, 0.7):
            e5 = float(with_zeros.expected_mse(torch.tensor([-1.0]), torch.tensor([hi]), scheme)[0])
            e2 = float(without.expected_mse(torch.tensor([-1.0]), torch.tensor([hi]), scheme)[0])
            assert e5 * 5 == pytest.approx(e2 * 2, rel=1e-12) and e2 > 0
    # clipping: the top bin [7/8, 1] is uniform, its error on [0, 0.5] is the mean of
    # (x - 0.5)^2 over it = ((1/2)^3 - (3/8)^3) / 3 / (1/8); the bottom bin [-1, -7/8) is
    # rounded on int8's fine grid (s = 1.5 / 255); 5 samples
    e = float(with_zeros.expected_mse(torch.tensor([-1.0]), torch.tensor([0.5]), INT8_ASYM)[0])
    clip = ((0.5) ** 3 - (0.375) ** 3) / 3 / 0.125
    assert e == pytest.approx((clip + (1.5 / 255) ** 2 / 12) / 5, rel=1e-2)


def test_histogram_grows_when_outliers_arrive_late():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    late = x[500_000:].clone()
    late[:5], late[5:10] = 1000.0, -1000.0
    for o in (EntropyObserver(), PercentileObserver(), MinMaxObserver()):
        o.update(x[:500_000])
        o.update(late)
    ent, pct, mm = (EntropyObserver(), PercentileObserver(), MinMaxObserver())
    for o in (ent, pct, mm):
        o.update(x[:500_000])
        r0 = o.R if hasattr(o, "R") else None
        o.update(late)
        if r0 is not None:
            assert o.R == r0 * 256 and o.count == 1_000_000  # 4.66 * 2^8 >= 1000
    assert _lohi(mm) == (-1000.0, 1000.0)
    lo, hi = _lohi(ent, INT4_SYM)
    assert 2 < hi < 20 and lo == -hi
    lo, hi = _lohi(pct, INT8_SYM)
    assert hi == pytest.approx(3.89, abs=0.15)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_all_zero_input_and_qparams_through_primitives(name):
    o = get_observer(name)
    o.update(torch.zeros(3, 4))
    assert _lohi(o, INT8_SYM) == (0.0, 0.0) and _lohi(o, INT8_ASYM) == (0.0, 0.0)
    # any shape, any float dtype; qparams are qparams_from_range of range(scheme)
    g = torch.Generator().manual_seed(7)
    o.update((torch.randn(2, 3, 50, generator=g) * 2).to(torch.bfloat16))
    for scheme in (INT8_SYM, INT4_ASYM, QuantScheme(bits=4, symmetric=False, zero_point="float", granularity="tensor")):
        lo, hi = o.range(scheme)
        s, z = o.qparams(scheme)
        s_ref, z_ref = qparams_from_range(lo, hi, scheme)
        assert torch.equal(s, s_ref) and ((z is None and z_ref is None) or torch.equal(z, z_ref))
        assert float(lo) <= 0.0 <= float(hi)


def test_minmax_low_precision_inputs_exact():
    o = MinMaxObserver()
    o.update(torch.tensor([[0.5, -1.25]], dtype=torch.float16))
    o.update(torch.tensor([3.0, -0.125], dtype=torch.bfloat16).reshape(1, 1, 2))
    assert _lohi(o) == (-1.25, 3.0)
    o = MinMaxObserver()
    o.update(torch.tensor([1.0 + 1e-12, -3], dtype=torch.float64))  # float64 is not rounded to fp32
    assert _lohi(o) == (-3.0, 1.0 + 1e-12)
    o = MinMaxObserver()
    o.update(torch.tensor([[3, -7]]))  # integer activations are fine too
    assert _lohi(o) == (-7.0, 3.0)
