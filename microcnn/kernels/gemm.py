"""FP32 matrix multiplication kernels: a register micro-kernel, a cache-blocked GEMM, the dense layer.

Numba/LLVM only keeps accumulators in registers for reductions over the innermost loop, hence the
shapes below. None uses fastmath beyond ``contract`` (fused multiply-adds), so results are the same
bits on every x86-64 CPU with FMA, whatever vector width Numba compiles for:

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
* ``window_dots`` / ``_gemm_nt`` ("NT", dot products): ``c[i, j] = a[i, :] . b_j`` on 4x4 blocks
  with register accumulators, written as IR (``_make_dot_kernel``) so that every dot product is
  summed in one fixed order -- 8 partial sums, then a fixed tree -- whatever vector width the
  target has: the linear layer, the 1x1-output convolution (weights row-major along ``k``) and the
  convolution's weight gradient (``b_j`` a window of the image). Reductions left to LLVM
  (``reassoc``) change their last bits with the CPU they are compiled for. At batch 1 this is
  bound by reading the weights from L2 (LeNet's conv3: 192 KB, a few us).

The kernels read and write through raw addresses (``.ctypes.data``) or unchecked indexing, so a wrong
dtype, memory layout or shape would read or write outside the arrays. Called from Python, each public
kernel name is a checked wrapper (end of this file) that refuses such inputs with an ``InputError``
before the kernel runs; called from another Numba kernel, which builds its arrays itself, the same name
compiles to the unchecked kernel (a Numba ``overload``), at no cost.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit
from numba.extending import overload

from ..errors import InputError
from .simd import LANES, fmuladd, register_loop, splat

if TYPE_CHECKING:
    from llvmlite import ir

# Contraction into FMAs only: NN results do not depend on vector width.
_CONTRACT = {"contract"}

_COL_BLOCK = 1024  # columns of c per pass; long rows amortise each pass's set-up
_K_BLOCK = 256  # rows of b per pass: a 256 x 1024 block of b (1 MiB) stays in L2


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
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


# -- register micro-kernel ----------------------------------------------------------------------
# PACK_ROWS rows of c x (vectors x LANES) columns of accumulators stay in vector registers for the
# whole reduction (16 of AVX-512's 32 registers, 8 of AVX2's 16), so c is written once instead of
# being re-read every four k as in gemm_acc: about twice its speed on LeNet's convolutions.
PACK_ROWS = 8 if LANES == 16 else 4
_STRIP_VECTORS = 2


def _real_row(builder: ir.IRBuilder, r: int, rows: ir.Value) -> ir.Value:
    """Row ``r`` of a block if it is one of the ``rows`` real ones, else the last real row: padding rows
    read memory that exists and compute values that are never stored."""
    from llvmlite import ir

    i64 = ir.IntType(64)
    real = builder.icmp_signed("<", ir.Constant(i64, r), rows)
    return builder.select(real, ir.Constant(i64, r), builder.sub(rows, ir.Constant(i64, 1)))


def _make_register_kernel(vectors: int) -> Any:
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
            fma = fmuladd(builder, vf)
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
                    new += [builder.call(fma, [weight, data[v], accs[r * vectors + v]])
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


@njit(cache=True, nogil=True)
def _gemm_packed(packed, b, data, base, offs, out, ncol):
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


@njit(cache=True, nogil=True)
def _sgemm(a, b):
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


# -- dot products -----------------------------------------------------------------------------
# Every dot product is summed the same way on every target: DOT_LANES partial sums (lane l takes the
# products of k = l, l + DOT_LANES, ... by fused multiply-adds, in increasing k), then a fixed tree
# (lanes l and l + 4, then l and l + 2, then the last two). A reduction left to LLVM (fastmath
# ``reassoc``) is split into as many lanes as the target's vector width, so its last bits change
# with the CPU Numba compiles for; hence the IR, which fixes the lanes and the order.
DOT_LANES = 8
DOT_ROWS, DOT_COLS = 4, 4  # outputs per block: 16 vector accumulators (row blocks of 1 use 1 x 8)


def _make_dot_kernel(rows: int, cols: int, accumulate: bool) -> Any:
    """``kernel(a_addr, a_stride, b_addr, off_addr, n_k, out_addr, out_stride)``: for r < rows,
    c < cols, ``out[r * out_stride + c] (+)= dot(a[r * a_stride + k], b[off[c] + k] for k < n_k)``,
    summed as described above (float32 addresses, element strides and offsets)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.core.extending import intrinsic

    @intrinsic
    def kernel(typingctx, a_addr, a_stride, b_addr, off_addr, n_k, out_addr, out_stride):
        sig = types.void(*([types.intp] * 7))

        def codegen(context, builder, signature, args):
            a_addr, a_stride, b_addr, off_addr, n_k, out_addr, out_stride = args
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vf = ir.VectorType(f32, DOT_LANES)
            a_p = builder.inttoptr(a_addr, f32.as_pointer())
            b_p = builder.inttoptr(b_addr, f32.as_pointer())
            off_p = builder.inttoptr(off_addr, i64.as_pointer())
            out_p = builder.inttoptr(out_addr, f32.as_pointer())
            fma = fmuladd(builder, vf)
            fmuladd1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3),
                                                      "llvm.fmuladd.f32")
            a_rows = [builder.gep(a_p, [builder.mul(a_stride, ir.Constant(i64, r))]) for r in range(rows)]
            b_rows = [builder.gep(b_p, [builder.load(builder.gep(off_p, [ir.Constant(i64, c)]))])
                      for c in range(cols)]
            zero = ir.Constant(vf, [0.0] * DOT_LANES)
            n_vec = builder.udiv(n_k, ir.Constant(i64, DOT_LANES))
            tail0 = builder.mul(n_vec, ir.Constant(i64, DOT_LANES))

            def vector_step(t, accs):
                at = builder.mul(t, ir.Constant(i64, DOT_LANES))
                xs = [builder.load(builder.bitcast(builder.gep(p, [at]), vf.as_pointer()), align=4)
                      for p in a_rows]
                ys = [builder.load(builder.bitcast(builder.gep(p, [at]), vf.as_pointer()), align=4)
                      for p in b_rows]
                return [builder.call(fma, [xs[r], ys[c], accs[r * cols + c]])
                        for r in range(rows) for c in range(cols)]

            def tail_step(lane, accs):  # k = tail0 + lane goes to lane ``lane``, as in vector_step
                at = builder.add(tail0, lane)
                lane32 = builder.trunc(lane, i32)
                xs = [builder.load(builder.gep(p, [at])) for p in a_rows]
                ys = [builder.load(builder.gep(p, [at])) for p in b_rows]
                new = []
                for r in range(rows):
                    for c in range(cols):
                        acc = accs[r * cols + c]
                        s = builder.call(fmuladd1, [xs[r], ys[c], builder.extract_element(acc, lane32)])
                        new.append(builder.insert_element(acc, s, lane32))
                return new

            accs = register_loop(builder, n_vec, [zero] * (rows * cols), vector_step, "dot")
            accs = register_loop(builder, builder.sub(n_k, tail0), accs, tail_step, "dottail")
            for r in range(rows):
                for c in range(cols):
                    ptr = builder.gep(out_p, [builder.add(builder.mul(out_stride, ir.Constant(i64, r)),
                                                          ir.Constant(i64, c))])
                    total = _sum_lanes(builder, accs[r * cols + c])
                    builder.store(builder.fadd(builder.load(ptr), total) if accumulate else total, ptr)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _sum_lanes(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """The lanes of a DOT_LANES vector added by the fixed tree: halves, then halves again (no fast-math
    flags: LLVM keeps this order)."""
    from llvmlite import ir

    width = DOT_LANES
    while width > 1:
        width //= 2
        undef = ir.Constant(vector.type, ir.Undefined)
        low = builder.shuffle_vector(vector, undef, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                  list(range(width))))
        high = builder.shuffle_vector(vector, undef, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                   list(range(width, 2 * width))))
        vector = builder.fadd(low, high)
    return builder.extract_element(vector, ir.Constant(ir.IntType(32), 0))


