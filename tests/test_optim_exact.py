"""Optimizers and schedules against plain-Python references of PyTorch's documented algorithms, over
several steps and with every option away from its default (dampening, eps that matters, unusual betas,
OneCycleLR's phase boundaries), plus the argument boundaries. Found by mutation testing
(docs/mutation-python.md)."""

import math

import numpy as np
import pytest

from microcnn import optim
from microcnn.autograd import Tensor
from microcnn.errors import InputError

P0 = [0.7, -1.2, 0.05, 2.0]
GRADS = [[0.3, -0.1, 0.8, -2.0], [-0.5, 0.2, 0.1, 1.0], [0.05, 0.6, -0.9, 0.4]]
TOL = 2e-6  # float32 parameters and buffers vs a float64 reference, over three steps


def param(values=P0):
    return Tensor(np.array(values, np.float32), requires_grad=True)


def run(opt_cls, grads=GRADS, **kw):
    p = param()
    opt = opt_cls([p], **kw)
    out = []
    for g in grads:
        p.grad = np.array(g, np.float32)
        opt.step()
        out.append(p.data.astype(np.float64).copy())
    return out


def sgd_ref(grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD's algorithm, element by element in float64."""
    p, buf, out = list(P0), None, []
    for g in grads:
        g = [gi + weight_decay * pi for gi, pi in zip(g, p, strict=True)]
        if momentum:
            buf = list(g) if buf is None else [momentum * b + (1 - dampening) * gi for b, gi in zip(buf, g,
                                                                                                   strict=True)]
            g = [gi + momentum * b for gi, b in zip(g, buf, strict=True)] if nesterov else buf
        p = [pi - lr * gi for pi, gi in zip(p, g, strict=True)]
        out.append(np.array(p))
    return out


def adam_ref(grads, lr, betas, eps, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam / AdamW's algorithm, element by element in float64."""
    b1, b2 = betas
    p, m, v, out = list(P0), [0.0] * len(P0), [0.0] * len(P0), []
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = [pi * (1 - lr * weight_decay) for pi in p]
        else:
            g = [gi + weight_decay * pi for gi, pi in zip(g, p, strict=True)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        p = [pi - lr * (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps)
             for pi, mi, vi in zip(p, m, v, strict=True)]
        out.append(np.array(p))
    return out


@pytest.mark.parametrize("kw", [
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
    {"momentum": 0.6, "nesterov": True, "weight_decay": 0.1},
    {"weight_decay": 0.2},
])
def test_sgd_three_steps_with_every_option(kw):
    got = run(optim.SGD, lr=0.05, **kw)
    for g, r in zip(got, sgd_ref(GRADS, 0.05, **kw), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=TOL)


@pytest.mark.parametrize("cls, wd, decoupled", [(optim.Adam, 0.0, False), (optim.Adam, 0.3, False),
                                                (optim.AdamW, 0.3, True)])
def test_adam_three_steps_with_a_large_eps_and_unusual_betas(cls, wd, decoupled):
    # eps = 0.25 is comparable to sqrt(v): its sign and place in the denominator show in the result
    kw = {"lr": 0.1, "betas": (0.5, 0.7), "eps": 0.25, "weight_decay": wd}
    got = run(cls, **kw)
    for g, r in zip(got, adam_ref(GRADS, 0.1, (0.5, 0.7), 0.25, wd, decoupled), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=TOL)


def test_adamw_defaults_are_pytorchs_with_decoupled_decay_1e_2():
    got = run(optim.AdamW)
    for g, r in zip(got, adam_ref(GRADS, 1e-3, (0.9, 0.999), 1e-8, 1e-2, decoupled=True), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=TOL)


def test_a_gradient_of_the_wrong_shape_is_refused_before_any_parameter_moves():
    a, b = param(), param([1.0, 2.0, 3.0])
    a.grad = np.ones(4, np.float32)
    b.grad = np.ones(2, np.float32)
    opt = optim.SGD([a, b], lr=0.1)
    with pytest.raises(InputError, match=r"gradient of parameter 1 expected shape \(3,\), found \(2,\)"):
        opt.step()
    np.testing.assert_array_equal(a.data, np.array(P0, np.float32))
    np.testing.assert_array_equal(b.data, [1.0, 2.0, 3.0])
    assert a.version == b.version == 0


def test_argument_boundaries():
    p = [param()]
    # accepted: closed lower bounds, dampening's closed upper bound
    optim.SGD(p, lr=0.1, momentum=0.0, dampening=1.0, weight_decay=0.0)
    optim.Adam(p, betas=(0.0, 0.0), weight_decay=0.0)
    bad = [
        (lambda: optim.SGD(p, lr=0.1, momentum=1.0), "momentum"),
        (lambda: optim.SGD(p, lr=0.1, momentum=-1e-9), "momentum"),
        (lambda: optim.SGD(p, lr=0.1, dampening=1.0 + 1e-9), "dampening"),
        (lambda: optim.SGD(p, lr=0.1, weight_decay=-1e-9), "weight_decay"),
        (lambda: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
        (lambda: optim.SGD(p, lr=math.inf), "lr"),
        (lambda: optim.Adam(p, betas=(1.0, 0.9)), r"betas\[0\]"),
        (lambda: optim.Adam(p, betas=(0.9, 1.0)), r"betas\[1\]"),
        (lambda: optim.Adam(p, eps=0.0), "eps"),
        (lambda: optim.Adam(p, weight_decay=-0.1), "weight_decay"),
    ]
    for make, name in bad:
        with pytest.raises(InputError, match=name):
            make()
    assert optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True).nesterov


def one_cycle_ref(t, total, pct_start, max_lr, div, final_div, base_m, max_m):
    """torch.optim.lr_scheduler.OneCycleLR (two phases, cosine), as its source computes it."""
    initial = max_lr / div
    phases = [(float(pct_start * total) - 1, initial, max_lr, max_m, base_m),
              (total - 1, max_lr, initial / final_div, base_m, max_m)]

    def cos(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    start = 0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            pct = (t - start) / (end - start)
            return cos(lr0, lr1, pct), cos(m0, m1, pct)
        start = end
    raise AssertionError


# warm-up ends at step pct * total - 1: 4.2, 1.5, 2.5, exactly 1, and 0.2 with an annealing span < 1
@pytest.mark.parametrize("total, pct", [(13, 0.4), (10, 0.25), (7, 0.5), (10, 0.2), (2, 0.6)])
def test_one_cycle_matches_pytorchs_schedule_at_every_step(total, pct):
    opt = optim.SGD([param()], lr=1.0, momentum=0.5)
    s = optim.OneCycleLR(opt, max_lr=2.0, total_steps=total, pct_start=pct, div_factor=10.0,
                         final_div_factor=100.0, base_momentum=0.8, max_momentum=0.9)
    for t in range(total + 1):  # step total_steps itself is allowed, as in PyTorch
        lr, m = one_cycle_ref(t, total, pct, 2.0, 10.0, 100.0, 0.8, 0.9)
        assert (opt.lr, opt.momentum) == (lr, m)  # same formula, same operations: the same bits
        if t < total:
            s.step()


def test_one_cycle_whose_warm_up_ends_at_step_0_starts_at_max_lr():
    # pct_start * total_steps = 1: PyTorch divides by zero here; the warm-up is taken as complete
    opt = optim.SGD([param()], lr=1.0, momentum=0.5)
    s = optim.OneCycleLR(opt, max_lr=2.0, total_steps=10, pct_start=0.1, base_momentum=0.8, max_momentum=0.9)
    got = [(opt.lr, opt.momentum)]
    for _ in range(9):
        s.step()
        got.append((opt.lr, opt.momentum))
    low = 2.0 / 25 / 1e4
    for t, (lr, m) in enumerate(got):  # annealing over steps 0..9
        assert lr == pytest.approx(low + (2.0 - low) / 2 * (math.cos(math.pi * t / 9) + 1), rel=1e-12)
        assert m == pytest.approx(0.9 + (0.8 - 0.9) / 2 * (math.cos(math.pi * t / 9) + 1), rel=1e-12)


def test_one_cycle_without_momentum_cycling_leaves_the_momentum_alone():
    opt = optim.Adam([param()], lr=1.0, betas=(0.7, 0.99))
    s = optim.OneCycleLR(opt, max_lr=1.0, total_steps=5, cycle_momentum=False)
    for _ in range(4):
        s.step()
        assert opt.betas == (0.7, 0.99)


def test_one_cycle_sets_adam_beta1_and_keeps_beta2():
    opt = optim.Adam([param()], lr=1.0, betas=(0.5, 0.99))
    s = optim.OneCycleLR(opt, max_lr=1.0, total_steps=10, pct_start=0.3, base_momentum=0.8, max_momentum=0.9)
    s.step()
    s.step()  # end of the warm-up: beta1 at base_momentum
    assert opt.betas == (pytest.approx(0.8), 0.99)


def test_step_lr_default_gamma_is_a_tenth():
    opt = optim.SGD([param()], lr=1.0)
    s = optim.StepLR(opt, step_size=1)
    s.step()
    assert opt.lr == pytest.approx(0.1)


def test_step_lr_with_a_gamma_above_one_and_a_step_size_of_three():
    opt = optim.SGD([param()], lr=0.5)
    s = optim.StepLR(opt, step_size=3, gamma=2.0)
    got = [opt.lr]
    for _ in range(7):
        s.step()
        got.append(s.get_last_lr())
    assert got == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_linear_warmup_refusals():
    opt = optim.SGD([param()], lr=1.0)
    with pytest.raises(InputError, match="start_factor"):
        optim.LinearWarmup(opt, 3, start_factor=0.0)
    with pytest.raises(InputError, match="same optimizer"):
        optim.LinearWarmup(opt, 3, after=optim.StepLR(optim.SGD([param()], lr=1.0), 2))
    assert optim.LinearWarmup(opt, 3, start_factor=1.0).get_last_lr() == 1.0


def test_steps_count_the_updates_made_not_the_calls_refused():
    p = param()
    opt = optim.SGD([p], lr=0.1)
    p.grad = np.ones(3, np.float32)  # wrong shape: refused, not counted
    with pytest.raises(InputError):
        opt.step()
    assert opt.steps == 0
    p.grad = np.ones(4, np.float32)
    opt.step()
    opt.step()
    assert opt.steps == 2 and p.version == 2


def test_momentum_value_is_sgd_momentum_or_adam_beta1():
    sgd = optim.SGD([param()], lr=0.1, momentum=0.7)
    adam = optim.Adam([param()], betas=(0.8, 0.95))
    assert sgd.momentum_value == 0.7 and adam.momentum_value == 0.8
    sgd.momentum_value, adam.momentum_value = 0.6, 0.85
    assert sgd.momentum == 0.6 and adam.betas == (0.85, 0.95)


def test_the_base_optimizer_leaves_the_update_rule_to_subclasses():
    p = param()
    p.grad = np.ones(4, np.float32)
    base = optim.Optimizer([p], lr=0.1)
    for action in (base.step, lambda: base.momentum_value,
                   lambda: setattr(base, "momentum_value", 0.9)):
        with pytest.raises(NotImplementedError):
            action()


def test_adam_defaults_are_pytorchs():
    got = run(optim.Adam)  # lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay
    for g, r in zip(got, adam_ref(GRADS, 1e-3, (0.9, 0.999), 1e-8), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=TOL)


def test_a_schedule_must_define_its_rate():
    with pytest.raises(NotImplementedError):
        optim.Schedule(optim.SGD([param()], lr=0.1))


def test_after_the_warm_up_the_next_schedule_starts_at_its_own_step_0():
    opt = optim.SGD([param()], lr=1.0, momentum=0.9)
    cycle = optim.OneCycleLR(opt, max_lr=2.0, total_steps=6)  # its step 0 is max_lr / 25, not its base
    warm = optim.LinearWarmup(opt, 3, start_factor=0.5, after=cycle)
    got = [opt.lr]
    for _ in range(9):
        warm.step()
        got.append(opt.lr)
    # ramp towards the base rate (the optimizer's rate before the schedules), then the cycle from step 0
    assert got[:3] == [0.5, pytest.approx(2 / 3), pytest.approx(5 / 6)]
    assert got[3:] == [cycle.lr_at(t) for t in range(7)] and got[3] == pytest.approx(2.0 / 25)
