"""The channel-blocked FP32 convolution (``kernels.conv_blocked``): the same bits as im2col's GEMM, which it
replaces for batches, checked against a float64 NumPy reference, and the same bits on every CPU target.

Tolerance against the float64 reference: |y - ref| <= 1e-5 * (|b| + sum_k |w_k x_k|) per output (a sum of
K float32 fused multiply-adds is off by at most about K * 2**-24 of that magnitude; random signs give
sqrt(K) of it, far below the bound).
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from microcnn.kernels import conv_blocked as CB
from microcnn.kernels.conv import ConvGeometry, conv2d_im2col, conv_geometry, gemm_images, pack_group_rows
from microcnn.kernels.pool import NO_POOL, PoolGeometry

from . import reference as ref
from .test_portability import _run_predictions

# (n, c, h, w, o, kh, kw, stride, padding): the benchmark networks' layers (stride 2, 1x1 projection, 16
# channels), partial channel blocks (21, 40), 5x5 and non-square kernels and inputs, tiles that wrap rows
# and end on the small tile or on a whole tile overlapping the one before (npix 196, 130), two-block calls
# (o > 16) with a zero-padded last block (40, 48), a 1-channel 9-tap stem.
SHAPES = [
    (5, 32, 14, 14, 64, 3, 3, (1, 1), (1, 1)),
    (4, 32, 28, 28, 32, 3, 3, (2, 2), (1, 1)),
    (4, 16, 16, 16, 32, 1, 1, (2, 2), (0, 0)),
    (4, 3, 12, 12, 16, 3, 3, (1, 1), (1, 1)),
    (4, 7, 9, 11, 21, 3, 3, (2, 2), (1, 1)),
    (4, 6, 8, 8, 40, 5, 5, (1, 1), (2, 2)),
    (6, 5, 10, 7, 24, 3, 2, (1, 2), (0, 1)),
    (3, 1, 10, 13, 16, 3, 3, (1, 1), (1, 1)),
    (3, 8, 9, 9, 48, 3, 3, (1, 1), (1, 1)),
]


def _case(shape, seed=0):
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    x[0, 0, 0, :3] = [0.0, -0.0, 1e-40]  # zeros of both signs and a subnormal
    wt = rng.standard_normal((o, c, kh, kw), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    b[0] = -0.0  # a channel whose sum may be a signed zero
    return x, wt, b, conv_geometry(wt.shape, stride, padding)


def _im2col_one_by_one(x, wt, b, geom, pool, relu, y):
    """im2col's GEMM path (``gemm_images``), one image per call."""
    w2 = np.ascontiguousarray(wt.reshape(wt.shape[0], -1))
    for i in range(len(x)):
        gemm_images(x, w2, pack_group_rows(w2, 1), b, geom, pool, relu, y, i, i + 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_blocked_gives_im2cols_bits(shape, relu):
    x, wt, b, geom = _case(shape)
    o, npix = wt.shape[0], None
    blocked = conv2d_im2col(x, wt, b, *geom[2:6])
    npix = blocked.shape[2] * blocked.shape[3]
    assert CB.use_blocked(o, 1, wt[0].size, npix, geom.sh * geom.sw > 1, 1, 1)  # the layer runs it
    y = np.empty_like(blocked)
    w2 = np.ascontiguousarray(wt.reshape(o, -1))
    CB.blocked_images(x, w2, b, geom, NO_POOL, relu, y, 0, len(x))
    expected = np.empty_like(y)
    _im2col_one_by_one(x, wt, b, geom, NO_POOL, relu, expected)
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))
    if not relu:
        np.testing.assert_array_equal(blocked.view(np.uint32), expected.view(np.uint32))
    else:
        assert (y >= 0).all() and not np.signbit(y).any()  # ReLU maps -0 to +0, as im2col does


