"""Inference writes large convolution outputs into arrays it keeps from call to call
(``network.Workspace``), as ONNX Runtime's arena does: a fresh array of megabytes page-faults on every
call. What must hold: the same bits as layer-by-layer inference at every batch size in any order of
calls (smaller batches reuse a prefix, larger ones grow the array), an array a call returned is never
written by a later call (even when it is the workspace's array, a view of it, or was overwritten in
place by a ReLU), one set of arrays per thread, and copies of a model start with none.
"""

import copy
import pickle
import threading

import numpy as np
import pytest

from microcnn import network
from microcnn.graph import Add, Graph
from microcnn.kernels.conv import im2col_runner
from microcnn.layers import Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from microcnn.model import INPUT
from microcnn.network import Sequential, Workspace

RNG = np.random.default_rng(5)
IMAGES = RNG.random((48, 3, 20, 24), dtype=np.float32)  # 69,120 values: above the workspace's threshold
BATCHES = (48, 20, 48, 33)  # full, a prefix, full again, in between


def _chain_ending_in_conv():
    return Sequential(Conv2d(3, 16, 3, padding=1), ReLU(), Conv2d(16, 16, 3, padding=1), ReLU(), MaxPool2d(2),
                      Conv2d(16, 8, 3, stride=2, padding=1), input_shape=(3, 20, 24))


def _chain_ending_in_relu_view():
    # The last ReLU overwrites the convolution's (workspace) output in place; Flatten returns a view of it.
    return Sequential(Conv2d(3, 16, 3, padding=1), ReLU(), Conv2d(16, 8, 3, stride=2, padding=(1, 0)), ReLU(),
                      Flatten(), input_shape=(3, 20, 24))


def _residual_graph():
    return Graph([("c1", Conv2d(3, 16, 3, padding=1), ["x"]), ("r1", ReLU(), ["c1"]),
                  ("c2", Conv2d(16, 16, 3, padding=1), ["r1"]), ("sum", Add(), ["c2", "r1"]),
                  ("r2", ReLU(), ["sum"]), ("c3", Conv2d(16, 16, 3, stride=2, padding=1), ["r2"]),
                  ("c4", Conv2d(16, 16, 1), ["r2"]), ("c5", Conv2d(16, 16, 3, stride=2, padding=1), ["c4"]),
                  ("sum2", Add(), ["c3", "c5"]), ("gap", GlobalAvgPool2d(), ["sum2"]),
                  ("flat", Flatten(), ["gap"]), ("fc", Linear(16, 10), ["flat"])],
                 "x", "fc", input_shape=(3, 20, 24))


def _graph_ending_in_conv():
    return Graph([("c1", Conv2d(3, 16, 3, padding=1), ["x"]), ("r1", ReLU(), ["c1"]),
                  ("c2", Conv2d(16, 8, 3, padding=1), ["r1"])], "x", "c2", input_shape=(3, 20, 24))


MODELS = {"chain_conv": _chain_ending_in_conv, "chain_relu_view": _chain_ending_in_relu_view,
          "residual": _residual_graph, "graph_conv": _graph_ending_in_conv}


def _layer_by_layer(model, x):
    """Every layer's own ``forward``, one after another: no fusion, no workspace."""
    env = {"x": x, INPUT: x}
    nodes = model.layer_nodes()
    for node in nodes:
        env[node.name] = node.layer.forward(*(env[i] for i in node.inputs))
    return env[nodes[-1].name]


