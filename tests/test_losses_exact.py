"""Losses with every reduction and an upstream gradient other than 1, against float64 NumPy references
(gradients by central differences of the reference); the boundaries of their arguments. Found by
mutation testing (docs/mutation-python.md)."""

import numpy as np
import pytest

from microcnn.autograd import Tensor
from microcnn.errors import InputError
from microcnn.losses import binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy, mse_loss

RNG = np.random.default_rng(21)
UPSTREAM = 2.5  # d(total)/d(loss): the loss op must scale its gradient by it


def reduce(per_element, reduction):
    return per_element.sum() / (per_element.size if reduction == "mean" else 1)


def ce_elements(z, t, e=0.0):
    m = z.max(axis=1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    soft = np.full(z.shape, e / z.shape[1])
    soft[np.arange(len(t)), t] += 1 - e
    return -(soft * logp).sum(axis=1)


def central_diff(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


def check(loss_fn, elements, x, target, reduction):
    """Value and gradient (times UPSTREAM) of ``loss_fn(x, target, reduction)`` against the reference."""
    x = x.astype(np.float32).astype(np.float64)
    xt = Tensor(x.astype(np.float32), requires_grad=True)
    out = loss_fn(xt, target, reduction=reduction)
    ref = lambda a: reduce(elements(a, target), reduction)  # noqa: E731
    assert float(out.data) == pytest.approx(ref(x), rel=1e-6, abs=1e-6)
    out.backward(np.float32(UPSTREAM))
    want = UPSTREAM * central_diff(ref, x)
    np.testing.assert_allclose(xt.grad, want, rtol=1e-4, atol=1e-5 * (1 + np.abs(want).max()))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2, 1.0])
