"""Observers against plain NumPy references computed on the raw data."""

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from microcnn.quant.params import fake_quantize, qparams_from_range


def batches(seed=0, signed=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):  # growing magnitude forces the histogram to double its range several times
        x = rng.gamma(2.0, 0.5 * (i + 1), size=(3, 4, 5, 5)).astype(np.float32)
        if signed:
            x -= np.float32(0.8 * (i + 1))
        out.append(x)
    return out


def feed(obs, data):
    for x in data:
        obs.observe(x)
    return obs


def raw_error(values, lo, hi, bits):
    scale, zp = qparams_from_range(lo, hi, bits, symmetric=False, signed=False)
    return float(((values - fake_quantize(values, scale, zp, bits, signed=False)) ** 2).sum())


def test_minmax_matches_numpy():
    data = batches(signed=True)
    obs = feed(MinMaxObserver(), data)
    allv = np.concatenate([d.ravel() for d in data])
    assert obs.range(8) == (pytest.approx(min(allv.min(), 0)), pytest.approx(allv.max()))


def test_moving_average_matches_the_formula():
    data = batches(signed=True)
    obs = feed(MovingAverageMinMaxObserver(averaging_constant=0.25), data)
    lo, hi = float(data[0].min()), float(data[0].max())
    for d in data[1:]:
        lo += 0.25 * (float(d.min()) - lo)
        hi += 0.25 * (float(d.max()) - hi)
    assert obs.min_val == pytest.approx(lo) and obs.max_val == pytest.approx(hi)


@pytest.mark.parametrize("signed", [False, True])
def test_histogram_counts_match_numpy_after_range_doublings(signed):
    data = batches(1, signed)
    obs = feed(HistogramObserver(bins=256), data)
    allv = np.concatenate([d.ravel() for d in data]).astype(np.float64)
    assert obs.limit > np.abs(allv).max() >= obs.limit / 4  # doubled at least once, not too far
    pos, _ = np.histogram(allv[allv >= 0], bins=256, range=(0, obs.limit))
    neg, _ = np.histogram(-allv[allv < 0], bins=256, range=(0, obs.limit))
    # merging bins pairwise is exact: only values within rounding of a bin edge may differ
    assert np.abs(obs.pos - pos).sum() <= 2 and np.abs(obs.neg - neg).sum() <= 2
    assert obs.pos.sum() + obs.neg.sum() == allv.size


@pytest.mark.parametrize("p", [99.0, 99.9])
def test_percentile_matches_numpy_percentile(p):
    data = batches(2, signed=True)
    obs = feed(PercentileObserver(percentile=p, bins=1024), data)
    allv = np.concatenate([d.ravel() for d in data])
    lo, hi = obs.range(8)
    # the histogram quantile lies in the bin of the data value where the empirical CDF reaches p
    w = obs.bin_width * (1 + 1e-9)
    assert hi == pytest.approx(np.percentile(allv, p, method="inverted_cdf"), abs=w)
    assert lo == pytest.approx(np.percentile(allv, 100 - p, method="inverted_cdf"), abs=w)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_is_as_good_as_a_brute_force_search_on_raw_data(bits):
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_t(3, size=20000)).astype(np.float32)  # heavy tail: clipping pays
    obs = MSEObserver(candidates=100)
    obs.observe(x)
    lo, hi = obs.range(bits)
    values = x.astype(np.float64)
    brute = min(raw_error(values, 0.0, a * x.max(), bits) for a in np.linspace(0.01, 1, 100))
    assert raw_error(values, lo, hi, bits) <= 1.05 * brute
    assert hi < x.max()  # the outliers are clipped
    assert raw_error(values, lo, hi, bits) < raw_error(values, 0.0, float(x.max()), bits)


def _kl_reference(hist, levels):
    """TensorRT's entropy calibration, written out loop by loop, with the zero bin left out."""
    hist = hist.astype(np.float64)
    hist[0] = 0
    used = int(np.nonzero(hist)[0][-1]) + 1
    best, best_kl = used, np.inf
    for i in range(levels, used + 1):
        p = list(hist[:i])
        p[-1] += hist[i:].sum()
        q = [0.0] * i
        for level in range(levels):
            start, stop = (level * i + levels - 1) // levels, ((level + 1) * i + levels - 1) // levels
            chunk = hist[start:stop]
            nz = (chunk > 0).sum()
            for b in range(start, stop):
                q[b] = chunk.sum() / nz if hist[b] > 0 else 0.0
        p, q = np.array(p) / sum(p), np.array(q) / sum(q)
        kl = sum(pi * np.log(pi / (qi if qi > 0 else 1e-12)) for pi, qi in zip(p, q, strict=True) if pi > 0)
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def test_entropy_threshold_matches_the_reference_algorithm():
    rng = np.random.default_rng(4)
    x = np.concatenate([np.abs(rng.normal(0, 1, 5000)), [40.0, 55.0]]).astype(np.float32)
    obs = EntropyObserver(bins=256, max_candidates=10_000)
    obs.observe(x)
    lo, hi = obs.range(4)
    expected = _kl_reference(obs.pos, 16) * obs.bin_width
    assert lo == 0.0 and hi == pytest.approx(expected)
    assert np.percentile(x, 99) < hi < 40.0  # the two outliers are clipped, the bulk is kept


def test_bad_data_is_refused():
    obs = make_observer("mse", "conv1")
    with pytest.raises(InputError, match="no data"):
        obs.range(8)
    with pytest.raises(InputError, match="NaN"):
        obs.observe(np.array([1.0, np.nan], np.float32))
    with pytest.raises(InputError, match="empty"):
        obs.observe(np.zeros((0, 3), np.float32))
    obs.observe(np.zeros(10, np.float32))
    with pytest.raises(InputError, match="zero range"):
        obs.range(8)
    with pytest.raises(InputError):
        make_observer("kmeans")


def test_ranges_always_contain_zero():
    for kind in ("minmax", "ema", "percentile", "mse", "entropy"):
        obs = make_observer(kind)
        obs.observe(np.linspace(2.0, 3.0, 100, dtype=np.float32))
        lo, hi = obs.range(8)
        assert lo == 0.0 and 2.0 < hi <= 3.0 + 1e-6
