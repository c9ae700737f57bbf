"""Conv2d with groups (depthwise included) and dilation (issue 13): every path that convolves --
naive, im2col (stride 1 in place, zero-bordered, explicit patch matrix for strides), the fused
ReLU + max pooling epilogue, the threaded driver, the autograd backward, the layer and Sequential --
against the plain-NumPy float64 reference of ``tests.layer_refs`` (and PyTorch where installed).

Tolerances: float32 forward against the float64 reference within 2e-5 absolute (values O(1..10));
float32 gradients against float64 central differences of the reference within 1e-4 relative to the
largest gradient.
"""

import warnings

import numpy as np
import pytest

import microcnn.convolution as cv
from microcnn import InputError
from microcnn import autograd as ag
from microcnn.autograd import Tensor
from microcnn.kernels import conv as K
from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, layer_from_config
from microcnn.network import PROGRAM_MAX_BATCH, Sequential

from . import layer_refs as ref

ATOL = 2e-5

# (C, O, kernel, stride, padding, dilation, groups, H, W): groups in {1, 2, C} (depthwise, with a
# channel multiplier too), non-square kernels, strides and dilations, odd sizes
CASES = [
    (4, 6, (3, 2), (1, 1), (1, 0), (2, 1), 2, 11, 10),
    (4, 4, (3, 3), (2, 1), (1, 1), (1, 2), 4, 9, 12),
    (3, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3, 8, 8),  # depthwise, multiplier 2
    (8, 16, (3, 3), (1, 1), (2, 2), (2, 2), 2, 10, 9),  # packed register blocks per group
    (4, 8, (1, 1), (2, 2), (0, 0), (1, 1), 4, 7, 7),
    (2, 3, (2, 3), (1, 2), (0, 1), (3, 1), 1, 9, 8),  # dilation alone
    (6, 6, (5, 5), (1, 1), (0, 0), (1, 1), 6, 12, 12),  # depthwise read in place (no padding)
]


