"""The GEMM kernels' preconditions are checked when they are called from Python (kernels/gemm.py):
a wrong dtype, a memory layout the kernel's address arithmetic does not follow, or shapes and offsets
that would read or write outside an array are refused with an InputError naming the kernel and the
argument -- before anything is written -- and right inputs give the same bits as the unchecked kernel
(which is what other Numba kernels call) and agree with a float64 NumPy product."""

from __future__ import annotations

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.kernels import gemm
from microcnn.kernels.gemm import LANES, gemm_acc, gemm_packed, linear_forward, pack_rows, sgemm, window_dots

RNG = np.random.default_rng(17)


def _rand(*shape):
    return RNG.standard_normal(shape, dtype=np.float32)


def _close(got, a, b, extra=0.0):
    """float32 result against the float64 product: |error| <= K * 2^-22 * sum |a||b| (+ |extra|)."""
    ref = a.astype(np.float64) @ b.astype(np.float64) + extra
    bound = a.shape[1] * 2.0**-22 * (np.abs(a).astype(np.float64) @ np.abs(b)) + 1e-6 * np.abs(extra)
    return bool(np.all(np.abs(got - ref) <= bound + 1e-30))


# -- linear_forward --------------------------------------------------------------------------------------
def test_linear_forward_right_inputs_same_bits_as_the_kernel():
    x, w, b = _rand(5, 37), _rand(11, 37), _rand(11)
    y = linear_forward(x, w, b)
    assert np.array_equal(y, gemm._linear_forward(x, w, b, False))
    assert _close(y, x, w.T, b)
    # Rows that are contiguous but spaced out (every other image) follow the kernel's row stride.
    tall = _rand(10, 37)
    spaced = linear_forward(tall[::2], w, b)
    assert np.array_equal(spaced, linear_forward(np.ascontiguousarray(tall[::2]), w, b))


@pytest.mark.parametrize("case, match", [
    ("x float64", "x as a 2-D float32"),
    ("x columns strided", "x with contiguous rows"),
    ("w Fortran order", "w C-contiguous"),
    ("w int32", "w as a 2-D float32"),
    ("w wrong width", r"w \(out, 37\) and b \(out,\)"),
    ("b wrong length", r"w \(out, 37\) and b \(out,\)"),
    ("x 1-D", "x as a 2-D float32"),
    ("x a list", "x as a 2-D float32 array, found list"),
])
def test_linear_forward_refuses(case, match):
    x, w, b = _rand(4, 37), _rand(6, 37), _rand(6)
    args = {
        "x float64": (x.astype(np.float64), w, b),
        "x columns strided": (_rand(4, 74)[:, ::2], w, b),
        "w Fortran order": (x, np.asfortranarray(w), b),
        "w int32": (x, w.astype(np.int32), b),
        "w wrong width": (x, _rand(6, 38), b),
        "b wrong length": (x, w, _rand(5)),
        "x 1-D": (x[0], w, b),
        "x a list": (x.tolist(), w, b),
    }[case]
    with pytest.raises(InputError, match=f"linear_forward: expected {match}"):
        linear_forward(*args)


# -- sgemm -----------------------------------------------------------------------------------------------
def test_sgemm_right_inputs_same_bits_as_the_kernel():
    a, b = _rand(7, 300), _rand(300, 13)
    c = sgemm(a, b)
    assert np.array_equal(c, gemm._sgemm(a, b)) and _close(c, a, b)


@pytest.mark.parametrize("a, b, match", [
    (_rand(3, 4), _rand(5, 2), r"b with 4 rows"),
    (_rand(3, 4).astype(np.float64), _rand(4, 2), "a as a 2-D float32"),
    (_rand(4, 3).T, _rand(4, 2), "a C-contiguous"),
    (_rand(3, 4), _rand(2, 4).T, "b C-contiguous"),
    (_rand(3, 4), _rand(4), "b as a 2-D float32"),
])
def test_sgemm_refuses(a, b, match):
    with pytest.raises(InputError, match=f"sgemm: expected {match}"):
        sgemm(a, b)


