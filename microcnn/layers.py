"""Layers: parameters plus a forward pass that calls kernels.

Each layer has two forward paths. ``forward(ndarray)`` is inference on plain float32 NCHW arrays
and is what ``predict`` uses. ``forward_tensor(Tensor)`` records the op on the autograd tape for
training. ``layer(x)`` picks the path from the argument's type, as ``nn.Module.__call__`` would.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np

from . import autograd as ag
from .autograd import Tensor
from .checks import check_count, int_pair
from .convolution import conv2d_forward
from .errors import InputError
from .kernels import elementwise, pool
from .kernels.gemm import linear_forward
from .kernels.shapes import conv_output_size


class Layer:
    """Base class. Subclasses set ``forward`` and ``forward_tensor``; parametrised ones ``parameters``.

    Attributes may change after construction, and what runs next uses the new values: assigning a
    Tensor of the same shape to ``weight`` or ``bias``, a new ``stride``/``padding`` (validated as the
    constructor does) or conv ``algorithm``. Attributes the parameters' shapes follow from
    (``_FIXED``: kernel size, channels, features) are refused: build a new layer for another shape.
    """

    # Attribute assignments on all layers so far: compiled programs (``network``) compare it to know
    # that no layer has changed since they were built, in one integer comparison per call.
    edits = 0
    _FIXED: tuple[str, ...] = ()  # set once by the constructor
    _PAIRS: dict[str, int] = {}  # (int, int) hyperparameters that may change: name -> minimum value
    _TENSORS: tuple[str, ...] = ()  # parameters, replaceable by a Tensor of the same shape
    _BUFFERS: tuple[str, ...] = ()  # saved float32 (features,) arrays that are not parameters
    # Training mode (``train()``/``eval()``, as PyTorch's, on by default): only ``forward_tensor`` of
    # BatchNorm and Dropout reads it. ``forward`` on arrays is inference whatever the mode.
    training = True
    # ``forward`` may return its input or a view of it (Flatten, Dropout): Sequential must not then
    # let a later ReLU overwrite that array in place.
    passes_input = False

    def __setattr__(self, name, value):
        if name in self.__dict__:
            value = self._checked(name, value)
        object.__setattr__(self, name, value)
        Layer.edits += 1

    def _checked(self, name, value):
        """``value`` for a change of the attribute ``name`` after construction, or InputError."""
        if name in self._FIXED:
            raise InputError(f"{self.type}.{name} is fixed once the layer is built (its weights' shape "
                             f"follows from it); build a new {self.type} for another {name}")
        if name in self._PAIRS:
            pair = int_pair(value, f"{self.type}.{name}")
            minimum = self._PAIRS[name]
            if min(pair) < minimum:
                raise InputError(f"{self.type}.{name}: expected values >= {minimum}, found {value!r}")
            return pair
        if name in self._BUFFERS:
            shape = self.__dict__[name].shape
            arr = np.asarray(value) if isinstance(value, np.ndarray | list | tuple) else None
            if arr is None or arr.shape != shape or arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise InputError(f"{self.type}.{name}: expected finite floats of shape {shape}, found "
                                 f"{getattr(arr, 'shape', type(value).__name__)}")
            return np.array(arr, np.float32)
        if name == "training":
            return bool(value)
        if name in self._TENSORS:
            shape = self.__dict__["weight"].data.shape
            shape = shape[:1] if name == "bias" else shape
            if isinstance(value, Tensor) and value.data.shape == shape or name == "bias" and value is None:
                return value
            found = f"shape {value.data.shape}" if isinstance(value, Tensor) else type(value).__name__
            raise InputError(f"{self.type}.{name}: expected a Tensor of shape {shape}, found {found}; to "
                             f"change weights, edit {name}.data in place ({name}.data[...] = values) "
                             "or use Sequential.load_state_dict")
        return value

    def __call__(self, x):
        return self.forward_tensor(x) if isinstance(x, Tensor) else self.forward(x)

    def forward(self, x):
        """Inference on an array (N, ...): every layer type defines its own."""
        raise NotImplementedError(f"{self.type} defines no forward")

    def parameters(self) -> list[Tensor]:
        return []

    def buffers(self) -> dict[str, np.ndarray]:
        """Saved arrays that are not trained parameters (BatchNorm's running statistics), by name."""
        return {name: getattr(self, name) for name in self._BUFFERS}

    def named_state(self) -> list[tuple[str, np.ndarray]]:
        """Every array a state dict holds for this layer, by name: ``weight``, ``bias``, then the
        buffers. The arrays themselves (not copies): loading writes into them."""
        params = [(n, p.data) for n, p in zip(("weight", "bias"), self.parameters(), strict=False)]
        return params + list(self.buffers().items())

    def train(self, mode: bool = True) -> Layer:
        self.training = mode
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def _check_input(self, x) -> None:
        """Refuse an input (N, ...) this layer cannot take; by default any is accepted."""

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild the layer (weights are stored apart)."""
        return {}

    def output_shape(self, shape: tuple) -> tuple:
        """Shape of one sample's output given one sample's input shape (no batch axis)."""
        return shape

    @property
    def type(self) -> str:
        return type(self).__name__

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{self.type}({args})"


def bias_or_zeros(layer) -> np.ndarray:
    """A Conv2d's or Linear's bias array, or zeros when it has none: what the kernels take."""
    if layer.bias is not None:
        return layer.bias.data
    return np.zeros(layer.weight.data.shape[0], np.float32)


def _uniform_init(rng, shape, fan_in) -> np.ndarray:
    # PyTorch's default (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Conv2d(Layer):
    """2-D cross-correlation over NCHW float32 images, PyTorch's ``nn.Conv2d``.

    Args:
        in_channels, out_channels: C and O.
        kernel_size, stride, padding: an int or a pair (zero padding on both sides).
        bias: whether to add a learned (O,) bias.
        algorithm: how it is computed (``convolution.ALGORITHMS``, default ``"im2col"``; ``"auto"``
            times them per input shape); every algorithm computes the same convolution (Winograd and
            FFT fall back to im2col, with a warning, for dilation or groups).
        rng: a ``numpy.random.Generator`` for the He-uniform initialisation (default seed 0).
        dilation: spacing of the kernel's taps (an int or a pair).
        groups: C and O are split into ``groups`` groups; output group g sees input group g only
            (``groups == C``: depthwise). Weights are (O, C / groups, kh, kw).

    Shape:
        input (N, C, H, W) -> output (N, O, H', W') with
        H' = ``kernels.shapes.conv_output_size(H, kh, sh, ph, dh)`` (likewise W').

    Example::

        >>> conv = Conv2d(1, 6, 5, padding=2); conv.forward(np.zeros((2, 1, 28, 28), np.float32)).shape
        (2, 6, 28, 28)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 algorithm="im2col", rng=None, dilation=1, groups=1):
        self.in_channels = check_count("Conv2d in_channels", in_channels)
        self.out_channels = check_count("Conv2d out_channels", out_channels)
        self.groups = _check_groups(in_channels, out_channels, groups)
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = int_pair(stride, "stride")
        self.padding = int_pair(padding, "padding")
        self.dilation = int_pair(dilation, "dilation")
        if (min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0
                or min(self.dilation) < 1):
            raise InputError(
                f"Conv2d: expected kernel_size>=1, stride>=1, padding>=0, dilation>=1, found "
                f"{self.kernel_size}, {self.stride}, {self.padding}, {self.dilation}"
            )
        rng = rng if rng is not None else np.random.default_rng(0)
        kh, kw = self.kernel_size
        fan_in = self.in_channels // self.groups * kh * kw
        shape = (out_channels, in_channels // self.groups, kh, kw)
        self.weight = Tensor(_uniform_init(rng, shape, fan_in), True)
        self.bias = Tensor(_uniform_init(rng, (out_channels,), fan_in), True) if bias else None
        self.algorithm = algorithm
        self.conv_state: dict = {}  # prepared weights and the algorithm actually used

    _FIXED = ("in_channels", "out_channels", "kernel_size", "groups")
    _PAIRS = {"stride": 1, "padding": 0, "dilation": 1}
    _TENSORS = ("weight", "bias")

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) prepares its own kernels: the cached ones read this layer's
        # weight array, and copying a function keeps what it reads.
        return {**self.__dict__, "conv_state": {}}

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self):
        cfg = dict(in_channels=self.in_channels, out_channels=self.out_channels,
                   kernel_size=list(self.kernel_size), stride=list(self.stride),
                   padding=list(self.padding), bias=self.bias is not None)
        # Only when not the default: files written before dilation and groups existed keep their
        # architecture (loading compares it).
        if self.dilation != (1, 1):
            cfg["dilation"] = list(self.dilation)
        if self.groups != 1:
            cfg["groups"] = self.groups
        return cfg

    def output_shape(self, chw):
        c, h, w = chw
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (self.out_channels, conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw))

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"{self!r}: expected input (N, {self.in_channels}, H, W), found {tuple(x.shape)}"
            )
        (kh, kw), (ph, pw), (dh, dw) = self.kernel_size, self.padding, self.dilation
        if x.shape[2] + 2 * ph < dh * (kh - 1) + 1 or x.shape[3] + 2 * pw < dw * (kw - 1) + 1:
            raise InputError(f"{self!r}: input {tuple(x.shape)} is smaller than the kernel (dilated by "
                             f"{self.dilation})")

    def forward(self, x, pool: MaxPool2d | None = None, relu: bool = False, out: np.ndarray | None = None):
        """Inference. ``relu`` (a ReLU after this layer) and ``pool`` (the MaxPool2d after that) are
        applied in the same pass: Sequential fuses Conv2d [ReLU] [MaxPool2d] this way. ``out``: an
        array the result may be written into (``convolution.conv2d_forward``); the result is returned."""
        self._check_input(x)
        geom = None
        if pool is not None:
            pool.check_shape(self.output_shape(x.shape[1:]))
            geom = pool.geometry()
        return conv2d_forward(x, self.weight.data, bias_or_zeros(self), self.stride, self.padding,
                              self.algorithm, self.conv_state, geom, relu, self.dilation, self.groups, out)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _check_groups(in_channels, out_channels, groups) -> int:
    groups = check_count("Conv2d groups", groups)
    if in_channels % groups or out_channels % groups:
        raise InputError(f"Conv2d: groups ({groups}) must divide in_channels ({in_channels}) and "
                         f"out_channels ({out_channels})")
    return groups


