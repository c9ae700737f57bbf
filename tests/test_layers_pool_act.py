"""Pooling with any window, stride, padding and ceil mode; ReLU6, LeakyReLU, Tanh, GlobalAvgPool2d and
Dropout (issue 13): forward and backward against plain-NumPy float64 references (``tests.layer_refs``),
float64 central differences and PyTorch where installed; configs, shapes and Sequential.

Tolerances: max pooling exact (it selects a value); averages within 1e-6 absolute; activations
within 2 float32 ulps of the float64 reference (1e-6 relative); gradients within 1e-4 relative (the
tanh gradient 1 - y^2 within 2.5e-7 absolute: float32 cancellation near saturation).
"""

import numpy as np
import pytest

from microcnn import Dropout, GlobalAvgPool2d, InputError, LeakyReLU, ReLU6, Tanh
from microcnn import autograd as ag
from microcnn.autograd import Tensor
from microcnn.kernels import pool
from microcnn.layers import AvgPool2d, Flatten, Linear, MaxPool2d, ReLU, layer_from_config
from microcnn.network import Sequential

from . import layer_refs as ref

RNG = np.random.default_rng(31)
# (kernel, stride, padding, ceil_mode) on (H, W) = (7, 10) and (5, 5): ceil mode with a last partial
# window, a last window that would start in the padding (dropped), padding on one side only
POOLS = [((3, 3), (2, 2), (1, 1), False), ((3, 3), (2, 2), (1, 1), True), ((2, 3), (2, 2), (0, 1), True),
         ((3, 2), (3, 1), (1, 0), True), ((2, 2), (2, 2), (0, 0), True), ((5, 4), (2, 3), (2, 2), False),
         ((1, 3), (1, 2), (0, 1), False), ((4, 4), (3, 3), (2, 2), True)]


@pytest.mark.parametrize("k, s, p, ceil", POOLS)
@pytest.mark.parametrize("hw", [(7, 10), (5, 5)])
def test_pooling_matches_reference(k, s, p, ceil, hw):
    x = RNG.standard_normal((2, 3, *hw)).astype(np.float32)
    expected = ref.max_pool2d(x, k, s, p, ceil)
    layer = MaxPool2d(k, s, p, ceil)
    got = layer.forward(x)
    assert got.shape == expected.shape == (2, *layer.output_shape(x.shape[1:]))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(layer.forward(x, relu=True), np.maximum(expected, 0))
    np.testing.assert_array_equal(ag.max_pool2d(Tensor(x), k, s, p, ceil).data, expected)
    for include in (True, False):
        avg = AvgPool2d(k, s, p, ceil, include)
        expected = ref.avg_pool2d(x, k, s, p, ceil, include)
        np.testing.assert_allclose(avg.forward(x), expected, atol=1e-6)
        np.testing.assert_allclose(avg.forward_tensor(Tensor(x)).data, expected, atol=1e-6)


@pytest.mark.parametrize("k, s, p, ceil", POOLS[:5])
def test_pooling_gradients(k, s, p, ceil):
    x = RNG.standard_normal((2, 2, 7, 6)).astype(np.float32)
    for include in (True, False):
        t = Tensor(x, True)
        y = ag.avg_pool2d(t, k, s, p, ceil, include)
        g = RNG.standard_normal(y.shape)
        y.backward(g.astype(np.float32))
        num = ref.numeric_grad(lambda a, inc=include: ref.avg_pool2d(a, k, s, p, ceil, inc), [x], 0, g)
        assert ref.relative_error(t.grad, num) < 1e-4
    t = Tensor(x, True)  # max pooling: distinct values, so the winners are well defined
    y = ag.max_pool2d(t, k, s, p, ceil)
    g = RNG.standard_normal(y.shape)
    y.backward(g.astype(np.float32))
    num = ref.numeric_grad(lambda a: ref.max_pool2d(a, k, s, p, ceil), [x], 0, g, eps=1e-4)
    assert ref.relative_error(t.grad, num) < 1e-4


