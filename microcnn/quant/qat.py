"""Quantization-aware training: fake quantization on the autograd tape, LSQ learned step sizes, distillation,
and the conversion of the trained steps to the integer stages ``quantize`` builds.

Fake quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020)::

    q = clip(rint(v / s), -Qn, Qp)          v_hat = q * s

with the straight-through estimator for ``v`` (gradient 1 strictly inside (-Qn, Qp) in units of s, 0 from
the clamp boundaries outward) and LSQ's step gradient

    d v_hat / d s = q - v / s    inside,      -Qn or Qp    at or beyond the boundaries,

scaled by g = 1 / sqrt(N * Qp), N the number of values sharing the step (per output channel for weights,
per image for activations), as the paper prescribes so that steps and weights learn at similar rates.
``rint`` rounds half to even, as ``params.quantize_values`` and the integer kernels do, so a fake-quantized
network and its converted integer twin round the same way.

Grids: weights signed, Qn = 2**(b-1), Qp = 2**(b-1) - 1 (the signed grid of ``params.qrange``);
activations (the input of every Conv2d/Linear, where ``quantize`` places its activation quantizers)
unsigned, Qn = 0, Qp = 2**b - 1, zero point 0: every such input is an image or follows a ReLU.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .. import autograd as ag
from ..autograd import Tensor, as_tensor, make_result
from ..errors import InputError
from ..layers import Conv2d, Linear
from .calibrate import INPUT, Calibration
from .observers import Observer
from .params import check_bits, qrange


def lsq_grad_scale(count: int, qp: int) -> float:
    """LSQ's step-gradient scale g = 1 / sqrt(N * Qp)."""
    return 1.0 / math.sqrt(max(int(count), 1) * max(int(qp), 1))


def fake_quant(x, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0, axis: int | None = None) -> Tensor:
    """LSQ fake quantization ``clip(rint(x / step), -qn, qp) * step`` on the tape.

    ``step`` is a scalar (per tensor) or has one entry per index of ``axis`` (per channel). Gradients:
    straight-through for ``x`` inside the grid, LSQ's formula (times ``grad_scale``) for ``step``.
    """
    x, step = as_tensor(x), as_tensor(step)
    if axis is None:
        if step.size != 1:
            raise InputError(f"fake_quant: per-tensor step expected one value, found shape {step.shape}")
        s = step.data.reshape(())
    else:
        if step.shape != (x.shape[axis],):
            raise InputError(f"fake_quant: step expected shape ({x.shape[axis]},) for axis {axis}, "
                             f"found {step.shape}")
        shape = [1] * x.ndim
        shape[axis] = -1
        s = step.data.reshape(shape)
    if not (np.isfinite(step.data).all() and (step.data > 0).all()):
        raise InputError(f"fake_quant: steps must be finite and > 0, found min {float(step.data.min()):g}")
    v = x.data / s  # float32, as the tape computes
    q = np.clip(np.rint(v), -qn, qp)
    inside = (v > -qn) & (v < qp)

    def backward(g):
        dx = np.where(inside, g, np.float32(0)) if x.requires_grad else None
        ds = None
        if step.requires_grad:
            local = np.where(inside, q - v, q).astype(np.float32)  # clipped: q is -qn or qp
            per = (g * local).astype(np.float64)
            reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
            ds = (per.sum(axis=reduce_axes) * grad_scale).astype(np.float32).reshape(step.shape)
        return dx, ds

    return make_result((q * s).astype(np.float32), (x, step), backward, "fake_quant")


def weight_grid(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of the signed weight grid."""
    lo, hi = qrange(bits, signed=True)
    return -lo, hi


def act_grid(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of the unsigned activation grid."""
    return 0, qrange(bits, signed=False)[1]


def lsq_init(values: np.ndarray, qp: int, axis: int | None = None) -> np.ndarray:
    """LSQ's initial step 2 * mean|v| / sqrt(Qp), per tensor or per index of ``axis``."""
    a = np.abs(np.asarray(values, np.float64))
    mean = a.mean() if axis is None else a.reshape(a.shape[axis], -1).mean(axis=1) if axis == 0 else \
        np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).mean(axis=1)
    step = 2.0 * mean / math.sqrt(qp)
    return np.maximum(step, 1e-8).astype(np.float32)


