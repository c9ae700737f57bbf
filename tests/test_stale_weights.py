"""No silent stale weights (issue 12, item 5).

Small batches run as a compiled program and convolutions keep prepared (packed, transformed) weights,
so every way of changing a network is tried after the caches are warm: the next predictions, at
batch sizes that take the program (1, 7) and the layer path (64, 1000), must equal bit for bit those
of a network built afresh with the new weights and settings -- or the change is refused with an
InputError that says how to edit weights.
"""

import numpy as np
import pytest

import microcnn
from microcnn import InputError, optim
from microcnn.autograd import Tensor
from microcnn.kernels import program
from microcnn.kernels.gemm import pack_rows
from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Softmax
from microcnn.network import PROGRAM_MAX_BATCH, Sequential

RNG = np.random.default_rng(12)
IMAGES = RNG.random((64, 1, 28, 28), dtype=np.float32)
BATCHES = (1, 7, 64)  # 1 and 7 run as the compiled program, 64 layer by layer
assert max(BATCHES[:2]) < PROGRAM_MAX_BATCH <= BATCHES[2]


def _warm(net, batches=BATCHES):
    """Several predictions at every batch size: builds the program and every conv's prepared weights."""
    for n in batches:
        for _ in range(3):
            net.predict(IMAGES[:n])
    _assert_program(net)


def _assert_program(net):
    """Small batches do run as a compiled program here (else the tests below would not test it)."""
    im2col = all(layer.algorithm == "im2col" for layer in net.layers if isinstance(layer, Conv2d))
    assert (net._program is not None) == im2col


def _fresh(net):
    """A network built from nothing but ``net``'s configuration, weights and conv algorithms."""
    clone = Sequential.from_config(net.config())
    clone.load_state_dict(net.state_dict())
    for mine, theirs in zip(clone.layers, net.layers, strict=True):
        if isinstance(mine, Conv2d):
            mine.algorithm = theirs.algorithm
    return clone


def _assert_current(net, before=None, batches=BATCHES):
    """Predictions at every batch size equal a fresh network's, bit for bit, and differ from ``before``
    (the predictions before the change: a change that changed nothing would prove nothing)."""
    fresh = _fresh(net)
    for n in batches:
        got, want = net.predict(IMAGES[:n]), fresh.predict(IMAGES[:n])
        assert np.array_equal(got, want), f"batch {n}: max difference {np.abs(got - want).max()}"
        assert np.array_equal(net.predict(IMAGES[:n]), want), f"batch {n}, second call"
        if before is not None:
            assert not np.array_equal(got, before[n]), f"batch {n}: the change changed nothing"
    _assert_program(net)


def _predictions(net, batches=BATCHES):
    return {n: net.predict(IMAGES[:n]) for n in batches}


def _prune(net):
    for p in net.parameters():
        p.data[np.abs(p.data) < 0.05] = 0  # the usual pruning idiom: a masked assignment in place


