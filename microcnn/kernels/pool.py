"""Pooling kernels, NCHW, no padding. Max pooling is dtype-generic so the integer path reuses it."""

import numba
import numpy as np
from numba import njit, prange

from .shapes import conv_output_size


@njit(cache=True)
def maxpool_images(x, out, kh, kw, sh, sw, floor, n0, n1):
    """Max pooling of images n0..n1-1, never below ``floor`` (a fused ReLU when floor is 0)."""
    c, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    for i in range(n0, n1):
        for ch in range(c):
            if kh == 2 and kw == 2 and sh == 2 and sw == 2:  # LeNet's case, unrolled
                for oy in range(oh):
                    for ox in range(ow):
                        a = max(x[i, ch, 2 * oy, 2 * ox], x[i, ch, 2 * oy, 2 * ox + 1])
                        b = max(x[i, ch, 2 * oy + 1, 2 * ox], x[i, ch, 2 * oy + 1, 2 * ox + 1])
                        out[i, ch, oy, ox] = max(max(a, b), floor)
                continue
            for oy in range(oh):
                for ox in range(ow):
                    m = floor
                    for ky in range(kh):
                        for kx in range(kw):
                            m = max(m, x[i, ch, oy * sh + ky, ox * sw + kx])
                    out[i, ch, oy, ox] = m


@njit(cache=True, parallel=True)
def _maxpool_parallel(x, out, kh, kw, sh, sw, floor, nchunks):
    n = x.shape[0]
    for t in prange(nchunks):
        maxpool_images(x, out, kh, kw, sh, sw, floor, t * n // nchunks, (t + 1) * n // nchunks)


def maxpool2d(x, kh, kw, sh, sw, floor=None):
    """Max pooling of an NCHW array of any numeric dtype (the integer path reuses it).

    ``floor`` clamps from below: ``floor=0`` computes ``relu`` then ``maxpool`` in one pass, which is
    exact because max and relu commute. Batches of at least 32 images are split over Numba's
    threads; smaller ones run serially to keep the per-call cost low.
    """
    n, c, h, w = x.shape
    out = np.empty((n, c, conv_output_size(h, kh, sh), conv_output_size(w, kw, sw)), dtype=x.dtype)
    if floor is None:
        floor = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    floor = x.dtype.type(floor)
    if n >= 32 and numba.get_num_threads() > 1:
        _maxpool_parallel(x, out, kh, kw, sh, sw, floor, numba.get_num_threads())
    else:
        maxpool_images(x, out, kh, kw, sh, sw, floor, 0, n)
    return out


@njit(cache=True, parallel=True)
def maxpool2d_argmax(x, kh, kw, sh, sw):
    """Max pooling that also returns, per output, the flat index (y*W + x) of the winner for backward."""
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh), conv_output_size(w, kw, sw)
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    arg = np.empty((n, c, oh, ow), dtype=np.int32)
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    best_y, best_x = oy * sh, ox * sw
                    m = x[i, ch, best_y, best_x]
                    for ky in range(kh):
                        for kx in range(kw):
                            v = x[i, ch, oy * sh + ky, ox * sw + kx]
                            if v > m:
                                m, best_y, best_x = v, oy * sh + ky, ox * sw + kx
                    out[i, ch, oy, ox] = m
                    arg[i, ch, oy, ox] = best_y * w + best_x
    return out, arg


@njit(cache=True, parallel=True)
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


@njit(cache=True, parallel=True)
def avgpool2d(x, kh, kw, sh, sw):
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh), conv_output_size(w, kw, sw)
    out = np.empty((n, c, oh, ow), dtype=np.float32)
    inv = np.float32(1.0 / (kh * kw))
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    acc = np.float32(0.0)
                    for ky in range(kh):
                        for kx in range(kw):
                            acc += x[i, ch, oy * sh + ky, ox * sw + kx]
                    out[i, ch, oy, ox] = acc * inv
    return out


@njit(cache=True, parallel=True)
def avgpool2d_backward(dy, kh, kw, sh, sw, h, w):
    n, c, oh, ow = dy.shape
    dx = np.zeros((n, c, h, w), dtype=np.float32)
    inv = np.float32(1.0 / (kh * kw))
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    g = dy[i, ch, oy, ox] * inv
                    for ky in range(kh):
                        for kx in range(kw):
                            dx[i, ch, oy * sh + ky, ox * sw + kx] += g
    return dx
