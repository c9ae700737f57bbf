"""Timing helpers shared by the engine (convolution algorithm choice) and the tools (benchmarks).

Timings are medians of ``repeats`` runs after a warm-up run, with Numba's thread count pinned for the
duration (``threads``), so ratios measured side by side in one process are comparable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from numba import njit

from .kernels.threads import pinned_threads, split_batch

__all__ = ["batch1_latency", "machine_loop", "median_time", "pinned_threads"]


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


@njit(nogil=True, cache=True)
def _stepped(rows: np.ndarray, steps: int) -> np.ndarray:
    rows = rows.copy()  # each thread's own: rows written by two threads may share a cache line
    for _ in range(steps):
        rows *= np.float32(0.999)
        rows += np.float32(0.001)
    return rows


_LOOP_ROWS = np.ones((16, 1024), np.float32)  # 64 KiB: half in each of two cores' L2


def machine_loop(steps: int = 3000) -> np.ndarray:
    """Fixed vector arithmetic in the cores' own caches (no Python between steps; 3.4-4 ms on one
    core of a 2-core AMD EPYC), split over Numba's thread count as ``split_batch`` splits a batch:
    its scaling is what the machine gives at that moment (``bench.threads_table``). The stepped rows."""
    return split_batch(partial(_stepped, steps=steps), _LOOP_ROWS, 1)
