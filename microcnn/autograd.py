"""Tape-based reverse-mode autograd on float32 arrays.

Every differentiable op computes its output with a kernel and, when gradients are wanted, records on
the output the tensors it read (``parents``) and a closure that maps the output's gradient to one
gradient per parent. ``loss.backward()`` orders the recorded graph topologically and walks it in
reverse, adding up the gradients that reach each tensor, so a tensor used twice gets both
contributions. Leaf tensors (parameters) accumulate into ``.grad`` across calls, as in PyTorch;
``optimizer.zero_grad()`` clears them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import numpy as np

from .checks import int_pair
from .errors import InputError

if TYPE_CHECKING:  # for annotations only: this module imports the kernels inside its functions
    from .kernels.pool import PoolGeometry

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within the block ops record nothing: for evaluation, and for optimizers editing weights."""
    before = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = before


class Tensor:
    """A float32 array with an optional gradient.

    ``version`` counts the in-place changes the library makes to ``data`` (optimizer steps, state
    loading). It is informative only: edits made directly to ``data`` do not bump it, so nothing
    derived from a weight relies on it (compiled programs read the arrays themselves; convolutions'
    prepared weights compare the values they were made from).
    """

    def __init__(self, data, requires_grad: bool = False):
        arr = np.asarray(data, dtype=np.float32)  # keeps 0-d scalars 0-d, unlike ascontiguousarray
        self.data = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        self.grad = None
        self.requires_grad = requires_grad
        self.version = 0
        self.parents: tuple = ()
        self.backward_fn = None  # maps this tensor's gradient to a tuple of gradients, one per parent
        self.op = ""

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return float(self.data.reshape(-1)[0]) if self.data.size == 1 else self._not_scalar("item()")

    def _not_scalar(self, what):
        raise InputError(f"{what}: expected a tensor with one element, found shape {self.data.shape}")

    def __repr__(self):
        op = f", op={self.op}" if self.op else ""
        return f"Tensor(shape={self.data.shape}, requires_grad={self.requires_grad}{op})"

    def __len__(self):
        return len(self.data)

    # -- the backward pass ---------------------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Add d(self)/d(leaf) * grad into the ``.grad`` of every leaf that requires it.

        ``grad`` defaults to 1 for a one-element tensor (a loss). Intermediate tensors get their
        gradient of this pass in ``.grad`` too (replaced, not accumulated), which helps debugging.
        """
        if not self.requires_grad:
            raise InputError("backward(): this tensor does not require grad (no parameter or input "
                             "with requires_grad=True reached it, or it was built under no_grad())")
        if grad is None:
            if self.data.size != 1:
                self._not_scalar("backward() without a gradient")
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad, dtype=np.float32)
            if grad.shape != self.data.shape:
                raise InputError(f"backward(): gradient shape expected {self.data.shape}, found {grad.shape}")
        grads = {id(self): grad}
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node.backward_fn is None:  # a leaf
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            node.grad = g
            for parent, pg in zip(node.parents, node.backward_fn(g), strict=True):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg

    # -- operators -----------------------------------------------------------------------------
    def __add__(self, other):
        return add(self, other)

    def __radd__(self, other):
        return add(other, self)

    def __sub__(self, other):
        return sub(self, other)

    def __rsub__(self, other):
        return sub(other, self)

    def __mul__(self, other):
        return mul(self, other)

    def __rmul__(self, other):
        return mul(other, self)

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def __neg__(self):
        return mul(self, -1.0)

    def reshape(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def sum(self, axis=None, keepdims=False):
        return sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return mean(self, axis, keepdims)


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes that need a gradient, each after all its parents (iterative: deep graphs are fine)."""
    # A node is marked when it is expanded, not when pushed: a tensor read both directly and through
    # another op (a residual's skip) must come before that op, wherever the walk first met it.
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node.parents:
            if p.requires_grad and id(p) not in seen:
                stack.append((p, False))
    return order


def as_tensor(x) -> Tensor:
    """Tensors pass through; arrays and numbers become constants (no gradient)."""
    return x if isinstance(x, Tensor) else Tensor(x)


