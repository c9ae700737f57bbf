"""Our FP32 GEMM kernels against float64 NumPy products.

Tolerance: the standard forward-error bound of a length-K float32 dot product,
|c - c_exact| <= K * u * (|a| @ |b|) with u = 2**-24, elementwise. A wrong index or a dropped term
gives an error of the order of |a| @ |b| itself, far above it.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microcnn.kernels.gemm import PACK_ROWS, gemm_acc, gemm_packed, linear_forward, pack_rows, sgemm
from microcnn.kernels.simd import LANES

EXAMPLES = settings(max_examples=25, deadline=None)
U32 = 2.0**-24


def _bound(a, b, c0=0.0):
    """(K + 1) u (|c0| + |a| @ |b|): the bound for c0 + a @ b summed in float32 in any order."""
    a64, b64 = np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64))
    return (a.shape[1] + 1) * U32 * (np.abs(c0) + a64 @ b64) + 1e-30


def _rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


@EXAMPLES
@given(m=st.integers(1, 20), k=st.integers(1, 40), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_sgemm_matches_float64_product(m, k, n, seed):
    rng = np.random.default_rng(seed)
    a, b = _rand(rng, (m, k)), _rand(rng, (k, n))
    c = sgemm(a, b)
    assert c.dtype == np.float32 and c.shape == (m, n)
    assert np.all(np.abs(c - a.astype(np.float64) @ b) <= _bound(a, b))


SHAPES = [(6, 25, 784), (16, 150, 100), (120, 400, 33), (7, 259, 1030), (5, 3, 2049)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_sgemm_lenet_and_block_boundary_shapes(m, k, n):
    # LeNet's conv GEMMs, plus shapes that straddle the 256-k and 1024-column blocks and every
    # row-pass tail (6, 4, 1 rows; k not a multiple of 4).
    rng = np.random.default_rng(m * 1000 + k)
    a, b = _rand(rng, (m, k)), _rand(rng, (k, n))
    assert np.all(np.abs(sgemm(a, b) - a.astype(np.float64) @ b) <= _bound(a, b))


@EXAMPLES
@given(n=st.integers(1, 9), fin=st.integers(1, 50), fout=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_linear_forward_matches_float64(n, fin, fout, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _rand(rng, (n, fin)), _rand(rng, (fout, fin)), _rand(rng, (fout,))
    y = linear_forward(x, w, b)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert y.shape == (n, fout) and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= _bound(x, w.T, b))


def test_linear_forward_lenet_shapes():
    rng = np.random.default_rng(3)
    for n, fin, fout in [(1000, 400, 120), (1000, 120, 84), (1, 84, 10)]:
        x, w, b = _rand(rng, (n, fin)), _rand(rng, (fout, fin)), _rand(rng, (fout,))
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
        assert np.all(np.abs(linear_forward(x, w, b) - ref) <= _bound(x, w.T, b))


@EXAMPLES
@given(m=st.integers(1, 13), k=st.integers(1, 30), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_gemm_acc_reads_rows_through_the_window_indirection(m, k, n, seed):
    # Row k of B is the window buf[rows[k], offs[k] + col0 : ... + n]: the implicit-im2col contract.
    rng = np.random.default_rng(seed)
    buf = _rand(rng, (5, n + 12))
    rows = rng.integers(0, 5, k)
    offs = rng.integers(0, 9, k)
    col0 = 3
    b = np.stack([buf[r, o + col0 : o + col0 + n] for r, o in zip(rows, offs, strict=True)])
    a = _rand(rng, (m, k))
    c0 = _rand(rng, (m, n + 4))
    c = c0.copy()
    gemm_acc(a, buf, rows, offs, col0, c, 2, n, 0, k)
    ref = c0[:, 2 : 2 + n].astype(np.float64) + a.astype(np.float64) @ b
    assert np.all(np.abs(c[:, 2 : 2 + n] - ref) <= _bound(a, b, c0[:, 2 : 2 + n]))
    assert np.array_equal(c[:, :2], c0[:, :2]) and np.array_equal(c[:, 2 + n :], c0[:, 2 + n :])


@EXAMPLES
@given(m=st.integers(1, 19), k=st.integers(1, 40), n=st.integers(LANES, 90), seed=st.integers(0, 2**16))
def test_register_kernel_equals_gemm_acc_bit_for_bit(m, k, n, seed):
    """gemm_packed (registers, one fused multiply-add per k from the bias) against the float64 product,
    and against gemm_acc started from the same bias: the identical operation order, so the same bits
    -- what lets the bundled weights, trained with gemm_acc, reproduce exactly. Row counts cover
    whole and partial PACK_ROWS blocks, column counts whole strips and the overlapping last vector."""
    rng = np.random.default_rng(seed)
    a, b, bias = _rand(rng, (m, k)), _rand(rng, (k, n)), _rand(rng, (m,))
    data = np.concatenate([b.reshape(-1), np.full(LANES, np.nan, np.float32)])  # NaN: reads past the end
    out = np.full((m, n + 3), -7.0, np.float32)
    gemm_packed(pack_rows(a), bias, data, 0, np.arange(k) * n, out, n)
    ref = bias[:, None].astype(np.float64) + a.astype(np.float64) @ b
    assert np.all(np.abs(out[:, :n] - ref) <= _bound(a, b, bias[:, None]))
    assert np.all(out[:, n:] == -7.0)  # nothing stored past ncol
    c = np.repeat(bias[:, None], n, axis=1)
    gemm_acc(a, b, np.arange(k), np.zeros(k, np.int64), 0, c, 0, n, 0, k)
    assert np.array_equal(out[:, :n], c)


def test_pack_rows_layout():
    a = np.arange(3 * 5, dtype=np.float32).reshape(3, 5) + 1
    packed = pack_rows(a)
    assert packed.shape == (1, 5, PACK_ROWS)
    assert np.array_equal(packed[0, :, :3], a.T) and np.all(packed[0, :, 3:] == 0)
