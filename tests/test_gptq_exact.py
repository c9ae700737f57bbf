"""GPTQ rounding against the Optimal Brain Quantization recursion written with the explicit inverse
Hessian (GPTQ's Cholesky form is an algebraic rewrite of it), and its handling of dead inputs, scalar
scales, conv-shaped weights and clipping. Found by mutation testing (docs/mutation-python.md)."""

import numpy as np
import pytest

import microcnn
from microcnn.quant.rounding import gptq_round, input_gram

RNG = np.random.default_rng(17)


def obq_reference(w, scale, bits, gram, damp):
    """Quantize column j, push its error onto the later columns through H^-1, then drop j from H^-1."""
    w = np.array(w, np.float64)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    h = gram + damp * np.mean(np.diag(gram)) * np.eye(len(gram))
    hinv = np.linalg.inv(h)
    q = np.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = np.clip(np.rint(w[:, j] / scale), qmin, qmax)
        err = (w[:, j] - q[:, j] * scale) / hinv[j, j]
        w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


def correlated_problem(rows, k, samples=300):
    x = RNG.normal(size=(k, samples)) + 0.7 * RNG.normal(size=(1, samples))
    w = RNG.normal(size=(rows, k))
    return w, x @ x.T


@pytest.mark.parametrize("bits, damp", [(4, 0.01), (8, 0.01), (4, 0.3), (3, 0.0)])
def test_gptq_equals_the_explicit_inverse_hessian_recursion(bits, damp):
    w, gram = correlated_problem(7, 11)  # 7 rows, 11 columns
    scale = np.abs(w).max(1) / (2 ** (bits - 1) - 1) * RNG.uniform(0.6, 1.0, 7)  # some clipping
    got = gptq_round(w, scale, bits, gram, damp=damp)
    assert got.dtype == np.int8 and got.shape == (7, 11)
    np.testing.assert_array_equal(got, obq_reference(w, scale, bits, gram, damp))


def test_dead_inputs_get_zero_weights_and_leave_the_others_as_without_them():
    w, gram = correlated_problem(4, 9)
    dead = [2, 6]
    gram[dead, :] = 0.0
    gram[:, dead] = 0.0
    scale = np.abs(w).max(1) / 7
    got = gptq_round(w, scale, 4, gram, damp=0.0)
    alive = [j for j in range(9) if j not in dead]
    assert not got[:, dead].any()
    reduced = gptq_round(w[:, alive], scale, 4, gram[np.ix_(alive, alive)], damp=0.0)
    np.testing.assert_array_equal(got[:, alive], reduced)


def test_a_scalar_scale_is_every_rows_scale_and_conv_weights_are_flattened():
    w, gram = correlated_problem(3, 12)
    got = gptq_round(w.reshape(3, 3, 2, 2), 0.2, 8, gram)
    np.testing.assert_array_equal(got, gptq_round(w, np.full(3, 0.2), 8, gram))
    assert got.shape == (3, 12)


def test_input_gram_refuses_layers_without_weights():
    with pytest.raises(TypeError, match="ReLU"):
        input_gram(microcnn.ReLU(), np.zeros((2, 3), np.float32))


def test_default_damping_is_one_percent_of_the_mean_diagonal():
    w, gram = correlated_problem(5, 8)
    scale = np.abs(w).max(1) / 7
    np.testing.assert_array_equal(gptq_round(w, scale, 4, gram), obq_reference(w, scale, 4, gram, 0.01))


def test_conv_input_gram_is_accumulated_in_float64():
    # inputs near 1 with small variations: a float32 sum of products would lose the variations
    conv = microcnn.Conv2d(1, 1, 2)
    x = (1.0 + 1e-3 * RNG.normal(size=(30, 1, 9, 8))).astype(np.float32)
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (2, 2), axis=(2, 3))
    cols = win.transpose(1, 4, 5, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(input_gram(conv, x), cols @ cols.T, rtol=1e-13, atol=0)
