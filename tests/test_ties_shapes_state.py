"""Ties, non-square shapes and state carried across calls, outside the forward pooling paths (those are in
test_pool_nonsquare.py): the nearest fixed-point multiplier, observers fed batch after batch, max-pool
backward with tied inputs, non-square convolution and pooling gradients, and optimizer / schedule state
per parameter and across steps. References are exact (fractions) or plain NumPy float64.
"""

import math
from fractions import Fraction

import numpy as np
import pytest

from microcnn import autograd as ag
from microcnn import optim
from microcnn.autograd import Tensor
from microcnn.kernels import conv as K
from microcnn.kernels import elementwise, pool
from microcnn.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from microcnn.quant.params import fixed_point_multiplier

from . import reference as ref


# -- fixed-point multipliers -----------------------------------------------------------------------------
def nearest_m0(m: float, shift: int) -> Fraction:
    """M * 2**shift in exact arithmetic: the nearest m0 is within 1/2 of it."""
    return Fraction(m) * 2**shift


def check_nearest(m: float):
    m0, shift = (int(v[0]) for v in fixed_point_multiplier(m))
    assert 1 <= shift <= 62
    exact = nearest_m0(m, shift)
    assert abs(m0 - exact) <= Fraction(1, 2), (m, m0, shift, float(exact))
    if shift < 62:  # full precision unless the shift is capped
        assert 2**30 <= m0 < 2**31
    return m0, shift


@pytest.mark.parametrize("m, m0, shift", [
    (1 / 3, 1431655765, 32),  # 2**32 / 3 = 1431655765.33
    (2 / 3, 1431655765, 31),  # 2**31 * 2/3 = 1431655765.33
    (0.5, 2**30, 31),
    (0.75, 3 * 2**29, 31),
    (1.0, 2**30, 30),
    (1 - 2.0**-40, 2**30, 30),  # just below 1: m0 rounds up to 2**31, carried into the shift
    (0.1, 1717986918, 34),  # 2**34 / 10 = 1717986918.4
])
def test_fixed_point_multiplier_known_values(m, m0, shift):
    assert tuple(int(v[0]) for v in fixed_point_multiplier(m)) == (m0, shift)
    check_nearest(m)


def test_fixed_point_multiplier_is_the_nearest_not_just_close():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.uniform(0.0, 1.0, 200), 10.0 ** rng.uniform(-12, 8, 200),
        # just below powers of two
        [2.0**e * (1 - 2.0**-k) for e in (-20, -1, 0, 5) for k in (20, 31, 32, 33, 40, 52)],
        [2.0**e * (1 + 2.0**-k) for e in (-20, 0) for k in (31, 32, 33)],
        # exact halves of the last place: m0 + 1/2 (either neighbour is nearest)
        [(2**30 + 0.5) * 2.0**-31, (2**31 - 1.5) * 2.0**-40],
    ])
    for m in values:
        check_nearest(float(m))


@pytest.mark.parametrize("m", [
    (2**30 + 0.75) * 2.0**-63,  # shift capped at 62: m * 2**62 = 2**29 + 0.375 -> 2**29, not 2**29 + 1
    (2**30 + 0.8) * 2.0**-64,
    3.0 * 2.0**-70, 2.0**-62, 2.0**-63 * 1.5, 1e-25, 5e-324,
])
def test_tiny_multipliers_round_once_to_the_capped_shift(m):
    m0, shift = check_nearest(m)
    assert shift == 62 and 0 <= m0 < 2**31


def test_fixed_point_multiplier_per_channel_arrays():
    m = np.array([1 / 3, 0.5, 1e-3, 2.0**-70])
    m0, shift = fixed_point_multiplier(m)
    assert m0.dtype == np.int32 and shift.dtype == np.int32 and m0.shape == shift.shape == (4,)
    for j in range(4):
        assert abs(int(m0[j]) - nearest_m0(float(m[j]), int(shift[j]))) <= Fraction(1, 2)