_dot_block_set = _make_dot_kernel(DOT_ROWS, DOT_COLS, False)
_dot_block_add = _make_dot_kernel(DOT_ROWS, DOT_COLS, True)
_dot_column_set = _make_dot_kernel(DOT_ROWS, 1, False)
_dot_column_add = _make_dot_kernel(DOT_ROWS, 1, True)
_dot_row_set = _make_dot_kernel(1, 2 * DOT_COLS, False)
_dot_row_add = _make_dot_kernel(1, 2 * DOT_COLS, True)
_dot_one_set = _make_dot_kernel(1, 1, False)
_dot_one_add = _make_dot_kernel(1, 1, True)


@njit(cache=True, nogil=True)
def _window_dots(a, b, offs, c, accumulate):
    """c[i, j] = a[i, :] . b[offs[j] : offs[j] + K] (or += with ``accumulate``) for a (M, K) with
    contiguous rows, b 1-D, c (M, len(offs)) with contiguous rows; each dot product summed in the
    fixed order of ``_make_dot_kernel``, so the bits depend neither on the CPU nor on the blocking."""
    m, kdim = a.shape
    n = offs.shape[0]
    sa, sc = a.strides[0] // 4, c.strides[0] // 4
    b0, o0 = b.ctypes.data, offs.ctypes.data
    i = 0
    while i < m:
        rows = DOT_ROWS if m - i >= DOT_ROWS else 1
        ai, ci = a.ctypes.data + 4 * i * sa, c.ctypes.data + 4 * i * sc
        j = 0
        while j < n:
            oj, cj = o0 + 8 * j, ci + 4 * j
            if rows == DOT_ROWS and n - j >= DOT_COLS:
                if accumulate:
                    _dot_block_add(ai, sa, b0, oj, kdim, cj, sc)
                else:
                    _dot_block_set(ai, sa, b0, oj, kdim, cj, sc)
                j += DOT_COLS
            elif rows == DOT_ROWS:
                if accumulate:
                    _dot_column_add(ai, sa, b0, oj, kdim, cj, sc)
                else:
                    _dot_column_set(ai, sa, b0, oj, kdim, cj, sc)
                j += 1
            elif n - j >= 2 * DOT_COLS:
                if accumulate:
                    _dot_row_add(ai, sa, b0, oj, kdim, cj, sc)
                else:
                    _dot_row_set(ai, sa, b0, oj, kdim, cj, sc)
                j += 2 * DOT_COLS
            else:
                if accumulate:
                    _dot_one_add(ai, sa, b0, oj, kdim, cj, sc)
                else:
                    _dot_one_set(ai, sa, b0, oj, kdim, cj, sc)
                j += 1
        i += rows


