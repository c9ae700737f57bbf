"""Observers on hand-made data with closed-form answers, their saved state, their settings and the
histogram helpers, beyond the reference comparisons of test_quant_observers.py. Found by mutation
testing (docs/mutation-python.md)."""

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.quant.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    _kl,
    _quantile,
    kl_threshold,
    make_observer,
)
from microcnn.quant.params import qparams_from_range
from tests.test_quant_observers import _kl_reference, raw_error

RNG = np.random.default_rng(5)
SIGNED = [RNG.normal(0.3, 1.0 + i, size=(2, 3, 4)).astype(np.float32) for i in range(4)]


def feed(obs, data=SIGNED):
    for x in data:
        obs.observe(x)
    return obs


@pytest.mark.parametrize("kind", sorted(OBSERVERS))
def test_saved_state_restores_the_same_range_and_count(kind):
    obs = feed(make_observer(kind, "t", **({} if kind in ("minmax", "ema") else {"bins": 256})))
    copy = make_observer(kind, "t", **obs.params())
    copy.load_state({k: np.array(v) for k, v in obs.state().items()})
    assert copy.count == obs.count == sum(x.size for x in SIGNED)
    assert copy.params() == obs.params()
    for bits in (4, 8):
        assert copy.range(bits) == obs.range(bits)
    obs.observe(SIGNED[0])  # the copy is independent of the original
    assert copy.count == obs.count - SIGNED[0].size


def test_observer_settings_are_reported_as_given():
    assert MovingAverageMinMaxObserver(averaging_constant=0.3).params() == {"averaging_constant": 0.3}
    assert PercentileObserver(bins=128, percentile=99.5).params() == {"bins": 128, "percentile": 99.5}
    assert MSEObserver(bins=64, candidates=7).params() == {"bins": 64, "candidates": 7}
    assert EntropyObserver(bins=96, max_candidates=33).params() == {"bins": 96, "max_candidates": 33}
    assert MinMaxObserver().params() == {}


def test_histogram_state_of_the_wrong_size_or_sign_is_refused():
    obs = HistogramObserver(bins=64)
    good = {"pos": np.zeros(64), "neg": np.zeros(64), "scalars": np.array([1.0, -1.0, 1.0]),
            "count": np.array([0])}
    obs.load_state(good)
    one_negative = np.zeros(64)
    one_negative[7] = -1
    for key, bad in [("pos", np.zeros(63)), ("neg", np.zeros(128)), ("pos", one_negative),
                     ("neg", one_negative)]:
        with pytest.raises(InputError, match="64 bins"):
            HistogramObserver(bins=64).load_state(good | {key: bad})


@pytest.mark.parametrize("make, ok, bad", [
    (lambda v: MovingAverageMinMaxObserver(averaging_constant=v), [1.0, 1e-9], [0.0, 1.0 + 1e-9]),
    (lambda v: PercentileObserver(percentile=v), [100.0, 50.001], [50.0, 100.001]),
    (lambda v: HistogramObserver(bins=v), [64, 68], [60, 66, 64.0]),
])
def test_setting_boundaries(make, ok, bad):
    for v in ok:
        make(v)
    for v in bad:
        with pytest.raises(InputError):
            make(v)


def test_moving_average_with_constant_one_follows_the_last_batch():
    obs = feed(MovingAverageMinMaxObserver(averaging_constant=1.0))
    assert (obs.min_val, obs.max_val) == (float(SIGNED[-1].min()), float(SIGNED[-1].max()))


def test_qparams_of_a_known_range():
    obs = MinMaxObserver()
    obs.observe(np.array([-1.0, 0.5, 3.0], np.float32))
    scale, zp = obs.qparams(8)
    assert scale == np.float32(4 / 255) and zp == 64  # 0 - (-1) / (4/255) = 63.75 -> 64
    assert obs.qparams(4) == qparams_from_range(-1.0, 3.0, 4, symmetric=False, signed=False)


