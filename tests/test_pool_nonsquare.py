"""Max pooling with a different kernel and stride per direction, in every path that pools (standalone,
fused into the FP32 convolution, the compiled small-batch program, the integer kernels and stages);
half-way requantization cases in every integer epilogue; and the output range of every integer stage.

References are plain NumPy (``tests.reference`` and the int64 references of ``test_quant_kernels``).
Non-square windows catch swapped h/w strides or kernel sizes, which square cases cannot see.
"""

from fractions import Fraction

import numpy as np
import pytest

import microcnn.convolution as cv
from microcnn.kernels import conv as K
from microcnn.kernels import integer as ki
from microcnn.kernels import pool, program
from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU
from microcnn.network import PROGRAM_MAX_BATCH, Sequential
from microcnn.quant.params import ActQuant, fixed_point_multiplier
from microcnn.quant.qlayers import QConv2d, QLinear, QMaxPool2d

from . import reference as ref
from .test_quant_kernels import conv_acc_ref, finish_ref, packed, requant_ref

ATOL = 2e-5  # float32 convolutions against the float64 reference, values O(1..10)

# (kernel, stride) pairs that differ per direction, plus a square one on odd sizes
POOLS = [((2, 3), (1, 2)), ((3, 2), (2, 1)), ((1, 3), (1, 1)), ((2, 2), (2, 1)), ((3, 3), (2, 2)),
         ((2, 2), (2, 2))]
# (H, W): non-square, odd
SIZES = [(7, 10), (9, 6), (5, 5)]


def relu(a):
    return np.maximum(a, 0)


# -- standalone pooling -----------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, stride", POOLS)
@pytest.mark.parametrize("h, w", SIZES)
def test_maxpool_nonsquare_matches_reference(kernel, stride, h, w):
    rng = np.random.default_rng(h * 31 + w)
    x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    expected = ref.max_pool2d(x, kernel, stride)
    got = pool.maxpool2d(x, *kernel, *stride)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(pool.maxpool2d(x, *kernel, *stride, floor=0), relu(expected))
    np.testing.assert_array_equal(MaxPool2d(kernel, stride).forward(x), expected)
    np.testing.assert_array_equal(MaxPool2d(kernel, stride).forward(x, relu=True), relu(expected))
    # the threaded driver (chunks of images), whatever Numba's thread count
    out = np.empty_like(expected, dtype=np.float32)
    pool._maxpool_parallel(x, out, pool.PoolGeometry(*kernel, *stride), np.float32(-np.inf), 3)
    np.testing.assert_array_equal(out, expected)
    yv, arg = pool.maxpool2d_argmax(x, *kernel, *stride)
    np.testing.assert_array_equal(yv, expected)
    np.testing.assert_allclose(pool.avgpool2d(x, *kernel, *stride), ref.avg_pool2d(x, kernel, stride),
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32])
@pytest.mark.parametrize("kernel, stride", POOLS[:3])
def test_integer_maxpool_nonsquare_matches_reference(dtype, kernel, stride):
    info = np.iinfo(dtype)
    x = np.random.default_rng(3).integers(info.min, int(info.max) + 1, (2, 2, 8, 11)).astype(dtype)
    got = pool.maxpool2d(x, *kernel, *stride)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref.max_pool2d(x, kernel, stride))


# -- FP32 convolution fused with pooling --------------------------------------------------------------
# (C, O, kernel, stride, padding, H, W): stride 1 (patch rows read in place, or from a zero-bordered
# copy), and strides > 1 in one direction (explicit patch matrix)
CONVS = [
    (2, 3, (2, 3), (1, 1), (1, 0), 9, 11),
    (1, 4, (3, 2), (1, 1), (0, 0), 10, 8),
    (3, 2, (3, 2), (2, 1), (1, 2), 13, 8),
    (2, 3, (2, 2), (1, 2), (0, 1), 9, 15),
    (2, 2, (3, 2), (1, 1), (0, 1), 8, 9),
]