# -- observers across batches -------------------------------------------------------------------------------
def test_minmax_accumulates_across_batches():
    obs = MinMaxObserver()
    obs.observe(np.array([0.0, 5.0], np.float32))
    obs.observe(np.array([-1.0, 1.0], np.float32))
    assert (obs.min_val, obs.max_val) == (-1.0, 5.0) and obs.range(8) == (-1.0, 5.0)
    obs.observe(np.array([2.0], np.float32))  # inside: nothing moves
    assert obs.range(8) == (-1.0, 5.0) and obs.count == 5


def test_moving_average_follows_the_ema_formula_exactly():
    batches = [np.array([0.0, 5.0]), np.array([-1.0, 1.0]), np.array([-4.0, 2.0]), np.array([3.0, 3.5])]
    c = 0.25
    obs = MovingAverageMinMaxObserver(averaging_constant=c)
    lo = hi = None
    for b in batches:
        obs.observe(b.astype(np.float32))
        if lo is None:  # the first batch sets the averages
            lo, hi = b.min(), b.max()
        else:
            lo, hi = lo + c * (b.min() - lo), hi + c * (b.max() - hi)
        assert obs.min_val == pytest.approx(lo, abs=1e-12) and obs.max_val == pytest.approx(hi, abs=1e-12)
    # after [0, 5], [-1, 1]: min 0 + .25 * (-1 - 0) = -0.25, max 5 + .25 * (1 - 5) = 4
    two = MovingAverageMinMaxObserver(averaging_constant=c)
    two.observe(batches[0].astype(np.float32))
    two.observe(batches[1].astype(np.float32))
    assert (two.min_val, two.max_val) == (-0.25, 4.0)
    one = MovingAverageMinMaxObserver(averaging_constant=1.0)  # c = 1: the last batch alone
    for b in batches:
        one.observe(b.astype(np.float32))
    assert (one.min_val, one.max_val) == (3.0, 3.5)


def test_moving_average_state_round_trip_continues_the_average():
    a, b = np.array([0.0, 5.0], np.float32), np.array([-1.0, 1.0], np.float32)
    first = MovingAverageMinMaxObserver(averaging_constant=0.5)
    first.observe(a)
    resumed = MovingAverageMinMaxObserver(averaging_constant=0.5)
    resumed.load_state(first.state())
    resumed.observe(b)
    first.observe(b)
    assert (resumed.min_val, resumed.max_val, resumed.count) == (first.min_val, first.max_val, first.count)
    assert (first.min_val, first.max_val) == (-0.5, 3.0)


