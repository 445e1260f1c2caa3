"""Calibration observers: watch activations, then choose a quantization range for them.

Every observer has the same three calls:

* ``update(x)`` — any shape, any float dtype; statistics accumulate over calls. NaN/Inf input is
  refused with a one-line :class:`LowbitError` (it would silently poison the range).
* ``range(scheme=None) -> (lo, hi)`` — the chosen real range (0-d tensors, or 1-d per channel for
  min-max observers built with ``axis``). Histogram observers search a range that depends on the
  scheme (number of levels, symmetric or not); ``None`` means :data:`DEFAULT_SCHEME` (int8,
  symmetric, per-tensor).
* ``qparams(scheme) -> (scale, zero_point)`` — ``grid.qparams_from_range(lo, hi, scheme)``,
  so symmetric / asymmetric, full / restricted range and float zero-points all behave exactly as
  for weights. (The scheme's granularity is a weight notion and is ignored here: an observer is
  per-tensor unless built per-channel.)

Observers by name (:data:`OBSERVERS`, :func:`get_observer`):

=================  ==========================================================================
``minmax``         running min / max (per tensor, or per channel along ``axis``)
``moving-minmax``  first batch sets min / max, then an exponential moving average of the
                   per-batch min / max: ``m <- m + c * (batch_m - m)``
``percentile``     symmetric: the ``percentile`` of |x|; asymmetric: the ``100 - percentile``
                   and ``percentile`` percentiles of x (from the histogram, linear within a bin)
``entropy``        KL-divergence (TensorRT-style) threshold search on the histogram
``mse``            expected quantization MSE (rounding + clipping) minimised on the histogram
=================  ==========================================================================

The histogram (:class:`HistogramObserver`)
-------------------------------------------
One histogram of x over a range symmetric about zero, ``[-R, R]``, with ``2 * n_bins`` equal bins
of width ``w = R / n_bins`` (bin ``j`` covers ``[(j - n_bins) w, (j - n_bins + 1) w)``; x = R goes
into the last bin). Folding bin ``n_bins + k`` onto bin ``n_bins - 1 - k`` gives the histogram of
|x| with ``n_bins`` bins over ``[0, R]`` (used for symmetric schemes; a negative value exactly on
an edge, -k w, lands in the |x| bin below k w); the signed histogram serves
asymmetric ones. The exact data min and max are tracked alongside.

The first batch with a non-zero value sets ``R = max |x|`` (zeros seen before are kept aside and
added to the bin of 0). When a later batch reaches beyond ``R``, the range grows to
``R' = 2^k R`` with the smallest k such that ``R' >= max |x|``. Then every new bin is exactly the
union of ``2^k`` consecutive old bins (old bin ``j`` lies wholly inside new bin
``((2^k - 1) n_bins + j) // 2^k``), so re-binning only adds integer counts together: the total
count and the mass of every region that is a union of new bins are preserved exactly, and the
result equals the histogram built directly at the final range (whenever the bin index of a value
is computed exactly, e.g. ``R`` a power of two times ``n_bins``). Counts are float64 (exact up to
2^53 samples).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.core.grid import qparams_from_range
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError

DEFAULT_SCHEME = QuantScheme(bits=8, symmetric=True, granularity="tensor")


def _checked(x: Tensor, who: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise LowbitError(f"{who}.update expects a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise LowbitError(f"{who}.update got an empty tensor of shape {tuple(x.shape)}")
    x = x.detach()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise LowbitError(f"{who}.update got {bad} NaN/Inf values in a tensor of shape {tuple(x.shape)}")
    return x if x.dtype == torch.float64 else x.float()  # float64 stays exact, the rest -> fp32


class Observer:
    """Base class: ``update`` checks and forwards to ``_observe``; ``qparams`` goes through
    ``qparams_from_range`` on ``range(scheme)``."""

    name = "observer"

    def update(self, x: Tensor) -> None:
        self._observe(_checked(x, type(self).__name__))

    def _observe(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self, scheme: QuantScheme | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def qparams(self, scheme: QuantScheme) -> tuple[Tensor, Tensor | None]:
        lo, hi = self.range(scheme)
        return qparams_from_range(lo, hi, scheme)

    def _empty(self) -> LowbitError:
        return LowbitError(f"{type(self).__name__} has seen no data; call update(x) before range()/qparams()")


# -- min / max ---------------------------------------------------------------------------------


class MinMaxObserver(Observer):
    """Running min and max over everything seen (per tensor), or per channel along ``axis``
    (every update must then have the same size along that axis)."""

    name = "minmax"

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: Tensor | None = None
        self.max: Tensor | None = None

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.axis is None:
            return x.amin(), x.amax()
        if not -x.dim() <= self.axis < x.dim():
            raise LowbitError(f"{type(self).__name__}: axis {self.axis} is out of range "
                              f"for a tensor of shape {tuple(x.shape)}")
        xc = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if self.min is not None and xc.shape[0] != self.min.shape[0]:
            raise LowbitError(f"{type(self).__name__}: axis {self.axis} has {xc.shape[0]} channels, "
                              f"earlier updates had {self.min.shape[0]}")
        return xc.amin(dim=1), xc.amax(dim=1)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    def range(self, scheme: QuantScheme | None = None) -> tuple[Tensor, Tensor]:
        if self.min is None:
            raise self._empty()
        return self.min.clone(), self.max.clone()


class MovingAverageMinMaxObserver(MinMaxObserver):
    """The first batch sets min/max; each later batch moves them towards its own min/max:
    ``min <- min + c * (batch_min - min)`` (same for max), ``c = averaging_constant``."""

    name = "moving-minmax"

    def __init__(self, averaging_constant: float = 0.01, axis: int | None = None):
        if not 0.0 < averaging_constant <= 1.0:
            raise LowbitError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        super().__init__(axis)
        self.averaging_constant = float(averaging_constant)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            c = self.averaging_constant
            self.min = self.min + c * (lo - self.min)
            self.max = self.max + c * (hi - self.max)


# -- histogram ---------------------------------------------------------------------------------


def _candidate_indices(first: int, last: int, max_count: int) -> Tensor:
    """Integers in [first, last]: all of them if there are at most ``max_count``, else about
    ``max_count`` geometrically spaced ones (fine near ``first``, coarse far away) including both
    ends — relative resolution matters for thresholds, and outliers make ``last`` huge."""
    if last < first:
        return torch.empty(0, dtype=torch.long)
    if last - first + 1 <= max_count:
        return torch.arange(first, last + 1)
    start = max(first, 1)
    g = torch.logspace(math.log10(start), math.log10(last), max_count, dtype=torch.float64)
    idx = torch.cat([torch.tensor([first, last], dtype=torch.float64), g.round()]).long()
    return torch.unique(idx.clamp(first, last))


def _bracket(coarse: list[int], best: int, max_count: int) -> list[int]:
    """Candidates between the neighbours of ``best`` in the sorted ``coarse`` list."""
    i = coarse.index(best)
    lo, hi = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
    return _candidate_indices(lo, hi, max_count).tolist()


class HistogramObserver(Observer):
    """Histogram of x over a growing symmetric range ``[-R, R]`` (see the module docstring for
    the exact re-binning rule). Its own ``range`` is the data min / max; subclasses search a
    clipped range on the histogram."""

    name = "histogram"

    def __init__(self, n_bins: int = 2048):
        if not isinstance(n_bins, int) or n_bins < 8:
            raise LowbitError(f"n_bins must be an integer >= 8, got {n_bins!r}")
        self.n_bins = n_bins
        self.R: float | None = None
        self.counts = torch.zeros(2 * n_bins, dtype=torch.float64)
        self.data_min = math.inf
        self.data_max = -math.inf
        self._zeros_pending = 0  # zeros seen while R was still undefined
        self.exact_zeros = 0  # how many of the samples are exactly 0 (they sit in bin [0, w))

    # total number of samples seen
    @property
    def count(self) -> float:
        return float(self.counts.sum()) + self._zeros_pending

    @property
    def bin_width(self) -> float:
        if self.R is None:
            raise self._empty()
        return self.R / self.n_bins

    def edges(self) -> Tensor:
        """The ``2 * n_bins + 1`` edges of the signed histogram, float64."""
        n = self.n_bins
        return (torch.arange(-n, n + 1, dtype=torch.float64)) * self.bin_width

    def counts_without_zeros(self) -> Tensor:
        """The signed histogram less the samples that are exactly 0 (bin ``n_bins`` holds them)."""
        h = self.counts.clone()
        h[self.n_bins] -= self.exact_zeros
        return h

    def abs_counts(self) -> Tensor:
        """Histogram of |x|: ``n_bins`` bins over ``[0, R]`` (the signed one folded at 0)."""
        n = self.n_bins
        return self.counts[n:] + self.counts[:n].flip(0)

    def _grow(self, new_absmax: float) -> None:
        k = 0
        while self.R * 2.0**k < new_absmax:
            k += 1
        if k == 0:
            return
        n, f = self.n_bins, 2**k
        old = torch.arange(2 * n, dtype=torch.long)
        target = ((f - 1) * n + old) // f
        grown = torch.zeros_like(self.counts)
        grown.index_add_(0, target, self.counts)
        self.counts = grown
        self.R = self.R * f

    def _observe(self, x: Tensor) -> None:
        x = x.reshape(-1).double()
        lo, hi = float(x.min()), float(x.max())
        self.data_min, self.data_max = min(self.data_min, lo), max(self.data_max, hi)
        absmax = max(abs(lo), abs(hi))
        self.exact_zeros += int((x == 0).sum())
        if self.R is None:
            if absmax == 0.0:
                self._zeros_pending += x.numel()
                return
            self.R = absmax
        elif absmax > self.R:
            self._grow(absmax)
        n = self.n_bins
        idx = torch.floor(x * (n / self.R)).long().clamp(-n, n - 1) + n
        self.counts.index_add_(0, idx, torch.ones_like(x))
        if self._zeros_pending:
            self.counts[n] += self._zeros_pending
            self._zeros_pending = 0

    def _require(self) -> None:
        if self.data_min > self.data_max:
            raise self._empty()

    def _all_zero(self) -> bool:
        return self.R is None

    def range(self, scheme: QuantScheme | None = None) -> tuple[Tensor, Tensor]:
        self._require()
        return torch.tensor(self.data_min), torch.tensor(self.data_max)

    def _zero_range(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(0.0), torch.tensor(0.0)


# -- percentile --------------------------------------------------------------------------------


def _quantile_from_hist(counts: Tensor, edges: Tensor, q: float) -> float:
    """Value below which a fraction ``q`` of the mass lies, linear within the bin."""
    cdf = torch.cumsum(counts, 0)
    total = float(cdf[-1])
    target = q * total
    j = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype))[0].clamp(max=len(counts) - 1))
    below = float(cdf[j - 1]) if j > 0 else 0.0
    inside = float(counts[j])
    frac = 0.0 if inside == 0 else min(max((target - below) / inside, 0.0), 1.0)
    return float(edges[j] + frac * (edges[j + 1] - edges[j]))


class PercentileObserver(HistogramObserver):
    """Symmetric schemes: ``T`` = the ``percentile`` of |x|, range ``[-T, T]``. Asymmetric: the
    ``100 - percentile`` and ``percentile`` percentiles of x. Both are read off the histogram
    (linear interpolation inside the bin) and never reach beyond the data min / max."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, n_bins: int = 2048):
        if not 50.0 < percentile <= 100.0:
            raise LowbitError(f"percentile must be in (50, 100], got {percentile!r}")
        super().__init__(n_bins)
        self.percentile = float(percentile)

    def range(self, scheme: QuantScheme | None = None) -> tuple[Tensor, Tensor]:
        self._require()
        scheme = scheme or DEFAULT_SCHEME
        if self._all_zero():
            return self._zero_range()
        p = self.percentile / 100.0
        if scheme.symmetric:
            absmax = max(abs(self.data_min), abs(self.data_max))
            edges = torch.arange(self.n_bins + 1, dtype=torch.float64) * self.bin_width
            t = min(_quantile_from_hist(self.abs_counts(), edges, p), absmax)
            return torch.tensor(-t), torch.tensor(t)
        edges = self.edges()
        lo = max(_quantile_from_hist(self.counts, edges, 1.0 - p), self.data_min)
        hi = min(_quantile_from_hist(self.counts, edges, p), self.data_max)
        return torch.tensor(lo), torch.tensor(hi)


