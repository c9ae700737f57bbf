"""Sequential: an ordered list of layers with batched inference, tracing and state dicts."""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from .autograd import Tensor
from .checks import check_array_batch
from .errors import InputError
from .kernels import program
from .kernels.elementwise import same_bits
from .layers import (
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Softmax,
    bias_or_zeros,
    layer_from_config,
)
from .model import INPUT, LayerNode, LayerTrace, Model

__all__ = ["BATCHNORM_TYPES", "PROGRAM_MAX_BATCH", "CompiledProgram", "FloatModel", "FoldedPair",
           "FusedGroup", "LayerTrace", "Sequential", "Workspace", "fold_pair", "folds_into", "fuse_chain",
           "layer_names", "run_groups"]

_SHORT_NAMES = {"Conv2d": "conv", "Linear": "fc", "MaxPool2d": "pool", "AvgPool2d": "pool",
                "ReLU": "relu", "Sigmoid": "sigmoid", "Flatten": "flatten", "Softmax": "softmax"}


def layer_names(layers) -> list[str]:
    """Readable names numbered per kind (conv1, relu1, pool1, ..., fc1), as the reference tool prints."""
    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        short = _SHORT_NAMES.get(layer.type, layer.type.lower())
        counts[short] = counts.get(short, 0) + 1
        sep = "_" if short[-1].isdigit() else ""  # relu6_1, not relu61
        names.append(f"{short}{sep}{counts[short]}")
    for short in ("flatten", "softmax"):  # singletons read better without a number
        if counts.get(short) == 1:
            names[names.index(f"{short}1")] = short
    return names


BATCHNORM_TYPES = ("BatchNorm2d", "BatchNorm1d")  # by type name, as the file formats name layers


def folds_into(layer, bn) -> bool:
    """Whether ``bn`` is a batch norm that ``layers.fold_batchnorm`` merges into ``layer`` (its input)."""
    return bn.type in BATCHNORM_TYPES and isinstance(layer, Conv2d | Linear)


def fold_pair(layer, bn) -> Layer:
    """``layers.fold_batchnorm(layer, bn)``: a new Conv2d/Linear computing ``bn(layer(x))`` with running
    statistics (inference). Looked up at call time: the function comes with the BatchNorm layers."""
    from . import layers

    return layers.fold_batchnorm(layer, bn)


_F32 = np.dtype(np.float32)
# Batches up to this size run as a compiled program; larger ones go layer by layer, where the
# convolutions split the batch over Numba's threads and per-call costs no longer matter.
PROGRAM_MAX_BATCH = 32


class FoldedPair:
    """The folded Conv2d/Linear (``fold_pair``) of a (layer, BatchNorm) pair, made once and reused while
    its sources stay as they were: the same layer settings (configuration, conv algorithm, eps) and
    the bits of every source array (weights, bias, gamma, beta, running statistics) equal to the copies
    taken when it was made -- compared per call, so in-place edits (an optimizer step, a running
    statistic updated in training mode) refold it. The same fold as ``fold_batchnorm()``: same bits."""

    def __init__(self):
        self.folded: Layer | None = None
        self.key: tuple | None = None
        self.sources: list[np.ndarray] = []

    @staticmethod
    def _arrays(layer, bn) -> list[np.ndarray]:
        return [*(p.data for p in layer.parameters()), *(p.data for p in bn.parameters()),
                *(arr for _, arr in bn.named_state())]

    def get(self, layer, bn) -> Layer:
        # Not ``Layer.edits``: that counts every assignment anywhere, the new folded layers' included.
        key = (str(layer.config()), getattr(layer, "algorithm", None), bn.eps)
        arrays = self._arrays(layer, bn)
        if (self.folded is None or self.key != key or len(arrays) != len(self.sources)
                or not all(_same_values(a, s) for a, s in zip(arrays, self.sources, strict=True))):
            self.folded = fold_pair(layer, bn)
            self.key, self.sources = key, [np.array(a, copy=True) for a in arrays]
        return self.folded


