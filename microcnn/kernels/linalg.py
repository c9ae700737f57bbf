"""Float64 linear algebra for the quantization tools (GPTQ's Hessian and its factors, calibration
divergences), computed in a fixed order.

NumPy hands ``@``, ``np.linalg`` and float64 ``np.log`` to code it picks by CPU at run time (OpenBLAS
kernels, AVX-512 loops), whose last bits differ between machines -- enough to flip a rounding
decision or a calibration threshold. These loops give the same bits on every x86-64 CPU with FMA.
The sizes involved are small (K <= a few hundred), so plain loops are fast enough.
"""

import numpy as np
from numba import njit

# Annotations document the Python-side types; Numba ignores them and types each call from its arguments.


@njit(cache=True, nogil=True, fastmath={"contract"})
def gram(x: np.ndarray) -> np.ndarray:
    """x.T @ x (float64, K x K) for x (P, K), rows added in order p = 0, 1, ... (rank-1 updates that
    vectorise along the row without reordering any sum). Rows' zero entries are skipped: they add
    exact zeros.

    Example::

        >>> gram(np.array([[1.0, 2.0], [0.0, 1.0]]))
        array([[1., 2.],
               [2., 5.]])
    """
    p, k = x.shape
    g = np.zeros((k, k))
    for t in range(p):
        row = x[t]
        for a in range(k):
            xa = row[a]
            if xa != 0.0:
                ga = g[a]
                for b in range(a, k):
                    ga[b] += xa * row[b]
    for a in range(k):
        for b in range(a):
            g[a, b] = g[b, a]
    return g


@njit(cache=True, nogil=True)
def cholesky_lower(a: np.ndarray) -> np.ndarray:
    """L with L @ L.T = a for a symmetric positive definite a (float64); sums in increasing k.

    Example::

        >>> cholesky_lower(np.array([[4.0, 2.0], [2.0, 5.0]]))
        array([[2., 0.],
               [1., 2.]])
    """
    n = a.shape[0]
    lo = np.zeros((n, n))
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= lo[j, k] * lo[j, k]
        if not s > 0.0:
            raise ValueError("cholesky_lower: matrix is not positive definite")
        d = np.sqrt(s)
        lo[j, j] = d
        for i in range(j + 1, n):
            s = a[i, j]
            for k in range(j):
                s -= lo[i, k] * lo[j, k]
            lo[i, j] = s / d
    return lo


@njit(cache=True, nogil=True)
def inverse_spd(a: np.ndarray) -> np.ndarray:
    """a^-1 for a symmetric positive definite a, as L^-T L^-1 from its Cholesky factor."""
    lo = cholesky_lower(a)
    n = a.shape[0]
    m = np.zeros((n, n))  # L^-1, lower triangular, by forward substitution column by column
    for j in range(n):
        m[j, j] = 1.0 / lo[j, j]
        for i in range(j + 1, n):
            s = 0.0
            for k in range(j, i):
                s -= lo[i, k] * m[k, j]
            m[i, j] = s / lo[i, i]
    inv = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            s = 0.0
            for k in range(j, n):
                s += m[k, i] * m[k, j]
            inv[i, j] = s
            inv[j, i] = s
    return inv


@njit(cache=True, nogil=True)
def kl_sum(p: np.ndarray, q: np.ndarray) -> float:
    """sum p * log(p / q) over the entries with p > 0 (q > 0 there), in index order."""
    s = 0.0
    for i in range(p.shape[0]):
        if p[i] > 0.0:
            s += p[i] * np.log(p[i] / q[i])
    return s


@njit(cache=True, nogil=True, fastmath={"contract"})
def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for float64 2-D arrays, every entry summed over k in increasing order (rank-1 updates
    along the rows of b, which vectorise without reordering any sum).

    Example::

        >>> matmul(np.array([[1.0, 2.0]]), np.array([[3.0], [4.0]]))
        array([[11.]])
    """
    m, kk = a.shape
    c = np.zeros((m, b.shape[1]))
    for i in range(m):
        ci = c[i]
        for k in range(kk):
            aik = a[i, k]
            bk = b[k]
            for j in range(ci.size):
                ci[j] += aik * bk[j]
    return c