def test_cross_entropy_reductions_smoothing_and_upstream_gradient(reduction, smoothing):
    z, t = RNG.normal(0, 2, (6, 5)), RNG.integers(0, 5, 6)  # non-square: 6 rows, 5 classes
    # the mean runs over rows (not over rows x classes), as PyTorch does
    xt = Tensor(z.astype(np.float32), requires_grad=True)
    out = cross_entropy(xt, t, reduction, label_smoothing=smoothing)
    z64 = z.astype(np.float32).astype(np.float64)
    ref = lambda a: ce_elements(a, t, smoothing).sum() / (len(t) if reduction == "mean" else 1)  # noqa: E731
    assert float(out.data) == pytest.approx(ref(z64), rel=1e-6)
    out.backward(np.float32(UPSTREAM))
    np.testing.assert_allclose(xt.grad, UPSTREAM * central_diff(ref, z64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_reductions_and_upstream_gradient(reduction):
    x, t = RNG.normal(size=(3, 7)), RNG.normal(size=(3, 7))
    check(mse_loss, lambda a, t: (a - t) ** 2, x, t, reduction)


def bce_elements(p, t):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_reductions_and_upstream_gradient(reduction):
    p, t = RNG.uniform(0.05, 0.95, (4, 3)), RNG.uniform(0, 1, (4, 3))
    check(binary_cross_entropy, bce_elements, p, t, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_with_logits_reductions_and_upstream_gradient(reduction):
    x, t = RNG.normal(0, 4, (5, 2)), RNG.uniform(0, 1, (5, 2))
    check(binary_cross_entropy_with_logits, lambda a, t: bce_elements(1 / (1 + np.exp(-a)), t), x, t,
          reduction)


def test_bce_gradient_at_saturated_probabilities_uses_pytorchs_epsilon():
    p = Tensor(np.array([0.0, 1.0, 0.0, 1.0], np.float32), requires_grad=True)
    loss = binary_cross_entropy(p, np.array([1.0, 0.0, 0.0, 1.0]))
    assert float(loss.data) == pytest.approx(50.0)  # two log(0) clamped at -100, two exact zeros
    loss.backward()
    # (p - t) / max(p (1 - p), 1e-12) / N
    np.testing.assert_allclose(p.grad, [-0.25e12, 0.25e12, 0.0, 0.0], rtol=1e-6)


def test_empty_batches_have_zero_loss_and_an_empty_gradient():
    for fn, x, t in [(cross_entropy, np.zeros((0, 3)), np.zeros(0, np.int64)),
                     (mse_loss, np.zeros((0, 2)), np.zeros((0, 2))),
                     (binary_cross_entropy, np.zeros(0), np.zeros(0)),
                     (binary_cross_entropy_with_logits, np.zeros(0), np.zeros(0))]:
        xt = Tensor(x.astype(np.float32), requires_grad=True)
        loss = fn(xt, t)
        assert float(loss.data) == 0.0
        loss.backward()
        assert xt.grad.shape == x.shape


def test_targets_may_be_tensors_or_booleans_but_not_text():
    x = RNG.normal(size=(2, 3))
    t = RNG.integers(0, 2, (2, 3)).astype(bool)
    want = ((x.astype(np.float32).astype(np.float64) - t) ** 2).mean()
    assert float(mse_loss(Tensor(x), t).data) == pytest.approx(want, rel=1e-6)
    assert float(mse_loss(Tensor(x), Tensor(t.astype(np.float32))).data) == pytest.approx(want, rel=1e-6)
    assert float(mse_loss(Tensor(x), t.astype(np.int16)).data) == pytest.approx(want, rel=1e-6)
    with pytest.raises(InputError, match="numeric array, found dtype <U1"):
        mse_loss(Tensor(np.zeros(2)), np.array(["a", "b"]))


def test_argument_boundaries_and_messages():
    z = Tensor(np.zeros((2, 3)))
    with pytest.raises(InputError, match="label_smoothing"):
        cross_entropy(z, np.array([0, 1]), label_smoothing=-0.01)
    with pytest.raises(InputError, match=r"reduction: expected one of \('mean', 'sum'\), found 'none'"):
        mse_loss(z, np.zeros((2, 3)), reduction="none")
    with pytest.raises(InputError, match=r"found values in \[0.5, 0.5\] and NaN"):
        binary_cross_entropy(Tensor([0.5, np.nan]), np.array([1.0, 0.0]))
    with pytest.raises(InputError, match=r"found values in \[-0.5, 0.5\]$"):
        binary_cross_entropy(Tensor([0.5, -0.5]), np.array([1.0, 0.0]))
    with pytest.raises(InputError, match=r"class index expected in \[0, 2\], found 3"):
        cross_entropy(z, np.array([3, -1]))


def test_plain_arrays_are_accepted_as_constant_inputs():
    z, t = RNG.normal(size=(3, 4)), RNG.integers(0, 4, 3)
    p, y = RNG.uniform(0.1, 0.9, 5), RNG.uniform(0, 1, 5)
    z32 = z.astype(np.float32).astype(np.float64)
    assert float(cross_entropy(z.astype(np.float32), t).data) == pytest.approx(ce_elements(z32, t).mean(),
                                                                               rel=1e-6)
    assert float(mse_loss(z, z + 1).data) == pytest.approx(1.0, rel=1e-6)
    p32 = p.astype(np.float32).astype(np.float64)
    assert float(binary_cross_entropy(p, y).data) == pytest.approx(bce_elements(p32, y).mean(), rel=1e-6)
    assert float(binary_cross_entropy_with_logits(np.zeros(4), np.ones(4)).data) == pytest.approx(np.log(2))


def test_one_class_cross_entropy_is_zero_and_zero_classes_are_refused():
    z = Tensor(RNG.normal(size=(4, 1)).astype(np.float32), requires_grad=True)
    loss = cross_entropy(z, np.zeros(4, np.int64))
    assert float(loss.data) == 0.0
    loss.backward()
    np.testing.assert_array_equal(z.grad, np.zeros((4, 1), np.float32))
    with pytest.raises(InputError, match=r"logits expected shape \(N, K\), found \(4, 0\)"):
        cross_entropy(Tensor(np.zeros((4, 0))), np.zeros(4, np.int64))
