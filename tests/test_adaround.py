"""AdaRound: the rectified sigmoid and the regularizer against hand-computed values, the annealing
schedule, the gradient Adam follows against finite differences, the reconstruction it optimises
(decreasing, better than nearest rounding), determinism, and the codes it may choose."""

import math

import numpy as np
import pytest

import microcnn
from microcnn.errors import InputError
from microcnn.kernels.relax import adam_step, initial_v, rectified_sigmoid, regularizer, soft_weights
from microcnn.quant import calibrate, quantize, sqnr_db
from microcnn.quant.adaround import AdaRoundSettings, adaround, beta_at

RNG = np.random.default_rng(2020)
LN3 = math.log(3.0)


def test_rectified_sigmoid_by_hand():
    # sigmoid(0) = 1/2 -> 0.5 * 1.2 - 0.1 = 0.5; sigmoid(ln 3) = 3/4 -> 0.8; sigmoid(-ln 3) = 1/4 -> 0.2;
    # |V| large: the stretch passes 0 and 1 and is clipped there
    v = np.array([0.0, LN3, -LN3, 10.0, -10.0, math.log(11.0)])  # sigmoid(ln 11) = 11/12 -> exactly 1.0
    np.testing.assert_allclose(rectified_sigmoid(v), [0.5, 0.8, 0.2, 1.0, 0.0, 1.0], rtol=0, atol=1e-15)


def test_regularizer_by_hand():
    # 1 - |2h - 1|**beta: h = 0.5 -> 1; h = 0.8 -> 1 - 0.6**beta; h in {0, 1} -> 0
    v = np.array([0.0, LN3, -10.0])
    assert regularizer(v, 2.0) == pytest.approx(1 + (1 - 0.36) + 0, abs=1e-14)
    assert regularizer(v, 20.0) == pytest.approx(1 + (1 - 0.6 ** 20), abs=1e-14)
    assert regularizer(np.array([-LN3, LN3]), 3.0) == pytest.approx(2 * (1 - 0.6 ** 3), abs=1e-14)


def test_initial_v_starts_at_the_fp32_weights():
    rest = np.linspace(0, 0.999, 37)
    np.testing.assert_allclose(rectified_sigmoid(initial_v(rest)), rest, atol=1e-12)


def test_annealing_schedule():
    s = AdaRoundSettings(iterations=100, warmup=0.2, beta_start=20, beta_end=2)
    assert [beta_at(t, s) for t in (0, 10, 19)] == [None, None, None]  # warm-up: no regularizer
    assert beta_at(20, s) == 20.0
    assert beta_at(60, s) == pytest.approx(2 + 18 * 0.5)  # linear from 20 (t = 20) to 2 (t = 100)
    assert beta_at(99, s) == pytest.approx(2 + 18 * (1 - 79 / 80))
    betas = [beta_at(t, s) for t in range(20, 100)]
    assert all(a > b for a, b in zip(betas, betas[1:], strict=False))
    with pytest.raises(InputError, match="warmup"):
        AdaRoundSettings(warmup=1.0)


def test_adam_follows_the_finite_difference_gradient():
    """First Adam step: V moves by -lr * sign(g) where g is the gradient of the surrogate loss
    sum(G * soft_weights(V)) + lam * regularizer(V, beta), here taken by central differences."""
    o, k, qmin, qmax = 3, 5, -4, 3
    w = RNG.normal(0, 1, (o, k))
    scale = np.full(o, 0.4)
    zp = np.array([0.0, 1.0, -1.0])
    base = np.floor(w / scale[:, None]) + zp[:, None]
    v = initial_v(w / scale[:, None] - np.floor(w / scale[:, None]))
    grad_w = RNG.normal(0, 1, (o, k))
    beta, lam, lr = 7.0, 0.3, 1e-3

    def loss(vv):
        soft = soft_weights(vv, base, scale, zp, qmin, qmax).astype(np.float64)
        return float((grad_w * soft).sum()) + lam * regularizer(vv, beta)

    eps = 1e-4
    numeric = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        up, down = v.copy(), v.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (loss(up) - loss(down)) / (2 * eps)
    stepped = v.copy()
    adam_step(stepped, grad_w, base, scale, qmin, qmax, beta, lam, lr, 1, np.zeros_like(v), np.zeros_like(v))
    move = stepped - v
    live = np.abs(numeric) > 1e-3  # (float32 soft weights: tiny gradients are noise)
    assert live.sum() >= 8
    np.testing.assert_array_equal(np.sign(move[live]), -np.sign(numeric[live]))
    np.testing.assert_allclose(np.abs(move[live]), lr, rtol=1e-4)