def _same_values(a: np.ndarray, snapshot: np.ndarray) -> bool:
    """Whether ``a`` holds the bits of ``snapshot`` (a C-contiguous copy of an earlier ``a``)."""
    if a.dtype != snapshot.dtype or a.shape != snapshot.shape:
        return False
    if a.dtype == _F32 and a.flags.c_contiguous:
        return same_bits(a, snapshot)
    return np.ascontiguousarray(a).tobytes() == snapshot.tobytes()


@dataclass(frozen=True)
class FusedGroup:
    """One inference call of a chain of layers (``fuse_chain``): ``layer`` alone; a Conv2d or Linear
    followed by a BatchNorm it folds (``bn``: the call uses the folded layer, ``FoldedPair``), a ReLU
    (``relu``) and, for Conv2d, the MaxPool2d ``pool``; or a MaxPool2d whose input passes a ReLU
    first (``relu``).
    ``owned``: the input is an intermediate the network made, so a lone ReLU may overwrite it."""

    layer: Layer
    pool: MaxPool2d | None
    relu: bool
    owned: bool
    bn: Layer | None = None
    fold: FoldedPair = field(default_factory=FoldedPair, compare=False, repr=False)

    def run(self, x, out: np.ndarray | None = None):
        """The checked call (the layers validate x); ``out``: an array a convolution may write its result
        into (only given where ``writes_into``)."""
        layer = self.layer if self.bn is None else self.fold.get(self.layer, self.bn)
        if isinstance(layer, Conv2d):
            if out is not None:
                return layer.forward(x, pool=self.pool, relu=self.relu, out=out)
            return layer.forward(x, pool=self.pool, relu=self.relu)
        if isinstance(layer, Linear | MaxPool2d):
            return layer.forward(x, relu=self.relu)
        if isinstance(layer, ReLU):
            return layer.forward(x, inplace=self.owned)
        return layer.forward(x)

    @property
    def writes_into(self) -> bool:
        """Whether ``run`` takes an ``out`` array: convolutions of the exact type (a subclass may define
        its own ``forward``)."""
        return type(self.layer) is Conv2d

    def output_shape(self, chw):
        chw = self.layer.output_shape(chw)  # a BatchNorm keeps the shape
        return chw if self.pool is None else self.pool.output_shape(chw)

    def compilable(self) -> bool:
        """Whether ``kernels.program`` has ops for this group (im2col convolutions only; with a BatchNorm,
        those of the folded layer). Exact types: a subclass may compute something else in ``forward``."""
        layer = self.layer
        if self.pool is not None and not _plain_pool(self.pool):
            return False
        if type(layer) is Conv2d:
            return layer.algorithm == "im2col" and layer.groups == 1 and layer.dilation == (1, 1)
        if type(layer) is MaxPool2d:
            return _plain_pool(layer)
        return type(layer) in (Linear, ReLU, Flatten, Softmax, GlobalAvgPool2d)

    def program_ops(self, chw, keep: list) -> list[list[int]] | None:
        """The ``kernels.program`` rows for this compilable group on inputs of sample shape ``chw``, or
        None when a parameter is not what a row may point to (a float32 C-contiguous array of the
        layer's shape; e.g. a float64 array assigned to ``.data`` takes the layer path). The rows point
        at the layer's own arrays, or at the folded layer's (``FoldedPair``; ``CompiledProgram`` holds
        it); a zero bias made for a layer without one goes to ``keep``, which must outlive them."""
        layer, relu = self.layer, self.relu
        if self.bn is not None:
            layer = self.fold.get(layer, self.bn)
        if isinstance(layer, Conv2d | Linear):
            if isinstance(layer, Conv2d):
                out = layer.out_channels
                shape: tuple[int, ...] = (out, chw[0], *layer.kernel_size)
            else:
                out = layer.out_features
                shape = (out, int(np.prod(chw)))
            weight_arr, bias_arr = layer.weight.data, bias_or_zeros(layer)
            if not (program.pointable(weight_arr, shape) and program.pointable(bias_arr, (out,))):
                return None
            if layer.bias is None:
                keep.append(bias_arr)
            weight, bias = weight_arr.ctypes.data, bias_arr.ctypes.data  # the addresses the rows hold
        if isinstance(layer, Conv2d):
            pool = (0, 0, 0, 0) if self.pool is None else (*self.pool.kernel_size, *self.pool.stride)
            if (layer.output_shape(chw)[1:] == (1, 1) and layer.kernel_size == chw[1:]
                    and layer.padding == (0, 0)):  # the dense case, as the im2col runner does it
                ops = [program.op_row(program.OP_LINEAR, relu, weight, bias, out)]
                if self.pool is not None:
                    ops.append(program.op_row(program.OP_MAXPOOL, kernel=pool[:2], stride=pool[2:]))
                return ops
            return [program.op_row(program.OP_CONV, relu, weight, bias, out, layer.kernel_size, layer.stride,
                                   layer.padding, pool)]
        if isinstance(layer, Linear):
            return [program.op_row(program.OP_LINEAR, relu, weight, bias, out)]
        if isinstance(layer, MaxPool2d):
            return [program.op_row(program.OP_MAXPOOL, relu, kernel=layer.kernel_size, stride=layer.stride)]
        return {ReLU: [program.op_row(program.OP_RELU)], Flatten: [],
                Softmax: [program.op_row(program.OP_SOFTMAX)],
                GlobalAvgPool2d: [program.op_row(program.OP_GLOBALAVG)]}[type(layer)]


