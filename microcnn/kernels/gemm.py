"""FP32 matrix multiplication kernels: a register micro-kernel, a cache-blocked GEMM, the dense layer.

Numba/LLVM only keeps accumulators in registers for reductions over the innermost loop, hence:

* ``gemm_packed`` (the convolutions): ``c[i, :] = bias[i] + sum_k a[i, k] * b_row_k``, with a
  micro-kernel written as LLVM IR (``_make_register_kernel``) that holds 8 rows x 32 columns of
  ``c`` in vector registers for the whole reduction and writes them once. ``a`` is packed once
  (``pack_rows``); the row of ``b`` used for ``k`` is ``data[offs[k] + j]`` -- an indirection that
  lets the convolution read its patch matrix as windows of the image itself (implicit im2col).
  One fused multiply-add per k, in k order, from the bias: exactly ``gemm_acc``'s arithmetic,
  so the two give the same bits (tested), at about twice the speed (conv2 at batch 1: 61 vs 30
  GFLOP/s of multiply-adds).
* ``gemm_acc`` ("NN", plain Numba): ``c[i, :] += a[i, k] * b_row_k`` six rows and four ``k`` per
  pass, ``c`` read and written once per four ``k``; the Winograd products and ``sgemm`` (backward
  pass) use it.
* ``_gemm_nt`` ("NT", dot products): ``c[i, j] = a[i, :] . bt[j, :]`` on 4x4 blocks, i.e. 16
  independent reductions over contiguous ``k`` that LLVM vectorises into register accumulators:
  the linear layer and the 1x1-output convolution, whose weights are row-major along ``k``. At
  batch 1 it is bound by reading the weights from L2 (LeNet's conv3: 192 KB, ~3 us, as fast as
  ``np.dot``); a register GEMV over transposed weights measured no better, so there is none.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import LANES, register_loop, splat

# Contraction into FMAs only: NN results do not depend on vector width.
_CONTRACT = {"contract"}
# Dot products need reassociation so LLVM may split each reduction into vector lanes.
_REDUCE = {"contract", "reassoc", "nsz"}

_COL_BLOCK = 1024  # columns of c per pass; long rows amortise each pass's set-up
_K_BLOCK = 256  # rows of b per pass: a 256 x 1024 block of b (1 MiB) stays in L2


@njit(cache=True, fastmath=_CONTRACT)
def gemm_acc(a, b, rows, offs, col0, c, ccol0, n, k0, k1):
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


# -- register micro-kernel ----------------------------------------------------------------------
# PACK_ROWS rows of c x (vectors x LANES) columns of accumulators stay in vector registers for the
# whole reduction (16 of AVX-512's 32 registers, 8 of AVX2's 16), so c is written once instead of
# being re-read every four k as in gemm_acc: about twice its speed on LeNet's convolutions.
PACK_ROWS = 8 if LANES == 16 else 4
_STRIP_VECTORS = 2


def _fmuladd(builder, vector_type):
    """llvm.fmuladd on vectors: a fused multiply-add where the target has one, as ``contract`` allows."""
    from llvmlite import ir
    from numba.core import cgutils

    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 3),
                                          f"llvm.fmuladd.v{vector_type.count}f32")


def _real_row(builder, r: int, rows):
    """Row ``r`` of a block if it is one of the ``rows`` real ones, else the last real row: padding rows
    read memory that exists and compute values that are never stored."""
    from llvmlite import ir

    i64 = ir.IntType(64)
    real = builder.icmp_signed("<", ir.Constant(i64, r), rows)
    return builder.select(real, ir.Constant(i64, r), builder.sub(rows, ir.Constant(i64, 1)))


def _make_register_kernel(vectors: int):
    """``kernel(data_addr, off_addr, n_k, w_addr, bias_addr, rows, out_addr, out_stride)``: for the
    PACK_ROWS rows of one packed block (see ``pack_rows``) and ``vectors * LANES`` columns,

        out[r, j] = fma(w[n_k-1, r], data[off[n_k-1] + j], ... fma(w[0, r], data[off[0] + j], bias[r]))

    -- one fused multiply-add per k in increasing k order, which is exactly what ``gemm_acc``
    computes, so the two agree bit for bit. Only rows r < ``rows`` are stored (the block's padding
    rows are computed from zero weights and dropped); bias is read at min(r, rows - 1)."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def kernel(typingctx, data_addr, off_addr, n_k, w_addr, bias_addr, rows, out_addr, out_stride):
        sig = types.void(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            data_addr, off_addr, n_k, w_addr, bias_addr, rows, out_addr, out_stride = args
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vf = ir.VectorType(f32, LANES)
            data_p = builder.inttoptr(data_addr, f32.as_pointer())
            off_p = builder.inttoptr(off_addr, i64.as_pointer())
            w_p = builder.inttoptr(w_addr, f32.as_pointer())
            bias_p = builder.inttoptr(bias_addr, f32.as_pointer())
            out_p = builder.inttoptr(out_addr, f32.as_pointer())
            fmuladd = _fmuladd(builder, vf)
            init = []
            for r in range(PACK_ROWS):
                at = _real_row(builder, r, rows)
                init += [splat(builder, builder.load(builder.gep(bias_p, [at])), vf)] * vectors

            def step(k, accs):
                offset = builder.load(builder.gep(off_p, [k]))
                src = builder.bitcast(builder.gep(data_p, [offset]), vf.as_pointer())
                data = [builder.load(builder.gep(src, [ir.Constant(i64, v)]), align=4)
                        for v in range(vectors)]
                base = builder.mul(k, ir.Constant(i64, PACK_ROWS))
                new = []
                for r in range(PACK_ROWS):
                    at = builder.add(base, ir.Constant(i64, r))
                    weight = splat(builder, builder.load(builder.gep(w_p, [at])), vf)
                    new += [builder.call(fmuladd, [weight, data[v], accs[r * vectors + v]])
                            for v in range(vectors)]
                return new

            finals = register_loop(builder, n_k, init, step, "fp32mk")
            for r in range(PACK_ROWS):
                def store(r=r):
                    row = builder.mul(out_stride, ir.Constant(i64, r))
                    for v in range(vectors):
                        at = builder.add(row, ir.Constant(i64, v * LANES))
                        ptr = builder.bitcast(builder.gep(out_p, [at]), vf.as_pointer())
                        builder.store(finals[r * vectors + v], ptr, align=4)
                if r == 0:
                    store()
                else:
                    with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, r), rows)):
                        store()
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_register_strip = _make_register_kernel(_STRIP_VECTORS)
_register_vector = _make_register_kernel(1)


