"""Inference folds BatchNorm into the Conv2d/Linear before it (issue 13), with no stale weights.

``fuse_chain`` runs Conv2d + BatchNorm2d (+ ReLU) (+ MaxPool2d) and Linear + BatchNorm1d as one call
with weights folded once (``network.FoldedPair``). The references: ``model.fold_batchnorm()``, a model
built afresh from the same layers, must give the same bits; the layers run one by one (BatchNorm as
its own per-channel affine) must agree within float32 rounding (1e-5 relative, as ``fold_batchnorm``'s
own tests); after every change of a weight, a running statistic, eps or a layer setting the
predictions must again equal a fresh fold's, bit for bit. Residual Graphs write an Add over a dead
intermediate, which must never be the caller's array or a tensor read later.
"""

import numpy as np
import pytest

from microcnn import optim
from microcnn.autograd import Tensor
from microcnn.graph import Add, Graph
from microcnn.kernels import program
from microcnn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
    Softmax,
)
from microcnn.losses import cross_entropy
from microcnn.network import Sequential

RNG = np.random.default_rng(13)
IMAGES = RNG.random((40, 3, 12, 12), dtype=np.float32)
BATCHES = (1, 7, 40)  # the program's batch sizes and the layer path's


def _bn(n, seed):
    """A BatchNorm2d with non-trivial statistics (a fresh one is the identity, which would prove nothing)."""
    rng = np.random.default_rng(seed)
    bn = BatchNorm2d(n)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, n)
    bn.bias.data[...] = rng.normal(0, 0.2, n)
    bn.running_mean[...] = rng.normal(0, 0.3, n)
    bn.running_var[...] = rng.uniform(0.3, 2.0, n)
    return bn


def _net():
    bn1 = BatchNorm1d(16)
    bn1.running_var[...] = RNG.uniform(0.5, 2.0, 16)
    return Sequential(Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, 1), ReLU(), MaxPool2d(2),
                      Conv2d(8, 8, 3, stride=2, padding=1), _bn(8, 2), ReLU(),
                      Flatten(), Linear(8 * 3 * 3, 16), bn1, ReLU(), Linear(16, 10), Softmax(),
                      input_shape=(3, 12, 12))


def _layer_by_layer(net, x):
    for layer in net.layers:
        x = layer.forward(x)
    return x


def _assert_folded(net, before=None):
    """Every batch size equals a fresh ``fold_batchnorm()`` bit for bit (twice: the cache is used)."""
    fresh = net.fold_batchnorm()
    for n in BATCHES:
        want = fresh.predict(IMAGES[:n])
        for _ in range(2):
            got = net.predict(IMAGES[:n])
            assert np.array_equal(got, want), f"batch {n}: max difference {np.abs(got - want).max()}"
        if before is not None:
            assert not np.array_equal(got, before[n]), f"batch {n}: the change changed nothing"


def test_inference_runs_conv_bn_relu_pool_and_linear_bn_as_one_folded_call_each():
    net = _net()
    kinds = [(type(g.layer).__name__, type(g.bn).__name__ if g.bn else None, g.relu, g.pool is not None)
             for g in net.inference_groups()]
    assert kinds[:2] == [("Conv2d", "BatchNorm2d", True, True), ("Conv2d", "BatchNorm2d", True, False)]
    assert ("Linear", "BatchNorm1d", True, False) in kinds
    _assert_folded(net)
    ref = _layer_by_layer(net, IMAGES)  # BatchNorm as its own affine: equal up to float32 rounding
    np.testing.assert_allclose(net.predict(IMAGES), ref, rtol=1e-5, atol=1e-6)
    # Small batches ran as one compiled program whose rows point at the folded layers' arrays.
    assert net._program is not None
    assert [int(row[program.CODE]) for row in net._program.ops] == [
        program.OP_CONV, program.OP_CONV, program.OP_LINEAR, program.OP_LINEAR, program.OP_SOFTMAX]
    folded = [g.fold.folded for g in net.inference_groups() if g.bn is not None]
    assert [int(row[program.WEIGHT]) for row in net._program.ops[:3]] == [
        f.weight.data.ctypes.data for f in folded]


