"""Cross-layer equalization: the FP32 function is preserved (1e-5 relative), the ranges of every pair
end up equal, one sweep matches a NumPy computation of the paper's scales, and per-tensor quantization
of a badly balanced network recovers."""

import numpy as np
import pytest

import microcnn
from microcnn.errors import InputError
from microcnn.lenet import fashion_cnn
from microcnn.quant import calibrate, quantize, sqnr_db
from microcnn.quant.cle import equalization_pairs, equalize

RNG = np.random.default_rng(19)


@pytest.mark.parametrize("make", [lambda: microcnn.lenet(weights="bundled"), lambda: fashion_cnn(seed=2)])
def test_function_is_preserved(make, mnist_test):
    net = make()
    before = net.state_dict()
    x = mnist_test[0][:64]
    eq = equalize(net)
    ref, got = net.logits(x).astype(np.float64), eq.logits(x).astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    for k, v in net.state_dict().items():  # the input network is untouched
        np.testing.assert_array_equal(v, before[k])
    assert any(not np.array_equal(eq.state_dict()[k], before[k]) for k in before)


def _ranges(net, i, j):
    w1 = net.layers[i].weight.data.astype(np.float64)
    w2 = net.layers[j].weight.data.astype(np.float64)
    r1 = np.abs(w1.reshape(len(w1), -1)).max(axis=1)
    r2 = np.abs(w2.reshape(len(w2), len(w1), -1)).max(axis=(0, 2))  # Flatten: channel c's block of inputs
    return r1, r2


def test_every_pair_ends_balanced():
    net = fashion_cnn(seed=5)
    assert equalization_pairs(net) == [(0, 3), (3, 7), (7, 9)]  # conv-conv, conv-(pool, flatten)-fc, fc-fc
    eq = equalize(net, iterations=200, tol=1e-9)
    for i, j in equalization_pairs(eq):
        r1, r2 = _ranges(eq, i, j)
        np.testing.assert_allclose(r1, r2, rtol=1e-4)


def test_one_sweep_matches_numpy():
    rng = np.random.default_rng(1)
    net = microcnn.Sequential(microcnn.Linear(5, 4, rng=rng), microcnn.ReLU(), microcnn.Linear(4, 3, rng=rng))
    w1, b1 = net.layers[0].weight.data.astype(np.float64), net.layers[0].bias.data.astype(np.float64)
    w2 = net.layers[2].weight.data.astype(np.float64)
    s = np.sqrt(np.abs(w1).max(axis=1) / np.abs(w2).max(axis=0))
    eq = equalize(net, iterations=1)
    np.testing.assert_allclose(eq.layers[0].weight.data, w1 / s[:, None], rtol=1e-6)
    np.testing.assert_allclose(eq.layers[0].bias.data, b1 / s, rtol=1e-6)
    np.testing.assert_allclose(eq.layers[2].weight.data, w2 * s[None, :], rtol=1e-6)
    np.testing.assert_array_equal(eq.layers[2].bias.data, net.layers[2].bias.data)


def test_equalization_repairs_per_tensor_quantization(mnist_train):
    images = mnist_train[0]
    net = microcnn.lenet(weights="bundled")
    # The same function with conv1's channels scaled 1/16 .. 16 (and conv2's inputs by the inverse):
    # a per-tensor grid then wastes most of its levels on the largest channel.
    state = net.state_dict()
    f = 2.0 ** RNG.integers(-4, 5, len(state["0.weight"]))
    state["0.weight"] = (state["0.weight"] * f[:, None, None, None]).astype(np.float32)
    state["0.bias"] = (state["0.bias"] * f).astype(np.float32)
    state["3.weight"] = (state["3.weight"] / f[None, :, None, None]).astype(np.float32)
    skewed = microcnn.lenet()
    skewed.load_state_dict(state)
    x = images[4000:4300]
    reference = net.logits(x)
    quality = {}
    for name, model in (("skewed", skewed), ("equalized", equalize(skewed))):
        cal = calibrate(model, images[:300], samples=100, progress=False)
        q = quantize(model, cal, 4, 8, per_channel=False, bias_correction=False)
        quality[name] = sqnr_db(reference, q.logits(x))
    assert quality["equalized"] > quality["skewed"] + 3.0


def test_refuses_other_models():
    with pytest.raises(InputError, match="expected a microcnn Sequential"):
        equalize("lenet")
