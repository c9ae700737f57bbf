"""Integer kernel behaviours the third kernel mutation round (issue 19) found unchecked, each against an
independent NumPy int64 reference (``tests.test_quant_kernels``): results are exact.

* A fused ReLU with real-valued output (MODE_DEQUANT with lo = 0: the last layer of a network whose
  logits pass a ReLU, or an FP32 layer after an integer one) is never negative, in both dense layouts
  (channels in lanes below 4 rows, rows in lanes from 4) and in the convolution.
"""

import numpy as np
import pytest

from microcnn.kernels import integer as ki
from tests.test_quant_kernels import conv_acc_ref, requant_ref

RNG = np.random.default_rng(1919)


def _real(acc, lo, scale):
    return np.clip(acc, lo, 2**31 - 1).astype(np.float32) * scale


@pytest.mark.parametrize("n", [1, 3, 4, 21])
def test_dense_real_output_of_a_fused_relu_is_clamped_at_zero(n):
    f, o, zp = 37, 70, 9
    x = RNG.integers(0, 256, (n, f)).astype(np.uint8)
    w = RNG.integers(-128, 128, (o, f)).astype(np.int8)
    bias = RNG.integers(-5000, 5000, o).astype(np.int32)
    acc = (x.astype(np.int64) - zp) @ w.T.astype(np.int64) + bias
    assert (acc < 0).any() and (acc > 0).any()
    scale = RNG.uniform(1e-3, 1e-2, o).astype(np.float32)
    out_f = np.empty((n, o), np.float32)
    rq = ki.requant_params(np.zeros(o), np.ones(o), scale, ki.MODE_DEQUANT, 0, 0, 2**31 - 1)
    ki.linear_packed(x, ki.pack_linear(w, bias, zp), rq, np.empty((0, 0), np.uint8), out_f)
    np.testing.assert_array_equal(out_f, _real(acc, 0, scale))


def test_conv_real_output_of_a_fused_relu_is_clamped_at_zero():
    n, c, o, zp = 2, 3, 10, 4
    x = RNG.integers(0, 256, (n, c, 7, 9)).astype(np.uint8)
    w = RNG.integers(-128, 128, (o, c, 3, 2)).astype(np.int8)
    bias = RNG.integers(-5000, 5000, o).astype(np.int32)
    for stride, pool in [((1, 1), None), ((1, 2), ((2, 2), (2, 2))), ((2, 1), ((1, 2), (1, 2)))]:
        acc = conv_acc_ref(x, zp, w, bias, stride, (1, 0), pool)
        assert (acc < 0).any() and (acc > 0).any()
        scale = RNG.uniform(1e-3, 1e-2, o).astype(np.float32)
        flat_pool = (1, 1, 1, 1) if pool is None else (*pool[0], *pool[1])
        geo = ki.QConvGeometry(3, 2, *stride, 1, 0, *flat_pool)
        out_f = np.empty(acc.shape, np.float32)
        rq = ki.requant_params(np.zeros(o), np.ones(o), scale, ki.MODE_DEQUANT, 0, 0, 2**31 - 1)
        pk = ki.pack_conv(w, bias, stride[0], zp)
        ki.conv2d_packed(x, pk, geo, rq, np.empty((0,) * 4, np.uint8), out_f)
        np.testing.assert_array_equal(out_f, _real(acc, 0, scale[None, :, None, None]))


@pytest.mark.parametrize("c", [2, 3, 5])  # 2 or 1 channels per word: each word spans 2 or 4 kernel rows
def test_conv_with_kernel_taller_than_a_word_and_horizontal_stride(c):
    """Vertical stride 1, horizontal stride 2 (words built per kx), a kernel of 5 rows: the row groups
    after the first start R = 4 / G input rows further down."""
    o, zp = 9, 3
    x = RNG.integers(0, 256, (2, c, 9, 11)).astype(np.uint8)
    w = RNG.integers(-128, 128, (o, c, 5, 3)).astype(np.int8)
    bias = RNG.integers(-5000, 5000, o).astype(np.int32)
    acc = conv_acc_ref(x, zp, w, bias, (1, 2), (1, 1))
    out_f = np.empty(acc.shape, np.float32)
    rq = ki.requant_params(np.zeros(o), np.ones(o), np.ones(o), ki.MODE_DEQUANT, 0, -2**31, 2**31 - 1)
    geo = ki.QConvGeometry(5, 3, 1, 2, 1, 1, 1, 1, 1, 1)
    ki.conv2d_packed(x, ki.pack_conv(w, bias, 1, zp), geo, rq, np.empty((0,) * 4, np.uint8), out_f)
    np.testing.assert_array_equal(out_f.astype(np.int64), acc)