def test_array_logits_run_the_folded_groups_without_the_softmax():
    """``logits`` of an array is inference: the fused, folded groups (a fresh fold's bits, which the layers
    one by one match only up to float32 rounding), stopping before the Softmax, from any state."""
    net = _net()
    fresh = net.fold_batchnorm()
    head = Sequential(*fresh.layers[:-1], input_shape=fresh.input_shape)
    refs = {n: _layer_by_layer(Sequential(*net.layers[:-1]), IMAGES[:n]) for n in (3, 40)}
    for bn in (net[1], net[5], net[9]):  # folded into the call before: never run on their own
        bn.forward = lambda *a, **k: pytest.fail("a BatchNorm ran on its own")
    for n in (40, 3, 40):
        got = net.logits(IMAGES[:n])
        assert np.array_equal(got, head.predict(IMAGES[:n])), f"batch {n}"
        np.testing.assert_allclose(got, refs[n], rtol=1e-5, atol=1e-6)
        assert got.shape == (n, 10) and not np.allclose(got.sum(axis=1), 1)
    without_softmax = Sequential(*net.layers[:-1], input_shape=net.input_shape)
    assert np.array_equal(without_softmax.logits(IMAGES), without_softmax.predict(IMAGES))


def test_the_compiled_program_refolds_after_an_in_place_change_of_a_source():
    """Small batches run the compiled program, whose rows point at the fold's arrays. An in-place edit of
    a BatchNorm statistic or of the weights creates no layer (``Layer.edits`` stays): the program must
    still see it, before any call that folds (``fold_batchnorm``) has run."""
    net = _net()
    x = IMAGES[:7]
    net.predict(x)
    before = net.predict(x)  # from the program
    assert net._program is not None
    edits = (lambda: net[1].running_mean.__iadd__(np.float32(0.5)),
             lambda: net[4].weight.data.__imul__(np.float32(-0.5)),
             lambda: net[9].running_var.__setitem__(2, np.float32(5.0)))
    for edit in edits:
        edit()
        got = net.predict(x)
        assert not np.array_equal(got, before)
        assert np.array_equal(got, net.fold_batchnorm().predict(x))
        before = got


def test_global_average_pooling_runs_in_the_program_with_the_layer_paths_bits():
    x = RNG.standard_normal((40, 3, 10, 14), dtype=np.float32)  # non-square; 40: the layer path
    net = Sequential(Conv2d(3, 16, 3, padding=1, bias=False), _bn(16, 6), ReLU(), GlobalAvgPool2d(),
                     Flatten(), Linear(16, 10), input_shape=(3, 10, 14))
    whole = net.forward(x)
    small = np.concatenate([net.forward(x[i:i + 5]) for i in range(0, 40, 5)])
    assert [int(row[program.CODE]) for row in net._program.ops] == [
        program.OP_CONV, program.OP_GLOBALAVG, program.OP_LINEAR]
    assert np.array_equal(small.view(np.uint32), whole.view(np.uint32))
    feats = np.maximum(_layer_by_layer(Sequential(*net.layers[:3]), x), 0).mean(axis=(2, 3), dtype=np.float64)
    want = feats @ net[5].weight.data.T.astype(np.float64) + net[5].bias.data
    np.testing.assert_allclose(small, want, rtol=1e-4, atol=1e-5)


def test_the_fold_is_made_once_while_nothing_changes():
    net = _net()
    net.predict(IMAGES)
    folded = [g.fold.folded for g in net.inference_groups() if g.bn is not None]
    net.predict(IMAGES)
    assert [g.fold.folded for g in net.inference_groups() if g.bn is not None] == folded