def conv_case(c, o, kernel, h, w, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, *kernel)).astype(np.float32)
    b = (rng.standard_normal(o) * 0.5).astype(np.float32)
    return x, wt, b


def conv_pool_ref(x, wt, b, stride, padding, kernel, pstride, with_relu):
    y = ref.conv2d(x, wt, b, stride, padding)
    return ref.max_pool2d(relu(y) if with_relu else y, kernel, pstride)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("kernel, pstride", POOLS[:4])
@pytest.mark.parametrize("with_relu", [False, True])
def test_fused_im2col_pool_nonsquare(conv, kernel, pstride, with_relu, monkeypatch):
    c, o, k, stride, padding, h, w = conv
    for n in (1, 7):
        x, wt, b = conv_case(c, o, k, h, w, n, seed=n)
        expected = conv_pool_ref(x, wt, b, stride, padding, kernel, pstride, with_relu)
        run = K.im2col_runner(x.shape, wt, *stride, *padding)
        got = run(x, b, pool=(*kernel, *pstride), relu=with_relu)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=ATOL)
    # the threaded driver (taken with several Numba threads), in three chunks
    monkeypatch.setattr(K, "_use_parallel", lambda n, group: True)
    monkeypatch.setattr(K.numba, "get_num_threads", lambda: 3)
    np.testing.assert_allclose(run(x, b, pool=(*kernel, *pstride), relu=with_relu), expected, atol=ATOL)


@pytest.mark.parametrize("algorithm", ["naive", "fft"])
def test_other_algorithms_pool_nonsquare(algorithm):
    c, o, k, stride, padding, h, w = CONVS[0]
    x, wt, b = conv_case(c, o, k, h, w, 2)
    for kernel, pstride in POOLS[:2]:
        for with_relu in (False, True):
            got = cv.conv2d_forward(x, wt, b, stride, padding, algorithm, {}, (*kernel, *pstride),
                                    with_relu)
            expected = conv_pool_ref(x, wt, b, stride, padding, kernel, pstride, with_relu)
            np.testing.assert_allclose(got, expected, atol=ATOL)


def test_winograd_pool_nonsquare():
    x, wt, b = conv_case(2, 3, (3, 3), 9, 12, 2)
    for kernel, pstride in POOLS[:2]:
        got = cv.conv2d_forward(x, wt, b, (1, 1), (1, 0), "winograd", {}, (*kernel, *pstride), True)
        np.testing.assert_allclose(got, conv_pool_ref(x, wt, b, (1, 1), (1, 0), kernel, pstride, True),
                                   atol=1e-4)


def _net(conv, kernel, pstride, with_relu):
    c, o, k, stride, padding, h, w = conv
    rng = np.random.default_rng(5)
    layer = Conv2d(c, o, k, stride, padding, rng=rng)
    layer.bias.data[:] = rng.standard_normal(o).astype(np.float32) * 0.5
    body = [layer, ReLU()] if with_relu else [layer]
    return Sequential(*body, MaxPool2d(kernel, pstride), Flatten(),
                      Linear(_flat(conv, kernel, pstride), 3, rng=rng))