@njit(cache=True, nogil=True)
def _gemm_nt(a, bt, c):
    """c[i, j] = a[i, :] . bt[j, :] for a (M, K), bt (N, K), c (M, N), all C-contiguous."""
    kdim = bt.shape[1]
    window_dots(a, bt.reshape(-1), np.arange(bt.shape[0]) * kdim, c, False)


@njit(cache=True, nogil=True)
def _linear_forward(x, w, b, relu=False):
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


# -- checked entry points ---------------------------------------------------------------------------
# Called from Python, the public names below check what the kernels above take for granted; called from
# a Numba kernel, ``overload`` compiles the same name straight to the unchecked kernel.
_F32, _I64 = np.dtype(np.float32), np.dtype(np.int64)


def _refuse(kernel: str, what: str, found: object) -> InputError:
    return InputError(f"{kernel}: expected {what}, found {found}")


def _array(kernel: str, name: str, x: Any, dtype: np.dtype, ndim: int, layout: str = "") -> np.ndarray:
    """``x`` if it is a ``dtype`` array of ``ndim`` dimensions in ``layout`` ("C": C-contiguous, "rows":
    each row contiguous, "": any strides), else the InputError naming the kernel and the argument."""
    if not isinstance(x, np.ndarray) or x.dtype != dtype or x.ndim != ndim:
        found = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__)
        raise _refuse(kernel, f"{name} as a {ndim}-D {dtype} array", found)
    if layout == "C" and not x.flags.c_contiguous:
        raise _refuse(kernel, f"{name} C-contiguous (the kernel computes addresses from its shape)",
                      f"strides {x.strides}")
    if layout == "rows" and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        raise _refuse(kernel, f"{name} with contiguous rows", f"strides {x.strides}")
    return x


def _index(kernel: str, name: str, value: Any, low: int = 0) -> int:
    try:
        i = operator.index(value)
    except TypeError:
        raise _refuse(kernel, f"{name} as an integer", repr(value)) from None
    if i < low:
        raise _refuse(kernel, f"{name} >= {low}", i)
    return i