def pack_rows(a: np.ndarray) -> np.ndarray:
    """A (M, K) float32 matrix as blocks of PACK_ROWS rows, each stored k-major: shape
    (ceil(M / PACK_ROWS), K, PACK_ROWS), rows past M zero. The layout ``gemm_packed`` reads."""
    m, kdim = a.shape
    blocks = -(-m // PACK_ROWS)
    padded = np.zeros((blocks * PACK_ROWS, kdim), np.float32)
    padded[:m] = a
    return np.ascontiguousarray(padded.reshape(blocks, PACK_ROWS, kdim).transpose(0, 2, 1))


@njit(cache=True)
def gemm_packed(packed, b, data, base, offs, out, ncol):
    """out[i, j] = b[i] + sum_k a[i, k] * data[base + offs[k] + j] for i < out.shape[0], j < ncol,
    where ``packed = pack_rows(a)``; the same indirection as ``gemm_acc`` (implicit im2col windows),
    with offs flattened into element offsets of the 1-D ``data``.

    Needs ncol >= LANES: a last partial strip is recomputed as the ncol - LANES.. window, which
    overlaps columns already done and rewrites them with the same values. Reads stay below
    base + max(offs) + ncol."""
    o = out.shape[0]
    stride = out.shape[1]
    n_k = offs.shape[0]
    strip = _STRIP_VECTORS * LANES
    data_addr = data.ctypes.data + 4 * base
    off_addr = offs.ctypes.data
    for blk in range(packed.shape[0]):
        r0 = blk * PACK_ROWS
        rows = min(PACK_ROWS, o - r0)
        w_addr = packed[blk].ctypes.data
        bias_addr = b.ctypes.data + 4 * r0
        out_addr = out.ctypes.data + 4 * r0 * stride
        j = 0
        while ncol - j >= strip:
            _register_strip(data_addr + 4 * j, off_addr, n_k, w_addr, bias_addr, rows, out_addr + 4 * j,
                            stride)
            j += strip
        while j < ncol:
            j = min(j, ncol - LANES)
            _register_vector(data_addr + 4 * j, off_addr, n_k, w_addr, bias_addr, rows, out_addr + 4 * j,
                             stride)
            j += LANES


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
            gemm_acc(a, b, rows, offs, j0, c, j0, nb, k0, min(k0 + _K_BLOCK, kdim))
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
def linear_forward(x, w, b, relu=False):
    """y = x @ w.T + b for x (N, in), w (out, in) in PyTorch layout, b (out,); float32 contiguous;
    with ``relu``, max(y, 0) in the same pass.

    Dot-product form: both operands are contiguous along ``in``, so no transpose is needed.
    """
    n = x.shape[0]
    nout = w.shape[0]
    y = np.empty((n, nout), np.float32)
    _gemm_nt(x, w, y)
    for i in range(n):
        row = y[i]
        for j in range(nout):
            v = row[j] + b[j]
            row[j] = np.float32(0.0) if relu and v < 0 else v
    return y