def test_histogram_of_zeros_then_data_keeps_the_zeros_in_the_zero_bin():
    obs = HistogramObserver(bins=64)
    obs.observe(np.zeros(5, np.float32))
    assert obs.limit == 0.0 and obs.pos[0] == 5
    obs.observe(np.array([1.0, -0.5, 0.25], np.float32))
    assert obs.limit > 1.0 and obs.limit == pytest.approx(1.0, rel=1e-5)
    assert obs.pos[0] == 5 and obs.pos.sum() == 7 and obs.neg.sum() == 1
    # bin = floor(|x| / (R / 64)) with R just above 1: 0.25 -> 15, 0.5 -> 31, 1.0 -> 63
    assert obs.pos[63] == 1 and obs.pos[15] == 1 and obs.neg[31] == 1


def test_histogram_layout_matches_numpy_over_minus_r_to_r():
    obs = feed(HistogramObserver(bins=128))
    edges, counts = obs.histogram()
    values = np.concatenate([x.ravel() for x in SIGNED]).astype(np.float64)
    np.testing.assert_allclose(edges, np.linspace(-obs.limit, obs.limit, 257))
    want, _ = np.histogram(values, bins=edges)
    assert np.abs(counts - want).sum() <= 2  # values within rounding of an edge may land either side
    assert counts.sum() == values.size and obs.bin_width == obs.limit / 128


def test_quantile_interpolates_within_a_bin():
    edges = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    counts = np.array([1, 0, 2, 1])
    assert _quantile(edges, counts, 0.25) == pytest.approx(-1.0)  # the whole first bin
    assert _quantile(edges, counts, 0.5) == pytest.approx(0.5)  # half of the [0, 1) bin
    assert _quantile(edges, counts, 0.875) == pytest.approx(1.5)
    assert _quantile(edges, counts, 1.0) == pytest.approx(2.0)
    assert _quantile(edges, counts, 0.0) == pytest.approx(-2.0)


def test_percentile_100_is_the_full_range_and_non_negative_data_starts_at_zero():
    obs = feed(PercentileObserver(bins=256, percentile=100.0))
    lo, hi = obs.range(8)
    assert (lo, hi) == (pytest.approx(obs.min_val), pytest.approx(obs.max_val))
    pos = PercentileObserver(bins=256, percentile=90.0)
    x = np.arange(1, 1001, dtype=np.float32)
    pos.observe(x)
    lo, hi = pos.range(8)
    assert lo == 0.0 and hi == pytest.approx(900.0, abs=pos.bin_width)


def test_signed_entropy_threshold_matches_the_reference_on_both_signs():
    x = np.concatenate([RNG.normal(0, 1, 4000), -np.abs(RNG.normal(0, 0.5, 1000)), [30.0, -25.0]])
    obs = EntropyObserver(bins=256, max_candidates=10_000)
    obs.observe(x.astype(np.float32))
    lo, hi = obs.range(4)
    t = _kl_reference(obs.pos + obs.neg, 2**3) * obs.bin_width  # 2**(bits-1) levels per sign
    assert hi == pytest.approx(t) and lo == pytest.approx(-t)
    assert 2.0 < t < 25.0


def test_entropy_threshold_is_capped_by_the_observed_extremes():
    obs = EntropyObserver(bins=64)
    obs.observe(np.array([-0.5, 0.1, 0.2, 3.0], np.float32))
    lo, hi = obs.range(8)  # few bins in use: all kept, threshold = the top of the last used bin
    assert lo == -0.5 and hi == 3.0


def test_kl_threshold_when_fewer_bins_than_levels_are_used():
    hist = np.zeros(64)
    hist[[1, 5, 9]] = [3, 1, 2]
    assert kl_threshold(hist, 16) == 10
    assert kl_threshold(np.zeros(64), 16) == 1