class Linear(Layer):
    """Affine map ``y = x @ W.T + b``, PyTorch's ``nn.Linear`` layout (W is (out, in)).

    Args:
        in_features, out_features: sizes of each input and output row.
        bias: whether to add a learned (out,) bias.
        rng: a ``numpy.random.Generator`` for the initialisation (default seed 0).

    Shape:
        input (N, in_features) -> output (N, out_features).
    """

    def __init__(self, in_features, out_features, bias=True, rng=None):
        self.in_features = check_count("Linear in_features", in_features)
        self.out_features = check_count("Linear out_features", out_features)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.weight = Tensor(_uniform_init(rng, (out_features, in_features), in_features), True)
        self.bias = Tensor(_uniform_init(rng, (out_features,), in_features), True) if bias else None

    _FIXED = ("in_features", "out_features")
    _TENSORS = ("weight", "bias")

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None)

    def output_shape(self, shape):
        return (self.out_features,)

    def _check_input(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise InputError(f"{self!r}: expected input (N, {self.in_features}), found {tuple(x.shape)}")

    def forward(self, x, relu: bool = False):
        """Inference; ``relu``: a ReLU after this layer, in the same pass (Sequential fuses them)."""
        self._check_input(x)
        return linear_forward(x, self.weight.data, bias_or_zeros(self), relu)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.linear(x, self.weight, self.bias)


class ReLU(Layer):
    """max(x, 0), elementwise; any shape."""

    def forward(self, x, inplace: bool = False):
        """``inplace`` overwrites ``x``: Sequential uses it on intermediates it owns, never on user input."""
        if inplace and x.flags.c_contiguous:
            elementwise.relu_inplace(x.reshape(-1))
            return x
        return elementwise.relu(x.reshape(-1)).reshape(x.shape)

    def forward_tensor(self, x):
        return ag.relu(x)


class Sigmoid(Layer):
    """1 / (1 + exp(-x)), elementwise; any shape."""

    def forward(self, x):
        return elementwise.sigmoid(x.reshape(-1)).reshape(x.shape)

    def forward_tensor(self, x):
        return ag.sigmoid(x)


class _Activation(Layer):
    """An elementwise ``kernels.elementwise.activation`` of kind ``_KIND`` with parameters ``_args()``."""

    _KIND = elementwise.CLAMP

    def _args(self) -> tuple[float, float]:
        return (0.0, 0.0)

    def forward(self, x):
        a, b = (np.float32(v) for v in self._args())
        return elementwise.activation(x.reshape(-1), self._KIND, a, b).reshape(x.shape)

    def forward_tensor(self, x):
        return ag.activation(x, self._KIND, *self._args())


class ReLU6(_Activation):
    """min(max(x, 0), 6), elementwise; any shape (PyTorch's ``nn.ReLU6``, ONNX ``Clip(0, 6)``)."""

    def _args(self):
        return (0.0, 6.0)


class LeakyReLU(_Activation):
    """x for x > 0, else ``negative_slope`` * x; any shape (PyTorch's ``nn.LeakyReLU``)."""

    _KIND = elementwise.LEAKY_RELU

    def __init__(self, negative_slope=0.01):
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, int | float) \
                or not math.isfinite(negative_slope):
            raise InputError(f"LeakyReLU: expected a finite number negative_slope, found {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def config(self):
        return dict(negative_slope=self.negative_slope)

    def _args(self):
        return (self.negative_slope, 0.0)


class Tanh(_Activation):
    """tanh(x), elementwise; any shape."""

    _KIND = elementwise.TANH


class Dropout(Layer):
    """Inverted dropout (PyTorch's ``nn.Dropout``): in training mode (``forward_tensor`` while
    ``training``) each value is zeroed with probability ``p`` and the others are scaled by 1 / (1 - p);
    inference (``forward`` on arrays, or ``eval()``) is the identity.

    Args:
        p: the probability of zeroing, 0 <= p <= 1.
        rng: a ``numpy.random.Generator`` the masks are drawn from (default seed 0): the same seed
            gives the same masks.
    """

    passes_input = True

    def __init__(self, p=0.5, rng=None):
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise InputError(f"Dropout: expected a probability 0 <= p <= 1, found {p!r}")
        self.p = float(p)
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def config(self):
        return dict(p=self.p)

    def forward(self, x):
        return x

    def forward_tensor(self, x):
        if not self.training or self.p == 0:
            return x
        return ag.dropout(x, self.p, self.rng)


class _BatchNorm(Layer):
    """PyTorch's batch normalization over the channel axis (axis 1).

    ``forward_tensor`` in training mode normalises with the batch's statistics and updates the running
    ones (``running = (1 - momentum) * running + momentum * batch``, the variance unbiased);
    ``forward_tensor`` in eval mode and ``forward`` on arrays (inference, whatever the mode) use the
    running statistics: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: weight of the batch statistics in the running update, 0 <= momentum <= 1.
    """

    _NDIMS: tuple[int, ...] = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.num_features = check_count(f"{self.type} num_features", num_features)
        for name, value, ok in (("eps", eps, lambda v: v > 0), ("momentum", momentum, lambda v: 0 <= v <= 1)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise InputError(f"{self.type}: {name} out of range, found {value!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = Tensor(np.ones(num_features, np.float32), True)
        self.bias = Tensor(np.zeros(num_features, np.float32), True)
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)

    _FIXED = ("num_features",)
    _TENSORS = ("weight", "bias")
    _BUFFERS = ("running_mean", "running_var")

    def parameters(self):
        return [self.weight, self.bias]

    def config(self):
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum)

    def _check_input(self, x):
        if x.ndim not in self._NDIMS or x.shape[1] != self.num_features:
            dims = " or ".join(f"{x_}-D" for x_ in self._NDIMS)
            raise InputError(f"{self!r}: expected a {dims} input (N, {self.num_features}, ...), found "
                             f"{tuple(x.shape)}")

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) float32 (C,): inference is x * scale + shift, per channel."""
        return ag.batch_norm_affine(self.weight.data, self.bias.data, self.running_mean, self.running_var,
                                    self.eps)

    def forward(self, x):
        self._check_input(x)
        scale, shift = self.affine()
        x3 = np.ascontiguousarray(x, np.float32).reshape(x.shape[0], x.shape[1], -1)
        return elementwise.channel_affine(x3, scale, shift).reshape(x.shape)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training,
                             self.momentum, self.eps)


class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) maps, statistics per channel over N, H, W (see ``_BatchNorm``)."""

    _NDIMS = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) features or (N, C, L) sequences, statistics per channel (see ``_BatchNorm``)."""

    _NDIMS = (2, 3)


def fold_batchnorm(layer, bn):
    """A new Conv2d (or Linear) computing ``bn(layer(x))`` in inference: weights scaled per output
    channel by gamma / sqrt(running_var + eps), bias (b - running_mean) * scale + beta, computed in
    float64 and rounded once to float32. Same result as the two layers up to float32 rounding (tests:
    within 1e-5 relative); the layer and bn are left as they are."""
    expected = {Conv2d: BatchNorm2d, Linear: BatchNorm1d}.get(type(layer))
    if expected is None or type(bn) is not expected:
        raise InputError(f"fold_batchnorm: expected Conv2d + BatchNorm2d or Linear + BatchNorm1d, found "
                         f"{type(layer).__name__} + {type(bn).__name__}")
    out = layer.out_channels if isinstance(layer, Conv2d) else layer.out_features
    if bn.num_features != out:
        raise InputError(f"fold_batchnorm: {bn!r} does not fit the {out} outputs of {layer!r}")
    scale, shift = ag.batch_norm_affine(bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var,
                                        bn.eps, np.float64)
    folded = type(layer)(**{**layer.config(), "bias": True})
    if isinstance(layer, Conv2d):
        folded.algorithm = layer.algorithm
    w = layer.weight.data.astype(np.float64)
    folded.weight.data[...] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b = bias_or_zeros(layer).astype(np.float64)
    folded.bias.data[...] = b * scale + shift
    return folded


class _Pool2d(Layer):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = int_pair(stride if stride is not None else kernel_size, "stride")
        self.padding = int_pair(padding, "padding")
        if not isinstance(ceil_mode, bool | np.bool_):
            raise InputError(f"{self.type}: expected ceil_mode True or False, found {ceil_mode!r}")
        self.ceil_mode = bool(ceil_mode)
        pool.check_pool_geometry(self.geometry(), self.type)

    _PAIRS = {"kernel_size": 1, "stride": 1, "padding": 0}

    def _checked(self, name, value):
        value = super()._checked(name, value)
        if name in self._PAIRS:  # the new value must fit the others (padding <= half the window)
            geom = {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                    name: value}
            pool.check_pool_geometry(pool.PoolGeometry(*geom["kernel_size"], *geom["stride"],
                                                       *geom["padding"]), self.type)
        return bool(value) if name == "ceil_mode" else value

    def geometry(self) -> pool.PoolGeometry:
        """The window, stride, padding and ceil mode as the kernels take them."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return pool.PoolGeometry(kh, kw, sh, sw, ph, pw, int(self.ceil_mode))

    def config(self):
        cfg = dict(kernel_size=list(self.kernel_size), stride=list(self.stride))
        if self.padding != (0, 0):  # only when not the default: older files keep their architecture
            cfg["padding"] = list(self.padding)
        if self.ceil_mode:
            cfg["ceil_mode"] = True
        return cfg

    def output_shape(self, chw):
        c, h, w = chw
        return (c, *pool.pooled_shape(h, w, self.geometry()))

    def _check_input(self, x):
        if x.ndim != 4:
            self._refuse(x.shape)
        self.check_shape(x.shape[1:], x.shape)

    def check_shape(self, chw, found=None):
        """Refuse a (C, H, W) sample shape smaller than the window (``found``: the whole input's shape)."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if chw[1] + 2 * ph < kh or chw[2] + 2 * pw < kw:
            self._refuse(found if found is not None else ("N", *chw))

    def _refuse(self, found):
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        raise InputError(f"{self!r}: expected input (N, C, H>={kh - 2 * ph}, W>={kw - 2 * pw}), found "
                         f"{tuple(found)}")


class MaxPool2d(_Pool2d):
    """Max over ``kernel_size`` windows moved by ``stride`` (default: the kernel size), PyTorch's
    ``nn.MaxPool2d`` without dilation: ``padding`` cells are -inf, ``ceil_mode`` keeps a last partial
    window (one that starts inside the input or its left padding).

    Shape:
        input (N, C, H, W) -> output (N, C, H', W'), H' = ``kernels.pool.pool_output_size(H, kh, sh,
        ph, ceil_mode)`` (likewise W').
    """

    def forward(self, x, relu: bool = False):
        """``relu=True`` computes MaxPool(ReLU(x)) in one pass (exact: max and relu commute)."""
        self._check_input(x)
        return pool.maxpool2d(x, *self.geometry(), floor=0 if relu else None)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


class AvgPool2d(_Pool2d):
    """Mean over ``kernel_size`` windows moved by ``stride`` (default: the kernel size), PyTorch's
    ``nn.AvgPool2d``: zero ``padding`` counted in the divisor when ``count_include_pad`` (the default),
    else only the real cells are; shapes as ``MaxPool2d``."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        if not isinstance(count_include_pad, bool | np.bool_):
            raise InputError(f"AvgPool2d: expected count_include_pad True or False, found "
                             f"{count_include_pad!r}")
        self.count_include_pad = bool(count_include_pad)

    def config(self):
        cfg = super().config()
        if not self.count_include_pad:
            cfg["count_include_pad"] = False
        return cfg

    def forward(self, x):
        self._check_input(x)
        return pool.avgpool2d(x, *self.geometry(), count_include_pad=self.count_include_pad)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad)


