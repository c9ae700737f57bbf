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
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import check_count
from .errors import InputError

if TYPE_CHECKING:  # annotations only: optimizers take any object with .data, .grad and .version
    from .autograd import Tensor


def _positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a positive number, found {value!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise InputError(f"{name}: expected a finite number > 0, found {value!r}")
    return v


def _in_range(name: str, value: Any, lo: float, hi: float, hi_open: bool = True) -> float:
    v = float(value)
    if not (lo <= v < hi if hi_open else lo <= v <= hi):
        raise InputError(f"{name}: expected a value in [{lo}, {hi}{')' if hi_open else ']'}, found {value!r}")
    return v


class Optimizer:
    """Base class of the optimizers: updates ``params`` in place from their ``.grad`` on ``step()``.

    Subclasses define the update (``_update``) and which coefficient ``OneCycleLR`` cycles
    (``momentum_value``). As in ``torch.optim``, a parameter whose ``.grad`` is None is skipped.

    Args:
        params: the Tensors to train (``net.parameters()``); at least one.
        lr: learning rate, a finite number > 0.

    Raises:
        InputError: for an empty ``params``, a bad ``lr``, or (in ``step``) a gradient whose shape
            differs from its parameter's; nothing moves then.

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> w = Tensor(np.array([1.0, 2.0], np.float32), requires_grad=True)
        >>> opt = SGD([w], lr=0.5)
        >>> w.grad = np.array([1.0, -1.0], np.float32)
        >>> opt.step(); w.data, w.version
        (array([0.5, 2.5], dtype=float32), 1)
        >>> opt.zero_grad(); w.grad is None
        True
    """

    def __init__(self, params: Iterable[Tensor], lr: float):
        self.params = list(params)
        if not self.params:
            raise InputError("optimizer: expected at least one parameter, found an empty list")
        self.lr = _positive("lr", lr)
        self.state: dict[int, dict] = {}  # per parameter, keyed by position in self.params
        self.steps = 0

    def zero_grad(self) -> None:
        """Set every parameter's ``.grad`` to None (the next backward pass starts from zero)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One update of every parameter that has a gradient; bumps each updated parameter's ``version``."""
        grads: dict[int, np.ndarray] = {}
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
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    ``p -= lr * v`` with ``v = momentum * v + (1 - dampening) * (grad + weight_decay * p)``; Nesterov
    uses ``grad + momentum * v`` instead of ``v``. The first step sets ``v = grad``, as PyTorch does.

    Args:
        params: the Tensors to train.
        lr: learning rate (> 0).
        momentum: in [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty added to the gradient (>= 0).
        dampening: in [0, 1].

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> w = Tensor(np.zeros(2, np.float32), requires_grad=True)
        >>> opt = SGD([w], lr=0.1, momentum=0.9)
        >>> for _ in range(2):
        ...     w.grad = np.ones(2, np.float32)
        ...     opt.step()
        >>> w.data  # -0.1 * 1, then -0.1 * (0.9 * 1 + 1)
        array([-0.29, -0.29], dtype=float32)
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, nesterov: bool = False,
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
    def momentum_value(self) -> float:
        return self.momentum

    @momentum_value.setter
    def momentum_value(self, value: float) -> None:
        self.momentum = float(value)

    def _update(self, data: np.ndarray, grad: np.ndarray, state: dict) -> None:
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
    """Adam with bias correction, as ``torch.optim.Adam``.

    ``weight_decay`` adds an L2 term to the gradient (coupled decay); use ``AdamW`` for decoupled decay.

    Args:
        params: the Tensors to train.
        lr: learning rate (> 0).
        betas: decay rates of the first and second moment estimates, each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: L2 penalty (>= 0).

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> w = Tensor(np.zeros(3, np.float32), requires_grad=True)
        >>> opt = Adam([w], lr=0.01)
        >>> w.grad = np.array([2.0, -0.5, 0.0], np.float32)
        >>> opt.step(); w.data  # the first step moves by lr * sign(grad)
        array([-0.01,  0.01,  0.  ], dtype=float32)
    """

    decoupled = False

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.betas = (_in_range("betas[0]", betas[0], 0.0, 1.0), _in_range("betas[1]", betas[1], 0.0, 1.0))
        self.eps = _positive("eps", eps)
        self.weight_decay = _in_range("weight_decay", weight_decay, 0.0, math.inf)

    @property
    def momentum_value(self) -> float:
        return self.betas[0]

    @momentum_value.setter
    def momentum_value(self, value: float) -> None:
        self.betas = (float(value), self.betas[1])

    def _update(self, data: np.ndarray, grad: np.ndarray, state: dict) -> None:
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
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``: ``p *= 1 - lr * weight_decay``
    before the Adam step.

    Args:
        params, lr, betas, eps: as ``Adam``.
        weight_decay: decoupled decay rate (>= 0), 0.01 by default as in PyTorch.

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> w = Tensor(np.ones(2, np.float32), requires_grad=True)
        >>> opt = AdamW([w], lr=0.1, weight_decay=0.5)
        >>> w.grad = np.zeros(2, np.float32)
        >>> opt.step(); w.data  # a zero gradient: only the decay, 1 - 0.1 * 0.5
        array([0.95, 0.95], dtype=float32)
    """

    decoupled = True

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


# -- learning-rate schedules ------------------------------------------------------------------------
class Schedule:
    """Base class of the learning-rate schedules: sets ``optimizer.lr = lr_at(t)`` at construction
    (t = 0) and on each ``step()`` (t = 1, 2, ...). Subclasses define ``lr_at``.

    Args:
        optimizer: the optimizer whose ``lr`` is set; its ``lr`` at construction is ``base_lr``.
    """

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0
        self._apply(0)

    def lr_at(self, t: int) -> float:
        """The learning rate after ``t`` steps (closed form, no state)."""
        raise NotImplementedError

    def _apply(self, t: int) -> None:
        self.optimizer.lr = float(self.lr_at(t))

    def step(self) -> None:
        """Advance one step and set the optimizer's rate (call after ``optimizer.step()``)."""
        self.last_step += 1
        self._apply(self.last_step)

    def get_last_lr(self) -> float:
        """The rate the optimizer uses now."""
        return self.optimizer.lr


class StepLR(Schedule):
    """Decay by ``gamma`` every ``step_size`` steps: ``lr = base_lr * gamma ** (t // step_size)``.

    Args:
        optimizer: the optimizer to schedule.
        step_size: steps between decays (an integer >= 1).
        gamma: the factor (> 0).

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> opt = SGD([Tensor(np.zeros(1, np.float32))], lr=1.0)
        >>> sched = StepLR(opt, step_size=2, gamma=0.5)
        >>> [sched.lr_at(t) for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        self.step_size = check_count("step_size", step_size)
        self.gamma = _positive("gamma", gamma)
        super().__init__(optimizer)

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(Schedule):
    """Cosine decay from ``base_lr`` to ``eta_min`` over ``T_max`` steps (PyTorch's closed form):
    ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.

    Args:
        optimizer: the optimizer to schedule.
        T_max: steps of the half cosine (an integer >= 1).
        eta_min: the final rate (>= 0).

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> opt = SGD([Tensor(np.zeros(1, np.float32))], lr=1.0)
        >>> sched = CosineAnnealingLR(opt, T_max=4)
        >>> [round(sched.lr_at(t), 4) for t in range(5)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0]
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803 - PyTorch's name
        self.T_max = check_count("T_max", T_max)
        self.eta_min = _in_range("eta_min", eta_min, 0.0, math.inf)
        super().__init__(optimizer)

    def lr_at(self, t: int) -> float:
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class OneCycleLR(Schedule):
    """The one-cycle policy of ``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing), stepped
    once per batch.

    Warms up from ``max_lr / div_factor`` to ``max_lr`` over ``pct_start`` of ``total_steps``, then
    anneals to ``max_lr / (div_factor * final_div_factor)``; with ``cycle_momentum`` the momentum (SGD
    momentum or Adam's beta1) moves the opposite way between ``max_momentum`` and ``base_momentum``.

    Args:
        optimizer: the optimizer to schedule.
        max_lr: the peak rate (> 0).
        total_steps: steps of the whole cycle; stepping past it raises ``InputError``.
        pct_start: fraction of the cycle spent warming up, in [0, 1).
        div_factor, final_div_factor: the start and end rates' divisors (> 0).
        cycle_momentum: also cycle the momentum.
        base_momentum, max_momentum: the momentum's range.

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> opt = Adam([Tensor(np.zeros(1, np.float32))], lr=1e-3)
        >>> sched = OneCycleLR(opt, max_lr=0.1, total_steps=10)
        >>> round(opt.lr, 6), opt.betas[0]  # the cycle starts at max_lr / 25 and the top momentum
        (0.004, 0.95)
        >>> round(sched.lr_at(2), 6), round(sched.lr_at(9), 8)  # the peak, then the floor
        (0.1, 4e-07)
    """

    def __init__(self, optimizer: Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3,
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
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    def _phase(self, t: int) -> tuple[float, bool]:
        """(progress in the current phase, True while warming up), as PyTorch's two-phase schedule."""
        if t > self.total_steps:
            raise InputError(f"OneCycleLR: stepped {t} times, more than total_steps={self.total_steps}")
        if t <= self.warmup_end:
            return (t / self.warmup_end if self.warmup_end > 0 else 1.0), True
        span = self.total_steps - 1 - self.warmup_end
        return ((t - self.warmup_end) / span if span > 0 else 1.0), False

    def lr_at(self, t: int) -> float:
        pct, warm = self._phase(t)
        if warm:
            return self._cos(self.initial_lr, self.max_lr, pct)
        return self._cos(self.max_lr, self.min_lr, pct)

    def momentum_at(self, t: int) -> float:
        """The momentum (SGD momentum or Adam beta1) after ``t`` steps."""
        base, top = self.momenta
        pct, warm = self._phase(t)
        return self._cos(top, base, pct) if warm else self._cos(base, top, pct)

    def _apply(self, t: int) -> None:
        super()._apply(t)
        if self.cycle_momentum:
            self.optimizer.momentum_value = self.momentum_at(t)


class LinearWarmup(Schedule):
    """Ramp linearly from ``start_factor * lr`` to ``lr`` over ``warmup_steps``, then follow ``after``
    (a schedule built on the same optimizer, whose step count starts when the warm-up ends) or stay.

    Args:
        optimizer: the optimizer to schedule.
        warmup_steps: steps of the ramp (an integer >= 1).
        start_factor: the first rate as a fraction of the target, in (0, 1].
        after: the schedule that takes over (its ``base_lr`` is the ramp's target), or None.

    Example::

        >>> import numpy as np
        >>> from microcnn.autograd import Tensor
        >>> opt = SGD([Tensor(np.zeros(1, np.float32))], lr=1.0)
        >>> sched = LinearWarmup(opt, 2, start_factor=0.5, after=StepLR(opt, 1, gamma=0.1))
        >>> [round(sched.lr_at(t), 6) for t in range(5)]
        [0.5, 0.75, 1.0, 0.1, 0.01]
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.1,
                 after: Schedule | None = None):
        self.warmup_steps = check_count("warmup_steps", warmup_steps)
        self.start_factor = _in_range("start_factor", start_factor, 0.0, 1.0, hi_open=False)
        if self.start_factor == 0:
            raise InputError("start_factor: expected a value in (0, 1], found 0 (a zero learning rate)")
        if after is not None and after.optimizer is not optimizer:
            raise InputError("LinearWarmup: `after` must schedule the same optimizer")
        self.after = after
        super().__init__(optimizer)

    def lr_at(self, t: int) -> float:
        # `after` may already have set the optimizer's rate at its own step 0; its base rate is the target
        base = self.after.base_lr if self.after is not None else self.base_lr
        if t < self.warmup_steps:
            return base * (self.start_factor + (1 - self.start_factor) * t / self.warmup_steps)
        return self.after.lr_at(t - self.warmup_steps) if self.after is not None else base
