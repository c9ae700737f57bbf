"""Pooling kernels, NCHW, with PyTorch's geometry: any window, stride and padding, floor or ceil mode.

A window's geometry travels as one ``PoolGeometry`` (a named tuple Numba passes as a tuple of ints).
Max pooling treats the padding as -inf (PyTorch's semantics: padded cells never win) and is
dtype-generic so the integer path reuses it; average pooling divides by the window's size including
the padding (``count_include_pad``, PyTorch's default) or by the number of real cells. With
``ceil_mode`` the last window may run past the padded input; as in PyTorch, a window must start
inside the input or its left padding, so no window is empty.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from ..errors import InputError
from .shapes import conv_output_size


class PoolGeometry(NamedTuple):
    """Window (kh, kw), stride (sh, sw), padding (ph, pw) and ceil mode (0/1) of a pooling."""

    kh: int
    kw: int
    sh: int
    sw: int
    ph: int = 0
    pw: int = 0
    ceil: int = 0


NO_POOL = PoolGeometry(0, 0, 0, 0)  # "no pooling" where a fused pooling is optional (kh == 0)


def pool_geometry(pool) -> PoolGeometry:
    """``pool`` (a PoolGeometry, or a tuple (kh, kw, sh, sw[, ph, pw, ceil])) as a PoolGeometry of ints."""
    return pool if type(pool) is PoolGeometry else PoolGeometry(*(int(v) for v in pool))


@register_jitable
def pool_output_size(size, kernel, stride, padding, ceil):
    """Window positions over ``size`` values padded by ``padding`` on each side, as PyTorch's
    ``pooling_output_shape``: floor or ceil of (size + 2p - k) / s, plus 1, where in ceil mode a last
    window that would start in the right padding is dropped."""
    if not ceil:
        return conv_output_size(size, kernel, stride, padding)
    out = (size + 2 * padding - kernel + stride - 1) // stride + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pooled_shape(h, w, pool) -> tuple[int, int]:
    """(OH, OW) of pooling an h x w map with ``pool`` (a PoolGeometry)."""
    return (pool_output_size(h, pool.kh, pool.sh, pool.ph, pool.ceil),
            pool_output_size(w, pool.kw, pool.sw, pool.pw, pool.ceil))


def check_pool_geometry(pool, name="pool") -> None:
    """Refuse what PyTorch refuses: sizes < 1, negative padding, padding beyond half the window."""
    if min(pool.kh, pool.kw, pool.sh, pool.sw) < 1 or min(pool.ph, pool.pw) < 0:
        raise InputError(f"{name}: expected kernel_size >= 1, stride >= 1, padding >= 0, found "
                         f"{(pool.kh, pool.kw)}, {(pool.sh, pool.sw)}, {(pool.ph, pool.pw)}")
    if 2 * pool.ph > pool.kh or 2 * pool.pw > pool.kw:
        raise InputError(f"{name}: padding must be at most half the kernel size, found padding "
                         f"{(pool.ph, pool.pw)} for kernel {(pool.kh, pool.kw)}")


@njit(cache=True, nogil=True)
def maxpool_images(x, out, pool, floor, n0, n1):
    """Max pooling of images n0..n1-1 of x into ``out`` (whose shape gives OH, OW), never below
    ``floor`` (a fused ReLU when floor is 0). Padding cells are skipped (they are -inf)."""
    h, w = x.shape[2], x.shape[3]
    c, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    kh, kw, sh, sw, ph, pw = pool.kh, pool.kw, pool.sh, pool.sw, pool.ph, pool.pw
    unrolled = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    for i in range(n0, n1):
        for ch in range(c):
            if unrolled and 2 * oh <= h and 2 * ow <= w:  # LeNet's case, unrolled
                for oy in range(oh):
                    for ox in range(ow):
                        a = max(x[i, ch, 2 * oy, 2 * ox], x[i, ch, 2 * oy, 2 * ox + 1])
                        b = max(x[i, ch, 2 * oy + 1, 2 * ox], x[i, ch, 2 * oy + 1, 2 * ox + 1])
                        out[i, ch, oy, ox] = max(max(a, b), floor)
                continue
            for oy in range(oh):
                y0 = oy * sh - ph
                for ox in range(ow):
                    x0 = ox * sw - pw
                    m = floor
                    for ky in range(max(0, -y0), min(kh, h - y0)):
                        for kx in range(max(0, -x0), min(kw, w - x0)):
                            m = max(m, x[i, ch, y0 + ky, x0 + kx])
                    out[i, ch, oy, ox] = m


@njit(cache=True, nogil=True, parallel=True)
def _maxpool_parallel(x, out, pool, floor, nchunks):
    n = x.shape[0]
    for t in prange(nchunks):
        maxpool_images(x, out, pool, floor, t * n // nchunks, (t + 1) * n // nchunks)


def maxpool2d(x, kh, kw, sh, sw, ph=0, pw=0, ceil=0, floor=None):
    """Max pooling of an NCHW array of any numeric dtype (the integer path reuses it).

    ``floor`` clamps from below: ``floor=0`` computes ``relu`` then ``maxpool`` in one pass, which is
    exact because max and relu commute. Batches of at least 32 images are split over Numba's
    threads; smaller ones run serially to keep the per-call cost low.
    """
    pool = PoolGeometry(kh, kw, sh, sw, ph, pw, int(ceil))
    n, c, h, w = x.shape
    out = np.empty((n, c, *pooled_shape(h, w, pool)), dtype=x.dtype)
    if floor is None:
        floor = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    floor = x.dtype.type(floor)
    if n >= 32 and numba.get_num_threads() > 1:
        _maxpool_parallel(x, out, pool, floor, numba.get_num_threads())
    else:
        maxpool_images(x, out, pool, floor, 0, n)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _maxpool_argmax(x, pool, oh, ow):
    n, c, h, w = x.shape
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    arg = np.empty((n, c, oh, ow), dtype=np.int32)
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                y0 = oy * pool.sh - pool.ph
                for ox in range(ow):
                    x0 = ox * pool.sw - pool.pw
                    ya, xa = max(y0, 0), max(x0, 0)  # the first real cell of the window
                    best_y, best_x = ya, xa
                    m = x[i, ch, ya, xa]
                    for yy in range(ya, min(y0 + pool.kh, h)):
                        for xx in range(xa, min(x0 + pool.kw, w)):
                            v = x[i, ch, yy, xx]
                            if v > m:  # strictly greater: ties go to the first maximum, as PyTorch
                                m, best_y, best_x = v, yy, xx
                    out[i, ch, oy, ox] = m
                    arg[i, ch, oy, ox] = best_y * w + best_x
    return out, arg


def maxpool2d_argmax(x, kh, kw, sh, sw, ph=0, pw=0, ceil=0):
    """Max pooling that also returns, per output, the flat index (y*W + x) of the winner for backward."""
    pool = PoolGeometry(kh, kw, sh, sw, ph, pw, int(ceil))
    return _maxpool_argmax(x, pool, *pooled_shape(x.shape[2], x.shape[3], pool))


@njit(cache=True, nogil=True, parallel=True)
def maxpool2d_backward(dy, arg, h, w):
    n, c, oh, ow = dy.shape
    dx = np.zeros((n, c, h, w), dtype=dy.dtype)
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    a = arg[i, ch, oy, ox]
                    dx[i, ch, a // w, a % w] += dy[i, ch, oy, ox]
    return dx


@register_jitable
def _avg_window(pool, oy, ox, h, w, count_include_pad):
    """(y0, y1, x0, x1, divisor) of output (oy, ox): the real cells y0 <= y < y1, x0 <= x < x1, and what
    their sum is divided by (PyTorch: the window clipped to the padded input, or the real cells)."""
    ys, xs = oy * pool.sh - pool.ph, ox * pool.sw - pool.pw
    ye, xe = min(ys + pool.kh, h + pool.ph), min(xs + pool.kw, w + pool.pw)
    size = (ye - ys) * (xe - xs)
    y0, x0, y1, x1 = max(ys, 0), max(xs, 0), min(ye, h), min(xe, w)
    return y0, y1, x0, x1, size if count_include_pad else (y1 - y0) * (x1 - x0)


@register_jitable
def global_avg_image(x, i, out, scale):
    """out[i, :, 0, 0] = each channel's sum over image i of x (N, C, H, W) times ``scale`` (float32 1 / the
    divisor). Each channel is summed in the same order (row by row, from 0), four channels side by side
    -- four independent chains of additions instead of one (a chain is latency-bound). ``avgpool2d``
    with the whole image as its window and ``kernels.program`` run this same code."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    for ch in range(0, c, 4):
        c1, c2, c3 = min(ch + 1, c - 1), min(ch + 2, c - 1), min(ch + 3, c - 1)
        p0, p1, p2, p3 = x[i, ch], x[i, c1], x[i, c2], x[i, c3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for yy in range(h):
            for xx in range(w):
                a0 += p0[yy, xx]
                a1 += p1[yy, xx]
                a2 += p2[yy, xx]
                a3 += p3[yy, xx]
        out[i, ch, 0, 0] = a0 * scale
        out[i, c1, 0, 0] = a1 * scale
        out[i, c2, 0, 0] = a2 * scale
        out[i, c3, 0, 0] = a3 * scale


@njit(cache=True, nogil=True, parallel=True)
def _avgpool(x, pool, count_include_pad, oh, ow):
    n, c, h, w = x.shape
    out = np.empty((n, c, oh, ow), dtype=np.float32)
    y0, y1, x0, x1, size = _avg_window(pool, 0, 0, h, w, count_include_pad)
    if oh == 1 and ow == 1 and y0 == 0 and x0 == 0 and y1 == h and x1 == w:
        scale = np.float32(1.0 / size)
        for i in prange(n):
            global_avg_image(x, i, out, scale)
        return out
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    y0, y1, x0, x1, size = _avg_window(pool, oy, ox, h, w, count_include_pad)
                    acc = np.float32(0.0)
                    for yy in range(y0, y1):
                        for xx in range(x0, x1):
                            acc += x[i, ch, yy, xx]
                    out[i, ch, oy, ox] = acc * np.float32(1.0 / size)
    return out


def avgpool2d(x, kh, kw, sh, sw, ph=0, pw=0, ceil=0, count_include_pad=True):
    """Average pooling of a float32 NCHW array (see the module docstring for the divisor)."""
    pool = PoolGeometry(kh, kw, sh, sw, ph, pw, int(ceil))
    return _avgpool(x, pool, bool(count_include_pad), *pooled_shape(x.shape[2], x.shape[3], pool))


@njit(cache=True, nogil=True, parallel=True)
def avgpool2d_backward(dy, pool, count_include_pad, h, w):
    """Gradient of ``avgpool2d`` with the same geometry, for an input of h x w."""
    n, c, oh, ow = dy.shape
    dx = np.zeros((n, c, h, w), dtype=np.float32)
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    y0, y1, x0, x1, size = _avg_window(pool, oy, ox, h, w, count_include_pad)
                    g = dy[i, ch, oy, ox] * np.float32(1.0 / size)
                    for yy in range(y0, y1):
                        for xx in range(x0, x1):
                            dx[i, ch, yy, xx] += g
    return dx
