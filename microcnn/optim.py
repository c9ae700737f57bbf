"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules, with PyTorch's update rules.

An optimizer updates each parameter's ``.data`` in place and bumps ``p.version`` so that layers
caching data derived from a weight (prepared conv kernels) rebuild it. Parameters whose ``.grad``
is None are skipped, as in PyTorch. One learning rate per optimizer (no parameter groups).

Schedules follow ``torch.optim.lr_scheduler``: call ``schedule.step()`` after ``optimizer.step()``,
once per epoch (StepLR, CosineAnnealingLR with T_max in epochs) or once per batch (OneCycleLR,
or any schedule whose steps you count in batches). Each computes its rate in closed form from the
step count, so they can be composed: ``LinearWarmup(opt, 100, after=CosineAnnealingLR(opt, 900))``.
"""

from __future__ import annotations

import math

import numpy as np

from .checks import check_count
from .errors import InputError


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a positive number, found {value!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise InputError(f"{name}: expected a finite number > 0, found {value!r}")
    return v


def _in_range(name: str, value, lo: float, hi: float, hi_open: bool = True) -> float:
    v = float(value)
    if not (lo <= v < hi if hi_open else lo <= v <= hi):
        raise InputError(f"{name}: expected a value in [{lo}, {hi}{')' if hi_open else ']'}, found {value!r}")
    return v


class Optimizer:
    """Base of the optimizers: ``params`` (Tensors with ``.grad``) updated in place by ``step()`` at
    learning rate ``lr``; ``zero_grad()`` clears the gradients. Subclasses define the update."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise InputError("optimizer: expected at least one parameter, found an empty list")
        self.lr = _positive("lr", lr)
        self.state: dict[int, dict] = {}  # per parameter, keyed by position in self.params
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        grads = {}
        for i, p in enumerate(self.params):  # all checked before any parameter moves
            if p.grad is None:
                continue
            grads[i] = np.asarray(p.grad, np.float32)
            if grads[i].shape != p.data.shape:
                raise InputError(f"optimizer: gradient of parameter {i} expected shape {p.data.shape}, "
                                 f"found {grads[i].shape}")
        self.steps += 1
        for i, grad in grads.items():
            p = self.params[i]
            self._update(p.data, grad, self.state.setdefault(i, {}))
            p.version += 1

    def _update(self, data: np.ndarray, grad: np.ndarray, state: dict) -> None:
        raise NotImplementedError

    # the momentum-like coefficient OneCycleLR cycles (SGD momentum, Adam beta1)
    @property
    def momentum_value(self) -> float:
        raise NotImplementedError

    @momentum_value.setter
    def momentum_value(self, value: float) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """p -= lr * v with v = momentum * v + (1 - dampening) * (grad + weight_decay * p);
    Nesterov uses grad + momentum * v instead of v. The first step sets v = grad, as PyTorch does."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        super().__init__(params, lr)
        self.momentum = _in_range("momentum", momentum, 0.0, 1.0)
        self.dampening = _in_range("dampening", dampening, 0.0, 1.0, hi_open=False)
        self.weight_decay = _in_range("weight_decay", weight_decay, 0.0, math.inf)
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise InputError(f"SGD: Nesterov momentum expects momentum > 0 and dampening = 0, found "
                             f"momentum={momentum}, dampening={dampening}")
        self.nesterov = nesterov

    @property
    def momentum_value(self):
        return self.momentum

    @momentum_value.setter
    def momentum_value(self, value):
        self.momentum = float(value)

    def _update(self, data, grad, state):
        if self.weight_decay:
            grad = grad + np.float32(self.weight_decay) * data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= np.float32(self.momentum)
                buf += np.float32(1 - self.dampening) * grad
            grad = grad + np.float32(self.momentum) * buf if self.nesterov else buf
        data -= np.float32(self.lr) * grad


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` adds an L2 term to the gradient (coupled), as
    ``torch.optim.Adam``. Use AdamW for decoupled decay."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.betas = (_in_range("betas[0]", betas[0], 0.0, 1.0), _in_range("betas[1]", betas[1], 0.0, 1.0))
        self.eps = _positive("eps", eps)
        self.weight_decay = _in_range("weight_decay", weight_decay, 0.0, math.inf)

    @property
    def momentum_value(self):
        return self.betas[0]

    @momentum_value.setter
    def momentum_value(self, value):
        self.betas = (float(value), self.betas[1])

    def _update(self, data, grad, state):
        b1, b2 = self.betas
        if self.weight_decay and self.decoupled:
            data *= np.float32(1 - self.lr * self.weight_decay)
        elif self.weight_decay:
            grad = grad + np.float32(self.weight_decay) * data
        if "m" not in state:
            state["m"], state["v"], state["t"] = np.zeros_like(data), np.zeros_like(data), 0
        m, v = state["m"], state["v"]
        state["t"] += 1
        t = state["t"]
        m *= np.float32(b1)
        m += np.float32(1 - b1) * grad
        v *= np.float32(b2)
        v += np.float32(1 - b2) * grad * grad
        # PyTorch's arrangement: lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        step_size = self.lr / (1 - b1**t)
        denom = np.sqrt(v) / np.float32(math.sqrt(1 - b2**t)) + np.float32(self.eps)
        data -= np.float32(step_size) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


# -- learning-rate schedules ------------------------------------------------------------------------
class Schedule:
    """Sets ``optimizer.lr = lr_at(t)`` on each ``step()``; t counts steps from 0 (construction)."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0
        self._apply(0)

    def lr_at(self, t: int) -> float:
        raise NotImplementedError

    def _apply(self, t: int) -> None:
        self.optimizer.lr = float(self.lr_at(t))

    def step(self) -> None:
        self.last_step += 1
        self._apply(self.last_step)

    def get_last_lr(self) -> float:
        return self.optimizer.lr


