"""AdaRound's compiled relaxation steps (``kernels.relax``) against hand values and an independent
float64 NumPy transcription of the documented formulas (Nagel et al. 2020 and Adam with b1 = 0.9,
b2 = 0.999, eps = 1e-8): soft weights with a weight zero point and the grid clip, the final codes at
the tie V = 0 and at the grid's ends, and several Adam steps in a row (bias correction of both
moments), including where the rectifying or the grid clip is flat (no gradient).

Tolerances: hand values exact or within 1e-6 (float32 soft weights); the Adam trajectory within
1e-12 relative of the NumPy model (same float64 operations, library exp/pow may differ in the last bit).
"""

import math

import numpy as np

from microcnn.kernels.relax import GAMMA, ZETA, adam_step, hard_codes, soft_weights

LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4 -> h = 0.8; sigmoid(-ln 3) = 1/4 -> h = 0.2


def test_soft_weights_subtract_each_rows_zero_point_and_clip_to_the_grid():
    v = np.array([[0.0, LN3, -LN3], [0.0, 10.0, -10.0]])  # h = 0.5, 0.8, 0.2 / 0.5, 1, 0
    base = np.array([[2.0, 2.0, -4.0], [3.0, 3.0, -5.0]])
    scale, zp = np.array([0.5, 0.25]), np.array([1.0, -2.0])
    got = soft_weights(v, base, scale, zp, -4, 3)
    # row 0: 0.5 * (2.5 - 1), 0.5 * (2.8 - 1), 0.5 * (-3.8 - 1); row 1: 3.5 and 4 clip to 3, -5 to -4
    want = [[0.75, 0.9, -2.4], [0.25 * 5, 0.25 * 5, 0.25 * -2]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (2, 3)


def test_hard_codes_round_up_from_v_zero_and_stay_on_the_grid():
    v = np.array([[0.0, -1e-300, 1e-300, -3.0], [5.0, 5.0, -5.0, -5.0]])
    base = np.array([[0.0, 0.0, 0.0, 1.0], [3.0, 2.0, -4.0, -5.0]])
    got = hard_codes(v, base, -4, 3)
    # V >= 0 rounds up (h(0) = 0.5); base 3 + 1 clips to 3, base -5 clips to -4
    np.testing.assert_array_equal(got, [[1, 0, 1, 1], [3, 3, -4, -4]])
    assert got.dtype == np.int8


def _adam_model(v, grad_w, base, scale, qmin, qmax, beta, lam, lr, t, m, u):
    """The documented step in plain float64 NumPy (vectorised; the kernel loops per element)."""
    sg = 1.0 / (1.0 + np.exp(-v))
    raw = sg * (ZETA - GAMMA) + GAMMA
    dh = np.where((raw > 0) & (raw < 1), (ZETA - GAMMA) * sg * (1 - sg), 0.0)
    h = np.clip(raw, 0, 1)
    q = base + h
    g = np.where((q >= qmin) & (q <= qmax), grad_w * scale[:, None], 0.0)
    if lam:
        d = 2 * h - 1
        g = g + lam * np.where(d != 0, -2 * beta * np.abs(d) ** (beta - 1) * np.sign(d), 0.0)
    g = g * dh
    m[:] = 0.9 * m + 0.1 * g
    u[:] = 0.999 * u + 0.001 * g * g
    v -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(u / (1 - 0.999 ** t)) + 1e-8)


def test_adam_steps_follow_the_documented_update_with_both_bias_corrections():
    rng = np.random.default_rng(19)
    o, k, qmin, qmax = 3, 8, -4, 3
    v = rng.normal(0, 1.5, (o, k))
    v[0, :2] = (12.0, -12.0)  # rectifying clip flat: h'(V) = 0
    base = rng.integers(-5, 4, (o, k)).astype(np.float64)
    base[1, :2] = (-6.0, 3.5)  # the soft weight outside the grid: the grid clip is flat
    scale = np.array([0.5, 0.25, 2.0])
    mine, ref = v.copy(), v.copy()
    m1, u1, m2, u2 = (np.zeros((o, k)) for _ in range(4))
    for t in range(1, 6):  # the second moment's correction first differs from (1 - b2) at t = 2
        grad_w = rng.normal(0, 1, (o, k))
        lam, beta = (0.0, 20.0) if t < 3 else (0.05, 20.0 - 4 * t)
        adam_step(mine, grad_w, base, scale, qmin, qmax, beta, lam, 1e-2, t, m1, u1)
        _adam_model(ref, grad_w, base, scale, qmin, qmax, beta, lam, 1e-2, t, m2, u2)
        np.testing.assert_allclose(mine, ref, rtol=1e-12, atol=0)
        if lam == 0:  # only the regularizer moves a weight whose soft value is off the grid
            np.testing.assert_array_equal(mine[1, :2], v[1, :2])
    np.testing.assert_array_equal(mine[0, :2], v[0, :2])  # no gradient through the flat rectifying clip
    assert (mine != v).sum() >= o * k - 4
