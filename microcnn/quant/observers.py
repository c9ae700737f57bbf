"""Observers: collect statistics of one activation tensor during calibration, and turn them into a real
range [lo, hi] for a given bit width. They never quantize anything themselves (as in
``torch.ao.quantization``): ``microcnn.quant.params`` turns the range into (scale, zero_point).

* ``MinMaxObserver``            -- running min and max.
* ``MovingAverageMinMaxObserver`` -- exponential moving average of per-batch min and max.
* ``HistogramObserver`` family: a histogram of the values, then
  ``PercentileObserver`` (clip at a percentile), ``MSEObserver`` (the clipping range that minimises the
  expected squared quantization error) and ``EntropyObserver`` (TensorRT's KL-divergence threshold).

The histogram keeps ``bins`` bins of |x| for non-negative and for negative values over [0, R). When a
value >= R arrives, R doubles and adjacent bins merge pairwise, which is exact: no value ever moves to a
bin that does not contain it. At least bins/2 bins therefore cover [0, max|x|].
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..kernels.linalg import kl_sum
from .params import check_bits, fake_quantize, qparams_from_range


class Observer:
    """Base class. ``observe(x)`` any number of times, then ``range(bits)``."""

    kind = "observer"
    min_val: float  # smallest and largest value observed, set by every subclass
    max_val: float

    def __init__(self, tensor: str = "tensor"):
        self.tensor = tensor  # name used in error messages
        self.count = 0

    def observe(self, x) -> None:
        x = np.asarray(x)
        if x.size == 0:
            raise InputError(f"{self.kind} observer of {self.tensor}: expected values, found an empty array")
        if not np.isfinite(x).all():
            n_bad = int((~np.isfinite(x)).sum())
            raise InputError(f"{self.kind} observer of {self.tensor}: expected finite values, found "
                             f"{n_bad} NaN/Inf")
        self._observe(np.ascontiguousarray(x, np.float32).reshape(-1))
        self.count += x.size

    def range(self, bits: int = 8) -> tuple[float, float]:
        """The real range to quantize to ``bits``; always contains 0. Zero ranges are refused."""
        bits = check_bits(bits)
        if self.count == 0:
            raise InputError(f"{self.kind} observer of {self.tensor}: no data observed; calibrate first")
        if self.min_val == self.max_val == 0.0:
            raise InputError(f"{self.tensor}: every calibration value is 0 (zero range); a quantization "
                             "scale needs varied calibration data")
        lo, hi = self._range(bits)
        return float(min(lo, 0.0)), float(max(hi, 0.0))

    def _observe(self, x: np.ndarray) -> None:
        """Add the flat float32 values ``x`` (checked by ``observe``) to the statistics."""
        raise NotImplementedError

    def _range(self, bits: int) -> tuple[float, float]:
        """The range for ``bits`` from the statistics (``range`` checks and widens it to contain 0)."""
        raise NotImplementedError

    def qparams(self, bits: int = 8):
        lo, hi = self.range(bits)
        return qparams_from_range(lo, hi, bits, symmetric=False, signed=False, name=self.tensor)

    # -- persistence ---------------------------------------------------------------------------
    def params(self) -> dict:
        """Constructor settings (JSON-able)."""
        return {}

    def state(self) -> dict:
        """Collected statistics as float64/int64 arrays."""
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """The range of every value seen: [min, max] over all observed batches."""

    kind = "minmax"

    def __init__(self, tensor: str = "tensor"):
        super().__init__(tensor)
        self.min_val, self.max_val = np.inf, -np.inf

    def _observe(self, x):
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))

    def _range(self, bits):
        return self.min_val, self.max_val

    def state(self):
        return {"minmax": np.array([self.min_val, self.max_val]), "count": np.array([self.count])}

    def load_state(self, state):
        self.min_val, self.max_val = (float(v) for v in state["minmax"])
        self.count = int(state["count"][0])


class MovingAverageMinMaxObserver(MinMaxObserver):
    """min/max as exponential moving averages over batches: m <- m + c * (batch_m - m); the first batch
    sets them. Less sensitive to a single outlying batch than the running extremes."""

    kind = "ema"

    def __init__(self, tensor: str = "tensor", averaging_constant: float = 0.1):
        super().__init__(tensor)
        if not 0 < averaging_constant <= 1:
            raise InputError(f"averaging_constant: expected 0 < c <= 1, found {averaging_constant}")
        self.averaging_constant = float(averaging_constant)

    def _observe(self, x):
        lo, hi = float(x.min()), float(x.max())
        if self.count == 0:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val += c * (lo - self.min_val)
            self.max_val += c * (hi - self.max_val)

    def params(self):
        return {"averaging_constant": self.averaging_constant}


class HistogramObserver(Observer):
    """Histogram of the values (see module docstring); ``range`` is the full observed [min, max]."""

    kind = "histogram"

    def __init__(self, tensor: str = "tensor", bins: int = 4096):
        super().__init__(tensor)
        if not (isinstance(bins, int) and bins >= 64 and bins % 4 == 0):
            raise InputError(f"bins: expected a multiple of 4 >= 64, found {bins!r}")
        self.bins = bins
        self.limit = 0.0  # R: bins cover |x| in [0, R)
        self.pos = np.zeros(bins, np.int64)  # x >= 0
        self.neg = np.zeros(bins, np.int64)  # x < 0, by |x|
        self.min_val, self.max_val = np.inf, -np.inf

    def _observe(self, x):
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
        top = max(abs(self.min_val), abs(self.max_val))
        if self.limit == 0.0 and top > 0:
            self.limit = top * (1 + 1e-6)  # zeros seen so far sit in bin 0 at any width
        while top >= self.limit > 0:
            self.pos = np.concatenate([self.pos.reshape(-1, 2).sum(1), np.zeros(self.bins // 2, np.int64)])
            self.neg = np.concatenate([self.neg.reshape(-1, 2).sum(1), np.zeros(self.bins // 2, np.int64)])
            self.limit *= 2
        if self.limit == 0.0:
            self.pos[0] += x.size
            return
        width = self.limit / self.bins
        idx = np.minimum((np.abs(x.astype(np.float64)) / width).astype(np.int64), self.bins - 1)
        negative = x < 0
        self.pos += np.bincount(idx[~negative], minlength=self.bins)
        self.neg += np.bincount(idx[negative], minlength=self.bins)

    @property
    def bin_width(self) -> float:
        return self.limit / self.bins

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(edges, counts) over [-R, R] with 2*bins bins."""
        counts = np.concatenate([self.neg[::-1], self.pos])
        edges = np.linspace(-self.limit, self.limit, 2 * self.bins + 1)
        return edges, counts

    def _range(self, bits):
        return self.min_val, self.max_val

    def params(self):
        return {"bins": self.bins}

    def state(self):
        return {"pos": self.pos.copy(), "neg": self.neg.copy(),
                "scalars": np.array([self.limit, self.min_val, self.max_val]),
                "count": np.array([self.count])}

    def load_state(self, state):
        pos, neg = np.asarray(state["pos"], np.int64), np.asarray(state["neg"], np.int64)
        if pos.shape != (self.bins,) or neg.shape != (self.bins,) or (pos < 0).any() or (neg < 0).any():
            raise InputError(f"{self.tensor}: histogram state does not match {self.bins} bins")
        self.pos, self.neg = pos.copy(), neg.copy()
        self.limit, self.min_val, self.max_val = (float(v) for v in state["scalars"])
        self.count = int(state["count"][0])