def _flat(conv, kernel, pstride):
    c, o, k, stride, padding, h, w = conv
    oh, ow = (h + 2 * padding[0] - k[0]) // stride[0] + 1, (w + 2 * padding[1] - k[1]) // stride[1] + 1
    return o * ((oh - kernel[0]) // pstride[0] + 1) * ((ow - kernel[1]) // pstride[1] + 1)


def _net_ref(net, x, with_relu):
    conv, lin = net.layers[0], net.layers[-1]
    pl = net.layers[2 if with_relu else 1]
    a = conv_pool_ref(x, conv.weight.data, conv.bias.data, conv.stride, conv.padding, pl.kernel_size,
                      pl.stride, with_relu)
    return ref.linear(a.reshape(len(a), -1), lin.weight.data, lin.bias.data)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("kernel, pstride", [POOLS[0], POOLS[1], POOLS[3]])
@pytest.mark.parametrize("with_relu", [False, True])
def test_sequential_paths_pool_nonsquare(conv, kernel, pstride, with_relu):
    """The layer path (batch >= PROGRAM_MAX_BATCH, or a first call) and the compiled program (later
    small batches of the same sample shape) against the reference."""
    c, o, k, stride, padding, h, w = conv
    net = _net(conv, kernel, pstride, with_relu)
    big = np.random.default_rng(9).standard_normal((PROGRAM_MAX_BATCH + 3, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(net.forward(big), _net_ref(net, big, with_relu), atol=1e-4)
    for n in (1, 7):
        x = big[:n].copy()
        first = net.forward(x)  # layer path (the program was built for this shape by the call above)
        assert net._program is not None and net._program.sample_shape == (c, h, w)
        got = program.run_program(x, net._program.ops).reshape(first.shape)
        np.testing.assert_allclose(got, _net_ref(net, x, with_relu), atol=1e-4)
        np.testing.assert_array_equal(net.forward(x), got)


def test_program_never_overwrites_the_callers_input():
    """A leading ReLU works on the caller's array: the program must copy, not clamp it in place."""
    rng = np.random.default_rng(6)
    net = Sequential(ReLU(), Flatten(), Linear(12, 2, rng=rng))
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    kept = x.copy()
    expected = ref.linear(relu(x).reshape(2, -1), net.layers[2].weight.data, net.layers[2].bias.data)
    for _ in range(2):  # layer path, then the program
        np.testing.assert_allclose(net.forward(x), expected, atol=1e-5)
        np.testing.assert_array_equal(x, kept)
    assert net._program is not None and net._program.ops[0, 0] == program.OP_RELU


def test_program_relu_maxpool_op_nonsquare():
    """ReLU followed by MaxPool2d (no convolution before it) is one OP_MAXPOOL with a floor of 0."""
    net = Sequential(ReLU(), MaxPool2d((2, 3), (1, 2)), Flatten())
    x = np.random.default_rng(2).standard_normal((3, 2, 7, 10)).astype(np.float32)
    expected = relu(ref.max_pool2d(x, (2, 3), (1, 2))).reshape(3, -1)
    np.testing.assert_array_equal(net.forward(x), expected)  # layer path; builds the program
    np.testing.assert_array_equal(net.forward(x), expected)  # program
    assert net._program is not None and net._program.ops[0, 0] == program.OP_MAXPOOL


# -- integer convolution fused with pooling -----------------------------------------------------------
# N, C, H, W, O, kernel, stride, padding: even C (channels paired), odd C (kernel rows paired), vertical
# stride (explicit patch words), each with non-square kernels
QCONVS = [
    (2, 2, 9, 12, 3, (3, 2), (1, 1), (1, 0)),
    (2, 3, 10, 9, 5, (2, 3), (1, 1), (0, 1)),
    (2, 3, 13, 11, 9, (3, 3), (2, 1), (1, 1)),
    (1, 1, 8, 13, 2, (1, 2), (1, 2), (0, 0)),
    (2, 2, 14, 9, 4, (3, 2), (2, 1), (0, 1)),  # explicit patch words with a non-square kernel
    (1, 3, 13, 12, 3, (2, 3), (2, 2), (1, 0)),
]


def _qcase(n, c, h, w, o, kernel, wbits, abits, seed):
    rng = np.random.default_rng(seed)
    qmax = 2**abits - 1
    x = rng.integers(0, qmax + 1, (n, c, h, w)).astype(np.uint8)
    half = 2 ** (wbits - 1)
    wq = rng.integers(-half, half, (o, c, *kernel)).astype(np.int8)
    bias = rng.integers(-3000, 3000, o).astype(np.int32)
    real = rng.uniform(1e-4, 2e-2, o)
    m0, shift = fixed_point_multiplier(real)
    return x, int(rng.integers(0, qmax + 1)), wq, bias, m0, shift, real.astype(np.float32)


@pytest.mark.parametrize("qconv", QCONVS)
@pytest.mark.parametrize("kernel, pstride", POOLS)
@pytest.mark.parametrize("mode", [ki.MODE_FIXEDPOINT, ki.MODE_FLOAT, ki.MODE_DEQUANT])
def test_qconv2d_pool_nonsquare(qconv, kernel, pstride, mode):
    n, c, h, w, o, k, stride, padding = qconv
    oh, ow = (h + 2 * padding[0] - k[0]) // stride[0] + 1, (w + 2 * padding[1] - k[1]) // stride[1] + 1
    if oh < kernel[0] or ow < kernel[1]:
        pytest.skip("pool window larger than the convolution's output")
    for wbits, abits in ((8, 8), (4, 4)):
        x, zp_in, wq, bias, m0, shift, fmult = _qcase(n, c, h, w, o, k, wbits, abits, seed=c * 7 + wbits)
        zp, lo, hi = 5, 5, 2**abits - 1  # a fused ReLU: lo is the output zero point
        if mode == ki.MODE_DEQUANT:
            lo, hi = -2**31, 2**31 - 1  # real output, no clamp: pooling of negative values shows
        acc = conv_acc_ref(x, zp_in, wq, bias, stride, padding, (kernel, pstride))
        expected = finish_ref(acc, mode, m0, shift, fmult, zp, lo, hi, axis=1)
        out_q = np.empty(acc.shape, np.uint8) if mode != ki.MODE_DEQUANT else np.empty((0,) * 4, np.uint8)
        out_f = np.empty(acc.shape, np.float32) if mode == ki.MODE_DEQUANT else np.empty((0,) * 4, np.float32)
        ki.qconv2d(x, zp_in, packed(wq, wbits), wbits, k, stride, padding, (*kernel, *pstride), bias, m0,
                   shift, fmult, mode, zp, lo, hi, out_q, out_f)
        got = out_f if mode == ki.MODE_DEQUANT else out_q
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kernel, pstride", POOLS[:2])
def test_quantized_stages_pool_nonsquare(kernel, pstride):
    """QConv2d with a fused pool and a separate QMaxPool2d stage, against the int64 reference."""
    n, c, h, w, o, k, stride, padding = QCONVS[1]
    x, zp_in, wq, bias, _, _, _ = _qcase(n, c, h, w, o, k, 8, 8, seed=1)
    in_act, out_act = ActQuant(0.05, zp_in, 8), ActQuant(0.4, 7, 8)
    wscale = np.linspace(0.01, 0.02, o)
    stage = QConv2d((0, 1, 2), wq, 8, wscale, bias, in_act, out_act, True, stride, padding, (kernel, pstride))
    m0, shift = fixed_point_multiplier(0.05 * wscale / 0.4)
    acc = conv_acc_ref(x, zp_in, wq, bias, stride, padding, (kernel, pstride))
    expected = requant_ref(acc, m0.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1), 7, 7, 255)
    np.testing.assert_array_equal(stage.run(x), expected)
    qpool = QMaxPool2d((3,), out_act, kernel, pstride)
    np.testing.assert_array_equal(qpool.run(x), ref.max_pool2d(x, kernel, pstride))


# -- half-way cases in requantization -----------------------------------------------------------------
def half_up(acc, multiplier: Fraction) -> np.ndarray:
    """round(acc * M) with exact halves towards +infinity (the fixed-point rule), in exact arithmetic."""
    return np.array([int((Fraction(int(a)) * multiplier + Fraction(1, 2)).__floor__()) for a in acc.ravel()],
                    np.int64).reshape(acc.shape)


def half_even(acc, multiplier: Fraction) -> np.ndarray:
    """round(acc * M), exact halves to even (the float mode's rint)."""
    return np.array([round(Fraction(int(a)) * multiplier) for a in acc.ravel()], np.int64).reshape(acc.shape)


# multipliers whose products have exact halves: M = 1/2 (odd acc), 1/4 (acc = 2 mod 4), 3/8 (acc = 4 mod 8)
TIE_MULTIPLIERS = [Fraction(1, 2), Fraction(1, 4), Fraction(3, 8)]


def _tie_params():
    m0, shift = fixed_point_multiplier(np.array([float(m) for m in TIE_MULTIPLIERS]))
    for m, a, s in zip(TIE_MULTIPLIERS, m0, shift, strict=True):
        assert Fraction(int(a), 2 ** int(s)) == m  # exactly representable
    return m0, shift, np.array([float(m) for m in TIE_MULTIPLIERS], np.float32)


def test_requantize_one_half_way_cases():
    m0, shift, _ = _tie_params()
    acc = np.arange(-40, 41)
    for j, m in enumerate(TIE_MULTIPLIERS):
        expected = np.clip(half_up(acc, m) + 100, 0, 255)
        got = np.array([ki.requantize_one(int(a), int(m0[j]), int(shift[j]), 100, 0, 255) for a in acc])
        np.testing.assert_array_equal(got, expected)
    assert ki.requantize_one(-3, int(m0[0]), int(shift[0]), 0, -10, 10) == -1  # -1.5 -> -1 (up)
    assert ki.requantize_one(3, int(m0[0]), int(shift[0]), 0, -10, 10) == 2  # 1.5 -> 2
    assert ki.requantize_float_one(5, 0.5, 0, -10, 10) == 2  # float mode: 2.5 -> 2 (even)
    assert ki.requantize_float_one(-5, 0.5, 0, -10, 10) == -2


@pytest.mark.parametrize("pool_window", [None, ((2, 2), (2, 2)), ((2, 3), (1, 2))])
@pytest.mark.parametrize("mode", [ki.MODE_FIXEDPOINT, ki.MODE_FLOAT])
def test_conv_epilogues_round_half_way_cases_by_the_rule(pool_window, mode):
    """A 1x1 convolution with weight 1 makes every accumulator x - 128 + bias: the generic epilogue (no
    pool), the fused 2x2 pool and the general pool all meet exact halves."""
    rng = np.random.default_rng(11)
    o = len(TIE_MULTIPLIERS)
    x = rng.integers(0, 256, (2, 1, 8, 12)).astype(np.uint8)
    wq = np.ones((o, 1, 1, 1), np.int8)
    bias = np.array([0, 1, -3], np.int32)
    m0, shift, fmult = _tie_params()
    acc = conv_acc_ref(x, 128, wq, bias, (1, 1), (0, 0), pool_window)
    rnd = half_up if mode == ki.MODE_FIXEDPOINT else half_even
    expected = np.stack([rnd(acc[:, j], TIE_MULTIPLIERS[j]) for j in range(o)], axis=1)
    expected = np.clip(expected + 100, 0, 255).astype(np.uint8)
    assert (acc % 2 == 1).any() and (acc % 4 == 2).any() and (acc % 8 == 4).any()  # ties do occur
    out = np.empty(acc.shape, np.uint8)
    flat_pool = (1, 1, 1, 1) if pool_window is None else (*pool_window[0], *pool_window[1])
    ki.qconv2d(x, 128, packed(wq, 8), 8, (1, 1), (1, 1), (0, 0), flat_pool, bias, m0, shift, fmult, mode, 100,
               0, 255, out, np.empty((0,) * 4, np.float32))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", [ki.MODE_FIXEDPOINT, ki.MODE_FLOAT])
def test_linear_epilogue_rounds_half_way_cases_by_the_rule(mode):
    x = np.arange(-60, 61).reshape(-1, 1) + 128  # one feature: acc = x - 128 + bias
    x = x.astype(np.uint8)
    o = len(TIE_MULTIPLIERS)
    wq = np.ones((o, 1), np.int8)
    bias = np.array([0, 2, -4], np.int32)
    m0, shift, fmult = _tie_params()
    acc = (x.astype(np.int64) - 128) @ wq.T.astype(np.int64) + bias
    rnd = half_up if mode == ki.MODE_FIXEDPOINT else half_even
    expected = np.stack([rnd(acc[:, j], TIE_MULTIPLIERS[j]) for j in range(o)], axis=1)
    out = np.empty((len(x), o), np.uint8)
    ki.qlinear(x, 128, packed(wq, 8), 8, bias, m0, shift, fmult, mode, 100, 0, 255, out,
               np.empty((0, 0), np.float32))
    np.testing.assert_array_equal(out, np.clip(expected + 100, 0, 255))


# -- output ranges of integer stages -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_net_and_images():
    rng = np.random.default_rng(4)
    net = Sequential(Conv2d(1, 4, (3, 2), (1, 2), (1, 0), rng=rng), ReLU(), MaxPool2d((2, 3), (1, 2)),
                     Conv2d(4, 6, (2, 2), rng=rng), ReLU(), Flatten(), Linear(6 * 10 * 1, 16, rng=rng),
                     ReLU(), Linear(16, 5, rng=rng))
    # width 12 -> conv1 (12 - 2)//2 + 1 = 6 -> pool (6 - 3)//2 + 1 = 2 -> conv2 1; height 12 -> 12 -> 11 -> 10
    assert net.forward(np.zeros((1, 1, 12, 12), np.float32)).shape == (1, 5)
    images = rng.random((24, 1, 12, 12), dtype=np.float32)
    return net, images


@pytest.mark.parametrize("act_bits, weight_bits", [(4, 4), (4, 8), (8, 4)])
@pytest.mark.parametrize("requant", ["fixedpoint", "float"])
def test_integer_stages_emit_codes_within_the_requested_precision(small_net_and_images, act_bits, weight_bits,
                                                                  requant):
    """Bounds come from the requested bit widths, never from the stage's own clamp fields."""
    from microcnn.quant import calibrate, quantize

    net, images = small_net_and_images
    cal = calibrate(net, images, method="minmax", samples=12, progress=False)
    qnet = quantize(net, cal, weight_bits=weight_bits, act_bits=act_bits, requant=requant)
    top = (1 << act_bits) - 1
    wlo, whi = -(1 << (weight_bits - 1)), (1 << (weight_bits - 1)) - 1
    # inputs far outside the calibrated range saturate every stage at both ends
    x = np.concatenate([images, 6 * images, -3 * images, np.zeros_like(images[:2])])
    saturated = 0
    for stage in qnet.stages:
        if hasattr(stage, "weight_values"):
            wv = stage.weight_values
            assert wlo <= wv.min() and wv.max() <= whi, stage.kind
        x = stage.run(x)
        if x.dtype == np.uint8:
            assert x.max() <= top, (stage.kind, stage.layers, int(x.max()))
            saturated += int((x == top).any())
        else:
            assert x.dtype == np.float32 and np.isfinite(x).all()
    assert saturated >= 3  # the bound was reached, so the check had something to check


def test_relu_stages_never_emit_codes_below_the_zero_point():
    """A fused ReLU clamps at the code of real 0, computed here from the range (not the stage)."""
    act_in = ActQuant.from_range(-1.0, 3.0, 4)
    act_out = ActQuant.from_range(-2.0, 6.0, 4)
    zero_code = round(2.0 / (8.0 / 15))  # real 0 on the [-2, 6] grid of 15 steps
    assert act_out.zero_point == zero_code
    rng = np.random.default_rng(8)
    x = rng.integers(0, 16, (40, 12)).astype(np.uint8)
    wq = rng.integers(-8, 8, (6, 12)).astype(np.int8)
    for requant in ("fixedpoint", "float"):
        stage = QLinear((0, 1), wq, 4, np.full(6, 0.3), np.zeros(6, np.int32), act_in, act_out, True, requant)
        y = stage.run(x)
        assert y.min() == zero_code and y.max() == 15  # both clamps reached