def make_result(data, parents: tuple, backward_fn, op: str) -> Tensor:
    """The output tensor of an op, recorded on the tape only if grad is on and a parent needs it.

    ``backward_fn(grad)`` returns one gradient (or None) per parent, shaped like that parent.
    """
    out = Tensor(data)
    if is_grad_enabled() and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out.parents = parents
        out.backward_fn = backward_fn
        out.op = op
    return out


# -- elementwise arithmetic with NumPy broadcasting ------------------------------------------------
def _unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes broadcasting added or stretched, back to ``shape``."""
    if g.shape == shape:
        return g
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=stretched, keepdims=True) if stretched else g


def _broadcast_shape(a: Tensor, b: Tensor, op: str) -> None:
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise InputError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast") from None


def add(a, b) -> Tensor:
    a, b = as_tensor(a), as_tensor(b)
    _broadcast_shape(a, b, "add")
    return make_result(a.data + b.data, (a, b),
                       lambda g: (_unbroadcast(g, a.shape), _unbroadcast(g, b.shape)), "add")


def sub(a, b) -> Tensor:
    a, b = as_tensor(a), as_tensor(b)
    _broadcast_shape(a, b, "sub")
    return make_result(a.data - b.data, (a, b),
                       lambda g: (_unbroadcast(g, a.shape), _unbroadcast(-g, b.shape)), "sub")


def mul(a, b) -> Tensor:
    a, b = as_tensor(a), as_tensor(b)
    _broadcast_shape(a, b, "mul")
    return make_result(a.data * b.data, (a, b),
                       lambda g: (_unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                                  _unbroadcast(g * a.data, b.shape) if b.requires_grad else None),
                       "mul")


def matmul(a, b) -> Tensor:
    """Matrix product of arrays with >= 2 dims (leading dims broadcast as in ``np.matmul``)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise InputError(f"matmul: expected (..., M, K) @ (..., K, N), found {a.shape} @ {b.shape}")

    def backward(g):
        da = _unbroadcast(g @ b.data.swapaxes(-1, -2), a.shape) if a.requires_grad else None
        db = _unbroadcast(a.data.swapaxes(-1, -2) @ g, b.shape) if b.requires_grad else None
        return da, db

    return make_result(a.data @ b.data, (a, b), backward, "matmul")


# -- shape and reductions --------------------------------------------------------------------------
def reshape(x, shape) -> Tensor:
    x = as_tensor(x)
    try:
        y = x.data.reshape(shape)
    except ValueError:
        raise InputError(f"reshape: cannot view {x.shape} ({x.size} values) as {shape}") from None
    return make_result(y, (x,), lambda g: (g.reshape(x.shape),), "reshape")


def flatten(x) -> Tensor:
    """(N, ...) -> (N, prod(...)), as Flatten does before a Linear layer."""
    x = as_tensor(x)
    return reshape(x, (x.shape[0], -1))


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if any(not -ndim <= a < ndim for a in axes):
        raise InputError(f"axis: expected values in [-{ndim}, {ndim}), found {axis}")
    return tuple(sorted(a % ndim for a in axes))


def sum(x, axis=None, keepdims=False) -> Tensor:
    x = as_tensor(x)
    axes = _norm_axes(axis, x.ndim)

    def backward(g):
        g = g if keepdims else np.expand_dims(g, axes)
        return (np.broadcast_to(g, x.shape).copy(),)

    return make_result(np.sum(x.data, axis=axes, keepdims=keepdims), (x,), backward, "sum")


def mean(x, axis=None, keepdims=False) -> Tensor:
    x = as_tensor(x)
    axes = _norm_axes(axis, x.ndim)
    count = int(np.prod([x.shape[a] for a in axes]))
    return mul(sum(x, axes, keepdims), np.float32(1.0 / max(count, 1)))


# -- activations -----------------------------------------------------------------------------------
def relu(x) -> Tensor:
    from .kernels import elementwise

    x = as_tensor(x)
    y = elementwise.relu(x.data.reshape(-1)).reshape(x.shape)
    return make_result(y, (x,), lambda g: (
        elementwise.relu_backward(np.ascontiguousarray(g).reshape(-1), y.reshape(-1)).reshape(x.shape),),
        "relu")


