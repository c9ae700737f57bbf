"""Timing helpers shared by the engine (convolution algorithm choice) and the tools (benchmarks).

Timings are medians of ``repeats`` runs after a warm-up run, with Numba's thread count pinned for the
duration (``threads``), so ratios measured side by side in one process are comparable.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run the block with Numba (and BLAS, via env for children) limited to ``threads``."""
    import numba

    if threads is None:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    Example::

        >>> calls = []
        >>> seconds = median_time(lambda: calls.append(1), repeats=3)
        >>> len(calls), seconds >= 0
        (4, True)
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch1_latency(model: Any, images: np.ndarray, n: int = 200, repeats: int = 5) -> float:
    """Median over repeats of the mean seconds per image when images are predicted one at a time."""
    singles = [images[i:i + 1] for i in range(min(n, len(images)))]

    def run() -> None:
        for x in singles:
            model.predict(x)

    return median_time(run, repeats) / len(singles)