# -- entropy (KL) ------------------------------------------------------------------------------


_KL_EPS = 1e-4  # probability given to a bin of P that Q leaves empty (TensorRT-style smoothing)


class _KLTable:
    """Prefix sums of a histogram so that the divergence of any window costs O(non-empty bins
    in it + levels) rather than O(window width) — outliers make windows very wide."""

    def __init__(self, h: Tensor):
        self.h = h.double()
        zero = torch.zeros(1, dtype=torch.float64)
        self.cum = torch.cat([zero, torch.cumsum(self.h, 0)])
        self.cnz = torch.cat([zero, torch.cumsum((self.h > 0).double(), 0)])
        self.nz = torch.nonzero(self.h).flatten()

    def divergence(self, a: int, b: int, levels: int) -> float:
        h, cum, cnz = self.h, self.cum, self.cnz
        L = b - a
        left, right = float(cum[a]), float(cum[-1] - cum[b])
        nz = self.nz[(self.nz >= a) & (self.nz < b)]
        S = torch.unique(torch.cat([nz, torch.tensor([a] if left > 0 else [] , dtype=torch.long),
                                    torch.tensor([b - 1] if right > 0 else [], dtype=torch.long)]))
        P = h[S].clone()
        P[S == a] += left
        P[S == b - 1] += right
        # bin i of the window is in chunk (i m) // L, so chunk k = bins [ceil(k L / m), ceil((k + 1) L / m))
        k = torch.arange(levels + 1)
        bounds = a + (k * L + levels - 1) // levels
        mass = cum[bounds[1:]] - cum[bounds[:-1]]          # in-window mass of each chunk (unfolded)
        count = cnz[bounds[1:]] - cnz[bounds[:-1]]         # non-empty bins of h in each chunk
        chunk = ((S - a) * levels) // L
        fold_only = h[S] == 0                              # bins that are non-empty only in P
        count = count.index_add(0, chunk[fold_only], torch.ones(int(fold_only.sum()), dtype=torch.float64))
        total_p, total_q = float(P.sum()), float(mass.sum())
        p = P / total_p
        q = mass[chunk] / count[chunk] / max(total_q, 1e-300)
        q = torch.where(q > 0, q, torch.full_like(q, _KL_EPS))
        return float((p * torch.log(p / q)).sum())