def sigmoid(x) -> Tensor:
    from .kernels import elementwise

    x = as_tensor(x)
    y = elementwise.sigmoid(x.data.reshape(-1)).reshape(x.shape)
    return make_result(y, (x,), lambda g: (
        elementwise.sigmoid_backward(np.ascontiguousarray(g).reshape(-1), y.reshape(-1)).reshape(x.shape),),
        "sigmoid")


def _check_rows(x: Tensor, op: str) -> None:
    if x.ndim != 2 or x.shape[1] == 0:
        raise InputError(f"{op}: expected (N, K) scores with K >= 1, found shape {x.shape}")


def softmax(x) -> Tensor:
    """Softmax over axis 1 of (N, K) scores."""
    from .kernels import elementwise

    x = as_tensor(x)
    _check_rows(x, "softmax")
    y = elementwise.softmax_rows(x.data)
    return make_result(y, (x,), lambda g: (
        elementwise.softmax_rows_backward(np.ascontiguousarray(g), y),), "softmax")


def log_softmax(x) -> Tensor:
    """log(softmax(x)) over axis 1 of (N, K), computed as x - logsumexp(x) so it never hits log(0)."""
    from .kernels import elementwise

    x = as_tensor(x)
    _check_rows(x, "log_softmax")
    y = elementwise.log_softmax_rows(x.data)
    return make_result(y, (x,), lambda g: (g - np.exp(y) * g.sum(axis=1, keepdims=True),),
                       "log_softmax")


# -- layers ----------------------------------------------------------------------------------------
def linear(x, w, b=None) -> Tensor:
    """y = x @ w.T + b for x (N, in), w (out, in), b (out,) as PyTorch's Linear stores them."""
    from .kernels import backward as bk
    from .kernels.gemm import linear_forward

    x, w = as_tensor(x), as_tensor(w)
    b = as_tensor(b) if b is not None else None
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise InputError(f"linear: expected x (N, {w.shape[-1]}) and w (out, in), "
                         f"found x {x.shape}, w {w.shape}")
    y = linear_forward(x.data, w.data, b.data if b is not None else np.zeros(w.shape[0], np.float32))

    def backward(g):
        dx, dw, db = bk.linear_backward(np.ascontiguousarray(g), x.data, w.data, x.requires_grad)
        return ((dx if x.requires_grad else None), dw, db)[:len(parents)]

    parents = (x, w) if b is None else (x, w, b)
    return make_result(y, parents, backward, "linear")


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """2-D cross-correlation, NCHW input, (O, C / groups, KH, KW) weights, optional (O,) bias; PyTorch's
    ``dilation`` and ``groups``."""
    from .kernels import backward as bk
    from .kernels.conv import conv2d as conv2d_forward
    from .kernels.conv import conv_geometry

    x, w = as_tensor(x), as_tensor(w)
    b = as_tensor(b) if b is not None else None
    (sh, sw), (ph, pw) = int_pair(stride, "stride"), int_pair(padding, "padding")
    (dh, dw) = int_pair(dilation, "dilation")
    if (x.ndim != 4 or w.ndim != 4 or isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
            or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups):
        raise InputError(f"conv2d: expected x (N, {w.shape[1] if w.ndim == 4 else 'C'} * groups, H, W) and "
                         f"w (O, C / groups, KH, KW) with groups ({groups!r}) dividing O, found x {x.shape}, "
                         f"w {w.shape}")
    if b is not None and b.shape != (w.shape[0],):
        raise InputError(f"conv2d: bias expected shape ({w.shape[0]},), found {b.shape}")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if (h, wd) == (kh, kw) and (ph, pw) == (0, 0) and groups == 1:
        # One output pixel per image (LeNet's conv3): a fully connected layer on the flattened input,
        # where batching over images gives the GEMM long rows that per-image im2col would not.
        y = linear(reshape(x, (n, c * h * wd)), reshape(w, (o, c * kh * kw)), b)
        return reshape(y, (n, o, 1, 1))
    bias = b.data if b is not None else np.zeros(o, np.float32)
    y = conv2d_forward(x.data, w.data, bias, (sh, sw), (ph, pw), (dh, dw), groups)
    strided = (sh, sw) != (1, 1)
    geom = conv_geometry(w.shape, (1, 1), (ph, pw), (dh, dw), groups)

    def backward(g):
        if strided:
            # The backward kernel is stride 1: a strided conv is the stride-1 conv sampled every
            # (sh, sw) outputs, so its gradient is dy scattered onto that grid with zeros between.
            g_full = np.zeros((n, o, h + 2 * ph - dh * (kh - 1), wd + 2 * pw - dw * (kw - 1)), np.float32)
            g_full[:, :, ::sh, ::sw] = g
            g = g_full
        dx, dw_, db = bk.conv2d_backward(x.data, w.data, np.ascontiguousarray(g), geom, x.requires_grad)
        return ((dx if x.requires_grad else None), dw_, db)[:len(parents)]

    parents = (x, w) if b is None else (x, w, b)
    return make_result(y, parents, backward, "conv2d")