MUTATIONS = {
    "prune in place (masked assignment)": _prune,
    "slice assignment": lambda net: net[3].weight.data.__setitem__((slice(None), 0), 0.25),
    "*= in place": lambda net: net[0].weight.data.__imul__(np.float32(-1.5)),
    "np.copyto": lambda net: np.copyto(net[6].weight.data, RNG.standard_normal(net[6].weight.data.shape)
                                       .astype(np.float32) * 0.05),
    "ufunc out=": lambda net: np.multiply(net[9].weight.data, np.float32(3), out=net[9].weight.data),
    "one value in place": lambda net: net[11].bias.data.__setitem__(4, np.float32(5.0)),
    "replace weight Tensor": lambda net: setattr(net[3], "weight", Tensor(-net[3].weight.data, True)),
    "replace bias Tensor": lambda net: setattr(net[0], "bias", Tensor(np.full(6, 0.3, np.float32), True)),
    "assign .data": lambda net: setattr(net[9].weight, "data", net[9].weight.data * np.float32(-0.5)),
    "load_state_dict": lambda net: net.load_state_dict(microcnn.lenet(seed=99).state_dict()),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_weight_change_is_seen_at_every_batch_size(name):
    net = microcnn.lenet(seed=5)
    _warm(net)
    before = _predictions(net)
    MUTATIONS[name](net)
    _assert_current(net, before)


def test_an_optimizer_step_is_seen():
    net = microcnn.lenet(seed=6)
    _warm(net)
    before = _predictions(net)
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    grad_rng = np.random.default_rng(3)
    for _ in range(2):
        for p in net.parameters():
            p.grad = grad_rng.standard_normal(p.data.shape).astype(np.float32)
        opt.step()
    _assert_current(net, before)


def test_bundled_lenet_pruned_after_predictions_matches_the_layer_path_at_batch_1000():
    # The reported failure: a few predictions, then pruning in place, left batch-1 predictions on the
    # old weights (probabilities off by up to 0.83 against the layer path).
    net = microcnn.lenet(weights="bundled")
    images = np.random.default_rng(1).random((1000, 1, 28, 28), dtype=np.float32)
    for _ in range(3):
        net.predict(images[:1])
    net.predict(images)
    _prune(net)
    fresh = _fresh(net)
    whole = net.predict(images)
    assert np.array_equal(whole, fresh.predict(images))
    ones = np.concatenate([net.predict(images[i:i + 1]) for i in range(10)])
    assert np.array_equal(ones, np.concatenate([fresh.predict(images[i:i + 1]) for i in range(10)]))


@pytest.mark.parametrize("how", ["set_conv_algorithm", "attribute"])
@pytest.mark.parametrize("algorithm", ["winograd", "fft", "naive", "im2col"])
def test_conv_algorithm_changes_are_seen(how, algorithm):
    net = microcnn.lenet(seed=7, algorithm="winograd" if algorithm == "im2col" else "im2col")
    _warm(net)
    if how == "set_conv_algorithm":
        net.set_conv_algorithm(algorithm)
    else:
        for layer in net.layers:
            if isinstance(layer, Conv2d):
                layer.algorithm = algorithm
    _assert_current(net)
    _prune(net)  # and the new algorithm's prepared weights follow in-place edits too
    _assert_current(net)


def _small_net(stride=1, padding=1, pool=2, bias=True):
    """A network whose output size follows its hyperparameters (no Linear to fix it)."""
    rng = np.random.default_rng(8)
    return Sequential(Conv2d(1, 4, 3, stride=stride, padding=padding, bias=bias, rng=rng), ReLU(),
                      MaxPool2d(pool), Conv2d(4, 3, 3, rng=rng), ReLU(), Flatten(), Softmax(),
                      input_shape=(1, 28, 28))


@pytest.mark.parametrize("change", [
    lambda net: setattr(net[0], "stride", 2),
    lambda net: setattr(net[0], "stride", (1, 2)),
    lambda net: setattr(net[0], "padding", 0),
    lambda net: setattr(net[2], "kernel_size", 3),
    lambda net: setattr(net[2], "stride", (1, 2)),
    lambda net: net.layers.__setitem__(3, Conv2d(4, 3, 3, rng=np.random.default_rng(1))),
], ids=["conv stride", "conv stride pair", "conv padding", "pool window", "pool stride", "layer replaced"])
def test_hyperparameter_changes_are_seen(change):
    net = _small_net()
    _warm(net)
    before = {n: net.predict(IMAGES[:n]) for n in BATCHES}
    change(net)
    fresh = _fresh(net)
    for n in BATCHES:
        got = net.predict(IMAGES[:n])
        assert np.array_equal(got, fresh.predict(IMAGES[:n]))
        assert got.shape != before[n].shape or not np.array_equal(got, before[n])


def test_layers_without_bias_run_as_a_program_that_follows_their_weights():
    net = Sequential(Conv2d(1, 3, 5, bias=False), ReLU(), MaxPool2d(2), Flatten(),
                     Linear(3 * 12 * 12, 10, bias=False), Softmax(), input_shape=(1, 28, 28))
    _warm(net)
    assert net._program is not None  # the zero biases are the program's own
    before = _predictions(net)
    net[4].weight.data[:5] *= np.float32(-2)
    _assert_current(net, before)


def test_changes_that_would_not_match_the_weights_are_refused_with_how_to_edit_them():
    net = microcnn.lenet(seed=9)
    _warm(net)
    before = _predictions(net)
    with pytest.raises(InputError, match=r"Conv2d.weight: expected a Tensor of shape \(16, 6, 5, 5\), "
                                         r"found shape \(16, 6, 3, 3\); to change weights, edit weight.data "
                                         r"in place .*load_state_dict"):
        net[3].weight = Tensor(np.zeros((16, 6, 3, 3), np.float32))
    with pytest.raises(InputError, match=r"Linear.bias: expected a Tensor of shape \(84,\), found ndarray"):
        net[9].bias = np.zeros(84, np.float32)
    with pytest.raises(InputError, match="Conv2d.kernel_size is fixed once the layer is built"):
        net[0].kernel_size = (3, 3)
    with pytest.raises(InputError, match="Linear.in_features is fixed"):
        net[9].in_features = 100
    with pytest.raises(InputError, match=r"Conv2d.stride: expected values >= 1, found 0"):
        net[0].stride = 0
    with pytest.raises(InputError, match=r"MaxPool2d.stride: expected an int or a pair of ints"):
        net[2].stride = 1.5
    for n, want in _predictions(net).items():  # nothing changed
        assert np.array_equal(want, before[n])
    net[0].stride = [1, 1]  # a list is stored as the pair the constructor makes
    assert net[0].stride == (1, 1)


def test_a_float64_array_assigned_to_data_is_never_run_as_float32_bits_from_before():
    net = microcnn.lenet(seed=10)
    _warm(net)
    before = _predictions(net)
    net[0].weight.data = net[0].weight.data.astype(np.float64) * 2  # not what the program can point at
    assert net.predict(IMAGES[:1]).dtype == np.float32
    for n in BATCHES:
        assert not np.array_equal(net.predict(IMAGES[:n]), before[n])
    net[0].weight.data = net[0].weight.data.astype(np.float32)
    _assert_current(net, before)


def test_quantized_networks_are_snapshots_of_the_float_weights():
    net = microcnn.lenet(seed=11)
    q = microcnn.quantize(net, microcnn.calibrate(net, IMAGES[:16], method="minmax", progress=False))
    expected = q.forward(IMAGES[:7])
    _prune(net)
    net[9].weight.data *= np.float32(3)
    assert np.array_equal(q.forward(IMAGES[:7]), expected)  # quantize copied what it needs


def test_program_packs_conv_weights_exactly_as_pack_rows():
    rng = np.random.default_rng(4)
    for o, k in [(1, 1), (6, 25), (16, 150), (9, 7), (120, 400)]:
        w = rng.standard_normal((o, k)).astype(np.float32)
        want = pack_rows(w)
        got = np.full_like(want, np.nan)  # padding rows must be written too
        program.pack_weights(w, got)
        assert np.array_equal(got, want), (o, k)


def test_load_state_dict_refuses_nan_inf_and_out_of_range_weights_before_copying_any():
    net = microcnn.lenet(seed=12)
    before = net.state_dict()
    for value, what in [(np.nan, "NaN/Inf"), (-np.inf, "NaN/Inf"), (1e39, "beyond float32's range")]:
        state = {k: v.astype(np.float64) for k, v in microcnn.lenet(seed=13).state_dict().items()}
        state["9.weight"][2, 5] = value
        with pytest.raises(InputError, match=rf"state_dict: 9.weight: expected finite weights, found 1 "
                                             rf"value {what}.*first at index \(2, 5\).*nothing was loaded"):
            net.load_state_dict(state)
        for k, v in net.state_dict().items():
            assert np.array_equal(v, before[k]), k


@pytest.mark.parametrize("bad, message", [
    (IMAGES[:0], r"forward: expected at least one image, found an empty batch \(0, 1, 28, 28\)"),
    (IMAGES[:2].tolist(), r"forward: expected a numpy array \(N, C, H, W\), found list; predict\(\) "
                          "converts"),
])
def test_forward_names_the_real_problem(bad, message):
    net = microcnn.lenet(seed=14)
    net.forward(IMAGES[:1])
    with pytest.raises(InputError, match=message):
        net.forward(bad)


def test_predict_on_an_empty_list_says_the_batch_is_empty():
    with pytest.raises(InputError, match=r"images: expected at least one image, found an empty batch \(0,\)"):
        microcnn.lenet(seed=15).predict([])


def test_a_layer_subclass_is_never_replaced_by_the_program():
    class Doubled(Linear):
        def forward(self, x, relu=False):
            return super().forward(x, relu) * np.float32(2)

    def build(kind):
        layer = kind(784, 10, rng=np.random.default_rng(2))
        return Sequential(Flatten(), layer, Softmax(), input_shape=(1, 28, 28))

    net = build(Doubled)
    for _ in range(3):
        got = net.predict(IMAGES[:1])
    assert net._program is None
    assert np.array_equal(got, build(Doubled).predict(IMAGES[:1]))  # a first call: the layer path
    assert not np.array_equal(got, build(Linear).predict(IMAGES[:1]))


@pytest.mark.parametrize("algorithm", ["im2col", "naive", "winograd"])
def test_a_deep_copy_computes_with_its_own_weights(algorithm):
    import copy

    net = microcnn.lenet(seed=16, algorithm=algorithm)
    _warm(net)
    twin = copy.deepcopy(net)
    for p in net.parameters():  # the original changes in place; the copy must not follow
        p.data *= np.float32(-1)
    # Every prediction before any network is built (building one assigns layer attributes, which
    # would make every program rebuild itself).
    got = {(n, k): one.predict(IMAGES[:n]) for n in BATCHES for k, one in enumerate((net, twin))}
    for k, one in enumerate((net, twin)):
        fresh = _fresh(one)
        for n in BATCHES:
            assert np.array_equal(got[n, k], fresh.predict(IMAGES[:n])), ("original", "copy")[k]