def test_max_pool_ties_and_padding_go_to_the_first_real_maximum():
    x = np.array([[[[1, 3, 3], [3, 0, 3], [-2, -1, -5]]]], np.float32)
    t = Tensor(x, True)
    y = ag.max_pool2d(t, 2, 2, 1, ceil_mode=True)  # windows hold padding (-inf), never a winner
    np.testing.assert_array_equal(y.data, [[[[1, 3], [3, 3]]]])
    y.backward(np.ones(y.shape, np.float32))
    # window (1, 1) covers 0, 3, -1, -5 -> the 3 at (1, 2); window (0, 1): 3, 3 -> the first, (0, 1)
    np.testing.assert_array_equal(t.grad, [[[[1, 1, 0], [1, 0, 1], [0, 0, 0]]]])
    neg = -np.ones((1, 1, 2, 2), np.float32)
    np.testing.assert_array_equal(MaxPool2d(2, 1, 1).forward(neg), -np.ones((1, 1, 3, 3)))


def test_pooling_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = RNG.standard_normal((2, 3, 9, 8)).astype(np.float32)
    for k, s, p, ceil in POOLS:
        tx = torch.tensor(x, requires_grad=True)
        ty = F.max_pool2d(tx, k, s, p, ceil_mode=ceil)
        g = RNG.standard_normal(ty.shape).astype(np.float32)
        ty.backward(torch.tensor(g))
        mx = Tensor(x, True)
        my = ag.max_pool2d(mx, k, s, p, ceil)
        my.backward(g)
        np.testing.assert_array_equal(my.data, ty.detach().numpy())
        np.testing.assert_array_equal(mx.grad, tx.grad.numpy())
        for include in (True, False):
            want = F.avg_pool2d(torch.tensor(x), k, s, p, ceil_mode=ceil, count_include_pad=include).numpy()
            np.testing.assert_allclose(AvgPool2d(k, s, p, ceil, include).forward(x), want, atol=1e-6)


def test_pool_geometry_is_checked_and_round_trips():
    with pytest.raises(InputError, match="at most half the kernel"):
        MaxPool2d(2, padding=2)
    layer = MaxPool2d(3, 2, 1, ceil_mode=True)
    with pytest.raises(InputError, match="at most half the kernel"):
        layer.kernel_size = 1  # padding 1 no longer fits
    with pytest.raises(InputError, match="ceil_mode True or False"):
        MaxPool2d(2, ceil_mode="yes")
    with pytest.raises(InputError, match="H>=1"):
        MaxPool2d(3, padding=1).forward(np.zeros((1, 1, 0, 4), np.float32))
    for pl in (layer, AvgPool2d((3, 2), 1, (1, 0), False, False), MaxPool2d(2)):
        cfg = {"type": pl.type, **pl.config()}
        assert layer_from_config(cfg).config() == pl.config()
    assert MaxPool2d(2).config() == {"kernel_size": [2, 2], "stride": [2, 2]}  # older files unchanged


def test_pool_kernels_keep_their_positional_form():
    """The integer path and older callers pass (kh, kw, sh, sw) alone: same results as before."""
    x = RNG.integers(-128, 128, (1, 2, 6, 7)).astype(np.int8)
    np.testing.assert_array_equal(pool.maxpool2d(x, 2, 3, 2, 2), ref.max_pool2d(x, (2, 3), (2, 2)))


ACTIVATIONS = [
    (ReLU6(), lambda a: np.clip(a, 0, 6), lambda a: ((a > 0) & (a < 6)).astype(float)),
    (LeakyReLU(0.2), lambda a: np.where(a > 0, a, 0.2 * a), lambda a: np.where(a > 0, 1.0, 0.2)),
    (LeakyReLU(), lambda a: np.where(a > 0, a, 0.01 * a), lambda a: np.where(a > 0, 1.0, 0.01)),
    (Tanh(), np.tanh, lambda a: 1 - np.tanh(a) ** 2),
]


@pytest.mark.parametrize("layer, f, df", ACTIVATIONS, ids=["relu6", "leaky0.2", "leaky", "tanh"])
def test_activations_forward_and_backward(layer, f, df):
    x = (RNG.standard_normal((3, 4, 5)) * 5).astype(np.float32)
    x[0, 0, :3] = [0, 6, -0.0]  # the kinks: no gradient passes at 0 and 6 (PyTorch's rule)
    want = f(x.astype(np.float64))
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-6, atol=1e-7)
    t = Tensor(x, True)
    y = layer.forward_tensor(t)
    np.testing.assert_array_equal(y.data, layer.forward(x))
    g = RNG.standard_normal(x.shape).astype(np.float32)
    y.backward(g)
    np.testing.assert_allclose(t.grad, g * df(x.astype(np.float64)), rtol=1e-5, atol=1e-6)
    assert layer_from_config({"type": layer.type, **layer.config()}).config() == layer.config()