def growing_batches(seed, signed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(5):  # each batch reaches further: the range doubles between batches
        x = rng.uniform(0, 3.0**i, 300)
        if signed:
            x = x * rng.choice([-1.0, 1.0], 300)
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("cls", [HistogramObserver, PercentileObserver, MSEObserver, EntropyObserver])
@pytest.mark.parametrize("signed", [False, True])
def test_histograms_merged_across_batches_equal_one_histogram_of_everything(cls, signed):
    """Doubling the range merges bins pairwise, so the counts equal a histogram of the concatenation on
    the final edges, value for value (the design's claim: no value leaves the bin that holds it)."""
    data = growing_batches(3, signed)
    obs = cls(bins=64)
    for x in data:
        obs.observe(x)
    allv = np.concatenate(data).astype(np.float64)
    width = obs.limit / obs.bins
    assert obs.limit > np.abs(allv).max() >= obs.limit / 2 and obs.limit > 2 * np.abs(data[0]).max()
    idx = np.minimum((np.abs(allv) / width).astype(np.int64), obs.bins - 1)
    np.testing.assert_array_equal(obs.pos, np.bincount(idx[allv >= 0], minlength=obs.bins))
    np.testing.assert_array_equal(obs.neg, np.bincount(idx[allv < 0], minlength=obs.bins))
    assert (obs.min_val, obs.max_val) == (allv.min(), allv.max()) and obs.count == allv.size
    # the signed histogram covers [-R, R] with every value counted once
    edges, counts = obs.histogram()
    assert counts.sum() == allv.size and edges[0] == -obs.limit and edges[-1] == obs.limit


def test_histogram_state_round_trip_then_more_batches():
    data = growing_batches(4, True)
    whole = PercentileObserver(bins=64, percentile=99.0)
    for x in data:
        whole.observe(x)
    part = PercentileObserver(bins=64, percentile=99.0)
    for x in data[:2]:
        part.observe(x)
    resumed = PercentileObserver(bins=64, percentile=99.0)
    resumed.load_state(part.state())
    for x in data[2:]:
        resumed.observe(x)
    np.testing.assert_array_equal(resumed.pos, whole.pos)
    np.testing.assert_array_equal(resumed.neg, whole.neg)
    assert resumed.limit == whole.limit and resumed.range(8) == whole.range(8)


def test_percentile_quantile_at_an_exact_cumulative_tie_takes_the_first_bin():
    """Counts 2, 0, 2 and the median: the cumulative count reaches half at the end of bin 0 exactly;
    the quantile is that edge (the first bin reaching the target), not a later one."""
    from microcnn.quant.observers import _quantile

    edges = np.array([0.0, 1.0, 2.0, 3.0])
    assert _quantile(edges, np.array([2, 0, 2]), 0.5) == 1.0
    assert _quantile(edges, np.array([1, 1, 2]), 0.5) == 2.0
    assert _quantile(edges, np.array([2, 2, 0]), 1.0) == 2.0


# -- max pooling backward --------------------------------------------------------------------------------
def first_max_grad(x, g, kernel, stride):
    """PyTorch's rule: each output's gradient goes to the FIRST maximum of its window in row-major order;
    overlapping windows add up."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    dx = np.zeros(x.shape, np.float64)
    for i in range(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    win = x[i, ch, oy * sh:oy * sh + kh, ox * sw:ox * sw + kw]
                    ky, kx = divmod(int(np.argmax(win)), kw)  # np.argmax: first occurrence
                    dx[i, ch, oy * sh + ky, ox * sw + kx] += g[i, ch, oy, ox]
    return dx


@pytest.mark.parametrize("kernel, stride", [((2, 2), (2, 2)), ((2, 3), (1, 2)), ((3, 2), (2, 1)),
                                            ((3, 3), (1, 1))])
def test_maxpool_backward_with_ties_goes_to_the_first_maximum(kernel, stride):
    rng = np.random.default_rng(sum(kernel) * 10 + sum(stride))
    x = rng.integers(0, 3, (2, 2, 7, 9)).astype(np.float32)  # values 0..2: ties in almost every window
    x[0, 0] = 1.0  # a plane of equal values
    t = Tensor(x, requires_grad=True)
    y = ag.max_pool2d(t, kernel, stride)
    np.testing.assert_array_equal(y.data, ref.max_pool2d(x, kernel, stride))
    g = rng.integers(1, 9, y.shape).astype(np.float32)  # distinct weights show where each one went
    y.backward(g)
    np.testing.assert_array_equal(t.grad, first_max_grad(x, g, kernel, stride))


def test_maxpool_argmax_with_ties_in_non_square_windows():
    x = np.zeros((1, 1, 3, 5), np.float32)
    x[0, 0, 1, 1] = x[0, 0, 0, 2] = x[0, 0, 2, 0] = 4.0  # window (rows 0-2, cols 0-2): three maxima
    _, arg = pool.maxpool2d_argmax(x, 3, 3, 1, 2)
    assert arg[0, 0, 0, 0] == 0 * 5 + 2  # row 0 comes first in row-major order
    _, arg = pool.maxpool2d_argmax(np.zeros((1, 1, 2, 4), np.float32), 2, 3, 1, 1)
    np.testing.assert_array_equal(arg[0, 0], [[0, 1]])  # all equal: the window's first element


@pytest.mark.parametrize("kernel, stride", [((2, 3), (1, 2)), ((3, 2), (2, 1))])
def test_avgpool_backward_non_square(kernel, stride):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 8, 9)).astype(np.float32)
    t = Tensor(x, requires_grad=True)
    y = ag.avg_pool2d(t, kernel, stride)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    (kh, kw), (sh, sw) = kernel, stride
    expected = np.zeros(x.shape)
    for oy in range(y.shape[2]):
        for ox in range(y.shape[3]):
            share = g[:, :, oy:oy + 1, ox:ox + 1] / (kh * kw)
            expected[:, :, oy * sh:oy * sh + kh, ox * sw:ox * sw + kw] += share
    np.testing.assert_allclose(t.grad, expected, atol=1e-6)


# -- convolution gradients with non-square kernel, stride and padding ----------------------------------------
def conv_grads_ref(x, w, g, stride, padding):
    """dx, dw, db of sum(g * conv2d(x, w) + b), by scattering every tap in float64."""
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    dw = np.zeros(w.shape)
    oh, ow = g.shape[2:]
    for u in range(w.shape[2]):
        for v in range(w.shape[3]):
            patch = xp[:, :, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw]
            dw[:, :, u, v] = np.einsum("nohw,nchw->oc", g, patch)
            dxp[:, :, u:u + sh * (oh - 1) + 1:sh, v:v + sw * (ow - 1) + 1:sw] += np.einsum("nohw,oc->nchw", g,
                                                                                           w[:, :, u, v])
    return dxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]], dw, g.sum(axis=(0, 2, 3))


@pytest.mark.parametrize("kernel, stride, padding, hw", [
    ((2, 3), (1, 1), (1, 0), (7, 9)),
    ((3, 2), (2, 1), (0, 1), (9, 6)),
    ((1, 3), (1, 2), (2, 1), (5, 10)),
    ((3, 3), (2, 3), (1, 2), (8, 8)),
])
def test_conv_gradients_non_square(kernel, stride, padding, hw):
    rng = np.random.default_rng(kernel[0] * 5 + stride[1])
    n = 11 if kernel == (2, 3) else 3  # more images than the backward kernel's 8 chunks
    x = rng.standard_normal((n, 2, *hw)).astype(np.float32)
    w = rng.standard_normal((5, 2, *kernel)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    tx, tw, tb = Tensor(x, True), Tensor(w, True), Tensor(b, True)
    y = ag.conv2d(tx, tw, tb, stride, padding)
    np.testing.assert_allclose(y.data, ref.conv2d(x, w, b, stride, padding), atol=1e-4)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    dx, dw, db = conv_grads_ref(x, w, g, stride, padding)
    np.testing.assert_allclose(tx.grad, dx, atol=1e-4)
    np.testing.assert_allclose(tw.grad, dw, atol=1e-4)
    np.testing.assert_allclose(tb.grad, db, atol=1e-4)


@pytest.mark.parametrize("stride, padding", [((1, 2), (0, 1)), ((2, 1), (2, 0)), ((3, 2), (1, 1))])
def test_naive_conv_non_square(stride, padding):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    expected = ref.conv2d(x, w, b, stride, padding)
    np.testing.assert_allclose(K.conv2d_naive(x, w, b, *stride, *padding), expected, atol=1e-4)
    np.testing.assert_allclose(K.conv2d_im2col(x, w, b, *stride, *padding), expected, atol=1e-4)
    wf = K.fft_weights(w, (9 + 2 * padding[0], 11 + 2 * padding[1]))
    np.testing.assert_allclose(K.conv2d_fft(x, wf, b, 3, 2, *stride, *padding), expected, atol=1e-4)


# -- optimizers: state per parameter ----------------------------------------------------------------------
def adam_ref(grads, lr, b1, b2, eps, wd, decoupled, p0):
    """One parameter's Adam/AdamW trajectory in float64; ``grads`` has None for steps without a gradient
    (the parameter is skipped and its own step count does not advance)."""
    p, m, v, t = p0.astype(np.float64), 0.0, 0.0, 0
    for g in grads:
        if g is None:
            continue
        g = g.astype(np.float64)
        t += 1
        if decoupled:
            p = p * (1 - lr * wd)
        elif wd:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + eps)
    return p


@pytest.mark.parametrize("cls, wd", [(optim.Adam, 0.0), (optim.Adam, 0.1), (optim.AdamW, 0.1)])
def test_adam_counts_each_parameters_own_steps(cls, wd):
    rng = np.random.default_rng(1)
    a, b = Tensor(rng.standard_normal(4), True), Tensor(rng.standard_normal(3), True)
    a0, b0 = a.data.copy(), b.data.copy()
    opt = cls([a, b], lr=0.01, weight_decay=wd)
    ga, gb = [], []
    for step in range(6):
        a.grad = rng.standard_normal(4).astype(np.float32)
        b.grad = rng.standard_normal(3).astype(np.float32) if step >= 4 else None  # b joins at step 5
        ga.append(a.grad)
        gb.append(b.grad)
        if step == 4:  # b's first real update: bias correction with t = 1 moves it by ~lr per element
            before = b.data.copy() * (np.float32(1 - 0.01 * wd) if cls is optim.AdamW else 1)
            opt.step()
            if wd == 0:
                np.testing.assert_allclose(np.abs(b.data - before), 0.01, rtol=1e-4)
            continue
        opt.step()
    decoupled = cls is optim.AdamW
    np.testing.assert_allclose(a.data, adam_ref(ga, 0.01, 0.9, 0.999, 1e-8, wd, decoupled, a0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(b.data, adam_ref(gb, 0.01, 0.9, 0.999, 1e-8, wd, decoupled, b0), rtol=1e-5,
                               atol=1e-6)
    assert opt.state[1]["t"] == 2 and opt.state[0]["t"] == 6


def test_sgd_momentum_buffers_are_per_parameter():
    a, b = Tensor(np.zeros(2), True), Tensor(np.zeros(2), True)
    opt = optim.SGD([a, b], lr=0.1, momentum=0.5, weight_decay=0.0)
    a.grad = np.array([1.0, 2.0], np.float32)
    opt.step()  # a: v = g = [1, 2]
    b.grad = np.array([4.0, -4.0], np.float32)
    a.grad = np.array([1.0, 2.0], np.float32)
    opt.step()  # a: v = .5 * [1, 2] + [1, 2] = [1.5, 3]; b: first step, v = g
    np.testing.assert_allclose(a.data, -0.1 * np.array([1 + 1.5, 2 + 3]), rtol=1e-6)
    np.testing.assert_allclose(b.data, -0.1 * np.array([4.0, -4.0]), rtol=1e-6)
    np.testing.assert_allclose(opt.state[1]["momentum_buffer"], [4.0, -4.0])


def test_sgd_weight_decay_uses_each_parameters_own_value():
    a, b = Tensor(np.array([2.0]), True), Tensor(np.array([-10.0]), True)
    opt = optim.SGD([a, b], lr=0.5, momentum=0.9, weight_decay=0.1)
    a.grad, b.grad = np.zeros(1, np.float32), np.zeros(1, np.float32)
    opt.step()  # v = wd * p: a 0.2, b -1.0
    np.testing.assert_allclose([a.data[0], b.data[0]], [2.0 - 0.1, -10.0 + 0.5], rtol=1e-6)
    opt.step()  # v = 0.9 v + wd * p
    va, vb = 0.9 * 0.2 + 0.1 * 1.9, 0.9 * -1.0 + 0.1 * -9.5
    np.testing.assert_allclose([a.data[0], b.data[0]], [1.9 - 0.5 * va, -9.5 - 0.5 * vb], rtol=1e-6)


def test_schedules_keep_their_step_count_across_calls():
    p = Tensor(np.zeros(1), True)
    opt = optim.SGD([p], lr=1.0)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    seen = [sched.get_last_lr()]
    for _ in range(5):
        sched.step()
        seen.append(opt.lr)
    assert seen == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    opt2 = optim.SGD([p], lr=0.1)
    warm = optim.LinearWarmup(opt2, 2, start_factor=0.5, after=optim.StepLR(opt2, step_size=1, gamma=0.1))
    lrs = [opt2.lr]
    for _ in range(4):
        warm.step()
        lrs.append(opt2.lr)
    np.testing.assert_allclose(lrs, [0.05, 0.075, 0.1, 0.01, 0.001])


# -- ties and extremes in the elementwise kernels --------------------------------------------------------
@pytest.mark.parametrize("position", [0, 2, 4])
def test_softmax_rows_with_a_huge_score_in_any_position(position):
    z = np.zeros((2, 5), np.float32)
    z[0, position] = 1e30  # exp(1e30 - m) overflows unless m is the row's true maximum
    z[1] = [3.0, 3.0, 3.0, 3.0, 3.0]  # all tied: uniform
    z[1, position] = 5.0
    p = elementwise.softmax_rows(z)
    np.testing.assert_allclose(p, ref.softmax(z), atol=1e-7)
    np.testing.assert_allclose(elementwise.log_softmax_rows(z)[1], np.log(ref.softmax(z)[1]), atol=1e-6)
    assert elementwise.log_softmax_rows(z)[0, position] == 0.0


def test_all_finite_sees_nan_and_both_infinities():
    x = np.zeros(40, np.float32)
    assert elementwise.all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 17, 39):
            y = x.copy()
            y[where] = bad
            assert not elementwise.all_finite(y)


def test_all_finite_at_block_edges_and_the_extremes_of_float32():
    """The check runs on the bits in blocks of 4,096: a bad value at either side of a block boundary or
    in the short last block is seen; the largest finite magnitudes, subnormals and -0.0 are finite."""
    info = np.finfo(np.float32)
    x = np.zeros(3 * 4096 + 5, np.float32)
    x[[1, 4095, 4096, 8191, 8192, len(x) - 1]] = [info.max, -info.max, info.tiny / 8, -0.0, info.tiny, -1.0]
    assert elementwise.all_finite(x)
    assert elementwise.all_finite(x[:0])
    nan_payloads = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], np.uint32).view(np.float32)
    for bad in (np.inf, -np.inf, *nan_payloads):
        for where in (0, 4095, 4096, 8191, 8192, len(x) - 1):
            y = x.copy()
            y[where] = bad
            assert not elementwise.all_finite(y), (hex(np.float32(bad).view(np.uint32)), where)


def test_relu_backward_at_zero_passes_no_gradient():
    x = np.array([-2.0, -0.0, 0.0, 1e-30, 3.0], np.float32)
    t = Tensor(x, True)
    y = ag.relu(t)
    np.testing.assert_array_equal(y.data, np.maximum(x, 0))
    y.backward(np.full(5, 2.0, np.float32))
    np.testing.assert_array_equal(t.grad, [0, 0, 0, 2.0, 2.0])  # PyTorch: gradient 0 at x = 0


def test_predicted_class_ties_go_to_the_lowest_index_in_every_batch():
    """Equal scores predict the first class (numpy's argmax), also when predict splits the batch."""
    from microcnn.layers import Flatten, Linear, Softmax
    from microcnn.network import Sequential

    lin = Linear(4, 3, rng=np.random.default_rng(0))
    lin.weight.data[:] = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
    lin.bias.data[:] = 0
    net = Sequential(Flatten(), lin, Softmax())
    x = np.zeros((5, 1, 2, 2), np.float32)
    x[1, 0, 0] = [0.0, 1.0]  # class 1 alone on top
    x[2, 0] = [[0.0, 2.0], [2.0, 0.0]]  # classes 1 and 2 tied
    x[3, 0, 1, 0] = 3.0  # class 2 alone
    expected = [0, 1, 1, 2, 0]
    np.testing.assert_array_equal(net.predict_classes(x), expected)
    np.testing.assert_array_equal(net.predict_classes(x, batch_size=2), expected)
    assert net.accuracy(x, np.array(expected)) == 1.0