def _train_step(net):
    """One SGD step in training mode: weights move and the BatchNorms' running statistics update."""
    net.train()
    opt = optim.SGD(net.parameters(), lr=0.1)
    loss = cross_entropy(net.logits(Tensor(IMAGES)), RNG.integers(0, 10, len(IMAGES)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    net.eval()


CHANGES = {
    "running_mean in place": lambda net: net[1].running_mean.__iadd__(np.float32(0.5)),
    "running_var one value": lambda net: net[5].running_var.__setitem__(3, np.float32(4.0)),
    "running_var replaced": lambda net: setattr(net[5], "running_var", np.full(8, 2.0, np.float32)),
    "gamma in place": lambda net: net[1].weight.data.__imul__(np.float32(-1.0)),
    "beta Tensor replaced": lambda net: setattr(net[5], "bias", Tensor(np.full(8, 0.7, np.float32), True)),
    "eps": lambda net: setattr(net[1], "eps", 0.5),
    "conv weight in place": lambda net: net[0].weight.data.__imul__(np.float32(-0.5)),
    "conv bias in place": lambda net: net[4].bias.data.__setitem__(2, np.float32(3.0)),
    "conv weight Tensor replaced": lambda net: setattr(net[4], "weight", Tensor(-net[4].weight.data, True)),
    "conv algorithm": lambda net: setattr(net[0], "algorithm", "fft"),
    "BatchNorm1d statistics": lambda net: net[9].running_mean.__setitem__(0, np.float32(2.0)),
    "linear weight in place": lambda net: net[8].weight.data.__imul__(np.float32(2.0)),
    "training step": _train_step,
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_every_change_of_a_folded_source_is_seen(name):
    net = _net()
    for _ in range(2):
        _assert_folded(net)
    before = {n: net.predict(IMAGES[:n]) for n in BATCHES}
    CHANGES[name](net)
    _assert_folded(net, before)


def _residual():
    return Graph([("c1", Conv2d(3, 8, 3, padding=1, bias=False), ["x"]), ("b1", _bn(8, 3), ["c1"]),
                  ("r1", ReLU(), ["b1"]),
                  ("c2", Conv2d(8, 8, 3, padding=1, bias=False), ["r1"]), ("b2", _bn(8, 4), ["c2"]),
                  ("sum", Add(), ["b2", "r1"]), ("r2", ReLU(), ["sum"]),
                  ("c3", Conv2d(8, 8, 3, stride=2, padding=1, bias=False), ["r2"]), ("b3", _bn(8, 5), ["c3"]),
                  ("sum2", Add(), ["b3", "b3"]), ("gap", GlobalAvgPool2d(), ["sum2"]),
                  ("flat", Flatten(), ["gap"]), ("fc", Linear(8, 10), ["flat"])],
                 "x", "fc", input_shape=(3, 12, 12))


def test_residual_graph_folds_and_adds_in_place_without_touching_live_tensors():
    g = _residual()
    steps = g.plan()
    adds = {s.output: s.into for s in steps if s.layer is not None}
    # The first Add is the last reader of both b2 and r1 (c2 read r1 before): it writes over the
    # first, b2. The second reads b3 twice, so nothing is overwritten.
    assert adds == {"sum": 0, "sum2": None}
    x = IMAGES.copy()
    ref = _layer_by_layer_graph(g, x)
    for n in BATCHES:
        got = g.predict(x[:n])
        assert np.array_equal(x, IMAGES)  # the caller's array is never written
        assert np.array_equal(got, g.fold_batchnorm().predict(x[:n]))
        np.testing.assert_allclose(got, ref[:n], rtol=1e-5, atol=1e-6)
    before = g.predict(x)
    g.layers[1].running_mean[...] += np.float32(1.0)  # b1, read through a fold, then an Add
    after = g.predict(x)
    assert not np.array_equal(after, before)
    assert np.array_equal(after, g.fold_batchnorm().predict(x))


def _layer_by_layer_graph(g, x):
    env = {"x": x}
    for node in g.nodes:
        env[node.name] = node.layer.forward(*(env[i] for i in node.inputs))
    return env["fc"]