def kl_clip_divergence(h: Tensor, a: int, b: int, levels: int) -> float:
    """KL(P || Q) for clipping the histogram ``h`` to the bin window ``[a, b)`` (``b - a >= levels``).

    P: ``h[a:b]`` with the mass left of the window added to its first bin and the mass right of
    it added to its last bin (the clipped tails land on the range ends), normalised.
    Q: what a ``levels``-level quantizer keeps of the window: the window's ``L = b - a`` bins are
    split into ``levels`` consecutive chunks (bin i of the window goes to chunk
    ``i * levels // L``); each chunk's in-window mass (``h``, tails *not* folded) is spread
    uniformly over the chunk's bins where P > 0; normalised. Folding the tails makes P differ
    from Q exactly where clipping hurts, and merging bins makes them differ where rounding hurts.
    Bins with P > 0 that Q leaves empty (a tail landing in an otherwise empty chunk) get
    probability ``1e-4``. KL = sum over P > 0 of ``p * log(p / q)``.
    """
    if b - a < levels:
        raise LowbitError(f"KL window of {b - a} bins is narrower than the {levels} quantization levels")
    return _KLTable(h).divergence(a, b, levels)


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (after NVIDIA TensorRT's entropy calibrator).

    Symmetric schemes, on the |x| histogram (``n_bins`` bins of width w over [0, R]):
    ``levels = (qmax - qmin + 1) // 2`` (int8: 128), candidate windows ``[0, i)`` for i from
    ``levels`` to the last non-empty bin + 1 (all of them, or ``max_candidates`` geometrically
    spaced ones when there are more, then every i between the best one's neighbours); the one
    with the smallest
    :func:`kl_clip_divergence` (first on ties) gives ``T = min(i * w, max|x|)`` and the range
    ``[-T, T]``. If the data spans fewer than ``levels`` bins, nothing is clipped (``T = max|x|``).

    Asymmetric schemes, on the signed histogram: ``levels = qmax - qmin + 1`` and windows
    ``[a, b)`` with a on the negative side and b on the positive side of the zero bin (each from
    up to ``max_candidates_side`` geometrically spaced distances from 0, the data ends included),
    ``b - a >= levels``; the best pair of that grid is refined by coordinate descent (one end at a
    time, up to 3 rounds) over the distances between its two grid neighbours on each side; the
    final window gives ``(max(a_edge, min), min(b_edge, max))``.

    Samples that are exactly 0 (ReLU outputs: often half of them) are left out of P and Q: 0 is
    on every integer-zero-point grid, so they are quantized exactly whatever the range (with a
    float zero-point nearly so), and as a spike inside the
    first bin they would otherwise dominate the divergence and drag the threshold down.

    The threshold resolution is the bin width: with far outliers (R large) the smallest threshold
    that can be tried is ``levels * R / n_bins`` — raise ``n_bins`` if that is too coarse.
    """

    name = "entropy"

    def __init__(self, n_bins: int = 2048, max_candidates: int = 512, max_candidates_side: int = 32):
        super().__init__(n_bins)
        self.max_candidates = max_candidates
        self.max_candidates_side = max_candidates_side
        self.last_divergence: float | None = None

    def range(self, scheme: QuantScheme | None = None) -> tuple[Tensor, Tensor]:
        self._require()
        scheme = scheme or DEFAULT_SCHEME
        if self._all_zero():
            return self._zero_range()
        w = self.bin_width
        if scheme.symmetric:
            levels = (scheme.qmax - scheme.qmin + 1) // 2
            h = self.abs_counts()
            h[0] -= self.exact_zeros
            if not bool((h > 0).any()):
                return self._zero_range()
            absmax = max(abs(self.data_min), abs(self.data_max))
            last = int(torch.nonzero(h)[-1]) + 1
            cands = _candidate_indices(levels, last, self.max_candidates)
            if len(cands) == 0:
                self.last_divergence = 0.0
                return torch.tensor(-absmax), torch.tensor(absmax)
            table = _KLTable(h)
            coarse = cands.tolist()
            kl = [table.divergence(0, i, levels) for i in coarse]
            best = int(torch.argmin(torch.tensor(kl)))
            best_kl, best_i = kl[best], coarse[best]
            for i in _bracket(coarse, best_i, self.max_candidates):  # every bin between the neighbours
                d = table.divergence(0, i, levels)
                if d < best_kl or (d == best_kl and i < best_i):
                    best_kl, best_i = d, i
            self.last_divergence = best_kl
            t = min(best_i * w, absmax)
            return torch.tensor(-t), torch.tensor(t)
        levels = scheme.qmax - scheme.qmin + 1
        h, n = self.counts_without_zeros(), self.n_bins
        if not bool((h > 0).any()):
            return self._zero_range()
        nzi = torch.nonzero(h).flatten()
        first, last = int(nzi[0]), int(nzi[-1]) + 1
        if last - first <= levels:
            self.last_divergence = 0.0
            return torch.tensor(self.data_min), torch.tensor(self.data_max)
        # distances from the zero bin boundary (index n) to the window ends
        table = _KLTable(h)

        def window(da: int, db: int) -> tuple[int, int]:
            a = max(n - da, first)
            return a, min(max(n + db, a + 1), last)

        def kl(da: int, db: int) -> float:
            a, b = window(da, db)
            return table.divergence(a, b, levels) if b - a >= levels else math.inf

        da_max, db_max = max(n - first, 0), max(last - n, 0)
        best_kl, best = math.inf, (da_max, db_max)
        coarse_a = _candidate_indices(0, da_max, self.max_candidates_side).tolist()
        coarse_b = _candidate_indices(0, db_max, self.max_candidates_side).tolist()
        for da in coarse_a:  # coarse grid
            for db in coarse_b:
                d = kl(da, db)
                if d < best_kl:
                    best_kl, best = d, (da, db)
        fine_a = _bracket(coarse_a, best[0], self.max_candidates_side * 4)
        fine_b = _bracket(coarse_b, best[1], self.max_candidates_side * 4)
        for _ in range(3):  # then coordinate descent between the coarse neighbours, one end at a time
            moved = False
            for side, fine in ((0, fine_a), (1, fine_b)):
                for v in fine:
                    cand = (v, best[1]) if side == 0 else (best[0], v)
                    d = kl(*cand)
                    if d < best_kl:
                        best_kl, best, moved = d, cand, True
            if not moved:
                break
        best_ab = window(*best)
        self.last_divergence = best_kl
        a, b = best_ab
        lo = max((a - n) * w, self.data_min)
        hi = min((b - n) * w, self.data_max)
        return torch.tensor(lo), torch.tensor(hi)


# -- MSE ---------------------------------------------------------------------------------------


def _round_err_antiderivative(y: Tensor, s: Tensor) -> Tensor:
    """G(y) = integral of r(t)^2 from -s/2 to y, where r(t) = t - s * round(t / s)."""
    k = torch.round(y / s)
    u = y - k * s
    return k * s**3 / 12.0 + (u**3 + s**3 / 8.0) / 3.0


class MSEObserver(HistogramObserver):
    """Range minimising the expected quantization MSE computed from the histogram.

    For a candidate range [lo, hi]: ``(s, z) = qparams_from_range(lo, hi, scheme)`` (the exact
    scale / zero-point that would be used, fp16 rounding included); the quantizer maps x to
    ``s * (clamp(round(x / s + z), qmin, qmax) - z)``. Assuming the samples of each histogram bin
    ``[a, b)`` are spread uniformly over it, the bin's expected squared error is computed exactly:
    inside ``[cl, ch] = [s (qmin - z), s (qmax - z)]`` the rounding error, integrated in closed
    form from the periodic residual (one period contributes s^3 / 12); outside, the clipping
    error ``(x - cl)^2`` or ``(x - ch)^2`` integrated in closed form. Samples that are exactly 0
    are counted as a point mass at 0, not spread over their bin. The MSE is the
    count-weighted mean (:meth:`expected_mse`).

    Candidates: symmetric ``[-T, T]`` with T = k w (w the bin width, k from 1 to the last
    non-empty |x| bin, or ``max_candidates`` geometrically spaced values refined by trying every
    k between the best one's neighbours), capped at max|x|;
    asymmetric pairs (lo, hi) of bin edges on either side of 0 (``max_candidates_side`` each,
    geometric in distance from 0, capped at the data min / max), the best pair then refined by
    coordinate descent (one end at a time, up to 3 rounds) over ``max_candidates`` geometric
    distances per side. The smallest MSE wins (first on ties).

    MSE weighs outliers by their squared size, so it keeps far outliers whenever clipping them
    costs more than the rounding error their range causes: 10 samples at ±1000 among 10^6 from
    N(0, 1) are kept at every bit width (clipping them costs ~10^7 in summed squared error,
    keeping them at most ~10^6, the Gaussian's own energy, which then rounds to 0).
    """

    name = "mse"

    def __init__(self, n_bins: int = 2048, max_candidates: int = 512, max_candidates_side: int = 32):
        super().__init__(n_bins)
        self.max_candidates = max_candidates
        self.max_candidates_side = max_candidates_side
        self.last_mse: float | None = None

    def expected_mse(self, lo: Tensor, hi: Tensor, scheme: QuantScheme) -> Tensor:
        """Expected squared error per sample for each candidate range (``lo``, ``hi`` 1-d)."""
        self._require()
        lo = torch.as_tensor(lo, dtype=torch.float64).reshape(-1)
        hi = torch.as_tensor(hi, dtype=torch.float64).reshape(-1)
        s, z = qparams_from_range(lo.float(), hi.float(), scheme)
        s = s.double()[:, None]
        z = torch.zeros_like(s) if z is None else z.double()[:, None]
        total = self.count
        if self._all_zero():
            return torch.zeros(lo.shape, dtype=torch.float64)
        edges = self.edges()
        h = self.counts_without_zeros()
        nzb = torch.nonzero(h).flatten()
        zero = torch.zeros(1, dtype=torch.float64)
        # the exact zeros are one more "bin" squeezed to the point 0
        c = torch.cat([h[nzb], zero + self.exact_zeros])[None, :]
        a = torch.cat([edges[nzb].clamp(min=self.data_min), zero])[None, :]
        b = torch.cat([edges[nzb + 1].clamp(max=self.data_max), zero])[None, :]
        width = b - a
        cl, ch = s * (scheme.qmin - z), s * (scheme.qmax - z)
        # rounding part, on [max(a, cl), min(b, ch)], in the shifted variable y = x + z s
        ra, rb = torch.maximum(a, cl), torch.minimum(b, ch)
        G = _round_err_antiderivative
        rounding = torch.where(rb > ra, G(rb + z * s, s) - G(ra + z * s, s), torch.zeros_like(ra))
        below = torch.where(a < cl, ((torch.minimum(b, cl) - cl) ** 3 - (a - cl) ** 3) / 3.0, torch.zeros_like(a))
        above = torch.where(b > ch, ((b - ch) ** 3 - (torch.maximum(a, ch) - ch) ** 3) / 3.0, torch.zeros_like(b))
        integral = rounding + below + above
        # a bin squeezed to a point by the data min / max: its samples sit at that point
        point = width <= 0
        if point.any():
            xp = a.expand_as(integral)
            y = xp + z * s
            q = torch.clamp(torch.round(y / s), scheme.qmin, scheme.qmax)
            err_point = (xp - s * (q - z)) ** 2
            per_bin = torch.where(point, err_point, integral / width.clamp(min=1e-300))
        else:
            per_bin = integral / width
        return (per_bin * c).sum(dim=1) / total

    def _sym(self, k: list[int], absmax: float) -> tuple[Tensor, Tensor]:
        t = (torch.tensor(k, dtype=torch.float64) * self.bin_width).clamp(max=absmax)
        return -t, t

    def range(self, scheme: QuantScheme | None = None) -> tuple[Tensor, Tensor]:
        self._require()
        scheme = scheme or DEFAULT_SCHEME
        if self._all_zero():
            return self._zero_range()
        w, n = self.bin_width, self.n_bins
        if scheme.symmetric:
            absmax = max(abs(self.data_min), abs(self.data_max))
            last = int(torch.nonzero(self.abs_counts())[-1]) + 1
            coarse = _candidate_indices(1, last, self.max_candidates).tolist()
            mse = self.expected_mse(*self._sym(coarse, absmax), scheme)
            k = coarse[int(torch.argmin(mse))]
            fine = _bracket(coarse, k, self.max_candidates)  # every bin between the neighbours
            lo, hi = self._sym(fine, absmax)
            mse = self.expected_mse(lo, hi, scheme)
            best = int(torch.argmin(mse))
            self.last_mse = float(mse[best])
            return lo[best].clone(), hi[best].clone()
        nzi = torch.nonzero(self.counts).flatten()
        first, last = int(nzi[0]), int(nzi[-1]) + 1

        def lo_cands(count: int) -> Tensor:
            return (_candidate_indices(0, max(n - first, 0), count).double() * -w).clamp(min=self.data_min).unique()

        def hi_cands(count: int) -> Tensor:
            return (_candidate_indices(0, max(last - n, 0), count).double() * w).clamp(max=self.data_max).unique()

        def best_of(LO: Tensor, HI: Tensor) -> tuple[float, float, float]:
            ok = HI > LO
            LO, HI = LO[ok], HI[ok]
            if len(LO) == 0:
                return math.inf, 0.0, 0.0
            mse = self.expected_mse(LO, HI, scheme)
            i = int(torch.argmin(mse))
            return float(mse[i]), float(LO[i]), float(HI[i])

        LO, HI = torch.meshgrid(lo_cands(self.max_candidates_side), hi_cands(self.max_candidates_side), indexing="ij")
        err, lo, hi = best_of(LO.reshape(-1), HI.reshape(-1))  # coarse grid
        fine_lo, fine_hi = lo_cands(self.max_candidates), hi_cands(self.max_candidates)
        for _ in range(3):  # then coordinate descent on the fine candidates, one end at a time
            moved = False
            e1, l1, _ = best_of(fine_lo, torch.full_like(fine_lo, hi))
            if e1 < err:
                err, lo, moved = e1, l1, True
            e2, _, h2 = best_of(torch.full_like(fine_hi, lo), fine_hi)
            if e2 < err:
                err, hi, moved = e2, h2, True
            if not moved:
                break
        self.last_mse = err
        return torch.tensor(lo), torch.tensor(hi)


# -- by name -----------------------------------------------------------------------------------

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving-minmax": MovingAverageMinMaxObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
    "percentile": PercentileObserver,
}


def get_observer(name: str, **kwargs) -> Observer:
    """A new observer by name, e.g. ``get_observer("percentile", percentile=99.9)``."""
    if name not in OBSERVERS:
        raise LowbitError(f"unknown observer {name!r}; available: {', '.join(sorted(OBSERVERS))}")
    try:
        return OBSERVERS[name](**kwargs)
    except TypeError as e:
        raise LowbitError(f"observer {name!r}: bad options {sorted(kwargs)} ({e})") from None