def _pool_args(x, kernel_size, stride, padding, ceil_mode) -> PoolGeometry:
    from .kernels.pool import PoolGeometry, check_pool_geometry

    if x.ndim != 4:
        raise InputError(f"pooling: expected an (N, C, H, W) input, found shape {x.shape}")
    kernel = int_pair(kernel_size, "kernel_size")
    pool = PoolGeometry(*kernel, *int_pair(stride if stride is not None else kernel_size, "stride"),
                        *int_pair(padding, "padding"), int(bool(ceil_mode)))
    check_pool_geometry(pool)
    return pool


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False) -> Tensor:
    """Max pooling as PyTorch's (padding is -inf; ties: the first maximum gets the gradient)."""
    from .kernels import pool

    x = as_tensor(x)
    geom = _pool_args(x, kernel_size, stride, padding, ceil_mode)
    y, arg = pool.maxpool2d_argmax(x.data, *geom)
    h, w = x.shape[2], x.shape[3]
    return make_result(y, (x,), lambda g: (
        pool.maxpool2d_backward(np.ascontiguousarray(g), arg, h, w),), "max_pool2d")


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True) -> Tensor:
    """Average pooling as PyTorch's (``count_include_pad``: padding cells count in the divisor)."""
    from .kernels import pool

    x = as_tensor(x)
    geom = _pool_args(x, kernel_size, stride, padding, ceil_mode)
    y = pool.avgpool2d(x.data, *geom, count_include_pad=count_include_pad)
    h, w = x.shape[2], x.shape[3]
    return make_result(y, (x,), lambda g: (
        pool.avgpool2d_backward(np.ascontiguousarray(g), geom, bool(count_include_pad), h, w),), "avg_pool2d")


def global_avg_pool2d(x) -> Tensor:
    """(N, C, H, W) -> (N, C, 1, 1): the mean of every map (PyTorch's ``AdaptiveAvgPool2d(1)``)."""
    x = as_tensor(x)
    if x.ndim != 4:
        raise InputError(f"global_avg_pool2d: expected an (N, C, H, W) input, found shape {x.shape}")
    return avg_pool2d(x, x.shape[2:], 1)


# -- more activations --------------------------------------------------------------------------------
def activation(x, kind, a=0.0, b=0.0) -> Tensor:
    """``kernels.elementwise.activation`` of ``kind`` (CLAMP: ReLU6 with a=0, b=6; LEAKY_RELU with slope
    a; TANH), recorded with its gradient (which reads the input, or for TANH the output)."""
    from .kernels import elementwise as el

    x = as_tensor(x)
    a, b = np.float32(a), np.float32(b)
    y = el.activation(x.data.reshape(-1), kind, a, b).reshape(x.shape)
    saved = y if kind == el.TANH else x.data
    return make_result(y, (x,), lambda g: (el.activation_backward(
        np.ascontiguousarray(g).reshape(-1), saved.reshape(-1), kind, a, b).reshape(x.shape),),
        ("relu6", "leaky_relu", "tanh")[kind])


