"""Losses against float64 NumPy references (values, and gradients by finite differences of the
reference); optimizer steps against hand-computed updates (to 1e-6); schedules against their
closed forms and PyTorch's documented endpoints."""

import math

import numpy as np
import pytest

from microcnn import optim
from microcnn.autograd import Tensor
from microcnn.errors import InputError
from microcnn.losses import binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy, mse_loss
from tests.test_autograd import GRAD_TOL, numeric_grads

LOSS_TOL = 1e-6


def ce_ref(z, t):
    z = np.asarray(z, np.float64)
    m = z.max(axis=1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(t)), t].mean()


def bce_ref(p, t):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()


def check_loss(loss_fn, ref_fn, x, target):
    """Value matches the reference; gradient matches finite differences of the reference."""
    xt = Tensor(x.astype(np.float32), requires_grad=True)
    out = loss_fn(xt, target)
    x32 = x.astype(np.float32).astype(np.float64)
    expected = ref_fn(x32, target)
    assert out.shape == ()
    assert abs(float(out.data) - expected) <= LOSS_TOL * (1 + abs(expected))
    out.backward()
    (numeric,) = numeric_grads(lambda a: ref_fn(a, target), [x32], np.float64(1.0))
    np.testing.assert_allclose(xt.grad, numeric, rtol=0, atol=GRAD_TOL * (1 + np.abs(numeric).max()))


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cross_entropy_value_and_gradient(scale):
    rng = np.random.default_rng(0)
    z, t = rng.standard_normal((5, 4)) * scale, rng.integers(0, 4, 5)
    check_loss(cross_entropy, ce_ref, z, t)


def test_cross_entropy_with_label_smoothing():
    rng = np.random.default_rng(9)
    z, t = rng.standard_normal((5, 4)) * 3, rng.integers(0, 4, 5)

    def ref(a, t, e=0.1):
        e_z = np.exp(a - a.max(axis=1, keepdims=True))
        logp = np.log(e_z / e_z.sum(axis=1, keepdims=True))
        soft = np.full(a.shape, e / a.shape[1])
        soft[np.arange(len(t)), t] += 1 - e
        return -(soft * logp).sum(axis=1).mean()

    check_loss(lambda x, t: cross_entropy(x, t, label_smoothing=0.1), ref, z, t)
    with pytest.raises(InputError, match="label_smoothing"):
        cross_entropy(Tensor(z), t, label_smoothing=1.5)


def test_cross_entropy_is_stable_for_huge_logits():
    z = Tensor([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]], requires_grad=True)
    loss = cross_entropy(z, np.array([1, 1]))
    assert math.isclose(float(loss.data), 1e4 / 2, rel_tol=1e-6)
    loss.backward()
    np.testing.assert_allclose(z.grad, [[0.5, -0.5, 0], [0, 0, 0]], atol=1e-7)


def test_cross_entropy_sum_reduction():
    z, t = np.array([[1.0, 2.0], [0.5, -1.0]]), np.array([0, 1])
    loss = cross_entropy(Tensor(z), t, reduction="sum")
    assert math.isclose(float(loss.data), 2 * ce_ref(z, t), rel_tol=1e-6)


def test_cross_entropy_bad_input():
    z = Tensor(np.zeros((3, 4)))
    with pytest.raises(InputError, match=r"class index expected in \[0, 3\], found 4"):
        cross_entropy(z, np.array([0, 4, 1]))
    with pytest.raises(InputError, match=r"found -1"):
        cross_entropy(z, np.array([0, -1, 1]))
    with pytest.raises(InputError, match=r"targets expected shape \(3,\).*found \(2,\)"):
        cross_entropy(z, np.array([0, 1]))
    with pytest.raises(InputError, match="integer class indices"):
        cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(InputError, match=r"logits expected shape \(N, K\)"):
        cross_entropy(Tensor(np.zeros(4)), np.array([0]))
    with pytest.raises(InputError, match="reduction"):
        cross_entropy(z, np.array([0, 1, 2]), reduction="avg")


def test_mse_loss_value_and_gradient():
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    check_loss(mse_loss, lambda a, t: ((a - t) ** 2).mean(), x, t)
    with pytest.raises(InputError, match=r"expected shape \(3, 4\).*found \(4,\)"):
        mse_loss(Tensor(x), t[0])


