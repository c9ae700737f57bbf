"""Activation kernels on flat float32 buffers (callers pass ``a.reshape(-1)`` of contiguous arrays)."""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def all_finite(x) -> bool:
    """Whether no value of the flat float32 array x is NaN or +-Inf, one pass with no temporary.

    A float32 is NaN or Inf exactly when its 8 exponent bits are all ones; adding 1 to the exponent
    field then carries into bit 31, and nowhere else does. OR-ing those sums is an integer reduction
    that vectorises, unlike a float test with an early exit (5x slower on MNIST batches); blocks of
    4,096 keep an early answer for a bad value near the start."""
    bits = x.view(np.uint32)
    for start in range(0, bits.size, 4096):
        block = bits[start:start + 4096]
        carry = np.uint32(0)
        for i in range(block.size):
            carry |= (block[i] & np.uint32(0x7F800000)) + np.uint32(0x00800000)
        if carry >= np.uint32(0x80000000):
            return False
    return True


@njit(cache=True, nogil=True)
def relu(x):
    out = np.empty_like(x)
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else np.float32(0.0)
    return out


@njit(cache=True, nogil=True)
def relu_inplace(x):
    for i in range(x.size):
        if x[i] < 0:
            x[i] = 0
    return x


@njit(cache=True, nogil=True)
def relu_backward(dy, y):
    dx = np.empty_like(dy)
    for i in range(dy.size):
        dx[i] = dy[i] if y[i] > 0 else np.float32(0.0)
    return dx


# Activations by kind: one loop serves them all (the branch is the same for every value).
CLAMP, LEAKY_RELU, TANH = 0, 1, 2


@njit(cache=True, nogil=True)
def activation(x, kind, a, b):
    """Elementwise ``kind``: CLAMP min(max(x, a), b) (ReLU6: a = 0, b = 6), LEAKY_RELU x or a * x for
    x <= 0, TANH one C-library tanhf per value (NumPy's own SIMD loops give other last bits on other
    CPUs). ``a`` and ``b`` are float32; unused ones are ignored."""
    out = np.empty_like(x)
    if kind == CLAMP:  # one loop per kind, so that each vectorises
        for i in range(x.size):
            out[i] = a if x[i] < a else (b if x[i] > b else x[i])  # NaN stays NaN
    elif kind == LEAKY_RELU:
        for i in range(x.size):
            out[i] = x[i] if x[i] > 0 else x[i] * a
    else:
        for i in range(x.size):
            out[i] = np.tanh(x[i])
    return out


@njit(cache=True, nogil=True)
def activation_backward(dy, saved, kind, a, b):
    """The gradient of ``activation``: ``saved`` is its input for CLAMP (dy where a < x < b, as PyTorch's
    hardtanh_backward) and LEAKY_RELU, its output y for TANH (dy * (1 - y^2))."""
    dx = np.empty_like(dy)
    for i in range(dy.size):
        s = saved[i]
        if kind == CLAMP:
            dx[i] = dy[i] if a < s < b else np.float32(0.0)
        elif kind == LEAKY_RELU:
            dx[i] = dy[i] if s > 0 else dy[i] * a
        else:
            dx[i] = dy[i] * (1 - s * s)
    return dx


@njit(cache=True, nogil=True)
def channel_affine(x, scale, shift):
    """y[i, c, t] = x[i, c, t] * scale[c] + shift[c] for (N, C, L) float32 x, in one pass: a product and
    a sum, each rounded (no fused multiply-add), as ``x * scale + shift`` in NumPy."""
    n, c, m = x.shape
    y = np.empty_like(x)
    for i in range(n):
        for ch in range(c):
            s, t = scale[ch], shift[ch]
            src, dst = x[i, ch], y[i, ch]
            for q in range(m):
                dst[q] = src[q] * s + t
    return y


@njit(cache=True, nogil=True)
def channel_moments(x):
    """Per-channel mean and biased variance of x (N, C, L) in float64, summed in a fixed order (images,
    then positions) and in two passes (the variance sums squared deviations: no cancellation)."""
    n, c, m = x.shape
    mean = np.zeros(c, np.float64)
    var = np.zeros(c, np.float64)
    for ch in range(c):
        s = 0.0
        for i in range(n):
            for t in range(m):
                s += x[i, ch, t]
        mu = s / (n * m)
        q = 0.0
        for i in range(n):
            for t in range(m):
                d = x[i, ch, t] - mu
                q += d * d
        mean[ch], var[ch] = mu, q / (n * m)
    return mean, var