class Workspace:
    """The float32 arrays a model's inference writes its large convolution outputs into, kept from call
    to call (one set per thread, as ``predict`` runs slices of a batch on several). A new array of
    megabytes costs a page fault per 4 KiB page on every call once the C allocator has handed freed
    memory back to the system: a third of a residual CNN's time at batch 256 here. ONNX Runtime's arena
    keeps its activations the same way. The arrays of the last and largest batch stay allocated while
    the model lives (``clear`` drops them); an array a call returns is never reused (``release``)."""

    def __init__(self):
        self._local = threading.local()

    def __getstate__(self):  # a copy starts empty
        return {}

    def __setstate__(self, state):
        self._local = threading.local()

    def _slots(self) -> dict:
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = {}
        return slots

    def take(self, key, shape: tuple) -> np.ndarray:
        """A C-contiguous float32 array of ``shape`` for the call site ``key``: the first ``shape[0]``
        samples of the one kept there when its samples have this shape and it holds enough of them."""
        slots = self._slots()
        buf = slots.get(key)
        if buf is None or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
            buf = slots[key] = np.empty(shape, np.float32)
        return buf[:shape[0]]

    def release(self, result: np.ndarray) -> None:
        """Drop the kept arrays ``result`` may share memory with: it goes to the caller."""
        slots = self._slots()
        for key in [k for k, buf in slots.items() if np.may_share_memory(buf, result)]:
            del slots[key]

    @property
    def nbytes(self) -> int:
        """Bytes kept for the calling thread."""
        return sum(buf.nbytes for buf in self._slots().values())

    def clear(self) -> None:
        """Drop the arrays of every thread."""
        self._local = threading.local()


_WORKSPACE_MIN = 1 << 16  # input elements below which a group allocates its output: the heap reuses them


def run_groups(groups, x, workspace: Workspace | None, key=None):
    """``x`` through the fused ``groups`` in order; with a ``workspace``, a convolution reading at least
    ``_WORKSPACE_MIN`` values writes into the workspace's array for the call site (``key``, group)."""
    for j, group in enumerate(groups):
        out = None
        if workspace is not None and group.writes_into and x.size >= _WORKSPACE_MIN:
            out = workspace.take((key, j), (len(x), *group.output_shape(x.shape[1:])))
        x = group.run(x, out)
    return x


def _plain_pool(layer) -> bool:
    """A MaxPool2d the program's ops cover: no padding, floor mode."""
    return type(layer) is MaxPool2d and layer.padding == (0, 0) and not layer.ceil_mode