def _windows(kernel: str, offs: np.ndarray, start: int, width: int, size: int, what: str) -> None:
    """Every window ``[start + offs[k], start + offs[k] + width)`` lies inside ``[0, size)``."""
    if len(offs) and (start + int(offs.min()) < 0 or start + int(offs.max()) + width > size):
        raise _refuse(kernel, f"windows of {width} inside the {size} {what}",
                      f"offsets {int(offs.min())}..{int(offs.max())} from {start}")


def gemm_acc(a: np.ndarray, b: np.ndarray, rows: np.ndarray, offs: np.ndarray, col0: int, c: np.ndarray,
             ccol0: int, n: int, k0: int, k1: int) -> None:
    """``c[i, ccol0:ccol0+n] += sum_{k0<=k<k1} a[i, k] * b[rows[k], offs[k]+col0 : ...+n]`` for all rows
    i of ``a`` (float32, any strides; ``rows`` and ``offs`` int64), checked; see ``_gemm_acc``."""
    a = _array("gemm_acc", "a", a, _F32, 2)
    b = _array("gemm_acc", "b", b, _F32, 2)
    c = _array("gemm_acc", "c", c, _F32, 2)
    rows = _array("gemm_acc", "rows", rows, _I64, 1)
    offs = _array("gemm_acc", "offs", offs, _I64, 1)
    col0, ccol0, n = (_index("gemm_acc", k, v) for k, v in (("col0", col0), ("ccol0", ccol0), ("n", n)))
    k0, k1 = _index("gemm_acc", "k0", k0), _index("gemm_acc", "k1", k1, k0)
    if k1 > min(a.shape[1], len(rows), len(offs)):
        raise _refuse("gemm_acc", f"k1 <= a's {a.shape[1]} columns and {len(rows)} rows / {len(offs)} offs",
                      k1)
    if c.shape[0] < a.shape[0] or ccol0 + n > c.shape[1]:
        raise _refuse("gemm_acc", f"c with >= {a.shape[0]} rows and >= {ccol0 + n} columns", c.shape)
    used = rows[k0:k1]
    if len(used) and (int(used.min()) < 0 or int(used.max()) >= b.shape[0]):
        raise _refuse("gemm_acc", f"rows in 0..{b.shape[0] - 1}", f"{int(used.min())}..{int(used.max())}")
    _windows("gemm_acc", offs[k0:k1], col0, n, b.shape[1], "columns of b")
    _gemm_acc(a, b, rows, offs, col0, c, ccol0, n, k0, k1)