def test_activations_match_torch():
    torch = pytest.importorskip("torch")
    x = (RNG.standard_normal(200) * 5).astype(np.float32)
    x[:3] = [0, 6, -6]
    pairs = [(ReLU6(), torch.nn.ReLU6()), (LeakyReLU(0.1), torch.nn.LeakyReLU(0.1)),
             (Tanh(), torch.nn.Tanh())]
    for ours, theirs in pairs:
        tx = torch.tensor(x, requires_grad=True)
        theirs(tx).sum().backward()
        t = Tensor(x, True)
        ours.forward_tensor(t).sum().backward()
        np.testing.assert_allclose(ours.forward(x), theirs(torch.tensor(x)).numpy(), rtol=1e-6, atol=1e-7)
        # 1 - tanh(x)^2 in float32 cancels near saturation: 2 ulps of 1 absolute
        np.testing.assert_allclose(t.grad, tx.grad.numpy(), rtol=1e-6, atol=2.5e-7)


def test_global_avg_pool():
    x = RNG.standard_normal((2, 3, 5, 7)).astype(np.float32)
    gap = GlobalAvgPool2d()
    want = x.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(gap.forward(x), want, atol=1e-6)
    assert gap.output_shape((3, 5, 7)) == (3, 1, 1)
    t = Tensor(x, True)
    gap.forward_tensor(t).backward(np.ones((2, 3, 1, 1), np.float32))
    np.testing.assert_allclose(t.grad, np.full(x.shape, 1 / 35), rtol=1e-6)
    with pytest.raises(InputError, match="GlobalAvgPool2d"):
        gap.forward(np.zeros((2, 3), np.float32))


def test_dropout_is_identity_in_inference_and_seeded_inverted_dropout_in_training():
    x = RNG.standard_normal((50, 40)).astype(np.float32) + 3
    drop = Dropout(0.3, rng=np.random.default_rng(1))
    assert drop.forward(x) is x
    t = Tensor(x, True)
    y = drop.forward_tensor(t)
    kept = y.data != 0
    assert abs(kept.mean() - 0.7) < 0.03  # 2000 draws: 3 standard deviations ~ 0.03
    np.testing.assert_allclose(y.data[kept], x[kept] / np.float32(0.7), rtol=1e-6)
    y.backward(np.ones_like(x))
    np.testing.assert_allclose(t.grad, kept / np.float32(0.7), rtol=1e-6)
    again = Dropout(0.3, rng=np.random.default_rng(1)).forward_tensor(Tensor(x))
    np.testing.assert_array_equal(again.data, y.data)  # same seed, same mask
    drop.eval()
    assert drop.forward_tensor(t) is t
    assert not Dropout(1.0).forward_tensor(Tensor(x)).data.any()
    with pytest.raises(InputError, match="0 <= p <= 1"):
        Dropout(1.5)
    assert layer_from_config({"type": "Dropout", "p": 0.25}).p == 0.25


def test_sequential_with_new_layers_never_overwrites_the_input():
    """Dropout returns its input in inference: the ReLU after it must not clamp the caller's array."""
    rng = np.random.default_rng(2)
    net = Sequential(Dropout(0.5), ReLU(), ReLU6(), LeakyReLU(), Tanh(), GlobalAvgPool2d(), Flatten(),
                     Linear(3, 2, rng=rng))
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 10
    kept = x.copy()
    a = np.tanh(np.clip(x.astype(np.float64), 0, 6)).mean(axis=(2, 3))
    want = a @ net[7].weight.data.T.astype(np.float64) + net[7].bias.data
    for _ in range(2):
        np.testing.assert_allclose(net.forward(x), want, atol=1e-5)
        np.testing.assert_array_equal(x, kept)


def test_global_average_sums_each_channel_row_by_row_in_float32():
    """The global fast path (four channels side by side) keeps each channel's order -- row by row from
    0, in float32 -- so its bits are those of that loop, for a channel count that is not a multiple of four
    and a strided input."""
    x = np.random.default_rng(7).standard_normal((3, 6, 5, 14), dtype=np.float32)[:, :, :, ::2]
    expected = np.zeros((3, 6), np.float32)
    for yy in range(5):
        for xx in range(7):
            expected += x[:, :, yy, xx]
    expected *= np.float32(1.0 / 35)
    got = pool.avgpool2d(x, 5, 7, 1, 1)
    assert got.shape == (3, 6, 1, 1)
    np.testing.assert_array_equal(got[:, :, 0, 0].view(np.uint32), expected.view(np.uint32))
