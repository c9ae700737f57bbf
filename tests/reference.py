"""Independent plain-NumPy float64 references the kernels are checked against."""

import tracemalloc

import numpy as np


def conv2d(x, w, b, stride=(1, 1), padding=(0, 0)):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), (ph, pw) = stride, padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, o, oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            patch = x[:, :, ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx])
    return out + (0 if b is None else np.asarray(b, np.float64)[None, :, None, None])


def _windows(x, k, s):
    (kh, kw), (sh, sw) = k, s
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    win = np.empty((n, c, oh, ow, kh * kw))
    for ky in range(kh):
        for kx in range(kw):
            win[..., ky * kw + kx] = x[:, :, ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw]
    return win


def max_pool2d(x, k, s):
    return _windows(np.asarray(x, np.float64), k, s).max(-1)


def avg_pool2d(x, k, s):
    return _windows(np.asarray(x, np.float64), k, s).mean(-1)


def linear(x, w, b):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + b


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def lenet_forward(state, x):
    """LeNet-5 (DESIGN.md) from a state dict, in float64, without any microcnn code."""
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    a = max_pool2d(relu(conv2d(x, state["0.weight"], state["0.bias"], padding=(2, 2))), (2, 2), (2, 2))
    a = max_pool2d(relu(conv2d(a, state["3.weight"], state["3.bias"])), (2, 2), (2, 2))
    a = relu(conv2d(a, state["6.weight"], state["6.bias"])).reshape(len(a), -1)
    a = relu(linear(a, state["9.weight"], state["9.bias"]))
    return softmax(linear(a, state["11.weight"], state["11.bias"]))


def peak_bytes(fn) -> int:
    """Peak bytes Python allocated (tracemalloc) while ``fn()`` ran."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