def test_binary_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(2)
    p, t = rng.uniform(0.05, 0.95, (4, 3)), rng.integers(0, 2, (4, 3)).astype(np.float64)
    check_loss(binary_cross_entropy, bce_ref, p, t)
    t_soft = rng.uniform(0, 1, (4, 3))  # soft targets are allowed, as in PyTorch
    check_loss(binary_cross_entropy, bce_ref, p, t_soft)


def test_binary_cross_entropy_clamps_log_at_minus_100_and_refuses_non_probabilities():
    loss = binary_cross_entropy(Tensor([0.0, 1.0]), np.array([1.0, 0.0]))
    assert float(loss.data) == pytest.approx(100.0)
    with pytest.raises(InputError, match=r"probabilities expected in \[0, 1\]"):
        binary_cross_entropy(Tensor([0.5, 1.5]), np.array([1.0, 0.0]))
    with pytest.raises(InputError, match=r"targets expected shape \(2,\)"):
        binary_cross_entropy(Tensor([0.5, 0.5]), np.array([1.0, 0.0, 1.0]))


def test_binary_cross_entropy_with_logits_value_gradient_and_stability():
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((4, 3)) * 3, rng.integers(0, 2, (4, 3)).astype(np.float64)
    check_loss(binary_cross_entropy_with_logits, lambda a, t: bce_ref(1 / (1 + np.exp(-a)), t), x, t)
    big = Tensor([100.0, -100.0, 100.0], requires_grad=True)
    loss = binary_cross_entropy_with_logits(big, np.array([1.0, 0.0, 0.0]))
    assert float(loss.data) == pytest.approx(100.0 / 3, rel=1e-6)  # only the wrong one costs ~100
    loss.backward()
    np.testing.assert_allclose(big.grad, [0, 0, 1 / 3], atol=1e-7)


# -- optimizers -----------------------------------------------------------------------------------
def make_param(values, grad):
    p = Tensor(np.array(values, np.float32), requires_grad=True)
    p.grad = np.array(grad, np.float32)
    return p


P0, G1, G2 = [1.0, -2.0, 0.5], [0.1, -0.3, 2.0], [-0.2, 0.4, 1.0]


def run_two_steps(opt_cls, **kw):
    p = make_param(P0, G1)
    opt = opt_cls([p], **kw)
    opt.step()
    after_one = p.data.astype(np.float64).copy()
    p.grad = np.array(G2, np.float32)
    opt.step()
    return after_one, p.data.astype(np.float64), p.version


