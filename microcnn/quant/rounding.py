"""Data-aware rounding of weights (GPTQ / Optimal Brain Quantization): instead of rounding every weight
to the nearest grid point, quantize one input column at a time and spread its rounding error over the
columns not yet quantized, weighted by the inverse Hessian H = X X^T of the layer's inputs X on the
calibration images. That minimises ||W X - Q X||^2 greedily; it matters at 4 bits. The Hessian and
its factors come from ``kernels.linalg`` (fixed summation order), not BLAS/LAPACK, so the rounded
weights are the same on every CPU."""

from __future__ import annotations

import numpy as np

from ..kernels.linalg import cholesky_lower, gram, inverse_spd
from ..layers import Conv2d, Linear
from .params import qrange


def input_gram(layer, x: np.ndarray) -> np.ndarray:
    """X X^T (float64, K x K) of the layer's input columns: im2col patches for a convolution, rows for a
    dense layer. ``x`` is the layer's real-valued input on the calibration images."""
    if isinstance(layer, Conv2d):
        from ..kernels.conv import im2col

        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        cols = im2col(np.ascontiguousarray(x, np.float32), kh, kw, sh, sw, ph, pw, np.float32(0.0))
        return gram(np.ascontiguousarray(cols.T, np.float64))
    if isinstance(layer, Linear):
        return gram(np.ascontiguousarray(np.asarray(x, np.float64).reshape(len(x), -1)))
    raise TypeError(f"no weights to round in {layer.type}")


def gptq_round(w: np.ndarray, scale: np.ndarray, bits: int, gram: np.ndarray,
               damp: float = 0.01) -> np.ndarray:
    """Integer weights (int8, shape (O, K)) on the signed ``bits`` grid with per-row ``scale``, rounded
    column by column with error feedback through the Cholesky factor of the damped inverse Hessian."""
    w = np.array(w, np.float64).reshape(len(w), -1)
    k = w.shape[1]
    qmin, qmax = qrange(bits, signed=True)
    s = np.broadcast_to(np.asarray(scale, np.float64), (len(w),))[:, None]
    h = np.array(gram, np.float64)
    dead = np.diag(h) == 0  # inputs that are always 0: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    # Upper Cholesky factor of H^-1: row j holds the updates that compensate column j's error.
    u = cholesky_lower(inverse_spd(h)).T
    q = np.empty_like(w)
    for j in range(k):
        q[:, j] = np.clip(np.rint(w[:, j] / s[:, 0]), qmin, qmax)
        err = (w[:, j] - q[:, j] * s[:, 0]) / u[j, j]
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q.astype(np.int8)