@pytest.mark.parametrize("qw", [7, 8, 9, 16, 17])
@pytest.mark.parametrize("qh", [1, 2, 3])
def test_pooled_rows_requantized_two_at_a_time_or_one(qw, qh):
    """Fixed-point output of a conv with a fused 2x2 pool: pooled rows of 8 outputs or fewer go two per
    vector call (8 bytes each, the second stored over the first's spill), wider ones one per call; an
    odd last row, and a pair whose 8-byte store would pass the image's end, take the one-row call."""
    rng = np.random.default_rng(100 * qh + qw)
    n, c, o, zp = 2, 2, 3, 5
    x = rng.integers(0, 256, (n, c, 2 * qh + 2, 2 * qw + 2)).astype(np.uint8)  # 3x3 kernel, no padding
    w = rng.integers(-128, 128, (o, c, 3, 3)).astype(np.int8)
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    acc = conv_acc_ref(x, zp, w, bias, (1, 1), (0, 0), ((2, 2), (2, 2)))
    assert acc.shape == (n, o, qh, qw)
    m0 = rng.integers(2**30, 2**31, o).astype(np.int32)
    shift = np.full(o, 40, np.int32)
    out_q = np.zeros(acc.shape, np.uint8)
    rq = ki.requant_params(m0, shift, np.ones(o), ki.MODE_FIXEDPOINT, 128, 0, 255)
    geo = ki.QConvGeometry(3, 3, 1, 1, 0, 0, 2, 2, 2, 2)
    ki.conv2d_packed(x, ki.pack_conv(w, bias, 1, zp), geo, rq, out_q, np.empty((0,) * 4, np.float32))
    ref = requant_ref(acc, m0[None, :, None, None], shift[None, :, None, None], 128, 0, 255)
    assert len(np.unique(ref)) > 10  # the rule is exercised, not one clamped value
    np.testing.assert_array_equal(out_q, ref)


@pytest.mark.parametrize("c", [4, 8, 3, 6])  # words of 4 channels (C % 4 == 0) or of 4 consecutive taps
@pytest.mark.parametrize(("kernel", "stride", "padding"),
                         [((3, 3), (2, 2), (1, 1)), ((1, 1), (2, 2), (0, 0)), ((3, 2), (2, 1), (0, 1)),
                          ((2, 3), (3, 2), (1, 0)), ((3, 3), (2, 3), (1, 1))])
# 11 x 13: the last padded row and column are read; padded rows of 16 and more build the phase words of a
# horizontal stride of 2 by vector calls: exactly one, an odd width's lone last pixel, an overlapping last one
@pytest.mark.parametrize("size", [(9, 12), (11, 13), (6, 16), (7, 17), (5, 29)])
def test_vertical_stride_convolutions_are_exact(c, kernel, stride, padding, size):
    """Vertical stride > 1: with C a multiple of 4, words of 4 channels split into the stride's phases;
    else explicit patches of 4 consecutive taps of the flattened kernel; both exact against the int64
    reference on non-square images, with codes at 0 and 255 and the extreme weights."""
    rng = np.random.default_rng(c * 100 + stride[0] * 10 + kernel[1] + size[0])
    n, o, zp = 3, 11, 200
    x = rng.integers(0, 256, (n, c, *size)).astype(np.uint8)
    x[0, :, 0, :] = 255
    x[1, :, :, 0] = 0
    w = rng.integers(-128, 128, (o, c, *kernel)).astype(np.int8)
    w[0] = -128
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    acc = conv_acc_ref(x, zp, w, bias, stride, padding)
    out_f = np.empty(acc.shape, np.float32)
    rq = ki.requant_params(np.zeros(o), np.ones(o), np.ones(o), ki.MODE_DEQUANT, 0, -2**31, 2**31 - 1)
    geo = ki.QConvGeometry(*kernel, *stride, *padding, 1, 1, 1, 1)
    ki.conv2d_packed(x, ki.pack_conv(w, bias, stride[0], zp), geo, rq, np.empty((0,) * 4, np.uint8), out_f)
    np.testing.assert_array_equal(out_f.astype(np.int64), acc)