@pytest.mark.parametrize("shape", SHAPES)
def test_blocked_matches_the_float64_reference(shape):
    x, wt, b, geom = _case(shape, seed=1)
    y = conv2d_im2col(x, wt, b, *geom[2:6])
    r = ref.conv2d(x, wt, b, geom[2:4], geom[4:6])
    scale = ref.conv2d(np.abs(x), np.abs(wt), np.abs(b), geom[2:4], geom[4:6])
    assert y.shape == r.shape
    assert (np.abs(y - r) <= 1e-5 * scale).all()


def test_pooling_and_relu_after_the_blocked_convolution():
    x, wt, b, geom = _case((4, 8, 12, 12, 16, 3, 3, (1, 1), (1, 1)), seed=2)
    pool = PoolGeometry(2, 2, 2, 2, 0, 0, 0)
    y = np.empty((4, 16, 6, 6), np.float32)
    CB.blocked_images(x, np.ascontiguousarray(wt.reshape(16, -1)), b, geom, pool, True, y, 0, 4)
    expected = np.empty_like(y)
    _im2col_one_by_one(x, wt, b, geom, pool, True, expected)
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))
    full = np.maximum(ref.conv2d(x, wt, b, (1, 1), (1, 1)), 0)
    pooled = full.reshape(4, 16, 6, 2, 6, 2).max(axis=(3, 5))
    assert np.abs(y - pooled).max() <= 1e-5 * (1 + np.abs(pooled).max())


def test_nan_and_infinity_propagate_as_in_im2col():
    x, wt, b, geom = _case((4, 4, 8, 8, 16, 3, 3, (1, 1), (1, 1)), seed=3)
    x[1, 2, 3, 3], x[2, 0, 5, 5] = np.nan, np.inf
    w2 = np.ascontiguousarray(wt.reshape(16, -1))
    for relu in (False, True):
        y, expected = np.empty((4, 16, 8, 8), np.float32), np.empty((4, 16, 8, 8), np.float32)
        CB.blocked_images(x, w2, b, ConvGeometry(3, 3, 1, 1, 1, 1), NO_POOL, relu, y, 0, 4)
        _im2col_one_by_one(x, wt, b, geom, NO_POOL, relu, expected)
        np.testing.assert_array_equal(y, expected)  # NaN where im2col has NaN, 0 after ReLU
        assert np.isnan(y).any() != relu


def test_the_network_path_runs_the_blocked_kernel_with_the_same_bits_as_the_gemm_path():
    """A Conv2d layer at batch 8 and image by image (both blocked) gives the GEMM path's bits: the choice
    is a matter of speed only."""
    from microcnn.layers import Conv2d

    layer = Conv2d(8, 16, 3, stride=2, padding=1, rng=np.random.default_rng(4))
    x = np.random.default_rng(5).standard_normal((8, 8, 15, 15), dtype=np.float32)
    batched = layer.forward(x, relu=True)
    single = np.concatenate([layer.forward(x[i:i + 1], relu=True) for i in range(8)])
    gemm = np.empty_like(batched)
    geom = conv_geometry(layer.weight.data.shape, (2, 2), (1, 1))
    _im2col_one_by_one(x, layer.weight.data, layer.bias.data, geom, NO_POOL, True, gemm)
    np.testing.assert_array_equal(batched.view(np.uint32), gemm.view(np.uint32))
    np.testing.assert_array_equal(single.view(np.uint32), gemm.view(np.uint32))


def test_ineligible_convolutions_stay_on_im2col():
    assert not CB.use_blocked(16, 2, 72, 64, False, 1, 1)  # groups
    assert not CB.use_blocked(16, 1, 72, 64, False, 2, 2)  # dilation
    assert not CB.use_blocked(6, 1, 150, 64, False, 1, 1)  # fewer channels than half a block
    assert not CB.use_blocked(32, 1, 4, 784, False, 1, 1)  # 4 taps at stride 1 (1x1, 4 channels)
    assert CB.use_blocked(32, 1, 9, 784, False, 1, 1)  # a 1-channel 3x3 stem
    assert not CB.use_blocked(32, 1, 72, CB.PIXELS - 1, False, 1, 1)  # fewer pixels than a tile
    assert CB.use_blocked(32, 1, 9, 196, True, 1, 1)