class QATNetwork:
    """A Sequential with LSQ fake quantizers on every Conv2d/Linear weight (per output channel) and on
    every such layer's input (per tensor). Trains with ``train.fit`` like a Sequential: ``logits``
    accepts Tensors or arrays, ``parameters`` are the network's plus the steps.

    Args:
        net: the FP32 network (trained in place: its weights are the latent weights).
        weight_bits, act_bits: 2..8.
        images: a batch of training images to initialise the activation steps.
        init: "lsq" (2 * mean|v| / sqrt(Qp) on ``images``) or "calibration" (MSE calibration of
            ``images``, the step of ``quantize``'s activation quantizer).
    """

    def __init__(self, net, weight_bits: int, act_bits: int, images: np.ndarray, init: str = "lsq"):
        if init not in ("lsq", "calibration"):
            raise InputError(f"init: expected 'lsq' or 'calibration', found {init!r}")
        self.net = net
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.act_bits = check_bits(act_bits, "act_bits")
        self.input_shape = net.input_shape
        self.wq, self.aq = weight_grid(self.weight_bits), act_grid(self.act_bits)
        self.weighted = [i for i, layer in enumerate(net.layers) if isinstance(layer, Conv2d | Linear)]
        if not self.weighted:
            raise InputError("qat: the network has no Conv2d or Linear layer to quantize")
        self.weight_steps = {i: Tensor(lsq_init(net.layers[i].weight.data, self.wq[1], axis=0),
                                       requires_grad=True) for i in self.weighted}
        inputs = self._weighted_inputs(np.asarray(images, np.float32))
        if init == "calibration":
            from .calibrate import calibrate

            cal = calibrate(net, images, method="mse", samples=len(images), progress=False)
            steps = {i: cal.act_quant(self.tensor_name(i), self.act_bits).scale for i in self.weighted}
        else:
            steps = {i: float(lsq_init(inputs[i], self.aq[1])) for i in self.weighted}
        self.act_steps = {i: Tensor(np.float32(steps[i]), requires_grad=True) for i in self.weighted}

    def tensor_name(self, i: int) -> str:
        """Calibration name of the tensor layer ``i`` reads."""
        return self.net.names[i - 1] if i > 0 else INPUT

    def _weighted_inputs(self, x: np.ndarray) -> dict[int, np.ndarray]:
        found = {}
        for i, layer in enumerate(self.net.body):
            if i in self.weighted:
                found[i] = x
            x = layer.forward(x)
        return found

    def parameters(self) -> list[Tensor]:
        return [*self.net.parameters(), *self.weight_steps.values(), *self.act_steps.values()]

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def logits(self, x):
        """Fake-quantized scores before the final Softmax (arrays or Tensors)."""
        x = as_tensor(x)
        for i, layer in enumerate(self.net.body):
            if i not in self.weighted:
                x = layer(x)
                continue
            per_image = int(np.prod(x.shape[1:]))
            x = fake_quant(x, self.act_steps[i], *self.aq, lsq_grad_scale(per_image, self.aq[1]))
            w = layer.weight
            w = fake_quant(w, self.weight_steps[i], *self.wq,
                           lsq_grad_scale(w.size // w.shape[0], self.wq[1]), axis=0)
            x = ag.conv2d(x, w, layer.bias, layer.stride, layer.padding) if isinstance(layer, Conv2d) \
                else ag.linear(x, w, layer.bias)
        return x

    # -- conversion --------------------------------------------------------------------------------
    def calibration(self) -> Calibration:
        """A Calibration whose activation quantizers are exactly the learned ones (range [0, s * Qp])."""
        observers = OrderedDict((name, _FixedRange(name)) for name in [INPUT, *self.net.names])
        for i in self.weighted:
            observers[self.tensor_name(i)].max_val = float(self.act_steps[i].data) * self.aq[1]
        return Calibration("lsq", observers, self.net.config(), np.zeros((0, *self.input_shape), np.float32))

    def quantized(self, requant: str = "fixedpoint"):
        """The integer model (a ``QuantizedSequential``): ``quantize``'s stages, with the learned
        activation steps and each weighted stage rebuilt from the learned weight codes and steps."""
        from .qlayers import QConv2d, QLinear, QWeighted
        from .quantize import quantize, quantize_bias

        qnet = quantize(self.net, self.calibration(), self.weight_bits, self.act_bits, per_channel=True,
                        weight_clipping="minmax", bias_correction=False, requant=requant, rounding="nearest")
        for k, stage in enumerate(qnet.stages):
            if not isinstance(stage, QWeighted):
                continue
            i = stage.layers[0]
            layer, step = self.net.layers[i], self.weight_steps[i].data
            codes = np.clip(np.rint(layer.weight.data / step.reshape(-1, *[1] * (layer.weight.ndim - 1))),
                            -self.wq[0], self.wq[1]).astype(np.int8)
            bias = layer.bias.data if layer.bias is not None else np.zeros(len(step), np.float32)
            in_act = stage.in_act
            if in_act is None:  # quantize() gives every weighted stage an integer input
                raise InputError(f"qat: stage of layer {i} has no input quantization")
            bias_q = quantize_bias(bias, in_act.scale, step)
            args = (stage.layers, codes, self.weight_bits, step, bias_q, in_act, stage.out_act, stage.relu)
            if isinstance(stage, QConv2d):
                qnet.stages[k] = QConv2d(*args, stride=stage.stride, padding=stage.padding, pool=stage.pool,
                                         requant=stage.requant)
            else:
                qnet.stages[k] = QLinear(*args, requant=stage.requant)
        qnet.settings.update({"weight_clipping": "lsq", "rounding": "qat", "calibration": "lsq"})
        return qnet


class _FixedRange(Observer):
    """An activation range fixed by training, [0, hi], instead of observed."""

    kind = "lsq"

    def __init__(self, tensor: str = "tensor"):
        super().__init__(tensor)
        self.min_val, self.max_val = 0.0, 1.0
        self.count = 1

    def _observe(self, x):
        raise InputError("a learned (LSQ) range does not observe data")

    def _range(self, bits):
        return 0.0, self.max_val


def distillation_loss(student: Tensor, teacher_logits: np.ndarray, labels: np.ndarray, temperature: float,
                      alpha: float, hard_loss) -> Tensor:
    """(1 - alpha) * hard_loss(student, labels) + alpha * T**2 * KL(p || q), p = softmax(teacher / T) and
    q = softmax(student / T), averaged over the batch (Hinton et al.; T**2 keeps the soft gradients' size
    independent of T)."""
    soft_targets = Tensor(np.asarray(teacher_logits, np.float32) / np.float32(temperature))
    p = ag.softmax(soft_targets).data  # kernels, not np.exp: the same bits on every CPU
    log_p = ag.log_softmax(soft_targets).data
    n = len(p)
    log_q = ag.log_softmax(ag.mul(student, np.float32(1.0 / temperature)))
    # KL = sum p (log p - log q) / N; the p log p part is a constant (kept so the value is the KL)
    kl = ag.sum(ag.mul(log_q, -p / np.float32(n))) + np.float32((p.astype(np.float64) * log_p).sum() / n)
    soft = ag.mul(kl, np.float32(alpha * temperature**2))
    if alpha >= 1.0:
        return soft
    return soft + ag.mul(hard_loss(student, labels), np.float32(1.0 - alpha))

