"""How weights are rounded onto their integer grid: the registry ``ROUNDINGS`` (nearest, GPTQ, AdaRound
in ``quant.adaround``) and GPTQ itself.

Data-aware rounding of weights (GPTQ / Optimal Brain Quantization): instead of rounding every weight
to the nearest grid point, quantize one input column at a time and spread its rounding error over the
columns not yet quantized, weighted by the inverse Hessian H = X X^T of the layer's inputs X on the
calibration images. That minimises ||W X - Q X||^2 greedily; it matters at 4 bits. The Hessian and
its factors come from ``kernels.linalg`` (fixed summation order), not BLAS/LAPACK, so the rounded
weights are the same on every CPU."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..kernels.linalg import cholesky_lower, gram, inverse_spd
from ..layers import Conv2d, Linear
from .params import qrange


@dataclass
class RoundingJob:
    """What a rounding method may use for one layer: the FP32 ``layer``, its weight grid (``nearest``
    codes, per-row ``scale`` and ``zero_point`` of the signed ``bits``-bit grid), its input on the
    calibration images in the quantized network so far (``x_quant``, real values) and in the FP32
    network (``x_float``), whether a ReLU is fused, and the run's ``options`` / ``seed`` / ``progress``."""

    name: str
    layer: Conv2d | Linear
    nearest: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    x_quant: np.ndarray | None
    x_float: np.ndarray | None
    relu: bool
    options: dict = field(default_factory=dict)
    seed: int = 0
    progress: bool = False


def _nearest(job: RoundingJob) -> np.ndarray:
    return job.nearest


def _gptq(job: RoundingJob) -> np.ndarray:
    # gptq is in NEEDS_DATA: quantize always passes it the calibration images
    assert job.x_quant is not None
    groups = _groups(job.layer)
    o, c = len(job.nearest) // groups, job.layer.weight.data.shape[1]
    # A grouped convolution's groups are independent layers: each its own rows, input channels, Hessian.
    return np.concatenate([gptq_round(job.layer.weight.data[g * o:(g + 1) * o], job.scale[g * o:(g + 1) * o],
                                      job.bits, input_gram(job.layer, job.x_quant[:, g * c:(g + 1) * c]),
                                      zero_point=job.zero_point[g * o:(g + 1) * o]) for g in range(groups)])


def _groups(layer) -> int:
    return layer.groups if isinstance(layer, Conv2d) else 1


def _adaround(job: RoundingJob) -> np.ndarray:
    from .adaround import AdaRoundSettings, adaround

    # adaround is in NEEDS_DATA: quantize always passes it the calibration images
    assert job.x_quant is not None and job.x_float is not None
    if _groups(job.layer) > 1:
        raise InputError(f"rounding='adaround': {job.name} is a grouped convolution (groups="
                         f"{_groups(job.layer)}), which AdaRound does not reconstruct; use 'gptq' or "
                         "'nearest'")
    target = job.layer.forward(job.x_float)
    if job.relu:
        target = np.maximum(target, np.float32(0.0))
    codes, _ = adaround(job.layer, job.scale, job.zero_point, job.bits, job.x_quant, target, job.relu,
                        AdaRoundSettings(**job.options), seed=job.seed, progress=job.progress, name=job.name)
    return codes


# name -> rounding method (RoundingJob -> int8 codes); the command line's choices are these names.
ROUNDINGS = {"nearest": _nearest, "gptq": _gptq, "adaround": _adaround}
NEEDS_DATA = ("gptq", "adaround")  # methods that read the calibration images


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
               damp: float = 0.01, zero_point=0) -> np.ndarray:
    """Integer weights (int8, shape (O, K)) on the signed ``bits`` grid with per-row ``scale`` (and
    ``zero_point``: real = scale * (q - zero_point)), rounded column by column with error feedback
    through the Cholesky factor of the damped inverse Hessian."""
    w = np.array(w, np.float64).reshape(len(w), -1)
    k = w.shape[1]
    qmin, qmax = qrange(bits, signed=True)
    s = np.broadcast_to(np.asarray(scale, np.float64), (len(w),))[:, None]
    z = np.broadcast_to(np.asarray(zero_point, np.float64), (len(w),))
    h = np.array(gram, np.float64)
    dead = np.diag(h) == 0  # inputs that are always 0: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    # Upper Cholesky factor of H^-1: row j holds the updates that compensate column j's error.
    u = cholesky_lower(inverse_spd(h)).T
    q = np.empty_like(w)
    for j in range(k):
        q[:, j] = np.clip(np.rint(w[:, j] / s[:, 0]) + z, qmin, qmax)
        err = (w[:, j] - (q[:, j] - z) * s[:, 0]) / u[j, j]
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q.astype(np.int8)
