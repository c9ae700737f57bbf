"""Batch parallelism (``kernels.threads``): a batch cut into one slice per thread gives the same bits as
one call, for every kind of model; slices are consecutive, each runs with Numba pinned to one thread,
errors reach the caller, and nothing else changes state.

The thread counts here are Python threads (``split_batch(..., threads=k)``), so these tests run the
split whatever NUMBA_NUM_THREADS is; the one test of ``predict``'s own choice needs two Numba threads."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import pytest

import microcnn
from microcnn.kernels import threads
from microcnn.model import MIN_IMAGES_PER_THREAD
from microcnn.quant import calibrate, quantize
from tests.test_graph import block

ROOT = Path(__file__).resolve().parent.parent


def _lenet_models(bundled, images):
    stats = calibrate(bundled, images[:64], samples=64, method="minmax", progress=False)
    return {"fp32": bundled, "int8": quantize(bundled, stats), "w4a4": quantize(bundled, stats, 4, 4)}


@pytest.mark.parametrize("k", [2, 3])
def test_every_lenet_precision_gives_the_same_bits_split_or_not(bundled, mnist_test, k):
    images = mnist_test[0][:203]  # 203 = 67 + 68 + 68: slices of unequal size
    for name, model in _lenet_models(bundled, mnist_test[0]).items():
        whole = model.forward(images)
        split = threads.split_batch(model.forward, images, 1, threads=k)
        assert split.shape == whole.shape == (203, 10), name
        assert np.array_equal(split, whole), name


@pytest.mark.parametrize("k", [2, 4])
def test_a_residual_graph_and_its_quantized_form_give_the_same_bits(k):
    graph = block(seed=3, input_shape=(3, 8, 8))
    x = np.random.default_rng(1).random((37, 3, 8, 8), dtype=np.float32)
    qgraph = quantize(graph, calibrate(graph, x, samples=37, method="minmax", progress=False))
    for model in (graph, qgraph):
        assert np.array_equal(threads.split_batch(model.forward, x, 1, threads=k), model.forward(x))


def test_slices_are_consecutive_in_order_and_each_runs_on_one_numba_thread():
    seen = []
    lock = threading.Lock()

    def forward(a):
        with lock:
            seen.append((int(a[0, 0]), len(a), numba.get_num_threads(), threading.get_ident()))
        return a * 2

    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    before = numba.get_num_threads()
    out = threads.split_batch(forward, x, 1, threads=3)
    assert np.array_equal(out, x * 2)
    assert sorted((s, n) for s, n, _, _ in seen) == [(0, 3), (3, 3), (6, 4)]
    assert {t for _, _, t, _ in seen} == {1}
    assert threading.get_ident() in {ident for s, _, _, ident in seen if s == 0}  # the caller runs slice 0
    assert numba.get_num_threads() == before  # the caller's own count is restored


def test_an_error_in_any_slice_reaches_the_caller_after_every_slice_has_finished():
    finished = []

    def forward(a):
        if a[0, 0] == 5:
            raise microcnn.InputError("slice starting at 5")
        if a[0, 0] == 10:
            time.sleep(0.2)  # a slow worker slice: the caller's error must wait for it
        finished.append(int(a[0, 0]))
        return a

    x = np.arange(15, dtype=np.float32).reshape(15, 1)
    with pytest.raises(microcnn.InputError, match="starting at 5"):
        threads.split_batch(forward, x[:10], 1, threads=2)
    assert finished == [0]
    finished.clear()
    with pytest.raises(microcnn.InputError, match="starting at 5"):  # the failing slice is the caller's
        threads.split_batch(forward, x[5:], 1, threads=2)
    assert finished == [10]  # the worker's slice had finished when the error came out


class FakeNumba:
    """Numba's thread-count calls on a machine with ``limit`` threads, currently ``count``."""

    def __init__(self, count=3, limit=4, layer="omp"):
        self.count, self.calls, self.layer = count, [], layer
        self.config = SimpleNamespace(NUMBA_NUM_THREADS=limit)

    def get_num_threads(self):
        return self.count

    def set_num_threads(self, n):
        assert 1 <= n <= self.config.NUMBA_NUM_THREADS
        self.calls.append(n)
        self.count = n

    def threading_layer(self):
        if self.layer is None:
            raise ValueError("no threading layer could be loaded")
        return self.layer


def test_pinned_threads_sets_caps_and_restores_the_count(monkeypatch):
    fake = FakeNumba(count=3, limit=4)
    monkeypatch.setattr(threads, "numba", fake)
    with threads.pinned_threads(2):
        assert fake.count == 2
    with threads.pinned_threads(8):  # capped at NUMBA_NUM_THREADS
        assert fake.count == 4
    with pytest.raises(RuntimeError), threads.pinned_threads(1):
        assert fake.count == 1
        raise RuntimeError("the count comes back on errors too")
    assert fake.calls == [2, 3, 4, 3, 1, 3] and fake.count == 3
    ran = []
    with threads.pinned_threads(None):
        ran.append(fake.count)
    assert ran == [3] and fake.calls == [2, 3, 4, 3, 1, 3]  # None: untouched