def test_sgd_plain_and_weight_decay():
    p0, g1 = np.array(P0), np.array(G1)
    one, _, version = run_two_steps(optim.SGD, lr=0.1)
    np.testing.assert_allclose(one, p0 - 0.1 * g1, rtol=0, atol=1e-6)
    assert version == 2
    one, _, _ = run_two_steps(optim.SGD, lr=0.1, weight_decay=0.01)
    np.testing.assert_allclose(one, p0 - 0.1 * (g1 + 0.01 * p0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_two_steps(nesterov):
    lr, m = 0.1, 0.9
    p0, g1, g2 = np.array(P0), np.array(G1), np.array(G2)
    one, two, _ = run_two_steps(optim.SGD, lr=lr, momentum=m, nesterov=nesterov)
    buf1 = g1
    p1 = p0 - lr * (g1 + m * buf1 if nesterov else buf1)
    buf2 = m * buf1 + g2
    p2 = p1 - lr * (g2 + m * buf2 if nesterov else buf2)
    np.testing.assert_allclose(one, p1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(two, p2, rtol=0, atol=1e-6)


def adam_ref(p, grads, lr, b1, b2, eps, wd=0.0, decoupled=False):
    p, m, v = np.array(p), 0.0, 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.array(g)
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("cls,wd,decoupled", [(optim.Adam, 0.0, False), (optim.Adam, 0.05, False),
                                              (optim.AdamW, 0.05, True)])
def test_adam_and_adamw_two_steps(cls, wd, decoupled):
    one, two, _ = run_two_steps(cls, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    r1, r2 = adam_ref(P0, [G1, G2], 0.01, 0.9, 0.999, 1e-8, wd, decoupled)
    np.testing.assert_allclose(one, r1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(two, r2, rtol=0, atol=1e-6)


def test_first_adam_step_moves_each_weight_by_lr():
    # With bias correction the first step is lr * g / (|g| + eps): a textbook sanity point.
    one, _, _ = run_two_steps(optim.Adam, lr=0.01)
    np.testing.assert_allclose(one, np.array(P0) - 0.01 * np.sign(G1), atol=1e-6)


def test_zero_grad_and_parameters_without_gradient_are_skipped():
    a, b = make_param([1.0], [1.0]), make_param([2.0], [1.0])
    b.grad = None
    opt = optim.SGD([a, b], lr=0.5)
    opt.step()
    assert a.data[0] == 0.5 and b.data[0] == 2.0 and a.version == 1 and b.version == 0
    opt.zero_grad()
    assert a.grad is None


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), "fast"])
def test_non_positive_learning_rate_is_refused(lr):
    with pytest.raises(InputError, match="lr"):
        optim.Adam([make_param([1.0], [1.0])], lr=lr)


def test_bad_optimizer_arguments():
    p = make_param([1.0], [1.0])
    with pytest.raises(InputError, match="momentum"):
        optim.SGD([p], lr=0.1, momentum=1.5)
    with pytest.raises(InputError, match="Nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(InputError, match="at least one parameter"):
        optim.SGD([], lr=0.1)
    with pytest.raises(InputError, match="betas"):
        optim.Adam([p], betas=(0.9, 1.0))


# -- schedules -----------------------------------------------------------------------------------
def lrs(schedule, n):
    out = [schedule.get_last_lr()]
    for _ in range(n):
        schedule.step()
        out.append(schedule.get_last_lr())
    return np.array(out)


def opt_at(lr):
    return optim.SGD([make_param([1.0], [1.0])], lr=lr, momentum=0.9)


def test_step_lr():
    np.testing.assert_allclose(lrs(optim.StepLR(opt_at(1.0), 2, 0.5), 5), [1, 1, 0.5, 0.5, 0.25, 0.25])


def test_cosine_annealing_lr():
    got = lrs(optim.CosineAnnealingLR(opt_at(1.0), T_max=4, eta_min=0.1), 4)
    want = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    np.testing.assert_allclose(got, want)
    assert got[0] == 1.0 and got[-1] == pytest.approx(0.1)


def test_one_cycle_lr_and_momentum():
    opt = opt_at(0.1)
    s = optim.OneCycleLR(opt, max_lr=1.0, total_steps=10)  # warm-up ends at step 0.3*10 - 1 = 2
    momenta = [opt.momentum]
    got = [opt.lr]
    for _ in range(9):
        s.step()
        got.append(opt.lr)
        momenta.append(opt.momentum)
    assert got[0] == pytest.approx(1 / 25) and got[2] == pytest.approx(1.0)
    assert got[1] == pytest.approx((1 + 1 / 25) / 2)  # halfway along the cosine warm-up
    assert got[9] == pytest.approx(1 / 25 / 1e4)
    low = 1 / 25 / 1e4
    want_tail = [low + (1 - low) / 2 * (math.cos(math.pi * (t - 2) / 7) + 1) for t in range(2, 10)]
    np.testing.assert_allclose(got[2:], want_tail)
    assert momenta[0] == pytest.approx(0.95) and momenta[2] == pytest.approx(0.85)
    assert momenta[9] == pytest.approx(0.95)
    s.step()  # step 10 == total_steps is allowed, as in PyTorch
    with pytest.raises(InputError, match="total_steps"):
        s.step()


def test_one_cycle_cycles_adam_beta1():
    opt = optim.Adam([make_param([1.0], [1.0])], lr=1.0)
    optim.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    assert opt.betas == (pytest.approx(0.95), 0.999)


def test_linear_warmup_then_cosine():
    opt = opt_at(1.0)
    s = optim.LinearWarmup(opt, warmup_steps=4, start_factor=0.2, after=optim.CosineAnnealingLR(opt, T_max=4))
    got = lrs(s, 8)
    np.testing.assert_allclose(got[:4], [0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(got[4:], [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)], atol=1e-12)
    np.testing.assert_allclose(lrs(optim.LinearWarmup(opt_at(2.0), 2, 0.5), 3), [1.0, 1.5, 2.0, 2.0])


def test_bad_schedule_arguments():
    with pytest.raises(InputError, match="step_size"):
        optim.StepLR(opt_at(1.0), 0)
    with pytest.raises(InputError, match="max_lr"):
        optim.OneCycleLR(opt_at(1.0), max_lr=0.0, total_steps=10)
    with pytest.raises(InputError, match="T_max"):
        optim.CosineAnnealingLR(opt_at(1.0), T_max=0)