class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile``-th percentile (and at 100 - percentile for negative values)."""

    kind = "percentile"

    def __init__(self, tensor: str = "tensor", bins: int = 4096, percentile: float = 99.99):
        super().__init__(tensor, bins)
        if not 50 < percentile <= 100:
            raise InputError(f"percentile: expected 50 < p <= 100, found {percentile}")
        self.percentile = float(percentile)

    def params(self):
        return {"bins": self.bins, "percentile": self.percentile}

    def _range(self, bits):
        edges, counts = self.histogram()
        hi = _quantile(edges, counts, self.percentile / 100)
        lo = _quantile(edges, counts, 1 - self.percentile / 100) if self.min_val < 0 else 0.0
        return max(lo, self.min_val), min(hi, self.max_val)


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile of histogrammed data, values spread uniformly within each bin."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    i = min(int(np.searchsorted(cum, target)), len(counts) - 1)  # first bin reaching the target
    below = cum[i] - counts[i]
    frac = (target - below) / counts[i] if counts[i] else 0.0
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


class MSEObserver(HistogramObserver):
    """Search the clipping range alpha * [min, max], alpha = 1/n .. 1, that minimises the expected
    squared error of quantizing the histogram (bin centres) to ``bits``."""

    kind = "mse"

    def __init__(self, tensor: str = "tensor", bins: int = 4096, candidates: int = 100):
        super().__init__(tensor, bins)
        self.candidates = int(candidates)

    def params(self):
        return {"bins": self.bins, "candidates": self.candidates}

    def _range(self, bits):
        edges, counts = self.histogram()
        used = counts > 0
        centers = ((edges[:-1] + edges[1:]) / 2)[used]
        centers = np.clip(centers, self.min_val, self.max_val)
        weights = counts[used].astype(np.float64)
        best, best_err = 1.0, np.inf
        lo0, hi0 = min(self.min_val, 0.0), max(self.max_val, 0.0)
        for alpha in np.linspace(1.0, 1.0 / self.candidates, self.candidates):  # ties keep the wider range
            scale, zp = qparams_from_range(alpha * lo0, alpha * hi0, bits, symmetric=False, signed=False,
                                           name=self.tensor)
            # np.sum, not ``@``: BLAS's dot product sums in a CPU-dependent order
            residual = centers - fake_quantize(centers, scale, zp, bits, signed=False)
            err = float(np.sum(weights * residual ** 2))
            if err < best_err:
                best, best_err = alpha, err
        return best * lo0, best * hi0


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: the threshold t whose clipped-and-quantized histogram of |x| has
    the least KL divergence from the original. Range [0, t] for non-negative tensors, [-t, t] (within
    [min, max]) otherwise; the number of levels is 2**bits, or 2**(bits-1) per sign for signed data.
    Unlike TensorRT, the bin holding zero is left out of the divergence (see ``_range``)."""

    kind = "entropy"

    def __init__(self, tensor: str = "tensor", bins: int = 4096, max_candidates: int = 512):
        super().__init__(tensor, bins)
        self.max_candidates = int(max_candidates)

    def params(self):
        return {"bins": self.bins, "max_candidates": self.max_candidates}

    def _range(self, bits):
        signed = self.min_val < 0
        hist = (self.pos + self.neg) if signed else self.pos.copy()
        # Zero is exact on every grid; left in, the spike of ReLU zeros in bin 0 dominates the divergence
        # and drives the threshold towards 0 at low bit widths.
        hist[0] = 0
        levels = (1 << (bits - 1)) if signed else (1 << bits)
        threshold = kl_threshold(hist.astype(np.float64), levels, self.max_candidates) * self.bin_width
        threshold = min(threshold, max(abs(self.min_val), self.max_val))
        return (max(-threshold, self.min_val) if signed else 0.0), min(threshold, self.max_val)


