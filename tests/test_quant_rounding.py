"""GPTQ rounding against plain NumPy: its objective, its degenerate case, and its effect on a network."""

import numpy as np
import pytest

import microcnn
from microcnn.quant import calibrate, quantize, sqnr_db
from microcnn.quant.rounding import gptq_round, input_gram

RNG = np.random.default_rng(7)


def objective(w, q, scale, gram):
    """||(W - Q) X||^2 = trace((W - Q) G (W - Q)^T) with G = X X^T."""
    e = w - q * scale[:, None]
    return float(np.einsum("ok,kl,ol->", e, gram, e))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_beats_nearest_on_its_objective(bits):
    x = RNG.normal(size=(60, 500)) + 0.8 * RNG.normal(size=(1, 500))  # correlated inputs
    gram = x @ x.T
    w = RNG.normal(size=(12, 60))
    scale = np.abs(w).max(1) / (2 ** (bits - 1) - 1)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    nearest = np.clip(np.rint(w / scale[:, None]), qmin, qmax)
    q = gptq_round(w, scale, bits, gram).astype(np.float64)
    assert q.min() >= qmin and q.max() <= qmax
    assert objective(w, q, scale, gram) < 0.8 * objective(w, nearest, scale, gram)


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    gram = np.diag(RNG.uniform(1, 2, 30))  # no correlations: no error to pass on
    w = RNG.normal(size=(5, 30))
    scale = np.abs(w).max(1) / 7
    nearest = np.clip(np.rint(w / scale[:, None]), -8, 7)
    np.testing.assert_array_equal(gptq_round(w, scale, 4, gram, damp=0.0), nearest)


def test_input_gram_matches_numpy_patches():
    conv = microcnn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = RNG.normal(size=(4, 2, 7, 6)).astype(np.float32)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    cols = win.transpose(1, 4, 5, 0, 2, 3).reshape(18, -1)  # (c, ky, kx) x positions
    np.testing.assert_allclose(input_gram(conv, x), cols @ cols.T, rtol=1e-5, atol=1e-4)
    dense = microcnn.Linear(6, 2)
    rows = RNG.normal(size=(9, 6))
    np.testing.assert_allclose(input_gram(dense, rows), rows.T @ rows)


def test_gptq_improves_a_4bit_network(mnist_train):
    images = mnist_train[0]
    net = microcnn.lenet(seed=4)
    cal = calibrate(net, images[:300], samples=100, progress=False)
    x = images[2000:2300]
    reference = net.logits(x)
    quality = {r: sqnr_db(reference, quantize(net, cal, 4, 8, rounding=r).logits(x))
               for r in ("nearest", "gptq")}
    assert quality["gptq"] > quality["nearest"] + 1.0