@pytest.mark.parametrize(("layer", "safe"),
                         [("omp", True), ("tbb", True), ("workqueue", False), (None, False)])
def test_only_omp_and_tbb_count_as_thread_safe(monkeypatch, layer, safe):
    monkeypatch.setattr(threads, "numba", FakeNumba(layer=layer))
    monkeypatch.setattr(threads, "_threadsafe_layer", None)
    assert threads.threadsafe_layer() is safe
    monkeypatch.setattr(threads.numba, "layer", "omp" if not safe else "workqueue")
    assert threads.threadsafe_layer() is safe  # decided once per process


@pytest.mark.parametrize(("n", "least", "sizes"),
                         [(127, 64, [127]), (128, 64, [64, 64]), (200, 50, [66, 67, 67]), (10, 1, [3, 3, 4])])
def test_split_batch_takes_numbas_count_limited_by_min_per_thread(monkeypatch, n, least, sizes):
    monkeypatch.setattr(threads, "numba", FakeNumba(count=3, limit=4))
    monkeypatch.setattr(threads, "_threadsafe_layer", True)
    seen = []
    lock = threading.Lock()

    def forward(a):
        with lock:
            seen.append((int(a[0, 0]), len(a)))
        return a

    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    assert np.array_equal(threads.split_batch(forward, x, least), x)
    assert [size for _, size in sorted(seen)] == sizes


def test_one_thread_or_an_unsafe_layer_is_one_plain_call(monkeypatch):
    calls = []

    def forward(a):
        calls.append(a)
        return a

    x = np.zeros((300, 2), np.float32)
    assert threads.split_batch(forward, x, 1, threads=1) is x and len(calls) == 1 and calls[0] is x
    monkeypatch.setattr(threads, "_threadsafe_layer", False)  # as under Numba's workqueue layer
    calls.clear()
    assert threads.split_batch(forward, x, 1, threads=4) is x and len(calls) == 1


def test_a_fresh_process_finds_its_layer_before_any_parallel_kernel_has_run():
    script = ("from microcnn.kernels import threads; import numba\n"
              "print(threads.threadsafe_layer(), numba.threading_layer())")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() in (["True", "omp"], ["True", "tbb"])


def test_the_layer_in_use_is_known_and_thread_safe():
    # CI installs no TBB: the omp layer (libgomp) must be what this machine runs, or the split is off
    assert threads.threadsafe_layer() is True
    assert numba.threading_layer() in ("omp", "tbb")


@pytest.mark.parametrize(("count", "n", "least", "expected"),
                         [(2, 127, 64, 1), (2, 128, 64, 2), (2, 10_000, 64, 2), (3, 130, 64, 2),
                          (1, 500, 1, 1), (4, 3, 1, 3), (2, 0, 64, 1)])
def test_thread_count_keeps_at_least_min_per_thread_items(monkeypatch, count, n, least, expected):
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: count)
    assert threads.thread_count(n, least) == expected


def test_in_threads_covers_every_index_once_in_count_slices(monkeypatch):
    monkeypatch.setattr(threads.numba, "get_num_threads", lambda: 3)
    hits = np.zeros(17, np.int64)
    slices = []
    lock = threading.Lock()

    callers = []

    def kernel(target, start, stop):
        time.sleep(0.02)  # the call must wait for every slice, however late it ends
        with lock:
            target[start:stop] += 1
            slices.append((start, stop))
            callers.append(threading.get_ident())

    threads.in_threads(kernel, (hits,), 17, 5)
    assert hits.tolist() == [1] * 17
    assert sorted(slices) == [(0, 5), (5, 11), (11, 17)]
    slices.clear()
    threads.in_threads(kernel, (hits,), 14, 5)  # 14 // 5: two threads
    assert sorted(slices) == [(0, 7), (7, 14)]
    callers.clear()
    threads.in_threads(kernel, (hits,), 9, 5)  # one slice: run by the calling thread, no pool
    assert callers == [threading.get_ident()] and hits.tolist() == [3] * 9 + [2] * 5 + [1] * 3


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="predict's own split needs 2 Numba threads")
def test_predict_on_two_threads_splits_and_matches_one_thread(bundled, mnist_test, monkeypatch):
    images = mnist_test[0][:2 * MIN_IMAGES_PER_THREAD + 1]
    with threads.pinned_threads(1):
        one = bundled.predict(images)
    sizes = []
    forward = bundled.forward
    monkeypatch.setattr(bundled, "forward", lambda a: sizes.append(len(a)) or forward(a))
    with threads.pinned_threads(2):
        two = bundled.predict(images)
    assert sorted(sizes) == [MIN_IMAGES_PER_THREAD, MIN_IMAGES_PER_THREAD + 1]
    assert np.array_equal(one, two)