def _fused_fold(layer, bn) -> bool:
    """Whether inference runs ``layer`` and ``bn`` as one folded layer: exact types only (a subclass
    may compute something else in its ``forward``), the pairs ``fold_pair`` takes."""
    return {Conv2d: "BatchNorm2d", Linear: "BatchNorm1d"}.get(type(layer)) == type(bn).__name__


def fuse_chain(layers, owned: bool = False) -> list[FusedGroup]:
    """A chain of layers (each reading the previous one's output) as inference calls, with exact
    rewrites that save memory passes: Conv2d [BatchNorm] [ReLU] [MaxPool2d] and Linear [BatchNorm]
    [ReLU] are one call each (the BatchNorm folded into the weights, as ``fold_batchnorm``; the kernel
    applies ReLU and pooling as it stores its output), ReLU MaxPool2d one pooling pass with a floor of
    0 (max and relu commute), and other ReLUs overwrite intermediates the chain made. ``owned``: the
    chain's input is an intermediate nothing else reads, so it may be overwritten too. Sequential and
    Graph both lower their chains here."""
    groups, i = [], 0
    while i < len(layers):
        layer = layers[i]
        bn = layers[i + 1] if i + 1 < len(layers) and _fused_fold(layer, layers[i + 1]) else None
        after = layers[i + 1 + (bn is not None):i + 3 + (bn is not None)]
        relu = bool(after) and isinstance(after[0], ReLU)
        pool = after[relu] if len(after) > relu and isinstance(after[relu], MaxPool2d) else None
        if isinstance(layer, Conv2d):
            groups.append(FusedGroup(layer, pool, relu, owned, bn))
            i += 1 + (bn is not None) + relu + (pool is not None)
        elif isinstance(layer, Linear):
            groups.append(FusedGroup(layer, None, relu, owned, bn))
            i += 1 + (bn is not None) + relu
        elif isinstance(layer, ReLU) and after and isinstance(after[0], MaxPool2d):
            groups.append(FusedGroup(after[0], None, True, owned))
            i += 2
        else:
            groups.append(FusedGroup(layer, None, False, owned))
            i += 1
        owned = owned or not layer.passes_input  # Flatten returns a view of its input
    return groups


class CompiledProgram:
    """A network compiled for one sample shape (see ``kernels.program``). Its rows read the layers'
    parameter arrays at every call, so in-place edits need nothing; it is valid while the layer list,
    every layer's attributes (``Layer.edits`` counts assignments: a replaced Tensor, stride, algorithm)
    and every parameter's ``data`` array stay the same objects, and every folded BatchNorm pair still
    folds to the same layer (its rows point at the fold's arrays: a changed source value refolds)."""

    def __init__(self, layers, sample_shape, out_shape, ops, keep, folds=()):
        self.layers, self.sample_shape, self.out_shape = list(layers), sample_shape, out_shape
        self.ops = ops
        self.edits = Layer.edits
        # The arrays the rows point at: held here so they stay alive, compared by identity per call.
        self.arrays = [(p, p.data) for layer in layers for p in layer.parameters()]
        self.keep = keep
        # (group, folded layer) of each folded BatchNorm: the rows point at that fold's arrays, valid while
        # the group's FoldedPair gives the same fold (it refolds when a source value changed).
        self.folds = list(folds)

    @classmethod
    def build(cls, layers, groups, sample_shape) -> CompiledProgram | None:
        """The program, or None when a group has no ops (checked before anything else is done)."""
        if not all(group.compilable() for group in groups):
            return None
        rows: list[list[int]] = []
        keep: list[np.ndarray] = []
        chw = tuple(sample_shape)
        for group in groups:
            ops = group.program_ops(chw, keep)
            if ops is None:
                return None
            rows += ops
            chw = group.output_shape(chw)
        table = np.array(rows, np.int64).reshape(len(rows), program.FIELDS)
        folds = [(group, group.fold.folded) for group in groups if group.bn is not None]
        return cls(layers, tuple(sample_shape), chw, table, keep, folds)

    @classmethod
    def refreshed(cls, prog, layers, groups_fn, sample_shape) -> CompiledProgram | None:
        """``prog`` while it is current for ``layers`` and ``sample_shape``, else a new build (None when
        the chain has no ops); ``groups_fn()`` gives the chain's fused groups, asked only to build."""
        if prog is None or prog.sample_shape != sample_shape or not prog.is_current(layers):
            return cls.build(layers, groups_fn(), sample_shape)
        return prog

    def runs(self, x, layers) -> bool:
        """Whether this program may compute ``layers`` on ``x``: a small batch of its sample shape, of
        the one array type it was compiled for (read-only arrays take the layer path), layers unchanged."""
        return (type(x) is np.ndarray and x.dtype == _F32 and x.ndim == 4
                and x.shape[1:] == self.sample_shape and 0 < x.shape[0] < PROGRAM_MAX_BATCH
                and x.flags.c_contiguous and x.flags.writeable and self.is_current(layers))

    def run(self, x: np.ndarray) -> np.ndarray:
        return program.run_program(x, self.ops).reshape(x.shape[0], *self.out_shape)

    def is_current(self, layers) -> bool:
        if self.edits != Layer.edits or self.layers != layers:
            return False
        for tensor, data in self.arrays:
            if tensor.data is not data:
                return False
        return all(group.fold.get(group.layer, group.bn) is folded for group, folded in self.folds)