def test_kl_threshold_candidates_are_strided_but_start_at_levels():
    hist = np.ones(100)
    hist[99] = 50.0  # a heavy last bin: keeping everything is best
    assert kl_threshold(hist, 8, max_candidates=1000) == 100
    assert kl_threshold(hist, 8, max_candidates=4) == 100  # step (100 - 8) // 4 = 23 still reaches 100


def test_kl_divergence_closed_form():
    p, q = np.array([1.0, 3.0, 0.0]), np.array([2.0, 2.0, 4.0])
    want = 0.25 * np.log(0.25 / 0.25) + 0.75 * np.log(0.75 / 0.25)
    assert _kl(p, q) == pytest.approx(want)
    assert _kl(p, np.zeros(3)) == np.inf
    assert _kl(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(0.5 * np.log(0.5 / 1e-12)
                                                                             + 0.5 * np.log(0.5))


def test_mse_on_two_point_data_keeps_the_full_range():
    # values exactly 0 and 1: at alpha = 1 both are grid points (error 0); any clipping costs error
    obs = MSEObserver(bins=64, candidates=10)
    obs.observe(np.array([0.0] * 10 + [1.0] * 10, np.float32))
    assert obs.range(4) == (0.0, pytest.approx(1.0))


def test_mse_clips_a_lone_negative_outlier_as_well_as_a_brute_force_search():
    x = np.concatenate([np.linspace(-1, 1, 20001), [-40.0]]).astype(np.float32)
    obs = MSEObserver(bins=256, candidates=40)
    obs.observe(x)
    lo, hi = obs.range(4)
    alpha = hi / 1.0  # the range is alpha * [min, max] = alpha * [-40, 1]
    assert lo == pytest.approx(-40.0 * alpha, rel=1e-6)
    values = x.astype(np.float64)
    brute = min(raw_error(values, -40.0 * a, a, 4) for a in np.linspace(1.0, 1 / 40, 40))
    assert raw_error(values, lo, hi, 4) <= 1.05 * brute
    assert -40.0 < lo and raw_error(values, lo, hi, 4) < 0.9 * raw_error(values, -40.0, 1.0, 4)  # clipped


def test_plain_histogram_observer_gives_the_observed_range_and_names_itself():
    obs = HistogramObserver(bins=64)
    with pytest.raises(InputError, match="histogram observer of tensor: no data"):
        obs.range(8)
    obs.observe([[-0.75, 0.5], [2.0, 1.0]])  # any array-like
    assert obs.range(8) == (-0.75, 2.0) and obs.params() == {"bins": 64} and obs.count == 4
    with pytest.raises(InputError, match="bits"):
        obs.range(9)


def test_a_custom_observer_inherits_the_generic_name_and_must_define_its_state():
    class Constant(Observer):
        def _observe(self, x):
            self.min_val, self.max_val = -1.0, 1.0

        def _range(self, bits):
            return self.min_val, self.max_val

    obs = Constant("t")
    with pytest.raises(InputError, match="^observer observer of t: no data"):
        obs.range(8)
    obs.observe(np.ones(3))
    assert obs.range(4) == (-1.0, 1.0) and obs.params() == {}
    with pytest.raises(NotImplementedError):
        obs.state()
    with pytest.raises(NotImplementedError):
        obs.load_state({})


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [8, 16])
def test_kl_threshold_matches_the_reference_on_heavy_tailed_histograms(seed, levels):
    rng = np.random.default_rng(seed)
    hist = np.floor(2000 * np.exp(-np.arange(120) / rng.uniform(5, 20))) + rng.integers(0, 3, 120)
    hist[rng.integers(60, 120, 4)] += rng.integers(20, 200, 4)  # outliers far out
    hist[0] = 0
    assert kl_threshold(hist, levels, max_candidates=10_000) == _kl_reference(hist, levels)


