"""Training kernels: conv2d and linear backward (float32, NCHW, C-contiguous).

Forward passes use the inference kernels (``conv.conv2d``, ``gemm.linear_forward``); this module
holds what only training needs.

Convolution backward works on the zero-padded image (C, HP, WP), flattened. The input pixel under
tap (c, ky, kx) of output (oy, ox) sits at ``offs[c, ky, kx] + oy*WP + ox``, so indexing outputs by
``q = oy*WP + ox`` ("wide" rows: WP - OW unused columns per output row, held at zero) turns every
row of the im2col matrix into a contiguous window of the padded image. With dy on wide rows
``g (O, P)``, per image:

    dw (O, K) += g @ windows.T       dot products over P, read in place (implicit im2col), each
                                     summed in gemm's fixed lane order (same bits on every CPU)
    dxpad[window r] += (w2.T @ g)[r]   the GEMM fused with col2im, added in place

No patch matrix is ever built; the price is (WP - OW)/OW extra multiply-adds (14% for LeNet's
conv1, 40% for conv2), far cheaper than writing and re-reading im2col/col2im buffers. Kernels are
stride 1; ``autograd.conv2d`` handles strides by scattering dy onto the stride-1 output grid. A
dilated kernel's windows are its taps ``dh``/``dw`` apart; groups run one after the other on their
own rows of dy and weights and their own channels of the padded image.

Images are split into a fixed number of chunks (run in order, or by ``prange`` with several
threads); each chunk sums its own partial weight gradient and the partials are added in chunk
order, so results are bit-identical for any thread count.
"""

import numba
import numpy as np
from numba import njit, prange

from .conv import pad_into
from .gemm import sgemm, window_dots

_CHUNKS = 8


def window_offsets(c_in, kh, kw, hp, wp, dh=1, dw=1) -> np.ndarray:
    """Start of every (c, ky, kx) window in a flattened padded image (C, HP, WP), in w's K order
    (taps ``dh``/``dw`` apart: a dilated kernel's windows)."""
    c, ky, kx = np.ix_(np.arange(c_in), np.arange(kh), np.arange(kw))
    return ((c * hp + ky * dh) * wp + kx * dw).reshape(-1).astype(np.int64)


@njit(cache=True, nogil=True)
def window_scatter_acc(at, g, offs, dst):
    """dst[offs[r] + q] += sum_i at[r, i] * g[i, q]: the GEMM at @ g fused with col2im, which adds
    each column entry back onto the padded-image pixel it was read from."""
    k, m = at.shape
    p = g.shape[1]
    for r in range(k):
        d = dst[offs[r]:offs[r] + p]
        i = 0
        while i + 4 <= m:
            a0, a1, a2, a3 = at[r, i], at[r, i + 1], at[r, i + 2], at[r, i + 3]
            g0, g1, g2, g3 = g[i], g[i + 1], g[i + 2], g[i + 3]
            for q in range(p):
                d[q] += a0 * g0[q] + a1 * g1[q] + a2 * g2[q] + a3 * g3[q]
            i += 4
        for j in range(i, m):
            ai = at[r, j]
            gi = g[j]
            for q in range(p):
                d[q] += ai * gi[q]