def _finite_float32(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as float32, or InputError when a value is NaN/Inf or beyond float32's range (it would
    load as Inf): weights like that make every prediction NaN, which ``predict`` can only blame on
    the images."""
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = values.astype(np.float32, copy=False)
    finite = np.isfinite(as32)
    if finite.all():
        return as32
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    what = "NaN/Inf" if not np.isfinite(values).all() else "beyond float32's range (|value| > 3.4e38)"
    count = int((~finite).sum())
    raise InputError(f"{name}: expected finite weights, found {count} value{'s' * (count != 1)} {what} "
                     f"(first at index {first}: {float(values[first]):g}); nothing was loaded")


class FloatModel(Model):
    """What every FP32 model shares (``Sequential``, ``graph.Graph``): parameters, state dicts, modes,
    convolution algorithm and files. A subclass defines ``layers`` (every layer, in run order),
    ``named_parameters`` and ``config``."""

    layers: list[Layer]
    training = False

    def prefixed_layers(self) -> list[tuple[str, Layer]]:
        """(prefix, layer) pairs that name the state: ``"<prefix>.weight"`` and so on."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    @property
    def workspace(self) -> Workspace:
        """The arrays inference reuses from call to call (``Workspace``)."""
        ws = self.__dict__.get("_workspace")
        if ws is None:
            ws = self.__dict__["_workspace"] = Workspace()
        return ws

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        return [(f"{prefix}.{pname}", p) for prefix, layer in self.prefixed_layers()
                for pname, p in zip(("weight", "bias"), layer.parameters(), strict=False)]

    def named_state(self) -> dict[str, np.ndarray]:
        """Every saved array (parameters, then buffers such as BatchNorm's running statistics) by name:
        the arrays themselves, so loading writes into them."""
        return {f"{prefix}.{name}": arr for prefix, layer in self.prefixed_layers()
                for name, arr in layer.named_state()}

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    @property
    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    @property
    def nbytes(self) -> int:
        """Bytes the model stores: its float32 weights and biases."""
        return sum(p.data.nbytes for p in self.parameters())

    def state_dict(self) -> OrderedDict:
        return OrderedDict((k, arr.copy()) for k, arr in self.named_state().items())

    def load_state_dict(self, state, strict: bool = True, source: str = "state_dict") -> None:
        """Copy arrays into the parameters and buffers after checking every name and shape first (all
        or nothing)."""
        params = self.named_state()
        tensors = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise InputError(f"{source}: keys do not match the network (missing {missing}, "
                             f"unexpected {unexpected})")
        staged = {}
        for k, p in params.items():
            if k not in state:
                continue
            arr = np.asarray(state[k])
            if arr.shape != p.shape:
                raise InputError(f"{source}: {k} expected shape {p.shape}, found {arr.shape}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise InputError(f"{source}: {k} expected a float array, found dtype {arr.dtype}")
            staged[k] = _finite_float32(arr, f"{source}: {k}")
        for k, arr in staged.items():
            params[k][...] = arr
            if k in tensors:
                tensors[k].version += 1

    def fold_batchnorm(self) -> FloatModel:
        """A new model of the same class in which every BatchNorm that reads a Conv2d/Linear (its only
        reader) is merged into it (``layers.fold_batchnorm``, running statistics): inference and
        quantization then see one layer. Other layers are copied; this model is unchanged."""
        raise NotImplementedError

    def set_conv_algorithm(self, algorithm: str) -> FloatModel:
        from .convolution import ALGORITHM_VARIANTS, ALGORITHMS

        names = ("auto", *ALGORITHMS, *ALGORITHM_VARIANTS)
        if algorithm not in names:
            raise InputError(f"algorithm: expected one of {names}, found {algorithm!r}")
        for layer in self.layers:
            if isinstance(layer, Conv2d):
                layer.algorithm = algorithm
                layer.conv_state.clear()
        return self

    def train(self, mode: bool = True) -> FloatModel:
        """Set every layer's ``training`` flag (layers such as BatchNorm and Dropout behave differently
        while training) and return the model, as ``nn.Module.train`` does."""
        self.training = bool(mode)
        for layer in self.layers:
            layer.training = bool(mode)
        return self

    def eval(self) -> FloatModel:
        """``train(False)``: inference behaviour for every layer."""
        return self.train(False)

    def save(self, path) -> None:
        """Save weights: ``.raw`` writes the bare reference format, anything else a self-describing file."""
        from . import io

        (io.save_raw if Path(path).suffix == ".raw" else io.save_model)(self, path)

    def load(self, path) -> Self:
        """Load weights into this model from a ``.raw`` or self-describing file."""
        from . import io

        if Path(path).suffix == ".raw":
            io.load_raw(self, path)
        else:
            declared = {k: arr.shape for k, arr in self.named_state().items()}
            self.load_state_dict(io.read_model_state(path, self.config(), declared), source=str(path))
        return self


class Sequential(FloatModel):
    """A chain of layers run in order; inference fuses Conv/Linear + ReLU (+ MaxPool) groups and runs
    small batches through a compiled program, with the same results as layer by layer.

    Args:
        *layers: ``Layer`` objects, in order.
        input_shape: (C, H, W) of one sample, or None; checked and stored in saved files.

    Shape:
        ``predict``/``logits``: (N, C, H, W) or (C, H, W) float images -> (N, classes).

    Example::

        >>> net = Sequential(Flatten(), Linear(784, 10), Softmax(), input_shape=(1, 28, 28))
        >>> net.predict(images).shape, net.accuracy(images, labels), net.save("mlp.safetensors")
    """

    def __init__(self, *layers: Layer, input_shape: tuple | None = None):
        for layer in layers:
            if not isinstance(layer, Layer):
                raise InputError(f"Sequential: expected Layer objects, found {type(layer).__name__}")
        self.layers = list(layers)
        if input_shape is not None:
            shape = tuple(input_shape) if isinstance(input_shape, list | tuple) else ()
            if len(shape) != 3 or not all(isinstance(d, int | np.integer) and not isinstance(d, bool)
                                          and d >= 1 for d in shape):
                raise InputError(f"input_shape: expected None or (C, H, W) positive integers, "
                                 f"found {input_shape!r}")
            input_shape = tuple(int(d) for d in shape)
        self.input_shape = input_shape
        self.names = layer_names(self.layers)
        self._groups: list[FusedGroup] = []
        self._groups_for: list | None = None
        self._program: CompiledProgram | None = None

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) gets no compiled program: the program's rows hold the
        # addresses of this network's arrays, which a copy would otherwise keep reading.
        return {**self.__dict__, "_program": None}

    # -- container -----------------------------------------------------------------------------
    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        body = "\n".join(f"  ({i}) {n}: {layer!r}" for i, (n, layer) in
                         enumerate(zip(self.names, self.layers, strict=True)))
        return f"Sequential(input_shape={self.input_shape},\n{body}\n)"

    # -- forward passes ------------------------------------------------------------------------
    def __call__(self, x):
        if isinstance(x, Tensor):
            for layer in self.layers:
                x = layer(x)
            return x
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inference. Fused groups of layers (``inference_groups``) run as one call each. A small batch
        (fewer than PROGRAM_MAX_BATCH images) of a sample shape that has passed through before runs
        as one compiled program instead (``kernels.program``; same kernels, same bits), skipping the
        per-layer checks and calls that were done on that shape -- the difference at batch 1. (Read-only
        arrays take the layer path: one compiled program serves one array type.) The program reads the
        layers' own weight arrays, so every change of a weight or a layer is seen by the next call."""
        prog = self._program
        if prog is not None and prog.runs(x, self.layers):
            return prog.run(x)
        check_array_batch(x)
        sample_shape = x.shape[1:]
        x = run_groups(self.inference_groups(), x, self.workspace)
        self.workspace.release(x)
        self._program = CompiledProgram.refreshed(prog, self.layers, self.inference_groups, sample_shape)
        return x

    def inference_groups(self) -> list[FusedGroup]:
        """The layers as inference calls (``fuse_chain``); rebuilt when ``layers`` changes."""
        if self._groups_for != self.layers:
            self._groups, self._groups_for = fuse_chain(self.layers), list(self.layers)
        return self._groups

    @property
    def body(self) -> list[Layer]:
        """The layers before a trailing Softmax: what produces logits."""
        if self.layers and isinstance(self.layers[-1], Softmax):
            return self.layers[:-1]
        return self.layers

    def logits(self, x):
        """Scores before the final Softmax; accepts ndarrays (inference, through the fused groups as
        ``forward``) or Tensors (training)."""
        if isinstance(x, Tensor):
            for layer in self.body:
                x = layer(x)
            return x
        if len(self.body) == len(self.layers):
            return self.forward(x)
        groups = self.inference_groups()
        assert groups[-1].layer is self.layers[-1]  # fuse_chain keeps a Softmax a call of its own
        check_array_batch(x)
        x = run_groups(groups[:-1], x, self.workspace)
        self.workspace.release(x)
        return x

    def trace(self, x) -> list[LayerTrace]:
        """Run the network once, keeping every layer's output and wall time."""
        x = self.check_input(x)
        records = []
        for i, (name, layer) in enumerate(zip(self.names, self.layers, strict=True)):
            t0 = time.perf_counter()
            x = layer.forward(x)
            records.append(LayerTrace(i, name, layer.type, x, time.perf_counter() - t0))
        return records

    def fold_batchnorm(self) -> Sequential:
        layers, out, i = self.layers, [], 0
        while i < len(layers):
            if i + 1 < len(layers) and folds_into(layers[i], layers[i + 1]):
                out.append(fold_pair(layers[i], layers[i + 1]))
                i += 2
            else:
                out.append(copy.deepcopy(layers[i]))
                i += 1
        return Sequential(*out, input_shape=self.input_shape)

    def layer_nodes(self) -> list[LayerNode]:
        """Each layer reads the previous one's output (the first reads the input)."""
        return [LayerNode(name, layer, (prev,)) for name, layer, prev in
                zip(self.names, self.layers, [INPUT, *self.names], strict=False)]

    # -- parameters and state ------------------------------------------------------------------
    def prefixed_layers(self) -> list[tuple[str, Layer]]:
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    # -- architecture and files ------------------------------------------------------------------
    def config(self) -> dict:
        return {"input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": [{"type": layer.type, **layer.config()} for layer in self.layers]}

    @classmethod
    def from_config(cls, cfg: dict) -> Sequential:
        if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
            raise InputError(f"architecture: expected {{'layers': [...]}}, found {str(cfg)[:200]}")
        layers = []
        for c in cfg["layers"]:
            if not isinstance(c, dict):
                raise InputError(f"architecture: expected a layer object, found {str(c)[:100]}")
            layers.append(layer_from_config(c))
        return cls(*layers, input_shape=cfg.get("input_shape"))