@njit(cache=True, nogil=True)
def channel_sums(a, b):
    """Per-channel sum(a) and sum(a * b) of (N, C, L) arrays, in float64 and a fixed order: the
    batch norm's gradients of beta and gamma."""
    n, c, m = a.shape
    sa = np.zeros(c, np.float64)
    sab = np.zeros(c, np.float64)
    for ch in range(c):
        for i in range(n):
            for t in range(m):
                v = np.float64(a[i, ch, t])
                sa[ch] += v
                sab[ch] += v * b[i, ch, t]
    return sa, sab


@njit(cache=True, nogil=True)
def sigmoid(x):
    # Branch on the sign so exp never overflows: 1/(1+e^-x) for x>=0, e^x/(1+e^x) otherwise.
    out = np.empty_like(x)
    for i in range(x.size):
        v = x[i]
        if v >= 0:
            out[i] = 1.0 / (1.0 + np.exp(-v))
        else:
            e = np.exp(v)
            out[i] = e / (1.0 + e)
    return out


@njit(cache=True, nogil=True)
def sigmoid_backward(dy, y):
    dx = np.empty_like(dy)
    for i in range(dy.size):
        dx[i] = dy[i] * y[i] * (1 - y[i])
    return dx


@njit(cache=True, nogil=True)
def softmax_rows(x):
    """Softmax over the last axis of a 2-D array, max-shifted so exp never overflows."""
    n, k = x.shape
    out = np.empty_like(x)
    for i in range(n):
        m = x[i, 0]
        for j in range(1, k):
            m = max(m, x[i, j])
        s = np.float32(0.0)
        for j in range(k):
            e = np.exp(x[i, j] - m)
            out[i, j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(k):
            out[i, j] *= inv
    return out


@njit(cache=True, nogil=True)
def log_softmax_rows(x):
    n, k = x.shape
    out = np.empty_like(x)
    for i in range(n):
        m = x[i, 0]
        for j in range(1, k):
            m = max(m, x[i, j])
        s = np.float32(0.0)
        for j in range(k):
            s += np.exp(x[i, j] - m)
        lse = m + np.log(s)
        for j in range(k):
            out[i, j] = x[i, j] - lse
    return out


@njit(cache=True, nogil=True)
def softmax_rows_backward(dy, y):
    """Gradient through softmax: dx = y * (dy - sum(dy*y)) row by row."""
    n, k = y.shape
    dx = np.empty_like(dy)
    for i in range(n):
        dot = np.float32(0.0)
        for j in range(k):
            dot += dy[i, j] * y[i, j]
        for j in range(k):
            dx[i, j] = y[i, j] * (dy[i, j] - dot)
    return dx


@njit(cache=True, nogil=True)
def same_bits(a, b) -> bool:
    """Whether the C-contiguous float32 arrays a and b hold the same bits (signed zeros and NaN payloads
    included): how caches of values derived from an array (packed or transformed weights) check that
    it has not been edited in place since. No early exit, so LLVM vectorises it (~0.1 ns a value)."""
    if a.size != b.size:
        return False
    x, y = a.reshape(-1).view(np.int32), b.reshape(-1).view(np.int32)
    diff = np.int32(0)
    for i in range(x.size):
        diff |= x[i] ^ y[i]
    return diff == 0


# Float64 exp/log for the training losses. NumPy runs its own AVX-512 loops for these on CPUs that have
# AVX-512, with other last bits than the C library it calls elsewhere; compiled by Numba, each value is
# one C-library call, the same on every x86-64 CPU with FMA (which is what makes training repeatable
# across machines). Flat contiguous float64 arrays in, new arrays out.


@njit(cache=True, nogil=True)
def libm_exp(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = np.exp(x[i])
    return out


@njit(cache=True, nogil=True)
def libm_log(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = np.log(x[i])
    return out


@njit(cache=True, nogil=True)
def libm_log1p(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = np.log1p(x[i])
    return out
