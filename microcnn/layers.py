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

    def parameters(self) -> list[Tensor]:
        return []

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
    """2-D cross-correlation over NCHW float32 images, PyTorch's ``nn.Conv2d`` without groups/dilation.

    Args:
        in_channels, out_channels: C and O.
        kernel_size, stride, padding: an int or a pair (zero padding on both sides).
        bias: whether to add a learned (O,) bias.
        algorithm: how it is computed (``convolution.ALGORITHMS``, default ``"im2col"``; ``"auto"``
            times them per input shape); every algorithm computes the same convolution.
        rng: a ``numpy.random.Generator`` for the He-uniform initialisation (default seed 0).

    Shape:
        input (N, C, H, W) -> output (N, O, H', W') with
        H' = ``kernels.shapes.conv_output_size(H, kh, sh, ph)`` (likewise W').

    Example::

        >>> conv = Conv2d(1, 6, 5, padding=2); conv.forward(np.zeros((2, 1, 28, 28), np.float32)).shape
        (2, 6, 28, 28)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 algorithm="im2col", rng=None):
        self.in_channels = check_count("Conv2d in_channels", in_channels)
        self.out_channels = check_count("Conv2d out_channels", out_channels)
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = int_pair(stride, "stride")
        self.padding = int_pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise InputError(
                f"Conv2d: expected kernel_size>=1, stride>=1, padding>=0, found "
                f"{self.kernel_size}, {self.stride}, {self.padding}"
            )
        rng = rng if rng is not None else np.random.default_rng(0)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        self.weight = Tensor(_uniform_init(rng, (out_channels, in_channels, kh, kw), fan_in), True)
        self.bias = Tensor(_uniform_init(rng, (out_channels,), fan_in), True) if bias else None
        self.algorithm = algorithm
        self.conv_state: dict = {}  # prepared weights and the algorithm actually used

    _FIXED = ("in_channels", "out_channels", "kernel_size")
    _PAIRS = {"stride": 1, "padding": 0}
    _TENSORS = ("weight", "bias")

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) prepares its own kernels: the cached ones read this layer's
        # weight array, and copying a function keeps what it reads.
        return {**self.__dict__, "conv_state": {}}

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=list(self.padding), bias=self.bias is not None)

    def output_shape(self, chw):
        c, h, w = chw
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return self.out_channels, conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"{self!r}: expected input (N, {self.in_channels}, H, W), found {tuple(x.shape)}"
            )
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise InputError(f"{self!r}: input {tuple(x.shape)} is smaller than the kernel")

    def forward(self, x, pool: MaxPool2d | None = None, relu: bool = False):
        """Inference. ``relu`` (a ReLU after this layer) and ``pool`` (the MaxPool2d after that) are
        applied in the same pass: Sequential fuses Conv2d [ReLU] [MaxPool2d] this way."""
        self._check_input(x)
        if pool is not None:
            pool.check_shape(self.output_shape(x.shape[1:]))
            pool = (*pool.kernel_size, *pool.stride)
        return conv2d_forward(x, self.weight.data, bias_or_zeros(self), self.stride, self.padding,
                              self.algorithm, self.conv_state, pool, relu)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.conv2d(x, self.weight, self.bias, self.stride, self.padding)


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


class _Pool2d(Layer):
    def __init__(self, kernel_size, stride=None):
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = int_pair(stride if stride is not None else kernel_size, "stride")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise InputError(f"{self.type}: expected kernel_size>=1 and stride>=1, found "
                             f"{self.kernel_size}, {self.stride}")

    _PAIRS = {"kernel_size": 1, "stride": 1}

    def config(self):
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride))

    def output_shape(self, chw):
        c, h, w = chw
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return c, conv_output_size(h, kh, sh), conv_output_size(w, kw, sw)

    def _check_input(self, x):
        if x.ndim != 4:
            self._refuse(x.shape)
        self.check_shape(x.shape[1:], x.shape)

    def check_shape(self, chw, found=None):
        """Refuse a (C, H, W) sample shape smaller than the window (``found``: the whole input's shape)."""
        if chw[1] < self.kernel_size[0] or chw[2] < self.kernel_size[1]:
            self._refuse(found if found is not None else ("N", *chw))

    def _refuse(self, found):
        raise InputError(f"{self!r}: expected input (N, C, H>={self.kernel_size[0]}, "
                         f"W>={self.kernel_size[1]}), found {tuple(found)}")


class MaxPool2d(_Pool2d):
    """Max over ``kernel_size`` windows moved by ``stride`` (default: the kernel size), no padding.

    Shape:
        input (N, C, H, W) -> output (N, C, conv_output_size(H, kh, sh), conv_output_size(W, kw, sw)).
    """

    def forward(self, x, relu: bool = False):
        """``relu=True`` computes MaxPool(ReLU(x)) in one pass (exact: max and relu commute)."""
        self._check_input(x)
        return pool.maxpool2d(x, *self.kernel_size, *self.stride, floor=0 if relu else None)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2d(_Pool2d):
    """Mean over ``kernel_size`` windows moved by ``stride`` (default: the kernel size), no padding;
    shapes as ``MaxPool2d``."""

    def forward(self, x):
        self._check_input(x)
        return pool.avgpool2d(x, *self.kernel_size, *self.stride)

    def forward_tensor(self, x):
        self._check_input(x.data)
        return ag.avg_pool2d(x, self.kernel_size, self.stride)


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)), C-order (as PyTorch's ``nn.Flatten``)."""

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
               (Conv2d, Linear, ReLU, Sigmoid, MaxPool2d, AvgPool2d, Flatten, Softmax)}


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


def parameter_shapes(cfg: dict) -> list[tuple[int, ...]]:
    """Shapes of the parameters ``layer_from_config(cfg)`` would create, in ``parameters()`` order,
    found without allocating them: loaders compare them with a file's contents before building."""
    cls, args = _class_and_args(cfg)
    if cls not in (Conv2d, Linear):
        return []
    try:
        a = inspect.signature(cls).bind(**args)
    except TypeError as exc:
        raise InputError(f"bad arguments for {cls.__name__}: {args} ({exc})") from None
    a.apply_defaults()
    a = a.arguments
    if cls is Conv2d:
        out = check_count("Conv2d out_channels", a["out_channels"])
        weight = (out, check_count("Conv2d in_channels", a["in_channels"]),
                  *int_pair(a["kernel_size"], "kernel_size"))
    else:
        out = check_count("Linear out_features", a["out_features"])
        weight = (out, check_count("Linear in_features", a["in_features"]))
    if min(weight) < 1:
        raise InputError(f"{cls.__name__}: expected kernel_size >= 1, found {weight[2:]}")
    return [weight, (out,)] if a["bias"] else [weight]
