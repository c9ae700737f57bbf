"""Element-wise steps of AdaRound's continuous relaxation (``microcnn.quant.adaround``), compiled so
that ``exp`` and ``pow`` are the same scalar library calls on every CPU (NumPy picks SIMD versions at
run time whose last bits differ between machines; after a thousand Adam steps that can flip a rounding).

Notation (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
``h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``, the soft weight on the integer grid is
``clip(floor(W / s) + zp + h(V), qmin, qmax)``, and the rounding regularizer is
``sum 1 - |2 h(V) - 1| ** beta``.
"""

import math

import numpy as np
from numba import njit

ZETA, GAMMA = 1.1, -0.1  # the stretch of the rectified sigmoid (the paper's values)


@njit(cache=True, nogil=True)
def _sigmoid(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


@njit(cache=True, nogil=True)
def rectified_sigmoid(v):
    """h(V) for a float64 array (any shape), as float64."""
    flat = v.reshape(-1)
    out = np.empty(flat.size)
    for i in range(flat.size):
        out[i] = min(1.0, max(0.0, _sigmoid(flat[i]) * (ZETA - GAMMA) + GAMMA))
    return out.reshape(v.shape)


@njit(cache=True, nogil=True)
def initial_v(rest):
    """V with h(V) = rest (the fractional part of W / s, in [0, 1)): AdaRound starts at the FP32 weights."""
    flat = rest.reshape(-1)
    out = np.empty(flat.size)
    for i in range(flat.size):
        out[i] = -math.log((ZETA - GAMMA) / (flat[i] - GAMMA) - 1.0)
    return out.reshape(rest.shape)


@njit(cache=True, nogil=True)
def regularizer(v, beta):
    """sum over V of 1 - |2 h(V) - 1| ** beta (float64, summed in index order)."""
    flat = v.reshape(-1)
    total = 0.0
    for i in range(flat.size):
        h = min(1.0, max(0.0, _sigmoid(flat[i]) * (ZETA - GAMMA) + GAMMA))
        total += 1.0 - abs(2.0 * h - 1.0) ** beta
    return total


@njit(cache=True, nogil=True)
def soft_weights(v, base, scale, zero_point, qmin, qmax):
    """Real soft-quantized weights (float32, shape of ``v`` = (O, K)): scale[o] * (clip(base + h(V), qmin,
    qmax) - zero_point[o]), where base = floor(W / s) + zp (float64, (O, K))."""
    o, k = v.shape
    out = np.empty((o, k), np.float32)
    for r in range(o):
        for c in range(k):
            h = min(1.0, max(0.0, _sigmoid(v[r, c]) * (ZETA - GAMMA) + GAMMA))
            q = min(float(qmax), max(float(qmin), base[r, c] + h))
            out[r, c] = np.float32(scale[r] * (q - zero_point[r]))
    return out


@njit(cache=True, nogil=True)
def hard_codes(v, base, qmin, qmax):
    """The final integer codes: base + (h(V) >= 0.5), i.e. round up where V >= 0, clipped (int8)."""
    o, k = v.shape
    out = np.empty((o, k), np.int8)
    for r in range(o):
        for c in range(k):
            q = base[r, c] + (1.0 if v[r, c] >= 0.0 else 0.0)
            out[r, c] = np.int8(min(float(qmax), max(float(qmin), q)))
    return out


@njit(cache=True, nogil=True)
def adam_step(v, grad_w, base, scale, qmin, qmax, beta, lam, lr, t, m, u):
    """One Adam step (b1 = 0.9, b2 = 0.999, eps = 1e-8) on V, in place, for the loss
    reconstruction + lam * regularizer(V, beta) (lam = 0: no regularizer, the warm-up).

    ``grad_w`` (O, K): d reconstruction / d soft weight. The chain rule through the soft weight is
    scale[o] where the grid clip is inactive, and h'(V) = (ZETA - GAMMA) sigmoid (1 - sigmoid) where
    the rectifying clip is inactive (0 elsewhere: both clips are flat).
    """
    o, k = v.shape
    b1, b2, eps = 0.9, 0.999, 1e-8
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    for r in range(o):
        for c in range(k):
            sg = _sigmoid(v[r, c])
            raw = sg * (ZETA - GAMMA) + GAMMA
            dh = (ZETA - GAMMA) * sg * (1.0 - sg) if 0.0 < raw < 1.0 else 0.0
            h = min(1.0, max(0.0, raw))
            q = base[r, c] + h
            g = grad_w[r, c] * scale[r] if qmin <= q <= qmax else 0.0
            if lam != 0.0:
                d = 2.0 * h - 1.0
                ad = abs(d)
                if ad > 0.0:  # d/dh of 1 - |d| ** beta = -2 beta |d| ** (beta - 1) sign(d)
                    g += lam * (-2.0 * beta * ad ** (beta - 1.0) * (1.0 if d > 0 else -1.0))
            g *= dh
            m[r, c] = b1 * m[r, c] + (1.0 - b1) * g
            u[r, c] = b2 * u[r, c] + (1.0 - b2) * g * g
            v[r, c] -= lr * (m[r, c] / c1) / (math.sqrt(u[r, c] / c2) + eps)