@pytest.mark.parametrize("kind", sorted(OBSERVERS))
def test_only_all_zero_data_is_a_zero_range(kind):
    def observed(*values):
        obs = make_observer(kind, "conv1", **({} if kind in ("minmax", "ema") else {"bins": 64}))
        obs.observe(np.array(values, np.float32))
        return obs

    with pytest.raises(InputError, match="conv1: every calibration value is 0"):
        observed(0.0, 0.0).range(8)
    assert observed(2.0, 2.0).range(8) == (0.0, pytest.approx(2.0))  # constant, but not zero
    lo, hi = observed(-1.0, 0.0, -0.5).range(8)  # non-positive: the range ends at 0
    assert hi == 0.0 and -1.0 <= lo < -0.4


@pytest.mark.parametrize("kind", ["mse", "entropy"])
def test_default_bit_width_is_8(kind):
    obs = feed(make_observer(kind, bins=256))
    assert obs.range() == obs.range(8) != obs.range(4)
    assert obs.qparams() == obs.qparams(8)


def test_default_settings():
    # the defaults decide every calibration made without options; the histogram family shares its bins
    assert HistogramObserver().params() == {"bins": 4096}
    assert PercentileObserver().params() == {"bins": 4096, "percentile": 99.99}
    assert MSEObserver().params() == {"bins": 4096, "candidates": 100}
    assert EntropyObserver().params() == {"bins": 4096, "max_candidates": 512}
    assert MovingAverageMinMaxObserver().params() == {"averaging_constant": 0.1}


def test_a_value_equal_to_the_histogram_limit_doubles_it():
    obs = HistogramObserver(bins=64)
    obs.load_state({"pos": np.zeros(64), "neg": np.zeros(64), "scalars": np.array([2.0, 0.5, 1.0]),
                    "count": np.array([10])})
    obs.observe(np.array([2.0, 0.0, 0.0], np.float32))  # bins cover [0, R): 2.0 needs R = 4
    assert obs.limit == 4.0 and obs.pos[32] == 1
    assert obs.pos[0] == 2 and obs.neg.sum() == 0  # zeros count as non-negative
    assert obs.count == 13


def test_entropy_of_non_negative_data_with_exact_zeros_uses_all_levels_on_one_side():
    rng = np.random.default_rng(8)
    x = np.concatenate([np.zeros(3000), np.abs(rng.normal(0, 1, 5000)), [30.0]]).astype(np.float32)
    obs = EntropyObserver(bins=256, max_candidates=10_000)
    obs.observe(x)
    for bits in (3, 4):  # the spike of zeros is left out: at 3 bits it would halve the threshold
        lo, hi = obs.range(bits)
        assert lo == 0.0 and hi == pytest.approx(_kl_reference(obs.pos, 2**bits) * obs.bin_width)


def test_histogram_of_small_values_doubles_its_limit_too():
    obs = HistogramObserver(bins=64)
    obs.observe(np.array([0.1], np.float32))
    obs.observe(np.array([0.3, -0.25], np.float32))  # R: 0.1 (1 + 1e-6) -> doubled twice
    assert obs.limit == pytest.approx(0.4, rel=1e-5)
    assert obs.pos[int(0.1 / obs.bin_width)] == 1 and obs.pos[int(0.3 / obs.bin_width)] == 1
    assert obs.neg[int(0.25 / obs.bin_width)] == 1


def test_mse_range_is_a_candidate_fraction_of_the_observed_range_for_small_values():
    x = np.random.default_rng(6).gamma(2.0, 0.03, 5000).astype(np.float32)  # max well below 1
    obs = MSEObserver(bins=256, candidates=7)
    obs.observe(x)
    lo, hi = obs.range(4)
    assert lo == 0.0 and hi <= obs.max_val
    assert np.isclose(np.linspace(1.0, 1 / 7, 7), hi / obs.max_val, rtol=1e-9, atol=0).any()


def test_the_count_of_bad_values_is_reported():
    with pytest.raises(InputError, match="found 3 NaN/Inf"):
        MinMaxObserver("x").observe(np.array([1.0, np.nan, 2.0, -np.inf, np.inf], np.float32))
