"""Convolution algorithms and their dispatch, against the float64 plain-NumPy reference.

Error measure: max |y - ref| / max |ref| (relative to the output's scale). Stated tolerances:
naive and im2col <= 1e-5; Winograd F(2x2, r) <= 1e-5; F(4x4, r) <= 5e-5 (documented in
``conv2d_winograd``); FFT <= 1e-5 (documented in ``conv2d_fft``).
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microcnn import convolution as cv
from microcnn.errors import InputError
from microcnn.kernels import conv as K

from . import reference as ref

EXAMPLES = settings(max_examples=20, deadline=None)
TOL = {"naive": 1e-5, "im2col": 1e-5, "winograd": 1e-5, "winograd4": 5e-5, "fft": 1e-5}


def rel_err(y, r):
    return float(np.max(np.abs(y.astype(np.float64) - r)) / max(np.max(np.abs(r)), 1e-30))


@st.composite
def conv_case(draw, stride_one=False, square=False):
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 7))
    kh = draw(st.integers(1, 5))
    kw = kh if square else draw(st.integers(1, 5))
    sh, sw = (1, 1) if stride_one else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    return x, wt, b, (sh, sw), (ph, pw)


@EXAMPLES
@given(conv_case())
def test_naive_and_im2col_match_reference(case):
    x, w, b, (sh, sw), (ph, pw) = case
    r = ref.conv2d(x, w, b, (sh, sw), (ph, pw))
    for y in (K.conv2d_naive(x, w, b, sh, sw, ph, pw), K.conv2d_im2col(x, w, b, sh, sw, ph, pw)):
        assert y.shape == r.shape and y.dtype == np.float32
        assert rel_err(y, r) <= 1e-5


@pytest.mark.parametrize("n", [1, 3, 20])
@pytest.mark.parametrize("c,o,hw,pad", [(1, 6, 28, 2), (6, 16, 14, 0), (16, 120, 5, 0)])
def test_im2col_on_lenet_shapes(n, c, o, hw, pad):
    # Batch 1 runs one image per GEMM (direct into y, or padded columns for conv2), batch 20 runs
    # groups with a partial last group; conv3 is the dense-layer path.
    rng = np.random.default_rng(n + c)
    x = rng.random((n, c, hw, hw), dtype=np.float32)
    w = rng.standard_normal((o, c, 5, 5)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    y = K.conv2d(x, w, b, (1, 1), (pad, pad))
    assert rel_err(y, ref.conv2d(x, w, b, (1, 1), (pad, pad))) <= 1e-5


def test_im2col_parallel_chunks_match_serial():
    import numba

    rng = np.random.default_rng(7)
    x = rng.random((37, 6, 14, 14), dtype=np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        y = K.conv2d_im2col(np.concatenate([x] * 4), w, b)  # 148 images: >= 4 groups, split in chunks
    finally:
        numba.set_num_threads(saved)
    r = ref.conv2d(x, w, b)
    for i in range(4):
        assert rel_err(y[37 * i : 37 * (i + 1)], r) <= 1e-5


@EXAMPLES
@given(conv_case())
def test_public_im2col_layout(case):
    x, w, b, (sh, sw), (ph, pw) = case
    cols = K.im2col(x, w.shape[2], w.shape[3], sh, sw, ph, pw)
    r = ref.conv2d(x, w, b, (sh, sw), (ph, pw))
    n, o, oh, ow = r.shape
    y = (w.reshape(o, -1).astype(np.float64) @ cols).reshape(o, n, oh, ow).transpose(1, 0, 2, 3)
    assert cols.dtype == x.dtype and cols.shape == (w[0].size, n * oh * ow)
    assert rel_err(y + b[None, :, None, None], r) <= 1e-12


@pytest.mark.parametrize("dtype,pad_value", [(np.uint8, 128), (np.int8, -3)])
def test_im2col_integer_dtypes_pad_with_the_given_value(dtype, pad_value):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, (2, 3, 6, 5), endpoint=True).astype(dtype)
    kh, kw, sh, sw, ph, pw = 3, 2, 2, 1, 1, 2
    cols = K.im2col(x, kh, kw, sh, sw, ph, pw, pad_value)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    oh, ow = (6 + 2 * ph - kh) // sh + 1, (5 + 2 * pw - kw) // sw + 1
    expected = np.empty((3 * kh * kw, 2 * oh * ow), dtype)
    for c in range(3):
        for u in range(kh):
            for v in range(kw):
                patch = xp[:, c, u : u + sh * (oh - 1) + 1 : sh, v : v + sw * (ow - 1) + 1 : sw]
                expected[(c * kh + u) * kw + v] = patch.reshape(-1)
    assert cols.dtype == dtype and np.array_equal(cols, expected)


@pytest.mark.parametrize("m,r", K.WINOGRAD_VARIANTS)
def test_winograd_matrices_compute_1d_correlation(m, r):
    at, g, bt = K.winograd_matrices(m, r)
    rng = np.random.default_rng(m * r)
    gk, d = rng.standard_normal(r), rng.standard_normal(m + r - 1)
    expected = np.array([gk @ d[i : i + r] for i in range(m)])
    assert np.allclose(at @ ((g @ gk) * (bt @ d)), expected, rtol=0, atol=1e-12)


@EXAMPLES
@given(conv_case(stride_one=True, square=True), st.sampled_from([2, 4]), st.sampled_from([3, 5]))
def test_winograd_matches_reference(case, m, r):
    x, w, b, _, (ph, pw) = case
    rng = np.random.default_rng(x.size)
    w = rng.standard_normal((w.shape[0], w.shape[1], r, r)).astype(np.float32)
    if x.shape[2] + 2 * ph < r or x.shape[3] + 2 * pw < r:
        x = rng.standard_normal((x.shape[0], x.shape[1], r + 3, r + 1)).astype(np.float32)
    y = K.conv2d_winograd(x, K.winograd_weights(w, m), b, ph, pw, m, r)
    assert rel_err(y, ref.conv2d(x, w, b, (1, 1), (ph, pw))) <= (1e-5 if m == 2 else 5e-5)


@EXAMPLES
@given(conv_case())
def test_fft_matches_reference(case):
    x, w, b, (sh, sw), (ph, pw) = case
    grid = (x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
    y = K.conv2d_fft(x, K.fft_weights(w, grid), b, w.shape[2], w.shape[3], sh, sw, ph, pw)
    assert y.dtype == np.float32
    assert rel_err(y, ref.conv2d(x, w, b, (sh, sw), (ph, pw))) <= 1e-5


# -- dispatch ----------------------------------------------------------------------------------


def _lenet_conv2(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 6, 14, 14), dtype=np.float32),
            rng.standard_normal((16, 6, 5, 5)).astype(np.float32), rng.standard_normal(16).astype(np.float32))


@pytest.mark.parametrize("algorithm", cv.ALGORITHMS + cv.ALGORITHM_VARIANTS + ("auto",))
def test_conv2d_forward_every_algorithm(algorithm):
    x, w, b = _lenet_conv2()
    state = {}
    for _ in range(2):  # the second call takes the remembered fast path
        y = cv.conv2d_forward(x, w, b, (1, 1), (1, 1), algorithm, state)
        assert rel_err(y, ref.conv2d(x, w, b, (1, 1), (1, 1))) <= TOL.get(algorithm, 1e-5)
    assert state["fallback"] is None
    assert state["used"] == algorithm if algorithm != "auto" else state["used"] in cv.AUTO_CANDIDATES


def test_auto_records_its_choice():
    cv.reset_auto_choices()
    x, w, b = _lenet_conv2(n=3)
    state = {}
    cv.conv2d_forward(x, w, b, (1, 1), (0, 0), "auto", state)
    table = cv.auto_choices()
    assert len(table) == 1 and table["Choice"][0] == state["used"]
    assert {f"{a} (ms)" for a in cv.AUTO_CANDIDATES} <= set(table.columns)
    assert table["Batch"][0] == "2-8"


def test_eligible_algorithms():
    everything = set(cv.ALGORITHMS + cv.ALGORITHM_VARIANTS)
    assert set(cv.eligible_algorithms((16, 6, 5, 5), (1, 1), (0, 0))) == everything
    assert set(cv.eligible_algorithms((16, 6, 5, 5), (2, 2), (0, 0))) == {"naive", "im2col", "fft"}
    assert set(cv.eligible_algorithms((4, 3, 7, 7), (1, 1), (3, 3))) == {"naive", "im2col", "fft"}
    assert set(cv.eligible_algorithms((4, 3, 3, 5), (1, 1), (0, 0))) == {"naive", "im2col", "fft"}


@pytest.mark.parametrize("algorithm", ["winograd", "winograd4"])
def test_winograd_with_stride_two_falls_back_explicitly(algorithm):
    x, w, b = _lenet_conv2()
    state = {}
    with pytest.warns(RuntimeWarning, match="stride"):
        y = cv.conv2d_forward(x, w, b, (2, 2), (1, 1), algorithm, state)
    assert state["used"] == "im2col" and "stride" in state["fallback"]
    assert rel_err(y, ref.conv2d(x, w, b, (2, 2), (1, 1))) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per state, not on every call
        cv.conv2d_forward(x, w, b, (2, 2), (1, 1), algorithm, state)


def test_bad_arguments_raise_input_error():
    x, w, b = _lenet_conv2()
    with pytest.raises(InputError, match="algorithm"):
        cv.conv2d_forward(x, w, b, (1, 1), (0, 0), "gemm3000")
    with pytest.raises(InputError, match=r"\(O, 6, KH, KW\)"):
        cv.conv2d_forward(x, w[:, :5], b)
    with pytest.raises(InputError, match="b: expected shape"):
        cv.conv2d_forward(x, w, b[:3])
    with pytest.raises(InputError, match="smaller than kernel"):
        cv.conv2d_forward(x[:, :, :4, :4], w, b)
    with pytest.raises(InputError, match="stride"):
        cv.conv2d_forward(x, w, b, (0, 1), (0, 0))


def test_non_contiguous_and_float64_inputs_are_converted():
    x, w, b = _lenet_conv2()
    xt = np.asfortranarray(x.astype(np.float64))
    y = cv.conv2d_forward(xt, w, b, (1, 1), (0, 0), "im2col", {})
    assert y.dtype == np.float32 and rel_err(y, ref.conv2d(x, w, b)) <= 1e-5


@pytest.mark.parametrize("algorithm", ["winograd", "fft", "im2col"])
def test_state_cache_follows_weights_edited_in_place(algorithm):
    x, w, b = _lenet_conv2()
    state = {}
    for _ in range(2):  # the second call takes the remembered fast path
        cv.conv2d_forward(x, w, b, (1, 1), (0, 0), algorithm, state)
    w *= -0.5  # in place, as an optimizer step does: same array, nothing told the cache
    edited = cv.conv2d_forward(x, w, b, (1, 1), (0, 0), algorithm, state)
    assert rel_err(edited, ref.conv2d(x, w, b)) <= TOL[algorithm]
    w[0, 0, 0, 0] = np.float32(7.0)  # a single value, as pruning or a probe does
    np.testing.assert_array_equal(cv.conv2d_forward(x, w, b, (1, 1), (0, 0), algorithm, state),
                                  cv.conv2d_forward(x, w, b, (1, 1), (0, 0), algorithm, {}))


def test_state_cache_follows_a_replaced_weight_array():
    x, w, b = _lenet_conv2()
    state = {}
    cv.conv2d_forward(x, w, b, (1, 1), (0, 0), "winograd", state)
    w2 = w * 2
    y = cv.conv2d_forward(x, w2, b, (1, 1), (0, 0), "winograd", state)
    assert rel_err(y, ref.conv2d(x, w2, b)) <= 1e-5


# -- benchmarks --------------------------------------------------------------------------------


def _small_net():
    from microcnn.lenet import lenet

    return lenet(seed=3)


def test_benchmark_algorithms_table():
    net = _small_net()
    images = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    algorithms = ("im2col", "naive", "winograd", "fft")
    before = [layer.algorithm for layer in net.layers if hasattr(layer, "algorithm")]
    table = cv.benchmark_algorithms(net, images, algorithms, repeats=2)
    assert list(table.columns) == ["Algorithm", "Total Time (ms)", "Per Image (us)", "Speedup",
                                   "Max Error vs Naive"]
    assert list(table["Algorithm"]) == list(algorithms)
    row = table.set_index("Algorithm")
    assert row.loc["naive", "Speedup"] == pytest.approx(1.0)
    assert row.loc["naive", "Max Error vs Naive"] == 0.0
    assert np.allclose(table["Per Image (us)"], table["Total Time (ms)"] * 1e3 / 6)
    logits = net.logits(images)
    assert (table["Max Error vs Naive"] <= 1e-5 * np.abs(logits).max()).all()
    assert [layer.algorithm for layer in net.layers if hasattr(layer, "algorithm")] == before  # restored


def test_benchmark_labels_fallbacks():
    from microcnn.layers import Conv2d, Flatten, Linear
    from microcnn.network import Sequential

    net = Sequential(Conv2d(1, 2, 3, stride=2), Flatten(), Linear(2 * 4 * 4, 3), input_shape=(1, 9, 9))
    images = np.random.default_rng(1).random((2, 1, 9, 9), dtype=np.float32)
    with pytest.warns(RuntimeWarning):
        table = cv.benchmark_algorithms(net, images, ("winograd",), repeats=1)
    assert "fallback" in table["Algorithm"][0] and "stride" in table["Algorithm"][0]


def test_per_layer_algorithm_table():
    net = _small_net()
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    table = cv.per_layer_algorithm_table(net, images, repeats=1)
    assert isinstance(table, pd.DataFrame) and list(table["Layer"]) == ["conv1", "conv2", "conv3"]
    assert list(table["Input"]) == ["1x28x28", "6x14x14", "16x5x5"]
    assert list(table["Output"]) == ["6x28x28", "16x10x10", "120x1x1"]
    for a in cv.ALGORITHMS:
        assert (table[f"{a} (ms)"] > 0).all()
    assert set(table["Fastest"]) <= set(cv.ALGORITHMS) and set(table["Auto"]) <= set(cv.AUTO_CANDIDATES)


@pytest.mark.slow
def test_lenet_predictions_identical_across_algorithms(mnist_test):
    from microcnn.lenet import lenet

    bundled = lenet(weights="bundled")  # its own copy: the session fixture must keep its algorithm
    images, _ = mnist_test
    predictions = {}
    for algorithm in cv.ALGORITHMS:
        bundled.set_conv_algorithm(algorithm)
        predictions[algorithm] = bundled.predict(images, batch_size=1000).argmax(axis=1)
    for algorithm in cv.ALGORITHMS:
        assert np.array_equal(predictions[algorithm], predictions["naive"]), algorithm


def test_kernel_level_preparation_rejects_mismatches():
    x, w, b = _lenet_conv2()
    with pytest.raises(InputError, match="square"):
        K.winograd_weights(w[:, :, :3, :], 2)
    with pytest.raises(InputError, match="not provided"):
        K.winograd_matrices(3, 3)
    with pytest.raises(InputError, match="do not fit"):
        K.conv2d_winograd(x, K.winograd_weights(w, 2), b, 0, 0, 4, 5)
    with pytest.raises(InputError, match="do not fit"):
        K.conv2d_fft(x, K.fft_weights(w, (15, 14)), b, 5, 5)