def kl_threshold(hist: np.ndarray, levels: int, max_candidates: int = 512) -> int:
    """Number of leading bins to keep (the clipping threshold in bins) minimising KL(P || Q)."""
    used = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else 1
    if used <= levels:
        return used
    step = max(1, (used - levels) // max_candidates)
    best_i, best_kl = used, np.inf
    for i in range(levels, used + 1, step):
        kept = hist[:i]
        p = kept.copy()
        p[-1] += hist[i:].sum()  # outliers are clipped into the last kept bin
        chunk = (np.arange(i) * levels) // i  # bin -> quantization level
        sums = np.bincount(chunk, kept, minlength=levels)
        nonzero = np.bincount(chunk, kept > 0, minlength=levels)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(kept > 0, sums[chunk] / nonzero[chunk], 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if q.sum() == 0:
        return np.inf
    p = p / p.sum()
    q = q / q.sum()
    q = np.where((p > 0) & (q == 0), 1e-12, q)  # smoothing: a level Q misses costs much, not infinity
    # a fixed-order loop over libm's log: NumPy's float64 log has an AVX-512 variant with other last bits
    return float(kl_sum(p, q))


OBSERVERS = {cls.kind: cls for cls in (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver,
                                       MSEObserver, EntropyObserver)}


def make_observer(method: str, tensor: str = "tensor", **kwargs) -> Observer:
    if method not in OBSERVERS:
        raise InputError(f"method: expected one of {sorted(OBSERVERS)}, found {method!r}")
    return OBSERVERS[method](tensor, **kwargs)