def dropout(x, p, rng) -> Tensor:
    """Inverted dropout: each value zeroed with probability ``p`` (drawn from ``rng``, a NumPy
    Generator), the others scaled by 1 / (1 - p), so the expected output is the input."""
    x = as_tensor(x)
    keep = rng.random(x.shape) >= p
    scale = np.float32(0.0) if p >= 1 else np.float32(1.0 / (1.0 - p))
    mask = keep.astype(np.float32) * scale
    return make_result(x.data * mask, (x,), lambda g: (g * mask,), "dropout")


# -- batch normalization ----------------------------------------------------------------------------
def _channels_last_axis(a: np.ndarray) -> np.ndarray:
    """(N, C, ...) as the (N, C, L) view the per-channel kernels take."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def batch_norm_affine(gamma, beta, mean, var, eps, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with y = x * scale + shift the batch norm of x given the statistics:
    scale = gamma / sqrt(var + eps), shift = beta - mean * scale, computed in float64 and rounded
    once to ``dtype``. What the eval-mode forward (layer and autograd alike) and BN folding (float64)
    use."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    return scale.astype(dtype), shift.astype(dtype)


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5) -> Tensor:
    """PyTorch's batch norm over axis 1 of (N, C, ...) input.

    Training: normalise with the batch's mean and biased variance, and update ``running_mean`` and
    ``running_var`` (float32 arrays, in place) with ``momentum``, the variance unbiased (n / (n - 1)),
    as PyTorch does. Eval: y = x * scale + shift from the running statistics (``batch_norm_affine``).
    Statistics and the parameter gradients are summed in float64 in a fixed order."""
    from .kernels import elementwise as el

    x, gamma, beta = as_tensor(x), as_tensor(gamma), as_tensor(beta)
    if x.ndim < 2 or x.shape[1] != gamma.shape[0]:
        raise InputError(f"batch_norm: expected (N, {gamma.shape[0]}, ...) input, found {x.shape}")
    x3 = _channels_last_axis(x.data)
    count = x3.shape[0] * x3.shape[2]
    if not training:
        scale, shift = batch_norm_affine(gamma.data, beta.data, running_mean, running_var, eps)
        xhat = None
        y = el.channel_affine(x3, scale, shift).reshape(x.shape)
    else:
        if count < 2:
            raise InputError(f"batch_norm: training needs more than one value per channel, found input "
                             f"{x.shape}")
        mean, var = el.channel_moments(x3)
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * (count / (count - 1))
        inv = (1.0 / np.sqrt(var + eps)).astype(np.float32)
        xhat = (x.data - _per_channel(mean.astype(np.float32), x.ndim)) * _per_channel(inv, x.ndim)
        scale = (gamma.data * inv).astype(np.float32)
        y = xhat * _per_channel(gamma.data, x.ndim) + _per_channel(beta.data, x.ndim)

    def backward(g):
        g3 = _channels_last_axis(np.ascontiguousarray(g))
        if xhat is None:  # eval: an affine map per channel
            inv_eval = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
            norm = ((x3 - running_mean[None, :, None]) * inv_eval[None, :, None].astype(np.float32))
            sg, sgx = el.channel_sums(g3, np.ascontiguousarray(norm, np.float32))
            dx = g * _per_channel(scale, x.ndim)
            return dx, sgx.astype(np.float32), sg.astype(np.float32)
        sg, sgx = el.channel_sums(g3, _channels_last_axis(xhat))
        # dx = gamma * inv * (g - mean(g) - xhat * mean(g * xhat)), per channel
        mg, mgx = (sg / count).astype(np.float32), (sgx / count).astype(np.float32)
        dx = (g - _per_channel(mg, x.ndim) - xhat * _per_channel(mgx, x.ndim)) * _per_channel(scale, x.ndim)
        return dx, sgx.astype(np.float32), sg.astype(np.float32)

    return make_result(y.astype(np.float32, copy=False), (x, gamma, beta), backward, "batch_norm")