def gemm_packed(packed: np.ndarray, b: np.ndarray, data: np.ndarray, base: int, offs: np.ndarray,
                out: np.ndarray, ncol: int) -> None:
    """``out[i, j] = b[i] + sum_k a[i, k] * data[base + offs[k] + j]`` for ``packed = pack_rows(a)``,
    checked (the register micro-kernel reads and writes through raw addresses); see ``_gemm_packed``."""
    out = _array("gemm_packed", "out", out, _F32, 2, "C")
    offs = _array("gemm_packed", "offs", offs, _I64, 1, "C")
    packed = _array("gemm_packed", "packed", packed, _F32, 3, "C")
    blocks = -(-out.shape[0] // PACK_ROWS)
    if packed.shape != (blocks, len(offs), PACK_ROWS):
        raise _refuse("gemm_packed", f"packed of shape {(blocks, len(offs), PACK_ROWS)} (pack_rows of "
                      f"{out.shape[0]} rows x {len(offs)} offsets)", packed.shape)
    b = _array("gemm_packed", "b", b, _F32, 1, "C")
    if len(b) < out.shape[0]:
        raise _refuse("gemm_packed", f"at least {out.shape[0]} biases", len(b))
    data = _array("gemm_packed", "data", data, _F32, 1, "C")
    base, ncol = _index("gemm_packed", "base", base), _index("gemm_packed", "ncol", ncol)
    if not LANES <= ncol <= out.shape[1]:
        raise _refuse("gemm_packed", f"ncol in {LANES}..{out.shape[1]} (a vector, at most out's width)", ncol)
    _windows("gemm_packed", offs, base, ncol, len(data), "elements of data")
    _gemm_packed(packed, b, data, base, offs, out, ncol)


def window_dots(a: np.ndarray, b: np.ndarray, offs: np.ndarray, c: np.ndarray, accumulate: bool) -> None:
    """``c[i, j] = a[i, :] . b[offs[j] : offs[j] + K]`` (or ``+=`` with ``accumulate``), checked (the
    dot-product kernels read and write through raw addresses); see ``_window_dots``."""
    a = _array("window_dots", "a", a, _F32, 2, "rows")
    b = _array("window_dots", "b", b, _F32, 1, "C")
    offs = _array("window_dots", "offs", offs, _I64, 1, "C")
    c = _array("window_dots", "c", c, _F32, 2, "rows")
    if c.shape != (a.shape[0], len(offs)):
        raise _refuse("window_dots", f"c of shape {(a.shape[0], len(offs))} (rows of a x offsets)", c.shape)
    _windows("window_dots", offs, 0, a.shape[1], len(b), "elements of b")
    _window_dots(a, b, offs, c, bool(accumulate))


def sgemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for float32 C-contiguous ``a`` (M, K) and ``b`` (K, N) with the blocked kernel (no BLAS),
    checked; see ``_sgemm``.

    Example::

        >>> sgemm(np.ones((2, 3), np.float32), np.full((3, 1), 2, np.float32))
        array([[6.],
               [6.]], dtype=float32)
    """
    a = _array("sgemm", "a", a, _F32, 2, "C")
    b = _array("sgemm", "b", b, _F32, 2, "C")
    if a.shape[1] != b.shape[0]:
        raise _refuse("sgemm", f"b with {a.shape[1]} rows (a is {a.shape})", b.shape)
    return _sgemm(a, b)


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, relu: bool = False) -> np.ndarray:
    """``x @ w.T + b`` (then ``max(., 0)`` with ``relu``) with every dot product summed in the fixed order
    of ``_make_dot_kernel``: the same bits on every CPU. Checked; see ``_linear_forward``.

    Args:
        x: float32 (N, in), rows contiguous.
        w: float32 (out, in), C-contiguous (PyTorch's layout).
        b: float32 (out,).
        relu: clamp negative outputs to 0 in the same pass.

    Returns:
        float32 (N, out).

    Example::

        >>> x = np.array([[1.0, 2.0]], np.float32)
        >>> w = np.array([[1.0, 1.0], [-1.0, 0.0]], np.float32)
        >>> linear_forward(x, w, np.array([0.5, 0.0], np.float32))
        array([[ 3.5, -1. ]], dtype=float32)
        >>> linear_forward(x, w, np.zeros(2, np.float32), relu=True)
        array([[3., 0.]], dtype=float32)
    """
    x = _array("linear_forward", "x", x, _F32, 2, "rows")
    w = _array("linear_forward", "w", w, _F32, 2, "C")
    b = _array("linear_forward", "b", b, _F32, 1)
    if w.shape[1] != x.shape[1] or len(b) != w.shape[0]:
        raise _refuse("linear_forward", f"w (out, {x.shape[1]}) and b (out,) for x {x.shape}",
                      f"w {w.shape}, b {b.shape}")
    return _linear_forward(x, w, b, bool(relu))


# Inside Numba kernels: the unchecked kernels under the public names.
@overload(gemm_acc)
def _gemm_acc_nopython(a, b, rows, offs, col0, c, ccol0, n, k0, k1):
    return lambda a, b, rows, offs, col0, c, ccol0, n, k0, k1: _gemm_acc(a, b, rows, offs, col0, c, ccol0,
                                                                          n, k0, k1)


@overload(gemm_packed)
def _gemm_packed_nopython(packed, b, data, base, offs, out, ncol):
    return lambda packed, b, data, base, offs, out, ncol: _gemm_packed(packed, b, data, base, offs, out, ncol)


@overload(window_dots)
def _window_dots_nopython(a, b, offs, c, accumulate):
    return lambda a, b, offs, c, accumulate: _window_dots(a, b, offs, c, accumulate)


@overload(sgemm)
def _sgemm_nopython(a, b):
    return lambda a, b: _sgemm(a, b)


@overload(linear_forward)
def _linear_forward_nopython(x, w, b, relu=False):
    return lambda x, w, b, relu=False: _linear_forward(x, w, b, relu)