class GlobalAvgPool2d(Layer):
    """The mean of every map: (N, C, H, W) -> (N, C, 1, 1), as PyTorch's ``nn.AdaptiveAvgPool2d(1)``
    (ONNX ``GlobalAveragePool``)."""

    def _check_input(self, x):
        if x.ndim != 4:
            raise InputError(f"GlobalAvgPool2d: expected an (N, C, H, W) input, found {tuple(x.shape)}")

    def output_shape(self, chw):
        return (chw[0], 1, 1)

    def forward(self, x):
        self._check_input(x)
        return pool.avgpool2d(x, x.shape[2], x.shape[3], 1, 1)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.global_avg_pool2d(x)


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)), C-order (as PyTorch's ``nn.Flatten``)."""

    passes_input = True

    def forward(self, x):
        return x.reshape(x.shape[0], -1)

    def forward_tensor(self, x):
        return ag.flatten(x)

    def output_shape(self, chw):
        return (int(np.prod(chw)),)


class Softmax(Layer):
    """Softmax over the class axis of (N, K) scores."""

    def _check_input(self, x):
        if x.ndim != 2:
            raise InputError(f"Softmax: expected (N, K) scores, found shape {tuple(x.shape)}")

    def forward(self, x):
        self._check_input(x)
        return elementwise.softmax_rows(np.ascontiguousarray(x))

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.softmax(x)


LAYER_TYPES = {cls.__name__: cls for cls in
               (Conv2d, Linear, ReLU, Sigmoid, MaxPool2d, AvgPool2d, Flatten, Softmax, ReLU6, LeakyReLU, Tanh,
                Dropout, BatchNorm2d, BatchNorm1d, GlobalAvgPool2d)}


# Constructor arguments that say how this process computes, not what the layer is: never read from a file.
_RUNTIME_ARGS = ("rng", "algorithm")


@functools.cache
def _init_parameters(cls) -> frozenset:
    return frozenset(inspect.signature(cls).parameters)


def _class_and_args(cfg) -> tuple[type, dict]:
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        raise InputError(f"unknown layer type {kind!r}; expected one of {sorted(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    args = {k: v for k, v in cfg.items() if k != "type"}
    unknown = sorted((set(args) - _init_parameters(cls)) | (set(args) & set(_RUNTIME_ARGS)))
    if unknown:
        raise InputError(f"bad arguments for {kind}: {args} (unexpected {unknown})")
    return cls, args


def layer_from_config(cfg: dict) -> Layer:
    """Rebuild a layer from ``{"type": name, **config()}``; unknown types or arguments are refused."""
    cls, args = _class_and_args(cfg)
    try:
        return cls(**args)
    except TypeError as exc:
        raise InputError(f"bad arguments for {cls.__name__}: {args} ({exc})") from None


def state_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays ``layer_from_config(cfg)`` would hold in a state dict (``named_state``),
    by name, found without allocating them: loaders compare them with a file's contents before building."""
    cls, args = _class_and_args(cfg)
    if cls not in (Conv2d, Linear, BatchNorm2d, BatchNorm1d):
        return {}
    try:
        bound = inspect.signature(cls).bind(**args)
    except TypeError as exc:
        raise InputError(f"bad arguments for {cls.__name__}: {args} ({exc})") from None
    bound.apply_defaults()
    a = bound.arguments
    if issubclass(cls, _BatchNorm):
        c = (check_count(f"{cls.__name__} num_features", a["num_features"]),)
        return dict(weight=c, bias=c, running_mean=c, running_var=c)
    if cls is Conv2d:
        out = check_count("Conv2d out_channels", a["out_channels"])
        cin = check_count("Conv2d in_channels", a["in_channels"])
        groups = _check_groups(cin, out, a["groups"])
        weight: tuple[int, ...] = (out, cin // groups, *int_pair(a["kernel_size"], "kernel_size"))
    else:
        out = check_count("Linear out_features", a["out_features"])
        weight = (out, check_count("Linear in_features", a["in_features"]))
    if min(weight) < 1:
        raise InputError(f"{cls.__name__}: expected kernel_size >= 1, found {weight[2:]}")
    return dict(weight=weight, bias=(out,)) if a["bias"] else dict(weight=weight)
