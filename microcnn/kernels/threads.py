"""Kernels on several cores: plain Python threads, each running a slice of the batch.

Every kernel releases the GIL (``nogil=True``), so threads that call them run at once. Unlike
``parallel=True`` this compiles nothing twice, and ``split_batch`` wakes the workers once per model
call instead of once per layer: on a virtual machine an idle core takes 0.1-0.2 ms to wake, which at
LeNet's 5-15 ms per 1,000 images was what kept two threads at 1.3-1.5x one.

Results do not depend on the split: every kernel computes each image (each row of a dense layer) on
its own, in the same order whatever else is in its slice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import numba
import numpy as np

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_threadsafe_layer: bool | None = None


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run the block with Numba's thread count (of this thread: the setting is per thread) limited to
    ``threads`` (at most NUMBA_NUM_THREADS); None leaves it as it is."""
    if threads is None:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _workers(threads: int) -> ThreadPoolExecutor:
    # keyed by process too: a forked child inherits the dict but not the threads, and a pool whose
    # threads are gone would queue work forever
    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="microcnn")
    return _pools[key]


def _bounds(n: int, threads: int) -> list[int]:
    return [t * n // threads for t in range(threads + 1)]


def thread_count(n: int, min_per_thread: int) -> int:
    """Threads for ``n`` items: Numba's count for this thread, fewer when a thread would get less
    than ``min_per_thread`` items (waking a core costs more than it saves)."""
    if n < 2 * min_per_thread:  # one thread whatever Numba's count: skip asking (microseconds per layer)
        return 1
    return min(numba.get_num_threads(), n // min_per_thread)


def in_threads(kernel: Callable[..., None], args: tuple, n: int, min_per_thread: int) -> None:
    """kernel(*args, start, stop) over [0, n), split across ``thread_count`` threads."""
    threads = thread_count(n, min_per_thread)
    if threads == 1:
        kernel(*args, 0, n)
        return
    bounds = _bounds(n, threads)
    futures = [_workers(threads).submit(kernel, *args, bounds[t], bounds[t + 1]) for t in range(threads)]
    for f in futures:
        f.result()


def threadsafe_layer() -> bool:
    """Whether Numba's threading layer may be entered from several threads at once (omp, tbb: yes;
    workqueue: no, it aborts the process). ``parallel=True`` kernels enter it even on one thread."""
    global _threadsafe_layer
    if _threadsafe_layer is None:
        numba.get_num_threads()  # starts the layer, if no parallel kernel has yet
        try:
            _threadsafe_layer = numba.threading_layer() in ("omp", "tbb")
        except ValueError:  # no layer could start
            _threadsafe_layer = False
    return _threadsafe_layer


def split_batch(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, min_per_thread: int,
                threads: int | None = None) -> np.ndarray:
    """``forward(x)``, with the batch cut into ``threads`` consecutive slices (default: ``thread_count``)
    run at once, each with Numba pinned to one thread, and the outputs stacked in order. The calling
    thread runs the first slice itself. With one thread, or a threading layer that is not thread-safe,
    it is ``forward(x)``."""
    if threads is None:
        threads = thread_count(len(x), min_per_thread)
    if threads <= 1 or not threadsafe_layer():
        return forward(x)

    def part(lo: int, hi: int) -> np.ndarray:
        with pinned_threads(1):
            return forward(x[lo:hi])

    bounds = _bounds(len(x), threads)
    futures = [_workers(threads).submit(part, bounds[t], bounds[t + 1]) for t in range(1, threads)]
    try:
        first = part(bounds[0], bounds[1])
    finally:  # no slice runs on past the call, even when the first one failed
        wait(futures)
    return np.concatenate([first, *(f.result() for f in futures)])