# -- window_dots -----------------------------------------------------------------------------------------
def _window_case():
    a, src = _rand(6, 21), _rand(60)
    offs = np.array([0, 5, 39, 2, 17], np.int64)  # the last window ends at 39 + 21 = 60: exactly inside
    return a, src, offs, _rand(6, 5)


@pytest.mark.parametrize("accumulate", [False, True])
def test_window_dots_right_inputs_same_bits_as_the_kernel(accumulate):
    a, src, offs, start = _window_case()
    c, raw = start.copy(), start.copy()
    window_dots(a, src, offs, c, accumulate)
    gemm._window_dots(a, src, offs, raw, accumulate)
    assert np.array_equal(c, raw)
    windows = np.stack([src[o:o + 21] for o in offs], axis=1)
    assert _close(c, a, windows, start if accumulate else 0.0)


@pytest.mark.parametrize("case, match", [
    ("window past the end", "windows of 21 inside the 60 elements of b"),
    ("negative offset", "windows of 21 inside the 60 elements of b"),
    ("offs int32", "offs as a 1-D int64"),
    ("c wrong shape", r"c of shape \(6, 5\)"),
    ("b strided", "b C-contiguous"),
    ("a columns strided", "a with contiguous rows"),
    ("c float64", "c as a 2-D float32"),
])
def test_window_dots_refuses_before_writing(case, match):
    a, src, offs, c = _window_case()
    if case == "window past the end":
        offs = offs + 1
    elif case == "negative offset":
        offs = offs - 1
    elif case == "offs int32":
        offs = offs.astype(np.int32)
    elif case == "c wrong shape":
        c = _rand(6, 4)
    elif case == "b strided":
        src = _rand(120)[::2]
    elif case == "a columns strided":
        a = _rand(6, 42)[:, ::2]
    elif case == "c float64":
        c = c.astype(np.float64)
    before = c.copy()
    with pytest.raises(InputError, match=f"window_dots: expected {match}"):
        window_dots(a, src, offs, c, True)
    assert np.array_equal(c, before)


# -- gemm_packed -----------------------------------------------------------------------------------------
def _packed_case(m=11, k=9, n=2 * LANES + 3):
    a, b, bias = _rand(m, k), _rand(k, n), _rand(m)
    return pack_rows(a), bias, b.reshape(-1).copy(), np.arange(k, dtype=np.int64) * n, n, a, b


def test_gemm_packed_right_inputs_same_bits_as_the_kernel():
    packed, bias, data, offs, n, a, b = _packed_case()
    out, raw = np.zeros((a.shape[0], n), np.float32), np.zeros((a.shape[0], n), np.float32)
    gemm_packed(packed, bias, data, 0, offs, out, n)
    gemm._gemm_packed(packed, bias, data, 0, offs, raw, n)
    assert np.array_equal(out, raw) and _close(out, a, b, bias[:, None])


@pytest.mark.parametrize("case, match", [
    ("data too short", "windows of .* inside the .* elements of data"),
    ("base past the data", "windows of .* inside the .* elements of data"),
    ("packed from another matrix", "packed of shape"),
    ("ncol below a vector", f"ncol in {LANES}.."),
    ("ncol wider than out", f"ncol in {LANES}.."),
    ("too few biases", "at least 11 biases"),
    ("out not contiguous", "out C-contiguous"),
    ("data float64", "data as a 1-D float32"),
    ("offs int32", "offs as a 1-D int64"),
])
def test_gemm_packed_refuses_before_writing(case, match):
    packed, bias, data, offs, n, a, _b = _packed_case()
    base, ncol = 0, n
    out = np.zeros((a.shape[0], n), np.float32)
    if case == "data too short":
        data = data[:-1]
    elif case == "base past the data":
        base = 1
    elif case == "packed from another matrix":
        packed = pack_rows(_rand(a.shape[0], a.shape[1] + 1))
    elif case == "ncol below a vector":
        ncol = LANES - 1
    elif case == "ncol wider than out":
        ncol = n + 1
    elif case == "too few biases":
        bias = bias[:-1]
    elif case == "out not contiguous":
        out = np.zeros((a.shape[0], 2 * n), np.float32)[:, ::2]
    elif case == "data float64":
        data = data.astype(np.float64)
    elif case == "offs int32":
        offs = offs.astype(np.int32)
    before = out.copy()
    with pytest.raises(InputError, match=f"gemm_packed: expected {match}"):
        gemm_packed(packed, bias, data, base, offs, out, ncol)
    assert np.array_equal(out, before)


