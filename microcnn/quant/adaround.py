"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): choose,
per weight, whether to round down or up by layer-wise reconstruction instead of rounding to nearest.

For one Conv2d / Linear layer with weights W, grid scale s and zero point zp, the soft weights are
``W~ = s * (clip(floor(W / s) + zp + h(V), qmin, qmax) - zp)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)`` (ZETA = 1.1, GAMMA = -0.1). Adam on V minimises

    || f(W x + b) - f(W~ x^ + b) ||^2  +  lam * sum (1 - |2 h(V) - 1| ** beta)

where f is the layer's fused ReLU (identity if none), x the layer's input in the FP32 network and x^
its input in the network quantized so far -- the paper's *asymmetric* reconstruction: later layers learn
to compensate the errors of earlier ones (and of the activation quantization). The reconstruction is
summed over output channels and averaged over the batch's rows (output positions), as in the
reference implementations (BRECQ's ``lp_loss``). The regularizer is off for the first ``warmup``
fraction of the iterations, then beta decays linearly from 20 to 2 (the official code's
``LinearTempDecay``): early on it barely pushes h towards 0 or 1, at the end it forces it. V starts
where h(V) equals the fractional part of W / s (the FP32 weights), and the final codes round up
exactly where h(V) >= 0.5, i.e. V >= 0.

Each iteration takes a random batch of ``batch`` calibration images (seeded). Matrix products run on
``kernels.gemm`` (``sgemm``, ``linear_forward``) and the element-wise steps in ``kernels.relax``
(fixed order, scalar exp/pow), so the chosen codes are the same on every CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..kernels.conv import im2col
from ..kernels.gemm import linear_forward, sgemm
from ..kernels.relax import adam_step, hard_codes, initial_v, soft_weights
from ..layers import Conv2d, Linear
from .params import check_bits, qrange


@dataclass(frozen=True)
class AdaRoundSettings:
    """Hyper-parameters (defaults: the paper's and the reference implementations', iterations reduced
    from 10,000 to fit one CPU core: LeNet-5's layers converge well before 1,000)."""

    iterations: int = 1000
    batch: int = 32  # calibration images per iteration
    lam: float = 0.01  # weight of the rounding regularizer
    warmup: float = 0.2  # fraction of the iterations without the regularizer
    beta_start: float = 20.0
    beta_end: float = 2.0
    lr: float = 1e-3  # Adam's step size on V

    def __post_init__(self):
        checks = {"iterations": self.iterations >= 1 and isinstance(self.iterations, int),
                  "batch": self.batch >= 1 and isinstance(self.batch, int),
                  "lam": self.lam >= 0, "warmup": 0 <= self.warmup < 1,
                  "beta_start": self.beta_start >= self.beta_end > 0, "lr": self.lr > 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"adaround settings: bad {bad[0]} = {getattr(self, bad[0])!r} "
                             "(expected iterations, batch >= 1; lam >= 0; 0 <= warmup < 1; "
                             "beta_start >= beta_end > 0; lr > 0)")


def beta_at(t: int, s: AdaRoundSettings) -> float | None:
    """The regularizer's beta at iteration t (0-based); None during the warm-up (no regularizer)."""
    start = s.warmup * s.iterations
    if t < start:
        return None
    progress = (t - start) / (s.iterations - start)
    return s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - progress)


def _columns(layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as the (K, rows) matrix its weights (O, K) multiply: im2col patches for a
    convolution (rows: image-major positions), the transposed batch for a dense layer."""
    x = np.ascontiguousarray(x, np.float32)
    if isinstance(layer, Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        return im2col(x, kh, kw, sh, sw, ph, pw, np.float32(0.0))
    return np.ascontiguousarray(x.reshape(len(x), -1).T)


def _rows(y: np.ndarray) -> np.ndarray:
    """A layer's output (N, O[, H, W]) as (O, rows) in the order of ``_columns``."""
    if y.ndim == 2:
        return np.ascontiguousarray(y.T, np.float32)
    return np.ascontiguousarray(y.transpose(1, 0, 2, 3).reshape(y.shape[1], -1), np.float32)


def adaround(layer, scale, zero_point, bits: int, x_quant: np.ndarray, target: np.ndarray, relu: bool,
             settings: AdaRoundSettings | None = None, seed: int = 0, progress: bool = False,
             name: str = "layer") -> tuple[np.ndarray, list]:
    """AdaRound codes for ``layer``'s weights (int8, shape (O, K)) and the reconstruction loss after
    every iteration (on that iteration's batch, before its step).

    scale, zero_point: per output row (O,) grid of the signed ``bits``-bit weights. x_quant: the layer's
    real-valued input in the quantized network (calibration images, N first). target: the FP32
    layer's output on the FP32 input, after its ReLU when ``relu`` (N first).
    """
    if not isinstance(layer, Conv2d | Linear):
        raise InputError(f"adaround: expected a Conv2d or Linear layer, found {type(layer).__name__}")
    s = settings or AdaRoundSettings()
    bits = check_bits(bits, "weight bits")
    qmin, qmax = qrange(bits, signed=True)
    w = np.asarray(layer.weight.data, np.float64).reshape(len(layer.weight.data), -1)
    o = len(w)
    scale = np.broadcast_to(np.asarray(scale, np.float64), (o,)).copy()
    zero_point = np.broadcast_to(np.asarray(zero_point, np.float64), (o,)).copy()
    bias = (np.zeros(o, np.float32) if layer.bias is None else layer.bias.data.astype(np.float32))[:, None]
    if len(x_quant) != len(target):
        raise InputError(f"adaround {name}: {len(x_quant)} inputs but {len(target)} targets")
    scaled = w / scale[:, None]
    floor = np.floor(scaled)
    base = floor + zero_point[:, None]
    v = initial_v(scaled - floor)
    m, u = np.zeros_like(v), np.zeros_like(v)
    rng = np.random.default_rng(seed)
    n = len(x_quant)
    batch = min(s.batch, n)
    losses = []
    zeros_k = np.zeros(w.shape[1], np.float32)
    from tqdm.auto import tqdm

    bar = tqdm(range(s.iterations), desc=f"adaround {name}", unit="it", disable=not progress, leave=False)
    for t in bar:
        idx = np.sort(rng.choice(n, batch, replace=False))
        cols = _columns(layer, x_quant[idx])
        want = _rows(target[idx])
        out = sgemm(soft_weights(v, base, scale, zero_point, qmin, qmax), cols) + bias
        if relu:
            live = out > 0
            out = np.where(live, out, np.float32(0.0))
        diff = out - want
        rows = np.float32(diff.shape[1])
        losses.append(float(np.sum(diff.astype(np.float64) ** 2)) / float(rows))
        grad_out = diff * (np.float32(2.0) / rows)
        if relu:
            grad_out = np.where(live, grad_out, np.float32(0.0))
        # d loss / d W~ = grad_out @ cols.T: the dot products of their rows (no transposed copy)
        grad_w = linear_forward(np.ascontiguousarray(grad_out), cols, zeros_k).astype(np.float64)
        beta = beta_at(t, s)
        adam_step(v, grad_w, base, scale, qmin, qmax, beta or 0.0, 0.0 if beta is None else s.lam, s.lr,
                  t + 1, m, u)
        if progress and t % 100 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    return hard_codes(v, base, qmin, qmax), losses