def case(c, o, k, g, h, w, n=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // g, *k)).astype(np.float32)
    b = (rng.standard_normal(o) * 0.5).astype(np.float32)
    return x, wt, b


@pytest.mark.parametrize("spec", CASES)
def test_grouped_dilated_forward_matches_reference(spec, monkeypatch):
    c, o, k, s, p, d, g, h, w = spec
    x, wt, b = case(c, o, k, g, h, w)
    expected = ref.conv2d(x, wt, b, s, p, d, g)
    for got in (K.conv2d_naive(x, wt, b, *s, *p, d, g), K.conv2d(x, wt, b, s, p, d, g),
                cv.conv2d_forward(x, wt, b, s, p, "im2col", {}, dilation=d, groups=g)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=ATOL)
    layer = Conv2d(c, o, k, s, p, dilation=d, groups=g)
    layer.weight.data[...] = wt
    layer.bias.data[...] = b
    np.testing.assert_allclose(layer.forward(x), expected, atol=ATOL)
    assert layer.output_shape(x.shape[1:]) == expected.shape[1:]
    # the threaded driver, in three chunks, gives the same bits as the serial one
    serial = K.conv2d(x, wt, b, s, p, d, g)
    monkeypatch.setattr(K, "_use_parallel", lambda n, group: True)
    monkeypatch.setattr(K.numba, "get_num_threads", lambda: 3)
    np.testing.assert_array_equal(K.conv2d(x, wt, b, s, p, d, g), serial)


@pytest.mark.parametrize("spec", CASES[:4])
@pytest.mark.parametrize("pool", [(2, 2, 2, 2, 0, 0, 0), (3, 2, 2, 1, 1, 1, 1), (2, 3, 1, 2, 0, 1, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_relu_pool_with_groups_and_dilation(spec, pool, relu):
    c, o, k, s, p, d, g, h, w = spec
    x, wt, b = case(c, o, k, g, h, w, n=2, seed=1)
    y = ref.conv2d(x, wt, b, s, p, d, g)
    expected = ref.max_pool2d(np.maximum(y, 0) if relu else y, pool[:2], pool[2:4], pool[4:6], pool[6])
    got = K.im2col_runner(x.shape, wt, *s, *p, d, g)(x, b, pool=pool, relu=relu)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=ATOL)
    # the layer's fused call (what Sequential's Conv2d ReLU MaxPool2d group runs)
    layer = Conv2d(c, o, k, s, p, dilation=d, groups=g)
    layer.weight.data[...], layer.bias.data[...] = wt, b
    mp = MaxPool2d(pool[:2], pool[2:4], pool[4:6], bool(pool[6]))
    np.testing.assert_allclose(layer.forward(x, pool=mp, relu=relu), expected, atol=ATOL)


@pytest.mark.parametrize("spec", CASES)
def test_grouped_dilated_gradients_match_finite_differences(spec):
    c, o, k, s, p, d, g, h, w = spec
    x, wt, b = case(c, o, k, g, min(h, 9), min(w, 9), n=2, seed=2)
    tx, tw, tb = Tensor(x, True), Tensor(wt, True), Tensor(b, True)
    y = ag.conv2d(tx, tw, tb, s, p, d, g)
    weights = np.random.default_rng(3).standard_normal(y.shape)
    y.backward(weights.astype(np.float32))

    def f(xx, ww, bb):
        return ref.conv2d(xx, ww, bb, s, p, d, g)

    for i, t in enumerate((tx, tw, tb)):
        num = ref.numeric_grad(f, [x, wt, b], i, weights)
        assert ref.relative_error(t.grad, num) < 1e-4, ("x", "w", "b")[i]


def test_conv_matches_torch_forward_and_backward():
    torch = pytest.importorskip("torch")
    for c, o, k, s, p, d, g, h, w in CASES:
        x, wt, b = case(c, o, k, g, h, w, n=2, seed=4)
        tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, wt, b))
        ty = torch.nn.functional.conv2d(tx, tw, tb, s, p, d, g)
        gy = np.random.default_rng(5).standard_normal(ty.shape).astype(np.float32)
        ty.backward(torch.tensor(gy, dtype=torch.float64))
        mx, mw, mb = Tensor(x, True), Tensor(wt, True), Tensor(b, True)
        my = ag.conv2d(mx, mw, mb, s, p, d, g)
        my.backward(gy)
        np.testing.assert_allclose(my.data, ty.detach().numpy(), atol=ATOL)
        for mine, theirs in ((mx, tx), (mw, tw), (mb, tb)):
            np.testing.assert_allclose(mine.grad, theirs.grad.numpy(), atol=1e-4,
                                       rtol=1e-5)


def test_other_algorithms_fall_back_to_im2col_for_groups_and_dilation():
    x, wt, b = case(4, 4, (3, 3), 2, 8, 8)
    expected = ref.conv2d(x, wt, b, (1, 1), (1, 1), (1, 1), 2)
    for algorithm in ("winograd", "fft"):
        state = {}
        with pytest.warns(RuntimeWarning, match="groups"):
            got = cv.conv2d_forward(x, wt, b, (1, 1), (1, 1), algorithm, state, groups=2)
        assert state["used"] == "im2col" and "groups" in state["fallback"]
        np.testing.assert_allclose(got, expected, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cv.conv2d_forward(x, wt, b, (1, 1), (1, 1), "auto", {}, groups=2)  # picks im2col, no warning
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert cv.eligible_algorithms(wt.shape, (1, 1), (1, 1), (2, 2), 1) == ("naive", "im2col")


def test_bad_groups_and_dilation_are_refused():
    with pytest.raises(InputError, match="groups \\(3\\) must divide"):
        Conv2d(4, 6, 3, groups=3)
    with pytest.raises(InputError, match="dilation>=1"):
        Conv2d(4, 6, 3, dilation=0)
    layer = Conv2d(4, 6, 3, dilation=3)
    with pytest.raises(InputError, match="smaller than the kernel"):
        layer.forward(np.zeros((1, 4, 6, 6), np.float32))  # dilated extent 7
    with pytest.raises(InputError, match="groups is fixed"):
        layer.groups = 2
    layer.dilation = 1  # allowed: the weights' shape does not depend on it
    assert layer.forward(np.zeros((1, 4, 6, 6), np.float32)).shape == (1, 6, 4, 4)
    with pytest.raises(InputError, match="groups"):
        cv.conv2d_forward(np.zeros((1, 4, 6, 6), np.float32), np.zeros((6, 3, 3, 3), np.float32),
                          np.zeros(6, np.float32), (1, 1), (0, 0), "im2col", {}, groups=2)


def test_config_round_trip_keeps_old_architectures():
    plain = Conv2d(1, 6, 5, padding=2)
    assert "dilation" not in plain.config() and "groups" not in plain.config()  # older files unchanged
    grouped = Conv2d(4, 8, (3, 1), 2, 1, dilation=(2, 1), groups=4, bias=False)
    clone = layer_from_config({"type": "Conv2d", **grouped.config()})
    assert clone.config() == grouped.config() and clone.weight.data.shape == (8, 1, 3, 1)
    assert (clone.dilation, clone.groups) == ((2, 1), 4)


def _separable_net(rng):
    """A depthwise-separable CNN on 3x32x32 with dilated and grouped convolutions."""
    return Sequential(Conv2d(3, 16, 3, padding=1, rng=rng), ReLU(),
                      Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, rng=rng), ReLU(),
                      Conv2d(16, 32, 1, rng=rng), ReLU(), MaxPool2d(3, 2, 1, ceil_mode=True),
                      Conv2d(32, 32, 3, stride=2, padding=1, groups=32, rng=rng), ReLU(),
                      Conv2d(32, 8, 1, groups=2, rng=rng), ReLU(), MaxPool2d(2),
                      Flatten(), Linear(8 * 4 * 4, 10, rng=rng), input_shape=(3, 32, 32))


def _net_reference(net, x):
    a = np.asarray(x, np.float64)
    for layer in net.layers:
        if isinstance(layer, Conv2d):
            a = ref.conv2d(a, layer.weight.data, layer.bias.data, layer.stride, layer.padding, layer.dilation,
                           layer.groups)
        elif isinstance(layer, ReLU):
            a = np.maximum(a, 0)
        elif isinstance(layer, MaxPool2d):
            a = ref.max_pool2d(a, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)
        elif isinstance(layer, Flatten):
            a = a.reshape(len(a), -1)
        else:
            a = a @ layer.weight.data.T.astype(np.float64) + layer.bias.data
    return a


def test_sequential_with_groups_dilation_and_padded_pools_takes_the_layer_path():
    """Groups the compiled program has no ops for (groups, dilation, padded or ceil-mode pools) run
    layer by layer at every batch size, with the reference's results."""
    net = _separable_net(np.random.default_rng(7))
    x = np.random.default_rng(8).random((PROGRAM_MAX_BATCH + 2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(net.forward(x), _net_reference(net, x), atol=1e-4)
    for n in (1, 5):
        first = net.forward(x[:n])
        assert net._program is None
        np.testing.assert_allclose(first, _net_reference(net, x[:n]), atol=1e-4)
        np.testing.assert_array_equal(net.forward(x[:n]), first)
    assert not any(g.compilable() for g in net.inference_groups()[1:4])