# -- gemm_acc --------------------------------------------------------------------------------------------
def _acc_case(m=7, k=10, n=12):
    buf = _rand(5, n + 12)
    rows = RNG.integers(0, 5, k)
    offs = RNG.integers(0, 9, k)
    return _rand(m, k), buf, rows, offs, 3, _rand(m, n + 4), 2, n, 0, k


def test_gemm_acc_right_inputs_same_bits_as_the_kernel():
    a, buf, rows, offs, col0, c0, ccol0, n, k0, k1 = _acc_case()
    c, raw = c0.copy(), c0.copy()
    gemm_acc(a, buf, rows, offs, col0, c, ccol0, n, k0, k1)
    gemm._gemm_acc(a, buf, rows, offs, col0, raw, ccol0, n, k0, k1)
    assert np.array_equal(c, raw)
    b = np.stack([buf[r, o + col0:o + col0 + n] for r, o in zip(rows, offs, strict=True)])
    assert _close(c[:, ccol0:ccol0 + n], a, b, c0[:, ccol0:ccol0 + n])


@pytest.mark.parametrize("case, match", [
    ("row index past b", "rows in 0..4"),
    ("window past b", "windows of 12 inside the 24 columns of b"),
    ("k1 past a", "k1 <= a's 10 columns"),
    ("k1 before k0", "k1 >= 3"),
    ("c too narrow", "c with >= 7 rows and >= 17 columns"),
    ("c too few rows", "c with >= 7 rows"),
    ("a float64", "a as a 2-D float32"),
    ("rows int32", "rows as a 1-D int64"),
    ("n negative", "n >= 0"),
])
def test_gemm_acc_refuses_before_writing(case, match):
    a, buf, rows, offs, col0, c, ccol0, n, k0, k1 = _acc_case()
    if case == "row index past b":
        rows = rows.copy()
        rows[4] = 5
    elif case == "window past b":
        offs = offs.copy()
        offs[2] = 10  # 10 + col0 3 + 12 > 24
    elif case == "k1 past a":
        k1 = 11
    elif case == "k1 before k0":
        k0, k1 = 3, 2
    elif case == "c too narrow":
        ccol0 = 5
    elif case == "c too few rows":
        c = c[:6]
    elif case == "a float64":
        a = a.astype(np.float64)
    elif case == "rows int32":
        rows = rows.astype(np.int32)
    elif case == "n negative":
        n = -1
    before = c.copy()
    with pytest.raises(InputError, match=f"gemm_acc: expected {match}"):
        gemm_acc(a, buf, rows, offs, col0, c, ccol0, n, k0, k1)
    assert np.array_equal(c, before)


def test_numba_callers_still_compile_to_the_kernels():
    """Inside Numba code the public names are the unchecked kernels (the backward pass calls sgemm and
    window_dots, the convolution gemm_packed): a compiled caller runs and gives the checked result."""
    from microcnn.kernels.backward import linear_backward

    dy, x, w = _rand(3, 5), _rand(3, 8), _rand(5, 8)
    dx, dw, db = linear_backward(dy, x, w, True)
    assert np.array_equal(dx, sgemm(dy, w))
    assert np.array_equal(dw, sgemm(np.ascontiguousarray(dy.T), x))