def _dense_case(seed=0):
    rng = np.random.default_rng(seed)
    layer = microcnn.Linear(24, 6, rng=rng)
    x = rng.normal(0, 1, (200, 24)).astype(np.float32)
    x_quant = (np.round(x * 2) / 2).astype(np.float32)  # the input on a coarse grid, as a quantized net's
    target = np.maximum(layer.forward(x), 0)
    scale = np.abs(layer.weight.data).max(axis=1).astype(np.float64) / 3  # 3-bit grid
    return layer, x, x_quant, target, scale


def _output_error(layer, codes, scale, x_quant, target):
    """The reconstruction objective in float64 NumPy: mean over rows of the summed squared error."""
    w = codes.astype(np.float64) * scale[:, None]
    y = np.maximum(x_quant.astype(np.float64) @ w.T + layer.bias.data, 0)
    return float(((y - target) ** 2).sum(axis=1).mean())


def test_reconstruction_decreases_and_beats_nearest():
    layer, _, x_quant, target, scale = _dense_case()
    # The whole calibration set as the batch: the loss is then the objective itself, and during the
    # warm-up (no regularizer, the first 120 of 600 iterations) Adam only descends it.
    settings = AdaRoundSettings(iterations=600, batch=len(x_quant))
    codes, losses = adaround(layer, scale, 0, 3, x_quant, target, True, settings, seed=1)
    warm = np.array(losses[:120])
    assert (np.diff(warm) <= 0).all() and warm[-1] < 0.95 * warm[0]
    nearest = np.clip(np.rint(layer.weight.data / scale[:, None]), -4, 3)
    assert _output_error(layer, codes, scale, x_quant, target) < 0.95 * _output_error(
        layer, nearest, scale, x_quant, target)


def test_codes_are_floor_or_ceiling_on_the_grid_and_deterministic():
    layer, _, x_quant, target, scale = _dense_case(3)
    zp = np.array([0, 1, -1, 0, 2, -2])
    settings = AdaRoundSettings(iterations=120, batch=16)
    codes, losses = adaround(layer, scale, zp, 3, x_quant, target, True, settings, seed=5)
    again, losses2 = adaround(layer, scale, zp, 3, x_quant, target, True, settings, seed=5)
    np.testing.assert_array_equal(codes, again)
    assert losses == losses2
    assert codes.dtype == np.int8 and codes.min() >= -4 and codes.max() <= 3
    floor = np.floor(layer.weight.data.astype(np.float64) / scale[:, None]) + zp[:, None]
    up = codes - floor
    inside = (floor >= -4) & (floor + 1 <= 3)
    assert set(np.unique(up[inside])) <= {0.0, 1.0}


def test_adaround_lifts_a_3bit_network(mnist_train):
    images = mnist_train[0]
    net = microcnn.lenet(weights="bundled")
    cal = calibrate(net, images[:400], samples=128, progress=False, seed=2)
    x = images[3000:3300]
    reference = net.logits(x)
    nearest = quantize(net, cal, 3, 3, rounding="nearest")
    ada = quantize(net, cal, 3, 3, rounding="adaround", rounding_options={"iterations": 250})
    assert ada.settings["rounding"] == "adaround"
    assert sqnr_db(reference, ada.logits(x)) > sqnr_db(reference, nearest.logits(x)) + 1.0
    again = quantize(net, cal, 3, 3, rounding="adaround", rounding_options={"iterations": 250})
    np.testing.assert_array_equal(again.logits(x), ada.logits(x))  # seeded: the same network
