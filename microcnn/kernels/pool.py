"""Pooling kernels, NCHW, no padding. Max pooling is dtype-generic so the integer path reuses it."""

import numpy as np
from numba import njit, prange


def pooled_size(size: int, k: int, s: int) -> int:
    return (size - k) // s + 1


@njit(cache=True, parallel=True)
def maxpool2d(x, kh, kw, sh, sw):
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    for i in prange(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    m = x[i, ch, oy * sh, ox * sw]
                    for ky in range(kh):
                        for kx in range(kw):
                            v = x[i, ch, oy * sh + ky, ox * sw + kx]
                            if v > m:
                                m = v
                    out[i, ch, oy, ox] = m
    return out


@njit(cache=True, parallel=True)
def maxpool2d_argmax(x, kh, kw, sh, sw):
    """Max pooling that also returns, per output, the flat index (y*W + x) of the winner for backward."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
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
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
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