@njit(cache=True, nogil=True)
def _backward_images(x, w2t, dy, offs, geom, need_dx, n0, n1, dw, db, dx):
    """Add images n0..n1-1's weight and bias gradients into dw (O, K) and db (O,); write their dx.
    ``w2t`` (groups, K, O / groups): each group's weights transposed; group g's rows of dy read and
    scatter to its own channels, from g*C/groups on."""
    c, h, wd = x.shape[1], x.shape[2], x.shape[3]
    o, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    ph, pw, groups = geom.ph, geom.pw, geom.groups
    og, plane = o // groups, (c // groups) * (h + 2 * ph) * (wd + 2 * pw)
    hp, wp = h + 2 * ph, wd + 2 * pw
    p = (oh - 1) * wp + ow
    xpad = np.zeros((c, hp, wp), np.float32)
    dxpad = np.zeros((c, hp, wp), np.float32)
    gw = np.zeros((o, p), np.float32)  # dy on wide rows; the unused columns stay 0
    for i in range(n0, n1):
        for a in range(o):
            s = np.float32(0.0)
            for oy in range(oh):
                src = dy[i, a, oy]
                dst = gw[a, oy * wp:oy * wp + ow]
                for ox in range(ow):
                    dst[ox] = src[ox]
                    s += src[ox]
            db[a] += s
        pad_into(x, i, ph, pw, xpad)
        if need_dx:
            dxpad[:] = 0.0
        for g in range(groups):
            rows = gw[g * og:(g + 1) * og]
            window_dots(rows, xpad.reshape(-1)[g * plane:], offs, dw[g * og:(g + 1) * og], True)
            if need_dx:
                window_scatter_acc(w2t[g], rows, offs, dxpad.reshape(-1)[g * plane:])
        if need_dx:
            for ch in range(c):
                for yy in range(h):
                    src = dxpad[ch, yy + ph]
                    dst = dx[i, ch, yy]
                    for xx in range(wd):
                        dst[xx] = src[xx + pw]


@njit(cache=True, nogil=True, parallel=True)
def _backward_parallel(x, w2t, dy, offs, geom, need_dx, dw_parts, db_parts, dx):
    n, nchunks = x.shape[0], dw_parts.shape[0]
    for t in prange(nchunks):
        _backward_images(x, w2t, dy, offs, geom, need_dx, t * n // nchunks, (t + 1) * n // nchunks,
                         dw_parts[t], db_parts[t], dx)


def conv2d_backward(x, w, dy, geom, need_dx):
    """Gradients of the stride-1 conv2d ``geom`` (a ``conv.ConvGeometry``; its stride is ignored: dy is
    on the stride-1 grid): (dx, or an empty array when not needed; dw; db).

    The images are cut into the same chunks whether one thread runs them in order or ``prange``
    spreads them (the parallel driver compiles only when more than one thread is in use), and the
    per-chunk partial sums are added in chunk order: the result does not depend on the threads.
    """
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    k = cg * kh * kw
    groups = geom.groups
    offs = window_offsets(cg, kh, kw, h + 2 * geom.ph, wd + 2 * geom.pw, geom.dh, geom.dw)
    w2t = np.ascontiguousarray(w.reshape(groups, o // groups, k).transpose(0, 2, 1))
    nchunks = min(n, _CHUNKS)
    dw_parts = np.zeros((nchunks, o, k), np.float32)
    db_parts = np.zeros((nchunks, o), np.float32)
    dx = np.zeros((n if need_dx else 0, c, h, wd), np.float32)
    if numba.get_num_threads() > 1 and nchunks > 1:
        _backward_parallel(x, w2t, dy, offs, geom, need_dx, dw_parts, db_parts, dx)
    else:
        for t in range(nchunks):
            _backward_images(x, w2t, dy, offs, geom, need_dx, t * n // nchunks, (t + 1) * n // nchunks,
                             dw_parts[t], db_parts[t], dx)
    dw, db = dw_parts[0].copy(), db_parts[0].copy()
    for t in range(1, nchunks):
        dw += dw_parts[t]
        db += db_parts[t]
    return dx, dw.reshape(w.shape), db


@njit(cache=True, nogil=True)
def linear_backward(dy, x, w, need_dx):
    """Gradients of y = x @ w.T + b: (dx (N, in) or an empty array, dw (out, in), db (out,)),
    as two GEMMs with the blocked inference kernel."""
    dx = sgemm(dy, w) if need_dx else np.zeros((0, x.shape[1]), np.float32)
    dw = sgemm(np.ascontiguousarray(dy.T), x)
    db = np.zeros(dy.shape[1], np.float32)
    for i in range(dy.shape[0]):
        db += dy[i]
    return dx, dw, db