# -- the same bits on every CPU target ------------------------------------------------------------

_SCRIPT = """
import hashlib, json
import numpy as np
import numba
from microcnn.kernels import conv_blocked as CB, simd
from microcnn.kernels.conv import conv2d_im2col
shapes = %r
out = {"cpu_name": numba.config.CPU_NAME, "simd": simd.SIMD, "lanes": simd.LANES, "pairs": CB.PAIR_PIXELS}
for k, (n, c, h, w, o, kh, kw, stride, padding) in enumerate(shapes):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    wt = rng.standard_normal((o, c, kh, kw), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    y = conv2d_im2col(x, wt, b, *stride, *padding)
    one = np.concatenate([conv2d_im2col(x[i:i + 1], wt, b, *stride, *padding) for i in range(n)])
    out[str(k)] = [hashlib.sha256(y.tobytes()).hexdigest(), bool(np.array_equal(y.view(np.uint32),
                                                                                one.view(np.uint32)))]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_blocked_convolution_is_byte_identical_across_targets_and_widths(tmp_path):
    """Every shape above, compiled from scratch in its own Numba cache for the host, Haswell (AVX2: two
    8-lane vectors per block, 6 pixels a tile), Skylake-AVX512 and the host narrowed to 8 lanes and to
    portable IR, and on AVX-512 with two-block calls forced on and off (whichever the core picks): the
    same bits everywhere, and in each the same bits as im2col one image at a time."""
    from microcnn.kernels.simd import host_simd

    configs = {"host": {}, "haswell": {"NUMBA_CPU_NAME": "haswell"},
               "skylake-avx512": {"NUMBA_CPU_NAME": "skylake-avx512"}, "simd0": {"MICROCNN_SIMD": "0"}}
    if host_simd() >= 16:
        configs.update(simd8={"MICROCNN_SIMD": "8"}, pairs={"MICROCNN_PAIRS": "1"},
                       single={"MICROCNN_PAIRS": "0"})
    with ThreadPoolExecutor(2) as pool:
        runs = pool.map(lambda item: _run_predictions(tmp_path, *item, _SCRIPT % (SHAPES,)), configs.items())
        results = dict(zip(configs, runs, strict=True))
    assert results["haswell"]["cpu_name"] == "haswell" and results["haswell"]["lanes"] == 8
    assert results["skylake-avx512"]["cpu_name"] == "skylake-avx512"
    assert results["host"]["simd"] == host_simd()
    if host_simd() >= 16:
        assert (results["pairs"]["pairs"], results["single"]["pairs"]) == (10, 0)
    keys = [str(k) for k in range(len(SHAPES))]
    for label, result in results.items():
        assert all(result[k][1] for k in keys), label  # blocked batch == im2col image by image
    reference = {k: results["host"][k][0] for k in keys}
    assert {label: {k: r[k][0] for k in keys} for label, r in results.items()} == \
        {label: reference for label in results}
    assert len(set(reference.values())) == len(keys)
    assert hashlib.sha256(b"").hexdigest() not in reference.values()


def test_lenet_in_small_chunks_gives_the_bits_of_one_batch():
    """LeNet's conv2 (16 channels, 150 taps) runs blocked in the compiled program at batches of 7: the
    same bits as one batch of 1,000. (A tap-offset array freed before its last use by address crashed
    exactly this sequence at random.)"""
    import microcnn

    net = microcnn.lenet(weights="bundled")
    x = np.random.default_rng(6).random((1000, 1, 28, 28), dtype=np.float32)
    whole = net.predict(x, batch_size=1000)
    chunks = net.predict(x, batch_size=7)
    np.testing.assert_array_equal(whole.view(np.uint32), chunks.view(np.uint32))