@pytest.mark.parametrize("name", MODELS)
def test_same_bits_as_layer_by_layer_in_any_order_of_batches_and_returned_arrays_stay(name):
    model = MODELS[name]()
    ref = _layer_by_layer(model, IMAGES)
    outs = []
    for n in BATCHES:
        out = model.forward(IMAGES[:n])
        assert np.array_equal(out, ref[:n]), n
        outs.append((n, out, out.copy()))
    assert model.workspace.nbytes > 0  # the convolutions did write into kept arrays
    for n, out, copied in outs:  # no later call wrote over an array a call returned
        assert np.array_equal(out, copied), n
    for (_, a, _), (_, b, _) in zip(outs, outs[1:], strict=False):
        assert not np.may_share_memory(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_predict_keeps_its_results_and_matches_a_fresh_copy(name):
    model = MODELS[name]()
    first = model.predict(IMAGES)
    second = model.predict(IMAGES[::-1].copy())
    assert np.array_equal(first, copy.deepcopy(model).predict(IMAGES))
    assert np.array_equal(second, model.predict(IMAGES[::-1].copy()))
    assert np.array_equal(first, model.predict(IMAGES))


def test_workspace_arrays_are_kept_reused_as_prefixes_and_grown():
    ws = Workspace()
    a = ws.take("k", (8, 2, 3, 5))
    assert a.shape == (8, 2, 3, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.shares_memory(ws.take("k", (8, 2, 3, 5)), a)  # same call site, same shape: the same array
    small = ws.take("k", (3, 2, 3, 5))
    assert small.shape == (3, 2, 3, 5) and small.flags.c_contiguous and np.shares_memory(small, a)
    assert ws.nbytes == a.nbytes
    grown = ws.take("k", (9, 2, 3, 5))
    assert grown.shape == (9, 2, 3, 5) and not np.shares_memory(grown, a)
    other = ws.take("k", (9, 2, 5, 3))  # another sample shape: a new array
    assert not np.shares_memory(other, grown)
    assert not np.shares_memory(ws.take("j", (9, 2, 5, 3)), other)  # another call site: its own
    ws.release(other[:2].reshape(-1))  # a view of a kept array goes to a caller: it is dropped
    assert not np.shares_memory(ws.take("k", (9, 2, 5, 3)), other)
    assert ws.nbytes == 2 * other.nbytes
    ws.clear()
    assert ws.nbytes == 0


def test_each_thread_has_its_own_arrays_and_results():
    model = _residual_graph()
    ref = _layer_by_layer(model, IMAGES)
    errors, sizes = [], []

    def work(lo, hi):
        try:
            for _ in range(6):
                got = model.forward(IMAGES[lo:hi])
                if not np.array_equal(got, ref[lo:hi]):
                    errors.append((lo, hi))
            sizes.append(model.workspace.nbytes)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=span) for span in ((0, 48), (1, 47), (2, 48))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(sizes) == 3 and all(s > 0 for s in sizes)
    assert model.workspace.nbytes == 0  # this thread ran nothing: its set is empty


def test_copies_start_without_arrays_and_small_inputs_use_none(monkeypatch):
    model = _residual_graph()
    model.forward(IMAGES)
    assert model.workspace.nbytes > 0
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.workspace is not model.workspace and twin.workspace.nbytes == 0
        assert np.array_equal(twin.forward(IMAGES), model.forward(IMAGES))
    small = _residual_graph()
    read = 40 * 16 * 20 * 24  # what c2, c3, c4 and c5 read (c1 reads 40 * 3 * 20 * 24)
    monkeypatch.setattr(network, "_WORKSPACE_MIN", read + 1)  # above every conv's input
    few = IMAGES[:40]  # the layer path (32 images or more)
    assert np.array_equal(small.forward(few), _layer_by_layer(small, few))
    assert small.workspace.nbytes == 0
    monkeypatch.setattr(network, "_WORKSPACE_MIN", read)  # exactly: all but c1
    assert np.array_equal(small.forward(few), _layer_by_layer(small, few))
    kept = small.workspace.nbytes
    assert kept == 40 * 16 * 20 * 24 * 4 + 2 * 40 * 16 * 10 * 12 * 4 + 40 * 16 * 20 * 24 * 4  # c2, c3, c5, c4


def test_runner_writes_into_out_only_when_it_fits():
    w = RNG.standard_normal((16, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(16).astype(np.float32)
    run = im2col_runner(IMAGES.shape, w, 2, 1, 1, 0)
    ref = run(IMAGES, b)
    assert ref.shape == (48, 16, 10, 22)
    out = np.full(ref.shape, np.nan, np.float32)
    assert run(IMAGES, b, out=out) is out and np.array_equal(out, ref)
    for bad in (np.empty((48, 16, 22, 10), np.float32), np.empty(ref.shape, np.float64),
                np.empty((48, 16, 10, 44), np.float32)[..., ::2]):
        got = run(IMAGES, b, out=bad)
        assert got is not bad and np.array_equal(got, ref)
