"""FP32 matrix multiplication kernels: our own cache-blocked GEMM and the dense (linear) layer.

Two loop shapes, because Numba/LLVM only keeps accumulators in registers for reductions over the
innermost loop:

* ``_gemm_acc`` ("NN"): ``c[i, :] += a[i, k] * b_row_k`` over contiguous columns. Each pass
  updates six rows of ``c`` with four rows of ``b`` at once, so every loaded ``b`` vector feeds
  6 FMAs and ``c`` is read and written once per four ``k``. Long rows (>= 1000 columns) matter
  more than cache blocking here: each pass has a fixed set-up cost. The row of ``b``
  used for ``k`` is ``b[rows[k], offs[k] + col0:]`` -- an indirection that lets the convolution
  hand in shifted views of one small buffer (implicit im2col) instead of a materialised patch
  matrix. With ``rows = arange(K)`` and ``offs = 0`` it is an ordinary GEMM.
* ``_gemm_nt`` ("NT", dot products): ``c[i, j] = a[i, :] . bt[j, :]`` on 4x4 blocks, i.e. 16
  independent reductions over contiguous ``k`` that LLVM vectorises into register accumulators.
  Faster when both operands are row-major along ``k`` (the linear layer, 1x1-output convolution).

Measured on this machine (1 thread, single-threaded OpenBLAS for comparison): our kernel runs at
0.55-1.0x the speed of ``np.dot`` on LeNet-5's shapes -- 6x25 @ 25x784 33 vs 44 GFLOP/s (multiply-
adds), 16x150 @ 150x104 30 vs 53, 16x150 @ 150x1500 (conv2, a group of 15 images) 46 vs 45,
120x400 @ 400x1000 49 vs 57; the linear layer at batch 1 is faster than ``np.dot``. The
convolutions keep our kernel: the row indirection (implicit im2col) has no BLAS equivalent
without materialising the patch matrix, and BLAS's own threads ignore ``numba.set_num_threads``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Contraction into FMAs only: NN results do not depend on vector width.
_CONTRACT = {"contract"}
# Dot products need reassociation so LLVM may split each reduction into vector lanes.
_REDUCE = {"contract", "reassoc", "nsz"}

_COL_BLOCK = 1024  # columns of c per pass; long rows amortise each pass's set-up
_K_BLOCK = 256  # rows of b per pass: a 256 x 1024 block of b (1 MiB) stays in L2


@njit(cache=True, fastmath=_CONTRACT)
def _gemm_acc(a, b, rows, offs, col0, c, ccol0, n, k0, k1):
    """c[i, ccol0:ccol0+n] += sum_{k0<=k<k1} a[i, k] * b[rows[k], offs[k]+col0 : ...+n] for all i.

    Rows of c go in passes of 6 (then 4, then 1): a pass of 6 rows x 4 k keeps 24 broadcast weights
    and 4 loaded b vectors in registers and does 24 FMAs per 10 vector loads and 6 stores. A last
    block of fewer than 4 k repeats row k1-1 of b with weight 0, so each pass is a single
    vectorised loop (half the code to compile, at the price of <= 3 zero FMAs per element).
    """
    m = a.shape[0]
    last = k1 - 1
    i = 0
    while m - i >= 6:
        c0 = c[i, ccol0 : ccol0 + n]
        c1 = c[i + 1, ccol0 : ccol0 + n]
        c2 = c[i + 2, ccol0 : ccol0 + n]
        c3 = c[i + 3, ccol0 : ccol0 + n]
        c4 = c[i + 4, ccol0 : ccol0 + n]
        c5 = c[i + 5, ccol0 : ccol0 + n]
        for k in range(k0, k1, 4):
            q1, q2, q3 = min(k + 1, last), min(k + 2, last), min(k + 3, last)
            b0 = b[rows[k], offs[k] + col0 : offs[k] + col0 + n]
            b1 = b[rows[q1], offs[q1] + col0 : offs[q1] + col0 + n]
            b2 = b[rows[q2], offs[q2] + col0 : offs[q2] + col0 + n]
            b3 = b[rows[q3], offs[q3] + col0 : offs[q3] + col0 + n]
            a0, a1, a2, a3, a4, a5 = a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k], a[i + 4, k], a[i + 5, k]
            d0, d1, d2, d3, d4, d5 = _weights6(a, i, k + 1, k1)
            e0, e1, e2, e3, e4, e5 = _weights6(a, i, k + 2, k1)
            f0, f1, f2, f3, f4, f5 = _weights6(a, i, k + 3, k1)
            for j in range(n):
                x0, x1, x2, x3 = b0[j], b1[j], b2[j], b3[j]
                c0[j] = c0[j] + a0 * x0 + d0 * x1 + e0 * x2 + f0 * x3
                c1[j] = c1[j] + a1 * x0 + d1 * x1 + e1 * x2 + f1 * x3
                c2[j] = c2[j] + a2 * x0 + d2 * x1 + e2 * x2 + f2 * x3
                c3[j] = c3[j] + a3 * x0 + d3 * x1 + e3 * x2 + f3 * x3
                c4[j] = c4[j] + a4 * x0 + d4 * x1 + e4 * x2 + f4 * x3
                c5[j] = c5[j] + a5 * x0 + d5 * x1 + e5 * x2 + f5 * x3
        i += 6
    if m - i >= 4:
        c0 = c[i, ccol0 : ccol0 + n]
        c1 = c[i + 1, ccol0 : ccol0 + n]
        c2 = c[i + 2, ccol0 : ccol0 + n]
        c3 = c[i + 3, ccol0 : ccol0 + n]
        for k in range(k0, k1, 4):
            q1, q2, q3 = min(k + 1, last), min(k + 2, last), min(k + 3, last)
            b0 = b[rows[k], offs[k] + col0 : offs[k] + col0 + n]
            b1 = b[rows[q1], offs[q1] + col0 : offs[q1] + col0 + n]
            b2 = b[rows[q2], offs[q2] + col0 : offs[q2] + col0 + n]
            b3 = b[rows[q3], offs[q3] + col0 : offs[q3] + col0 + n]
            a0, a1, a2, a3 = a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k]
            d0, d1, d2, d3, _, _ = _weights6(a, i, k + 1, k1)
            e0, e1, e2, e3, _, _ = _weights6(a, i, k + 2, k1)
            f0, f1, f2, f3, _, _ = _weights6(a, i, k + 3, k1)
            for j in range(n):
                x0, x1, x2, x3 = b0[j], b1[j], b2[j], b3[j]
                c0[j] = c0[j] + a0 * x0 + d0 * x1 + e0 * x2 + f0 * x3
                c1[j] = c1[j] + a1 * x0 + d1 * x1 + e1 * x2 + f1 * x3
                c2[j] = c2[j] + a2 * x0 + d2 * x1 + e2 * x2 + f2 * x3
                c3[j] = c3[j] + a3 * x0 + d3 * x1 + e3 * x2 + f3 * x3
        i += 4
    while i < m:
        c0 = c[i, ccol0 : ccol0 + n]
        for k in range(k0, k1, 4):
            q1, q2, q3 = min(k + 1, last), min(k + 2, last), min(k + 3, last)
            b0 = b[rows[k], offs[k] + col0 : offs[k] + col0 + n]
            b1 = b[rows[q1], offs[q1] + col0 : offs[q1] + col0 + n]
            b2 = b[rows[q2], offs[q2] + col0 : offs[q2] + col0 + n]
            b3 = b[rows[q3], offs[q3] + col0 : offs[q3] + col0 + n]
            a0 = a[i, k]
            d0 = a[i, k + 1] if k + 1 < k1 else np.float32(0.0)
            e0 = a[i, k + 2] if k + 2 < k1 else np.float32(0.0)
            f0 = a[i, k + 3] if k + 3 < k1 else np.float32(0.0)
            for j in range(n):
                c0[j] = c0[j] + a0 * b0[j] + d0 * b1[j] + e0 * b2[j] + f0 * b3[j]
        i += 1


@njit(cache=True, inline="always")
def _weights6(a, i, k, k1):
    """a[i:i+6, k] (rows past the end of a read as 0), or zeros when k >= k1."""
    m = a.shape[0]
    if k >= k1:
        z = np.float32(0.0)
        return z, z, z, z, z, z
    return (a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k],
            a[i + 4, k] if i + 4 < m else np.float32(0.0), a[i + 5, k] if i + 5 < m else np.float32(0.0))


@njit(cache=True)
def sgemm(a, b):
    """C = A @ B for float32 C-contiguous A (M, K) and B (K, N); our blocked kernel, no BLAS.

    Column blocks of 1024 and K blocks of 256 keep the B block in L2 while all rows of A sweep over
    it; the six C rows a pass updates (24 KiB) stay in L1.
    """
    m, kdim = a.shape
    ncols = b.shape[1]
    c = np.zeros((m, ncols), np.float32)
    rows = np.arange(kdim)
    offs = np.zeros(kdim, np.int64)
    for j0 in range(0, ncols, _COL_BLOCK):
        nb = min(_COL_BLOCK, ncols - j0)
        for k0 in range(0, kdim, _K_BLOCK):
            _gemm_acc(a, b, rows, offs, j0, c, j0, nb, k0, min(k0 + _K_BLOCK, kdim))
    return c


@njit(cache=True, fastmath=_REDUCE)
def _gemm_nt(a, bt, c):
    """c[i, j] = a[i, :] . bt[j, :] for a (M, K), bt (N, K), c (M, N); 4x4 register blocks."""
    m, kdim = a.shape
    ncols = bt.shape[0]
    i = 0
    while i + 4 <= m:
        a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
        j = 0
        while j + 4 <= ncols:
            p0, p1, p2, p3 = bt[j], bt[j + 1], bt[j + 2], bt[j + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for k in range(kdim):
                x0, x1, x2, x3 = a0[k], a1[k], a2[k], a3[k]
                q0, q1, q2, q3 = p0[k], p1[k], p2[k], p3[k]
                s00 += x0 * q0
                s01 += x0 * q1
                s02 += x0 * q2
                s03 += x0 * q3
                s10 += x1 * q0
                s11 += x1 * q1
                s12 += x1 * q2
                s13 += x1 * q3
                s20 += x2 * q0
                s21 += x2 * q1
                s22 += x2 * q2
                s23 += x2 * q3
                s30 += x3 * q0
                s31 += x3 * q1
                s32 += x3 * q2
                s33 += x3 * q3
            c[i, j], c[i, j + 1], c[i, j + 2], c[i, j + 3] = s00, s01, s02, s03
            c[i + 1, j], c[i + 1, j + 1], c[i + 1, j + 2], c[i + 1, j + 3] = s10, s11, s12, s13
            c[i + 2, j], c[i + 2, j + 1], c[i + 2, j + 2], c[i + 2, j + 3] = s20, s21, s22, s23
            c[i + 3, j], c[i + 3, j + 1], c[i + 3, j + 2], c[i + 3, j + 3] = s30, s31, s32, s33
            j += 4
        while j < ncols:
            p0 = bt[j]
            s00 = s10 = s20 = s30 = np.float32(0.0)
            for k in range(kdim):
                q0 = p0[k]
                s00 += a0[k] * q0
                s10 += a1[k] * q0
                s20 += a2[k] * q0
                s30 += a3[k] * q0
            c[i, j], c[i + 1, j], c[i + 2, j], c[i + 3, j] = s00, s10, s20, s30
            j += 1
        i += 4
    while i < m:
        a0 = a[i]
        j = 0
        while j + 4 <= ncols:
            p0, p1, p2, p3 = bt[j], bt[j + 1], bt[j + 2], bt[j + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            for k in range(kdim):
                x0 = a0[k]
                s00 += x0 * p0[k]
                s01 += x0 * p1[k]
                s02 += x0 * p2[k]
                s03 += x0 * p3[k]
            c[i, j], c[i, j + 1], c[i, j + 2], c[i, j + 3] = s00, s01, s02, s03
            j += 4
        while j < ncols:
            p0 = bt[j]
            s00 = np.float32(0.0)
            for k in range(kdim):
                s00 += a0[k] * p0[k]
            c[i, j] = s00
            j += 1
        i += 1


@njit(cache=True)
def linear_forward(x, w, b):
    """y = x @ w.T + b for x (N, in), w (out, in) in PyTorch layout, b (out,); float32 contiguous.

    Dot-product form: both operands are contiguous along ``in``, so no transpose is needed.
    """
    n = x.shape[0]
    nout = w.shape[0]
    y = np.empty((n, nout), np.float32)
    _gemm_nt(x, w, y)
    for i in range(n):
        row = y[i]
        for j in range(nout):
            row[j] += b[j]
    return y
