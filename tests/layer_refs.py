"""Independent plain-NumPy float64 references for the issue-13 layers (grouped and dilated convolution,
padded / ceil-mode pooling, batch norm) and a finite-difference gradient, written from the PyTorch
documentation's formulas without any microcnn code."""

import math

import numpy as np


def conv2d(x, w, b, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow))
    for g in range(groups):
        xs, ws = x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]
        for ky in range(kh):
            for kx in range(kw):
                y0, x0 = ky * dh, kx * dw
                patch = xs[:, :, y0:y0 + sh * (oh - 1) + 1:sh, x0:x0 + sw * (ow - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, ky, kx])
    return out + (0 if b is None else np.asarray(b, np.float64)[None, :, None, None])


def pool_size(size, k, s, p, ceil):
    """PyTorch's pooling_output_shape."""
    out = (size + 2 * p - k + ((s - 1) if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool(x, k, s, p, ceil, reduce):
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    oh, ow = pool_size(h, k[0], s[0], p[0], ceil), pool_size(w, k[1], s[1], p[1], ceil)
    out = np.empty((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            ys, xs = i * s[0] - p[0], j * s[1] - p[1]
            out[:, :, i, j] = reduce(x, ys, xs, h, w)
    return out


def max_pool2d(x, k, s, p=(0, 0), ceil=False):
    def reduce(x, ys, xs, h, w):
        return x[:, :, max(ys, 0):min(ys + k[0], h), max(xs, 0):min(xs + k[1], w)].max(axis=(2, 3))

    return _pool(x, k, s, p, ceil, reduce)


def avg_pool2d(x, k, s, p=(0, 0), ceil=False, count_include_pad=True):
    def reduce(x, ys, xs, h, w):
        ye, xe = min(ys + k[0], h + p[0]), min(xs + k[1], w + p[1])
        cells = x[:, :, max(ys, 0):min(ye, h), max(xs, 0):min(xe, w)]
        size = (ye - ys) * (xe - xs) if count_include_pad else cells.shape[2] * cells.shape[3]
        return cells.sum(axis=(2, 3)) / size

    return _pool(x, k, s, p, ceil, reduce)


def batch_norm_train(x, gamma, beta, eps):
    """(y, batch mean, biased var) of a training-mode batch norm over axis 1."""
    x = np.asarray(x, np.float64)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    at = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean.reshape(at)) / np.sqrt(var.reshape(at) + eps)
    return y * np.asarray(gamma, np.float64).reshape(at) + np.asarray(beta, np.float64).reshape(at), mean, var


def batch_norm_eval(x, gamma, beta, mean, var, eps):
    x = np.asarray(x, np.float64)
    at = (1, -1) + (1,) * (x.ndim - 2)
    f = [np.asarray(v, np.float64).reshape(at) for v in (gamma, beta, mean, var)]
    return (x - f[2]) / np.sqrt(f[3] + eps) * f[0] + f[1]


def numeric_grad(f, arrays, which, weights, eps=1e-6):
    """d sum(f(*arrays) * weights) / d arrays[which], by central differences in float64."""
    arrays = [np.array(a, np.float64) for a in arrays]
    target = arrays[which]
    grad = np.zeros_like(target)
    for idx in np.ndindex(target.shape):
        keep = target[idx]
        target[idx] = keep + eps
        up = float(np.sum(f(*arrays) * weights))
        target[idx] = keep - eps
        down = float(np.sum(f(*arrays) * weights))
        target[idx] = keep
        grad[idx] = (up - down) / (2 * eps)
    return grad


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), math.ulp(1.0)))
