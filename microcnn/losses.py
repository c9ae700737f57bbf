"""Loss functions on autograd Tensors, reduced to a scalar mean (or sum) over the batch.

Each loss is one tape op with its closed-form gradient, computed in float64 on the (small) loss
inputs, then stored as float32 like every tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from .autograd import Tensor, as_tensor, make_result
from .errors import InputError
from .kernels import elementwise


def _elementwise(kernel: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float64)
    return kernel(x.reshape(-1)).reshape(x.shape)


# Float64 exp and logs through the C library (kernels.elementwise): NumPy's own loops differ in the last
# bits between CPUs with and without AVX-512, and so would every trained weight.
def _exp(x: np.ndarray) -> np.ndarray:
    return _elementwise(elementwise.libm_exp, x)


def _log(x: np.ndarray) -> np.ndarray:
    return _elementwise(elementwise.libm_log, x)


def _log1p(x: np.ndarray) -> np.ndarray:
    return _elementwise(elementwise.libm_log1p, x)

_REDUCTIONS = ("mean", "sum")


def _reduce_scale(reduction: str, count: int) -> float:
    if reduction not in _REDUCTIONS:
        raise InputError(f"reduction: expected one of {_REDUCTIONS}, found {reduction!r}")
    return 1.0 / max(count, 1) if reduction == "mean" else 1.0


def _same_shape_targets(pred: Tensor, target: Tensor | ArrayLike, name: str) -> np.ndarray:
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if t.shape != pred.shape:
        raise InputError(f"{name}: targets expected shape {pred.shape} (as the predictions), found {t.shape}")
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)
            or t.dtype == np.bool_):
        raise InputError(f"{name}: targets expected a numeric array, found dtype {t.dtype}")
    return t.astype(np.float64)


def cross_entropy(logits: Tensor | ArrayLike, target: ArrayLike, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy from raw scores and class indices, via log-sum-exp (``F.cross_entropy``).

    Args:
        logits: raw scores (not probabilities), a Tensor or an array.
        target: one class index per row, integers in [0, K).
        reduction: ``"mean"`` over the rows or ``"sum"``.
        label_smoothing: e in [0, 1] mixes the one-hot target with the uniform distribution, as
            PyTorch does: target = (1 - e) * onehot + e / K.

    Shape:
        logits (N, K), target (N,); the result is a scalar Tensor (shape ()).

    Raises:
        InputError: for other shapes, non-integer targets or a class index outside [0, K).

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> z = Tensor(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32), requires_grad=True)
        >>> loss = cross_entropy(z, [0, 2])  # mean of -log(e^2 / (e^2 + 2)) and log(3)
        >>> round(loss.item(), 4)
        0.6691
        >>> loss.backward(); z.grad.round(4)  # (softmax - onehot) / N
        array([[-0.1065,  0.0533,  0.0533],
               [ 0.1667,  0.1667, -0.3333]], dtype=float32)
    """
    logits = as_tensor(logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise InputError(f"cross_entropy: logits expected shape (N, K), found {logits.shape}")
    n, k = logits.shape
    t = np.asarray(target)
    if t.shape != (n,):
        raise InputError(f"cross_entropy: targets expected shape ({n},) (one class index per row of "
                         f"logits {logits.shape}), found {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"cross_entropy: targets expected integer class indices, found dtype {t.dtype}")
    if n and (t.min() < 0 or t.max() >= k):
        bad = int(t[(t < 0) | (t >= k)][0])
        raise InputError(f"cross_entropy: class index expected in [0, {k - 1}], found {bad}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise InputError(f"cross_entropy: label_smoothing expected in [0, 1], found {label_smoothing}")
    scale = _reduce_scale(reduction, n)
    z = logits.data.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - _log(_exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    soft = np.full((n, k), label_smoothing / k)
    soft[rows, t] += 1.0 - label_smoothing
    loss = -(soft * log_probs).sum() * scale

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (((_exp(log_probs) - soft) * (scale * float(g))).astype(np.float32),)

    return make_result(np.float32(loss), (logits,), backward, "cross_entropy")


def mse_loss(pred: Tensor | ArrayLike, target: Tensor | ArrayLike, reduction: str = "mean") -> Tensor:
    """Mean (or sum) of squared differences (``F.mse_loss``), with no silent broadcasting.

    Args:
        pred: predictions, a Tensor or an array.
        target: numeric targets of the same shape.
        reduction: ``"mean"`` over all elements or ``"sum"``.

    Shape:
        pred and target: any shape, the same; the result is a scalar Tensor.

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> p = Tensor(np.array([1.0, 2.0], np.float32), requires_grad=True)
        >>> loss = mse_loss(p, [0.0, 0.0]); loss.item()  # (1 + 4) / 2
        2.5
        >>> loss.backward(); p.grad  # 2 (p - t) / N
        array([1., 2.], dtype=float32)
    """
    pred = as_tensor(pred)
    t = _same_shape_targets(pred, target, "mse_loss")
    scale = _reduce_scale(reduction, pred.size)
    diff = pred.data.astype(np.float64) - t
    return make_result(np.float32((diff * diff).sum() * scale), (pred,),
                       lambda g: ((2.0 * scale * float(g) * diff).astype(np.float32),), "mse_loss")


_LOG_FLOOR = -100.0  # PyTorch clamps log(p) here, so p = 0 or 1 gives a large finite loss


def binary_cross_entropy(probs: Tensor | ArrayLike, target: Tensor | ArrayLike,
                         reduction: str = "mean") -> Tensor:
    """Binary cross-entropy ``-[t log p + (1 - t) log(1 - p)]`` of probabilities (``F.binary_cross_entropy``);
    prefer ``binary_cross_entropy_with_logits``, which is stable for extreme scores.

    Args:
        probs: probabilities in [0, 1] (log p is clamped at -100, as PyTorch does).
        target: targets of the same shape, usually 0 or 1.
        reduction: ``"mean"`` or ``"sum"``.

    Shape:
        probs and target: any shape, the same; the result is a scalar Tensor.

    Example::

        >>> round(binary_cross_entropy([0.5, 0.9], [1.0, 1.0]).item(), 4)  # -(log 0.5 + log 0.9) / 2
        0.3993
    """
    probs = as_tensor(probs)
    t = _same_shape_targets(probs, target, "binary_cross_entropy")
    p = probs.data.astype(np.float64)
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
        raise InputError(f"binary_cross_entropy: probabilities expected in [0, 1], found values in "
                         f"[{np.nanmin(p):g}, {np.nanmax(p):g}]{' and NaN' if np.isnan(p).any() else ''}")
    scale = _reduce_scale(reduction, p.size)
    with np.errstate(divide="ignore"):
        log_p = np.maximum(_log(p), _LOG_FLOOR)
        log_1p = np.maximum(_log1p(-p), _LOG_FLOOR)
    loss = -(t * log_p + (1 - t) * log_1p).sum() * scale

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        # PyTorch's epsilon keeps the gradient finite at p = 0 or 1.
        denom = np.maximum(p * (1 - p), 1e-12)
        return (((p - t) / denom * (scale * float(g))).astype(np.float32),)

    return make_result(np.float32(loss), (probs,), backward, "binary_cross_entropy")


def binary_cross_entropy_with_logits(logits: Tensor | ArrayLike, target: Tensor | ArrayLike,
                                     reduction: str = "mean") -> Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` in the stable form ``max(x, 0) - x t + log(1 + exp(-|x|))``
    (``F.binary_cross_entropy_with_logits``).

    Args:
        logits: raw scores.
        target: targets of the same shape, usually 0 or 1.
        reduction: ``"mean"`` or ``"sum"``.

    Shape:
        logits and target: any shape, the same; the result is a scalar Tensor.

    Example::

        >>> round(binary_cross_entropy_with_logits([0.0, 2.0], [1.0, 1.0]).item(), 4)
        0.41
    """
    logits = as_tensor(logits)
    t = _same_shape_targets(logits, target, "binary_cross_entropy_with_logits")
    x = logits.data.astype(np.float64)
    scale = _reduce_scale(reduction, x.size)
    loss = (np.maximum(x, 0) - x * t + _log1p(_exp(-np.abs(x)))).sum() * scale

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        e = _exp(-np.abs(x))
        sig = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return (((sig - t) * (scale * float(g))).astype(np.float32),)

    return make_result(np.float32(loss), (logits,), backward, "binary_cross_entropy_with_logits")