class StepLR(Schedule):
    """lr = base_lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        self.step_size = check_count("step_size", step_size)
        self.gamma = _positive("gamma", gamma)
        super().__init__(optimizer)

    def lr_at(self, t):
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(Schedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2 (PyTorch's closed form)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803 - PyTorch's name
        self.T_max = check_count("T_max", T_max)
        self.eta_min = _in_range("eta_min", eta_min, 0.0, math.inf)
        super().__init__(optimizer)

    def lr_at(self, t):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class OneCycleLR(Schedule):
    """Warm up from max_lr/div_factor to max_lr over pct_start of total_steps, then anneal (cosine)
    to max_lr/(div_factor*final_div_factor); the momentum (SGD momentum or Adam beta1) moves the
    opposite way between max_momentum and base_momentum. Stepped once per batch."""

    def __init__(self, optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95):
        self.max_lr = _positive("max_lr", max_lr)
        self.total_steps = check_count("total_steps", total_steps)
        self.pct_start = _in_range("pct_start", pct_start, 0.0, 1.0)
        self.initial_lr = self.max_lr / _positive("div_factor", div_factor)
        self.min_lr = self.initial_lr / _positive("final_div_factor", final_div_factor)
        self.warmup_end = float(self.pct_start * self.total_steps) - 1
        self.cycle_momentum = cycle_momentum  # as PyTorch: also for SGD built with momentum=0
        self.momenta = (base_momentum, max_momentum)
        super().__init__(optimizer)

    @staticmethod
    def _cos(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    def _phase(self, t):
        """(progress in the current phase, True while warming up), as PyTorch's two-phase schedule."""
        if t > self.total_steps:
            raise InputError(f"OneCycleLR: stepped {t} times, more than total_steps={self.total_steps}")
        if t <= self.warmup_end:
            return (t / self.warmup_end if self.warmup_end > 0 else 1.0), True
        span = self.total_steps - 1 - self.warmup_end
        return ((t - self.warmup_end) / span if span > 0 else 1.0), False

    def lr_at(self, t):
        pct, warm = self._phase(t)
        if warm:
            return self._cos(self.initial_lr, self.max_lr, pct)
        return self._cos(self.max_lr, self.min_lr, pct)

    def momentum_at(self, t):
        base, top = self.momenta
        pct, warm = self._phase(t)
        return self._cos(top, base, pct) if warm else self._cos(base, top, pct)

    def _apply(self, t):
        super()._apply(t)
        if self.cycle_momentum:
            self.optimizer.momentum_value = self.momentum_at(t)


class LinearWarmup(Schedule):
    """Ramp linearly from start_factor * lr to lr over ``warmup_steps``, then follow ``after`` (a
    schedule built on the same optimizer, whose step count starts when the warm-up ends) or stay."""

    def __init__(self, optimizer, warmup_steps: int, start_factor: float = 0.1,
                 after: Schedule | None = None):
        self.warmup_steps = check_count("warmup_steps", warmup_steps)
        self.start_factor = _in_range("start_factor", start_factor, 0.0, 1.0, hi_open=False)
        if self.start_factor == 0:
            raise InputError("start_factor: expected a value in (0, 1], found 0 (a zero learning rate)")
        if after is not None and after.optimizer is not optimizer:
            raise InputError("LinearWarmup: `after` must schedule the same optimizer")
        self.after = after
        super().__init__(optimizer)

    def lr_at(self, t):
        # `after` may already have set the optimizer's rate at its own step 0; its base rate is the target
        base = self.after.base_lr if self.after is not None else self.base_lr
        if t < self.warmup_steps:
            return base * (self.start_factor + (1 - self.start_factor) * t / self.warmup_steps)
        return self.after.lr_at(t - self.warmup_steps) if self.after is not None else base