@pytest.mark.parametrize("wp", [16, 17, 18, 30, 31, 33, 47])
@pytest.mark.parametrize(("sh", "kh"), [(2, 3), (2, 1), (3, 2), (3, 3)])
def test_phase_words_by_vectors_equal_the_copy_through_all_words(wp, sh, kh):
    """``_fill_phase_pairs`` (16 pixels a call, the last call overlapping from an even column, an odd
    width's last pixel alone) writes the words ``_fill_wide`` + ``_fill_phase_words`` write for a
    horizontal stride of 2, and no other word: every phase row a tap reads, every width around 16 and 32."""
    rng = np.random.default_rng(wp * 100 + sh * 10 + kh)
    c, hp = 8, 9
    padded = rng.integers(0, 256, (c, hp + 3, wp)).astype(np.uint8)
    hq, wq = -(-hp // sh), -(-wp // 2)
    pixels = np.zeros((c // 4, hp, wp), np.uint32)
    ki._fill_wide(4, padded, hp, pixels)
    want = np.zeros(((c // 4) * sh * 2, hq * wq), np.uint32)
    ki._fill_phase_words(pixels, sh, 2, kh, 3, want)
    got = np.zeros_like(want)
    ki._fill_phase_pairs(padded, sh, kh, hp, got)
    np.testing.assert_array_equal(got, want)
    rows = sum(y % sh < kh for y in range(hp))  # the rows the taps read: each pixel in one phase
    assert (want != 0).sum() == (c // 4) * rows * wp


@pytest.mark.parametrize("w", [5, 7, 8, 9, 14, 15, 16, 17, 28, 33])
@pytest.mark.parametrize("qmax", [15, 255])
@pytest.mark.parametrize(("ph", "pw"), [(1, 1), (0, 2), (2, 0)])
def test_padded_copy_of_every_row_width_clamps_and_keeps_the_border(w, qmax, ph, pw):
    """The convolution's padded input: rows copied by whole vectors of 16 or 8 bytes, the last overlapping
    the one before (scalar below 8 bytes), each code clamped to the stage's qmax; the border keeps the
    zero point. Exact against NumPy for every width around the vector sizes."""
    rng = np.random.default_rng(w * 1000 + qmax + 10 * ph + pw)
    c, h, zp = 3, 4, 7
    src = rng.integers(0, 256, (c, h, w)).astype(np.uint8)
    src[0, 0, -1] = 255  # the last byte of a row, written by the overlapping vector
    padded = np.full((c, h + 2 * ph + 3, w + 2 * pw), zp, np.uint8)
    want = padded.copy()
    want[:, ph:ph + h, pw:pw + w] = np.minimum(src, qmax)
    ki._fill_padded(src, qmax, padded, ph, pw)
    np.testing.assert_array_equal(padded, want)


@pytest.mark.parametrize("c, h, w, stride, o", [(8, 14, 14, (2, 2), 12), (4, 6, 19, (1, 1), 9),
                                                (3, 5, 40, (1, 2), 5)])
def test_conv_real_output_by_vectors_rounds_clamps_and_stops_at_the_image_end(c, h, w, stride, o):
    """The plain MODE_DEQUANT epilogue (``qdot.dequant_row``, 16 values a call): accumulators beyond 2**24
    round to float32 as NumPy's conversion does, both clamps bite, rows of 7 (stride 2: accumulator rows
    8 apart), 19 and 20 outputs (two calls per row) are written whole and nothing past each image's
    planes (the last rows go through the scratch buffer)."""
    n, zp = 3, 5
    x = RNG.integers(0, 256, (n, c, h, w)).astype(np.uint8)
    x[0, :, :3] = 255  # large accumulators: beyond 2**24 with the big weights below
    wt = RNG.integers(-128, 128, (o, c, 3, 3)).astype(np.int8)
    wt[0], wt[-1] = 127, -128
    bias = RNG.integers(-2**23, 2**23, o).astype(np.int32)
    bias[0], bias[-1] = 2**24, -2**23  # channel 0 above 2**24 (odd values round), the last one low
    acc = conv_acc_ref(x, zp, wt, bias, stride, (1, 1))
    lo, hi = -2**23 - 1001, int(np.median(acc[:, 0])) | 1  # half of channel 0 above hi
    inside = (acc > lo) & (acc < hi)
    assert (acc < lo).any() and (acc > hi).any() and (inside & (acc > 2**24) & (acc % 2 == 1)).any()
    scale = RNG.uniform(1e-3, 1e-2, o).astype(np.float32)
    geo = ki.QConvGeometry(3, 3, *stride, 1, 1, 1, 1, 1, 1)
    out_f = np.full((n + 1, *acc.shape[1:]), -7.0, np.float32)  # one image more: must stay untouched
    rq = ki.requant_params(np.zeros(o), np.ones(o), scale, ki.MODE_DEQUANT, 0, lo, hi)
    ki.conv2d_packed(x, ki.pack_conv(wt, bias, stride[0], zp), geo, rq, np.empty((0,) * 4, np.uint8),
                     out_f[:n])
    want = np.clip(acc, lo, hi).astype(np.float32) * scale[None, :, None, None]
    np.testing.assert_array_equal(out_f[:n], want)
    assert (out_f[n] == -7.0).all()
