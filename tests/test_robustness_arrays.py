"""Hostile and broken arrays from notebooks, and integer kernels at their extremes.

* ``predict`` (FP32 and quantized networks), ``calibrate`` and ``fit``: wrong rank, shape or dtype,
  NaN/Inf, empty batches are refused with ``InputError``; uint8 pixels are scaled by 1/255; memory
  layout (Fortran order, strides, byte order, read-only) never changes a result; a failed call leaves
  the network as it was.
* Integer kernels: worst-case int8 / int4 operands at the largest reductions do not overflow the int32
  accumulators, requantization saturates, and results equal an int64 (Python int) reference bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import microcnn
from microcnn.errors import InputError
from microcnn.kernels import integer as ki
from microcnn.quant import calibrate, quantize
from microcnn.quant.params import ActQuant, fixed_point_multiplier
from microcnn.quant.qlayers import ACC_LIMIT, QConv2d, QLinear, QMaxPool2d
from microcnn.train import fit, mlp
from tests.test_quant_kernels import conv_acc_ref, packed, requant_ref

RNG = np.random.default_rng(2024)
X = RNG.random((6, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def models():
    net = microcnn.lenet(seed=3)
    cal = calibrate(net, RNG.random((16, 1, 28, 28), dtype=np.float32), method="minmax", samples=16,
                    progress=False)
    return {"fp32": net, "int8": quantize(net, cal, 8, 8), "w4a4": quantize(net, cal, 4, 4)}


MODELS = ["fp32", "int8", "w4a4"]

# -- arrays the API refuses --------------------------------------------------------------------------
SHAPE = r"expected shape \(N, 1, 28, 28\), found "
DTYPE = r"expected float32 \(or uint8 pixels 0..255\), found dtype "
NONFINITE = r"expected finite float32 values, found .*NaN/Inf"
BAD_ARRAYS = {
    "rank 5": (X[None], SHAPE + r"\(1, 6, 1, 28, 28\)"),
    "rank 1": (X.ravel(), SHAPE + r"\(4704,\)"),
    "rank 0": (np.float32(0.5), SHAPE + r"\(\)"),
    "channels last": (X.transpose(0, 2, 3, 1), SHAPE + r"\(6, 28, 28, 1\)"),
    "3 channels": (np.repeat(X, 3, axis=1), SHAPE + r"\(6, 3, 28, 28\)"),
    "H 27": (X[:, :, 1:], SHAPE + r"\(6, 1, 27, 28\)"),
    "W 32": (np.pad(X, ((0, 0), (0, 0), (0, 0), (2, 2))), SHAPE + r"\(6, 1, 28, 32\)"),
    "H 0": (X[:, :, :0], SHAPE + r"\(6, 1, 0, 28\)"),
    "empty batch": (X[:0], r"expected at least one image, found an empty batch \(0, 1, 28, 28\)"),
    "int64": (X.astype(np.int64), DTYPE + "int64"),
    "int8": (X.astype(np.int8), DTYPE + "int8"),
    "uint16": (X.astype(np.uint16), DTYPE + "uint16"),
    "bool": (X > 0.5, DTYPE + "bool"),
    "complex": (X.astype(np.complex64), DTYPE + "complex64"),
    "object": (X.astype(object), DTYPE + "object"),
    "strings": (np.full((6, 1, 28, 28), "0.5"), DTYPE + "<U3"),
    "None": (None, DTYPE + "object"),
    "ragged list": ([[0.0] * 28, [0.0] * 27], r"expected an array, found list"),
    "NaN": (np.where(X > 0.99, np.nan, X).astype(np.float32), NONFINITE + r".*first in image 0"),
    "+Inf in image 4": (np.where(np.arange(6)[:, None, None, None] == 4, np.inf, X).astype(np.float32),
                        NONFINITE + r".*first in image 4\)"),
    "-Inf": (np.full((2, 1, 28, 28), -np.inf, np.float32), NONFINITE),
    "float64 beyond float32": (np.full((2, 1, 28, 28), 1e39), r"expected finite float32 values, found 1568 "
                               r"NaN/Inf or beyond float32's range"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
@pytest.mark.parametrize("model", MODELS)
def test_predict_refuses_bad_arrays(models, model, case):
    bad, message = BAD_ARRAYS[case]
    m = models[model]
    with pytest.raises(InputError, match="images: " + message):
        m.predict(bad)
    with pytest.raises(InputError, match="images: " + message):
        m.trace(bad)
    with pytest.raises(InputError, match="images: " + message):
        m.accuracy(bad, np.zeros(6, np.int64))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8", True, None])
@pytest.mark.parametrize("model", MODELS)
def test_predict_refuses_bad_batch_sizes(models, model, batch_size):
    with pytest.raises(InputError, match=rf"batch_size: expected an integer >= 1, found {batch_size!r}"):
        models[model].predict(X, batch_size=batch_size)


# -- accepted forms give identical results ------------------------------------------------------------
def _big_endian(x):
    return x.astype(">f4")


def _read_only(x):
    y = x.copy()
    y.flags.writeable = False
    return y


def _cropped_view(x):
    big = np.zeros((len(x), 1, 30, 31), np.float32)
    big[:, :, 1:29, 2:30] = x
    return big[:, :, 1:29, 2:30]


LAYOUTS = {
    "fortran": np.asfortranarray,
    "every other image": lambda x: np.repeat(x, 2, axis=0)[::2],
    "rows and columns swapped in memory": lambda x: np.ascontiguousarray(x.swapaxes(2, 3)).swapaxes(2, 3),
    "cropped view": _cropped_view,
    "big-endian": _big_endian,
    "read-only": _read_only,
    "float64": lambda x: x.astype(np.float64),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_memory_layout_and_dtype_do_not_change_results(models, model, layout):
    m = models[model]
    x = LAYOUTS[layout](X)
    assert np.array_equal(x, X)
    if layout not in ("big-endian", "read-only", "float64"):
        assert not x.flags.c_contiguous
    np.testing.assert_array_equal(m.predict(x), m.predict(X))
    # Negative strides. An image's FP32 result may move by an ulp with its position in the batch
    # (GEMM blocking); the integer pipeline is exact.
    np.testing.assert_allclose(m.predict(X[::-1]), m.predict(X)[::-1], rtol=0,
                               atol=1e-6 if model == "fp32" else 0)


@pytest.mark.parametrize("model", MODELS)
def test_uint8_pixels_are_scaled_by_1_over_255(models, model):
    m = models[model]
    pixels = RNG.integers(0, 256, (6, 1, 28, 28)).astype(np.uint8)
    np.testing.assert_array_equal(m.predict(pixels), m.predict(pixels.astype(np.float32) / np.float32(255)))
    np.testing.assert_array_equal(m.predict(pixels[2, 0]), m.predict(pixels[2:3]))  # one (H, W) image
    half = X.astype(np.float16)  # other float widths are converted, not refused
    np.testing.assert_array_equal(m.predict(half), m.predict(half.astype(np.float32)))


@pytest.mark.parametrize("model", MODELS)
def test_batch_of_one_and_partial_batches_equal_one_pass(models, model):
    m = models[model]
    whole = m.predict(X)
    # FP32 kernels may partition a batch differently (float32 summation order); integers are exact.
    atol = 1e-6 if model == "fp32" else 0
    singles = np.concatenate([m.predict(X[i:i + 1]) for i in range(len(X))])
    np.testing.assert_allclose(singles, whole, rtol=0, atol=atol)
    for batch_size in (1, 4, 5, 6, 7):
        np.testing.assert_allclose(m.predict(X, batch_size=batch_size), whole, rtol=0, atol=atol)
    np.testing.assert_allclose(whole.sum(axis=1), 1, atol=1e-5)


def test_overflowing_inputs_fp32_refused_quantized_saturate(models):
    huge = np.full((3, 1, 28, 28), 1e38, np.float32)
    huge[0] = X[0]
    # Finite inputs, finite weights, yet 784 * 1e38 overflows float32: NaN probabilities are refused.
    summing = microcnn.Sequential(microcnn.Flatten(), microcnn.Linear(784, 2), microcnn.Softmax(),
                                  input_shape=(1, 28, 28))
    summing[1].weight.data[:] = 1.0
    summing[1].bias.data[:] = 0.0
    with pytest.raises(InputError, match=r"outputs overflowed to NaN/Inf for 2 images \(first: image 1, "
                                         r"largest \|input\| 1e\+38\)"):
        summing.predict(huge)
    np.testing.assert_allclose(summing.predict(X[:1]), [[0.5, 0.5]], atol=1e-6)
    for model in ("int8", "w4a4"):
        # The input quantizer clamps at its largest code: 3e38 and 1e6 are the same integer.
        saturated = np.where(huge > 1, np.float32(1e6), huge)
        np.testing.assert_array_equal(models[model].predict(huge), models[model].predict(saturated))
        assert np.isfinite(models[model].predict(huge)).all()


# -- calibrate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["rank 5", "H 27", "empty batch", "int64", "bool", "NaN", "-Inf", "None"])
def test_calibrate_refuses_bad_arrays(models, case):
    bad, message = BAD_ARRAYS[case]
    with pytest.raises(InputError, match="calibration images: " + message):
        calibrate(models["fp32"], bad, method="minmax", progress=False)


def test_calibrate_refuses_constant_images(models):
    with pytest.raises(InputError, match="all 3 images are constant"):
        calibrate(models["fp32"], np.full((3, 1, 28, 28), 0.5, np.float32), method="minmax", progress=False)


def _ranges(cal):
    return {name: (obs.min_val, obs.max_val) for name, obs in cal.observers.items()}


def test_calibrate_layouts_uint8_and_single_image(models):
    net = models["fp32"]
    base = _ranges(calibrate(net, X, method="minmax", progress=False))
    for layout in ("fortran", "every other image", "big-endian", "cropped view"):
        assert _ranges(calibrate(net, LAYOUTS[layout](X), method="minmax", progress=False)) == base, layout
    pixels = (X * 255).astype(np.uint8)
    assert _ranges(calibrate(net, pixels, method="minmax", progress=False)) == _ranges(
        calibrate(net, pixels.astype(np.float32) / np.float32(255), method="minmax", progress=False))
    one = calibrate(net, X[3:4], method="minmax", progress=False)
    assert one.samples == 1
    assert _ranges(one)["input"] == (float(X[3].min()), float(X[3].max()))
    assert _ranges(one)["softmax"][1] <= 1.0


# -- fit --------------------------------------------------------------------------------------------
IMAGES = RNG.random((24, 1, 28, 28), dtype=np.float32)
LABELS = RNG.integers(0, 10, 24)


def _weights(net):
    return [p.data.copy() for p in net.parameters()]


def _fit(net, images=IMAGES, labels=LABELS, **kw):
    return fit(net, images, labels, **{"epochs": 1, "batch_size": 8, "progress": False, "seed": 0, **kw})


@pytest.mark.parametrize("case", ["rank 1", "H 27", "empty batch", "int64", "NaN", "+Inf in image 4"])
def test_fit_refuses_bad_images_and_leaves_the_network_untouched(case):
    net = mlp(784, 8, 10)
    before = _weights(net)
    bad, message = BAD_ARRAYS[case]
    with pytest.raises(InputError, match="images: " + message):
        _fit(net, bad, np.zeros(len(bad) if np.ndim(bad) == 4 else 6, np.int64))
    for a, p in zip(before, net.parameters(), strict=True):
        np.testing.assert_array_equal(p.data, a)


@pytest.mark.parametrize("bad_label", [10, -1])
def test_fit_refuses_out_of_range_labels_before_training(bad_label):
    # The bad label sits in the last image: a check made batch by batch would fail after training on
    # the batches before it, leaving a half-trained network behind.
    net = mlp(784, 8, 10)
    before = _weights(net)
    labels = LABELS.copy()
    labels[-1] = bad_label
    with pytest.raises(InputError, match=rf"labels?.*{bad_label}"):
        _fit(net, labels=labels)
    for a, p in zip(before, net.parameters(), strict=True):
        np.testing.assert_array_equal(p.data, a)


@pytest.mark.parametrize("eval_data", [IMAGES, (IMAGES,), "test split"])
def test_fit_refuses_malformed_eval_data(eval_data):
    with pytest.raises(InputError, match="eval_data"):
        _fit(mlp(784, 8, 10), eval_data=eval_data)


def test_fit_layouts_and_uint8_train_identically():
    reference = mlp(784, 8, 10)
    _fit(reference)
    for layout in ("fortran", "every other image", "rows and columns swapped in memory", "big-endian"):
        net = mlp(784, 8, 10)
        _fit(net, LAYOUTS[layout](IMAGES))
        for a, p in zip(_weights(reference), net.parameters(), strict=True):
            np.testing.assert_array_equal(p.data, a, err_msg=layout)
    pixels = (IMAGES * 255).astype(np.uint8)
    a, b = mlp(784, 8, 10), mlp(784, 8, 10)
    _fit(a, pixels)
    _fit(b, pixels.astype(np.float32) / np.float32(255))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data)


def test_fit_on_a_single_image():
    net = mlp(784, 8, 10)
    before = _weights(net)
    history = _fit(net, IMAGES[:1], LABELS[:1])
    assert len(history) == 1 and np.isfinite(history["loss"]).all()
    assert any((p.data != a).any() for a, p in zip(before, net.parameters(), strict=True))
    assert all(np.isfinite(p.data).all() for p in net.parameters())


# -- integer kernels at their extremes ------------------------------------------------------------------
def _kmax(weight_bits, act_bits, bias=0):
    """Largest reduction K whose worst case |bias| + K * max|x - zp| * max|w| fits an int32."""
    return (ACC_LIMIT - bias) // (((1 << act_bits) - 1) * (1 << (weight_bits - 1)))


NO_CLAMP = (-ACC_LIMIT - 1, ACC_LIMIT)  # (lo, hi) that leave every int32 accumulator as it is


def _run_qconv(x, zp_in, wq, wbits, bias, stride, padding, mode, m0, shift, fmult, zp, lo, hi):
    n, o = len(x), len(wq)
    kh, kw = wq.shape[2:]
    oh = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    out_q = np.empty((n, o, oh, ow) if mode != ki.MODE_DEQUANT else (0,) * 4, np.uint8)
    out_f = np.empty((n, o, oh, ow) if mode == ki.MODE_DEQUANT else (0,) * 4, np.float32)
    ki.qconv2d(x, zp_in, packed(wq, wbits), wbits, (kh, kw), stride, padding, (1, 1, 1, 1), bias, m0, shift,
               fmult, mode, zp, lo, hi, out_q, out_f)
    return out_f if mode == ki.MODE_DEQUANT else out_q


# C, KH, KW, stride, padding, H, W: the three word layouts of conv_plan, LeNet's conv3 (K = 400), and
# the largest K the int32 accumulator admits for W8A8 (65,775 = 2631 x 5 x 5 <= 65,793).
WORST_GEOMETRIES = {
    "LeNet conv3, K=400, even C": (16, 5, 5, (1, 1), (0, 0), 7, 7),
    "odd C, K=375, padded": (15, 5, 5, (1, 1), (2, 2), 6, 6),
    "stride 2, K=400": (16, 5, 5, (2, 2), (1, 1), 9, 9),
    "K=65775, largest admissible": (2631, 5, 5, (1, 1), (0, 0), 5, 5),
}
EXTREMES = {  # weight bits, activation bits, (x value, zero point) with |x - zp| largest, weight value
    "W8A8 x-zp=+255 w=-128": (8, 8, 255, 0, -128), "W8A8 x-zp=-255 w=-128": (8, 8, 0, 255, -128),
    "W8A8 x-zp=+255 w=+127": (8, 8, 255, 0, 127), "W4A8 x-zp=-255 w=-8": (4, 8, 0, 255, -8),
    "W4A4 x-zp=+15 w=-8": (4, 4, 15, 0, -8), "W8A4 x-zp=-15 w=-128": (8, 4, 0, 15, -128),
}


@pytest.mark.parametrize("extreme", sorted(EXTREMES))
@pytest.mark.parametrize("geometry", sorted(WORST_GEOMETRIES))
def test_qconv2d_worst_case_operands_do_not_overflow_int32(geometry, extreme):
    c, kh, kw, stride, padding, h, w = WORST_GEOMETRIES[geometry]
    wbits, abits, xval, zp_in, wval = EXTREMES[extreme]
    k = c * kh * kw
    if k > _kmax(wbits, abits):
        pytest.fail(f"geometry {geometry} exceeds the admissible K for {extreme}")
    x = np.full((2, c, h, w), xval, np.uint8)
    wq = np.full((3, c, kh, kw), wval, np.int8)
    product = (xval - zp_in) * wval * k
    # Biases take the remaining headroom: channel 0 reaches exactly +-(2**31 - 1) at full overlap.
    headroom = ACC_LIMIT - abs(product)
    bias = np.array([np.sign(product) * headroom, 0, -np.sign(product) * 12345], np.int32)
    acc = conv_acc_ref(x, zp_in, wq, bias, stride, padding)
    assert np.abs(acc).max() <= ACC_LIMIT
    if padding == (0, 0):
        assert abs(int(acc[0, 0, 0, 0])) == ACC_LIMIT  # the very edge of int32
    # Real output of the accumulators (scale 1): float32(acc), so a wrap-around (off by 2**32) shows.
    # MODE_DEQUANT clamps the accumulators to [lo, hi] (a fused ReLU is lo = 0): the full int32 range here.
    ones = np.ones(3, np.float32)
    unused_m0, unused_shift = np.zeros(3, np.int32), np.ones(3, np.int32)
    got = _run_qconv(x, zp_in, wq, wbits, bias, stride, padding, ki.MODE_DEQUANT, unused_m0, unused_shift,
                     ones, 0, *NO_CLAMP)
    np.testing.assert_array_equal(got, acc.astype(np.float32))
    # Requantized by 2**-24 around zero point 128: the top bits, through the integer epilogue.
    m0, shift = fixed_point_multiplier(np.full(3, 2.0**-24))
    got = _run_qconv(x, zp_in, wq, wbits, bias, stride, padding, ki.MODE_FIXEDPOINT, m0, shift, ones, 128, 0,
                     255)
    np.testing.assert_array_equal(got, requant_ref(acc, m0[None, :, None, None], shift[None, :, None, None],
                                                   128, 0, 255))


@pytest.mark.parametrize("wbits, abits", [(8, 8), (4, 8), (4, 4)])
def test_qconv2d_mixed_sign_extremes_are_bit_exact(wbits, abits):
    # Every |accumulator| of a K=400 layer is below 2**24, so float32 output equals the int64 exactly;
    # mixed signs make partial sums swing while the total stays small.
    qmax, half = (1 << abits) - 1, 1 << (wbits - 1)
    x = RNG.choice([0, qmax], (3, 16, 9, 9)).astype(np.uint8)
    wq = RNG.choice([-half, half - 1], (8, 16, 5, 5)).astype(np.int8)
    bias = RNG.choice([-(2**23), 0, 2**23], 8).astype(np.int32)
    for zp_in in (0, qmax // 2, qmax):
        acc = conv_acc_ref(x, zp_in, wq, bias, (1, 1), (1, 1))
        assert np.abs(acc).max() < 2**24
        got = _run_qconv(x, zp_in, wq, wbits, bias, (1, 1), (1, 1), ki.MODE_DEQUANT, np.zeros(8, np.int32),
                         np.ones(8, np.int32), np.ones(8, np.float32), 0, *NO_CLAMP)
        np.testing.assert_array_equal(got.astype(np.int64), acc)


@pytest.mark.parametrize("zp_in, xval", [(0, 255), (255, 0)])
def test_lenet_conv3_stage_worst_case(zp_in, xval):
    # The quantized LeNet conv3 (16 -> 120, 5x5 on a 5x5 map: K = 400) with every operand at its extreme,
    # through the stage the network runs; float output in accumulator units shows the exact sum.
    act = ActQuant(1.0, zp_in, 8)
    wq = np.full((120, 16, 5, 5), -128, np.int8)
    wq[1::2] = 127
    stage = QConv2d((6,), wq, 8, np.ones(120, np.float32), np.zeros(120, np.int32), act, None, relu=False)
    out = stage.run(np.full((2, 16, 5, 5), xval, np.uint8))
    centred = xval - zp_in
    expected = np.where(np.arange(120) % 2, 127, -128) * centred * 400
    assert np.abs(expected).max() == 400 * 255 * 128
    np.testing.assert_array_equal(out.reshape(2, 120), np.broadcast_to(expected.astype(np.float32), (2, 120)))


@pytest.mark.parametrize("wbits, abits", [(8, 8), (4, 8), (8, 4)])
def test_accumulator_guard_admits_the_largest_k_and_refuses_one_more(wbits, abits):
    k = _kmax(wbits, abits)
    act = ActQuant(0.01, 0, abits)
    low = -(1 << (wbits - 1))
    QConv2d((0,), np.full((1, k, 1, 1), low, np.int8), wbits, np.ones(1), np.zeros(1, np.int32), act, act,
            relu=False)
    with pytest.raises(InputError, match="worst-case accumulator .* exceeds int32"):
        QConv2d((0,), np.full((1, k + 1, 1, 1), low, np.int8), wbits, np.ones(1), np.zeros(1, np.int32), act,
                act, relu=False)


def test_quantized_stages_refuse_inputs_that_do_not_fit_their_weights():
    # The integer kernels index weights by the input's size and have no bounds checks: a stage handed
    # 216 features for 24-feature weights would read past its weight buffer.
    act = ActQuant(0.05, 0, 8)
    dense = QLinear((0,), RNG.integers(-128, 128, (5, 24)).astype(np.int8), 8, np.ones(5, np.float32),
                    np.zeros(5, np.int32), act, act, relu=False)
    np.testing.assert_array_equal(dense.run(np.zeros((3, 24), np.uint8)).shape, (3, 5))
    with pytest.raises(InputError, match=r"24"):
        dense.run(np.zeros((3, 216), np.uint8))
    conv = QConv2d((0,), RNG.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8), 8, np.ones(4, np.float32),
                   np.zeros(4, np.int32), act, act, relu=False)
    assert conv.run(np.zeros((2, 3, 6, 6), np.uint8)).shape == (2, 4, 4, 4)
    for bad in (np.zeros((2, 5, 6, 6), np.uint8), np.zeros((2, 3, 2, 2), np.uint8)):
        with pytest.raises(InputError):
            conv.run(bad)
    with pytest.raises(InputError, match="uint8"):  # codes, not real values
        dense.run(np.zeros((3, 24), np.float32))
    # a fused 2x2 pool needs a 2x2 convolution output: 3x3 kernel on 4x4 is the least that fits
    pooled = QConv2d((0,), RNG.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8), 8, np.ones(4, np.float32),
                     np.zeros(4, np.int32), act, act, relu=False, pool=((2, 2), (2, 2)))
    assert pooled.run(np.zeros((2, 3, 4, 4), np.uint8)).shape == (2, 4, 1, 1)
    with pytest.raises(InputError, match="smaller than the kernel"):
        pooled.run(np.zeros((2, 3, 3, 3), np.uint8))
    for bad_pool in (((2, 2), (0, 2)), ((2, 2, 2), (2, 2)), ((2, 2),)):
        with pytest.raises(InputError):
            QConv2d((0,), np.zeros((1, 1, 1, 1), np.int8), 8, np.ones(1), np.zeros(1, np.int32), act, act,
                    relu=False, pool=bad_pool)
    qpool = QMaxPool2d((0,), act, (3, 3), (3, 3))
    assert qpool.run(np.zeros((1, 2, 3, 3), np.uint8)).shape == (1, 2, 1, 1)
    with pytest.raises(InputError):
        qpool.run(np.zeros((1, 2, 2, 3), np.uint8))


ACCUMULATORS = [-2**31, -2**31 + 1, -2**30, -65_536, -3, -1, 0, 1, 3, 65_535, 2**30, 2**31 - 1]
MULTIPLIERS = [2.0**-45, 1e-9, 2.0**-31, 1e-3, 0.25, 0.5, 0.9999999, 1.0, 1.5, 1000.0, 2.0**29]
CLAMPS = [(0, 0, 255), (255, 0, 255), (128, 128, 255), (3, 0, 15), (15, 0, 15), (0, 0, 15)]


def test_requantization_saturates_and_matches_python_integers():
    acc = np.array(ACCUMULATORS + list(RNG.integers(-2**31, 2**31, 20)), np.int64)
    m0, shift = fixed_point_multiplier(np.array(MULTIPLIERS))
    assert shift.min() >= 1 and shift.max() == 62  # 2**-45 needs more: m0 drops its low bits instead
    normal = shift < 62
    assert ((m0[normal] >= 2**30) & (m0[normal] < 2**31)).all() and (m0[~normal] < 2**30).all()
    grid = np.repeat(acc[:, None], len(MULTIPLIERS), axis=1).astype(np.int32)
    for zp, lo, hi in CLAMPS:
        got = ki.requantize(grid, m0, shift, zp, lo, hi)
        for i, a in enumerate(acc.tolist()):
            for j, (m, s) in enumerate(zip(m0.tolist(), shift.tolist(), strict=True)):
                y = (a * m + (1 << (s - 1))) >> s  # exact Python integers, floor shift
                assert got[i, j] == min(max(y + zp, lo), hi), (a, MULTIPLIERS[j], zp, lo, hi)
        # saturation: the largest accumulator with multiplier >= 1 lands on hi, the smallest on lo
        assert (got[ACCUMULATORS.index(2**31 - 1), 7:] == hi).all()
        assert (got[ACCUMULATORS.index(-2**31), 7:] == lo).all()
    # the float epilogue: rint(float32(acc) * float32(M)) (half to even), same clamps
    for a in ACCUMULATORS:
        for m in MULTIPLIERS:
            y = int(np.rint(np.float32(a) * np.float32(m)))
            for zp, lo, hi in CLAMPS:
                got = ki.requantize_float_one(np.int32(a), np.float32(m), zp, lo, hi)
                assert got == min(max(y + zp, lo), hi), (a, m, zp, lo, hi)
