"""ONNX import and export: ``load_onnx(path)`` -> our model, ``export_onnx(model, path)`` -> a file.

Import translates a graph of opsets 13-20 into our layers, one node at a time (``_Importer.OPS``):
Conv (groups, dilation), Gemm, MatMul [+ Add of a constant bias], Relu, Clip(0, 6) as ReLU6, LeakyRelu,
Sigmoid, Tanh, MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape to (batch, features),
BatchNormalization (kept as a layer: the model folds it for inference and quantization), Add, Concat
along channels, ReduceMean over H and W (global average pooling), Identity, Dropout (the identity at
inference: no layer) and Softmax. The input is images (batch, C, H, W), or features (batch, F) for a
model that starts from flattened images (an MLP): those get a leading Flatten and record the image
shape ``image_shape`` (default: one channel of √F × √F when F is a square, else (F, 1, 1)). The small integer
arithmetic exporters write to compute a Reshape's target (Shape, Gather, Unsqueeze, Concat, Cast,
Constant, ...) is evaluated here, with the batch dimension as a marker that must end up as the first
entry of the target. The result is a ``Sequential`` when the nodes form a chain, a ``Graph`` otherwise.

Bad files are refused before anything large is made, each with one ``InputError`` naming the file and,
for a node, its name and op type: the file is parsed without external data (a tensor stored in
another file is refused, never read from a path the file names); declared dimensions and element
counts are checked against caps and against the bytes actually stored; nodes are ordered here (cycles,
dangling inputs, duplicate outputs refused, ``onnx.checker`` is not relied on), and every node's input
shape is checked against what its layer takes.

Export writes any Sequential or Graph of supported layers (opset 17, batch axis dynamic, initializers
named like the state_dict) atomically, and refuses an existing file unless ``overwrite=True``.
``microcnn.compare`` builds its ONNX Runtime models with it. The ``onnx`` package is the optional
``onnx`` extra, imported inside functions only.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import layers
from .errors import InputError, MicrocnnError
from .graph import Add, Concat, Graph
from .layers import AvgPool2d, Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU, Sigmoid, Softmax
from .model import INPUT, LayerNode, output_shapes, sample_output_shape
from .network import Sequential, layer_names

OPSETS = range(13, 21)
EXPORT_OPSET = 17
MAX_FILE_BYTES = 1 << 30
MAX_DIM = 1 << 16  # any one dimension of the input or of a computed tensor
MAX_SAMPLE_ELEMENTS = 1 << 26  # values of one sample in any computed tensor (256 MiB as float32)
# The batch dimension inside shape arithmetic: negative, so no real dimension can equal it.
_BATCH = -(1 << 40)

_PIP_NAMES = {"torch": "torch==2.13.0"}


class MissingDependencyError(MicrocnnError, ImportError):
    """An optional package (the ``onnx`` or ``compare`` extra) is not installed."""


def require(*modules: str, purpose: str = "the comparison", extra: str = "compare"):
    """Import the named optional modules, or raise one error naming every missing one and the fix
    (``pip install -e ".[extra]"``). Used by this module, ``torch_io`` and ``compare``."""
    import importlib

    found, missing = [], []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        pkgs = " ".join(_PIP_NAMES.get(m, m) for m in missing)
        raise MissingDependencyError(
            f"{purpose} needs the optional package(s) {', '.join(missing)}, which are not installed; "
            f"install them with `pip install -e \".[{extra}]\"` (or `pip install {pkgs}`)")
    return found[0] if len(found) == 1 else tuple(found)


def _onnx():
    return require("onnx", purpose="ONNX import/export", extra="onnx")


# -- import -------------------------------------------------------------------------------------------
def load_onnx(path, image_shape: tuple | None = None):
    """The model an ONNX file describes: a ``Sequential`` for a chain of nodes, else a ``Graph``.

    ``image_shape`` (C, H, W) is used only when the file's input is flat features (batch, F): the images
    the model is fed, whose C·H·W must be F (see the module docstring for the default).

    Example::

        net = load_onnx("resnet_tiny.onnx")  # a Sequential or a Graph
        probabilities = net.predict(images)
    """
    from .fileutil import regular_file_size

    onnx = _onnx()
    size = regular_file_size(path, "ONNX model")
    if size > MAX_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes; expected an ONNX model of at most {MAX_FILE_BYTES} bytes")
    try:  # external data stays unread: a file must not make us open paths it names
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and assorted others on corrupt bytes
        raise InputError(f"{path}: not an ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    return _Importer(path, model, image_shape).run()


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Importer:
    """One ONNX graph translated to our layers (see the module docstring)."""

    def __init__(self, path, model, image_shape=None):
        self.path, self.model, self.graph = str(path), model, model.graph
        self.image_shape = image_shape
        self.node = None  # the ONNX node being translated, named in errors
        self.consts: dict[str, np.ndarray] = {}  # initializers, Constant nodes, folded shape arithmetic
        self.shapes: dict[str, tuple] = {}  # a computed tensor -> its sample shape (no batch axis)
        self.source: dict[str, str] = {}  # a computed tensor -> the name of our node (or "input") making it
        self.nodes: list[list] = []  # [layer, [input node names], output tensor]
        self.matmul: dict[str, int] = {}  # output of a MatMul -> its index in nodes (for the bias Add)
        self.batch = None  # the input's fixed batch size, if it declares one

    def fail(self, what: str):
        where = f"node {self.node.name or '(unnamed)'!r} ({self.node.op_type})" if self.node else "graph"
        raise InputError(f"{self.path}: {where}: {what}")

    # -- reading -------------------------------------------------------------------------------
    def run(self):
        versions = {o.domain: o.version for o in self.model.opset_import}
        if versions.get("", versions.get("ai.onnx")) not in OPSETS:
            self.fail(f"expected opset {OPSETS.start}..{OPSETS.stop - 1} of the default domain, found "
                      f"{versions.get('', versions.get('ai.onnx'))}")
        for tensor in self.graph.initializer:
            self.consts[tensor.name] = self.array(tensor)
        self.read_input()
        if len(self.graph.output) != 1:
            self.fail(f"expected one graph output, found {len(self.graph.output)}")
        output = self.graph.output[0].name
        for node in self.ordered(output):
            self.node = node
            if node.domain not in ("", "ai.onnx"):
                self.fail(f"unsupported operator domain {node.domain!r}")
            if node.op_type not in self.OPS:
                self.fail(f"unsupported operator; supported: {', '.join(sorted(self.OPS))}")
            translate, (least, most) = self.OPS[node.op_type]
            if not least <= len(node.input) <= most or not node.output or not node.output[0]:
                self.fail(f"expected {least}..{most} inputs and an output, found {len(node.input)} inputs "
                          f"and outputs {list(node.output)}")
            try:
                translate(self, node, _attrs(node))
            except InputError as exc:  # a layer's own refusal: say where it comes from
                if str(exc).startswith(self.path):
                    raise
                self.fail(str(exc))
            except (ValueError, TypeError, IndexError, KeyError) as exc:  # hostile attributes or values
                self.fail(f"malformed node ({type(exc).__name__}: {exc})")
        self.node = None
        if output not in self.source or self.source[output] == "input":
            self.fail(f"the output {output!r} is not computed by any supported layer")
        self.check_declared(self.graph.output[0], self.shapes[output])
        return self.build(output)

    def array(self, tensor, what="initializer") -> np.ndarray:
        """A TensorProto as an array, after checking what it declares against what it stores."""
        from onnx import TensorProto, numpy_helper

        name = f"{what} {tensor.name!r}"
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            self.fail(f"{name} is stored in an external data file; expected the weights inside the "
                      ".onnx file (save with onnx.save(model, path, save_as_external_data=False))")
        dims = list(tensor.dims)
        if any(d < 0 for d in dims) or math.prod(dims) > MAX_FILE_BYTES:
            self.fail(f"{name} declares the absurd shape {dims}")
        kinds = {TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.INT64: 8, TensorProto.INT32: 4}
        if tensor.data_type not in kinds:
            self.fail(f"{name}: expected float or integer data, found type "
                      f"{TensorProto.DataType.Name(tensor.data_type)}")
        stored = (len(tensor.raw_data) // kinds[tensor.data_type] if tensor.HasField("raw_data") else
                  len(tensor.float_data) + len(tensor.double_data) + len(tensor.int64_data)
                  + len(tensor.int32_data))
        if stored != math.prod(dims):
            self.fail(f"{name} declares shape {dims} ({math.prod(dims)} values) but stores {stored}")
        arr = numpy_helper.to_array(tensor)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                self.fail(f"{name} holds {int((~np.isfinite(arr)).sum())} NaN/Inf values; expected finite "
                          "weights")
            arr = arr.astype(np.float32)
        return arr

    def read_input(self):
        inputs = [v for v in self.graph.input if v.name not in self.consts]
        if len(inputs) != 1:
            self.fail(f"expected one input tensor, found {len(inputs)} ({[v.name for v in inputs]})")
        value = inputs[0]
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or tensor.elem_type != 1:
            self.fail(f"input {value.name!r}: expected a float32 tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if len(dims) == 2 and tensor.HasField("shape"):
            return self.read_flat_input(value.name, dims)
        if len(dims) != 4 or not tensor.HasField("shape"):
            self.fail(f"input {value.name!r}: expected images (batch, C, H, W) or features (batch, F), found "
                      f"{dims if tensor.HasField('shape') else 'no shape'}")
        self.batch = dims[0]
        if None in dims[1:] or min(dims[1:]) < 1 or max(dims[1:]) > MAX_DIM:
            self.fail(f"input {value.name!r}: expected fixed C, H, W in 1..{MAX_DIM} (only the batch axis "
                      f"may be symbolic), found {[d or '?' for d in dims[1:]]}; re-export with a fixed "
                      "image size")
        if math.prod(dims[1:]) > MAX_SAMPLE_ELEMENTS:
            self.fail(f"input {value.name!r} holds {math.prod(dims[1:])} values per image; expected at most "
                      f"{MAX_SAMPLE_ELEMENTS}")
        self.input_shape = tuple(dims[1:])
        self.set(value.name, "input", self.input_shape)

    def read_flat_input(self, name, dims):
        """Features (batch, F): the model is fed images of ``image_shape`` through a leading Flatten."""
        features = dims[1]
        if features is None or not 1 <= features <= MAX_SAMPLE_ELEMENTS:
            self.fail(f"input {name!r}: expected a fixed feature count in 1..{MAX_SAMPLE_ELEMENTS}, found "
                      f"{features or '?'}")
        side = math.isqrt(features)
        shape = self.image_shape or ((1, side, side) if side * side == features else (features, 1, 1))
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3 or min(shape) < 1 or math.prod(shape) != features:
            self.fail(f"input {name!r} takes {features} features; expected an image_shape (C, H, W) with "
                      f"C·H·W = {features}, found {self.image_shape}")
        self.batch, self.input_shape = dims[0], shape
        self.set(f"{name}/image", "input", shape)
        self.add(Flatten(), [f"{name}/image"], name)

    def check_declared(self, value, shape):
        """A declared output of another rank is refused. Other sizes than the nodes compute are only
        warned about, as ONNX Runtime does: exporters declare what ONNX shape inference says, which for
        ceil-mode pooling counts a last window that PyTorch (and the runtime) drop."""
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in value.type.tensor_type.shape.dim]
        if not value.type.tensor_type.HasField("shape"):
            return
        shown = f"declared as {['?' if d is None else d for d in dims]}, the nodes compute (batch, " \
                f"{', '.join(map(str, shape))})"
        if len(dims) != len(shape) + 1:
            self.fail(f"output {value.name!r} is {shown}")
        if any(d not in (None, s) for d, s in zip(dims[1:], shape, strict=True)):
            warnings.warn(f"{self.path}: output {value.name!r} is {shown}; running what the nodes compute",
                          RuntimeWarning, stacklevel=3)

    def ordered(self, output: str) -> list:
        """The nodes ``output`` depends on, in an order where each comes after its inputs' producers."""
        producer = {}
        for node in self.graph.node:
            for out in node.output:
                if out and (out in producer or out in self.consts or out in self.source):
                    self.node = node
                    self.fail(f"output {out!r} is produced twice")
                producer[out] = node
        order, state = [], {}
        if output not in producer and output not in self.source:
            self.fail(f"the graph output {output!r} is produced by no node")
        # Depth-first from the output: post-order is a topological order, a node met again while still
        # open closes a cycle.
        stack = [(producer.get(output), False)]
        while stack:
            node, done = stack.pop()
            if node is None:
                continue
            if done:
                state[id(node)] = "closed"
                order.append(node)
                continue
            if state.get(id(node)) == "closed":
                continue
            if state.get(id(node)) == "open":
                self.node = node
                self.fail("the graph has a cycle through this node")
            state[id(node)] = "open"
            stack.append((node, True))
            for name in node.input:
                if not name or name in self.consts or name in self.source:
                    continue
                if name not in producer:
                    self.node = node
                    self.fail(f"input {name!r} is produced by no node, initializer or graph input")
                child = producer[name]
                if state.get(id(child)) == "open":
                    self.node = node
                    self.fail("the graph has a cycle through this node")
                if state.get(id(child)) != "closed":
                    stack.append((child, False))
        return order

    # -- helpers for the translators ---------------------------------------------------------------
    def set(self, name, source, shape):
        if len(shape) and (max(shape) > MAX_DIM or math.prod(shape) > MAX_SAMPLE_ELEMENTS):
            self.fail(f"computes {name!r} of the absurd shape (batch, {', '.join(map(str, shape))})")
        if len(shape) and min(shape) < 1:
            self.fail(f"its output {name!r} would have shape (batch, {', '.join(map(str, shape))}): the "
                      "input is too small for it")
        self.source[name], self.shapes[name] = source, tuple(int(d) for d in shape)

    def const(self, name, what="input"):
        if name not in self.consts:
            self.fail(f"{what} {name!r}: expected a constant (initializer or Constant node), found a "
                      "computed tensor")
        return self.consts[name]

    def tensor(self, name, rank=None) -> tuple:
        """The sample shape of a computed input (``rank``: including the batch axis)."""
        if name not in self.shapes:
            self.fail(f"input {name!r}: expected the computed tensor of a previous node, found a constant")
        shape = self.shapes[name]
        if rank is not None and len(shape) + 1 != rank:
            self.fail(f"input {name!r} has shape (batch, {', '.join(map(str, shape))}); expected "
                      f"{rank} dimensions")
        return shape

    def add(self, layer: Layer, inputs, out: str):
        """Append ``layer`` computing tensor ``out`` from the computed tensors ``inputs``."""
        shape = sample_output_shape(layer, *(self.shapes[i] for i in inputs))  # the layer's own checks
        self.nodes.append([layer, [self.source[i] for i in inputs], out])
        self.set(out, len(self.nodes) - 1, shape)

    def alias(self, node, name):
        if name in self.consts:
            self.consts[node.output[0]] = self.consts[name]
        else:
            self.set(node.output[0], self.source[name], self.shapes[name])

    def only_output(self, node):
        if len([o for o in node.output if o]) != 1:
            self.fail(f"expected one output, found {list(node.output)} (training outputs are not supported)")

    @staticmethod
    def pads(attrs, n=2) -> tuple:
        pads = list(attrs.get("pads", [0] * 2 * n))
        return tuple(pads[:n]), tuple(pads[n:])

    def spatial(self, attrs, kernel, ops_with_dilation=True):
        """(stride, padding, dilation) pairs of a Conv or pooling node; auto_pad and uneven pads refused."""
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            self.fail(f"auto_pad={auto}; expected explicit pads (export with padding given as numbers)")
        if len(kernel) != 2:
            self.fail(f"expected a 2-D kernel, found kernel_shape {list(kernel)}")
        begin, end = self.pads(attrs)
        if begin != end:
            self.fail(f"pads {list(begin + end)}: expected the same padding at both ends of each axis")
        stride = tuple(attrs.get("strides", (1, 1)))
        dilation = tuple(attrs.get("dilations", (1, 1)))
        if min(stride) < 1 or min(begin) < 0 or min(dilation) < 1:
            self.fail(f"strides {list(stride)}, pads {list(begin + end)}, dilations {list(dilation)}: "
                      "expected strides and dilations >= 1 and pads >= 0")
        return stride, begin, dilation

    # -- translators: one per op type --------------------------------------------------------------
    def op_conv(self, node, attrs):
        c, _, _ = self.tensor(node.input[0], rank=4)
        weight = self.const(node.input[1], "weight")
        if weight.ndim != 4:
            self.fail(f"weight {node.input[1]!r}: expected 4 dimensions (O, C/groups, kH, kW), found "
                      f"{list(weight.shape)}")
        out, per_group, kh, kw = weight.shape
        if list(attrs.get("kernel_shape", (kh, kw))) != [kh, kw]:
            self.fail(f"kernel_shape {attrs['kernel_shape']} differs from the weight's {[kh, kw]}")
        stride, padding, dilation = self.spatial(attrs, (kh, kw))
        groups = attrs.get("group", 1)
        if groups < 1 or per_group * groups != c or out % groups:
            self.fail(f"weight {list(weight.shape)} with group={groups} takes {per_group * groups} "
                      f"channels, found an input with {c}")
        bias = self.const(node.input[2], "bias") if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias.shape != (out,):
            self.fail(f"bias {node.input[2]!r}: expected shape [{out}], found {list(bias.shape)}")
        layer = Conv2d(c, out, (kh, kw), stride, padding, bias=bias is not None, dilation=dilation,
                       groups=groups)
        self.load(layer, weight, bias)
        self.add(layer, node.input[:1], node.output[0])

    def op_gemm(self, node, attrs):
        (k,) = self.tensor(node.input[0], rank=2)
        weight = self.const(node.input[1], "weight")
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            self.fail(f"expected transA=0, alpha=1, beta=1, found {attrs}")
        if weight.ndim != 2:
            self.fail(f"weight {node.input[1]!r}: expected 2 dimensions, found {list(weight.shape)}")
        weight = weight if attrs.get("transB", 0) else weight.T
        bias = self.const(node.input[2], "bias") if len(node.input) > 2 and node.input[2] else None
        self.linear(node, k, weight, bias)

    def op_matmul(self, node, attrs):
        (k,) = self.tensor(node.input[0], rank=2)
        weight = self.const(node.input[1], "weight")
        if weight.ndim != 2:
            self.fail(f"weight {node.input[1]!r}: expected 2 dimensions (K, N), found {list(weight.shape)}")
        self.linear(node, k, weight.T, None)
        self.matmul[node.output[0]] = len(self.nodes) - 1

    def linear(self, node, k, weight, bias):
        out, k_w = weight.shape
        if k_w != k:
            self.fail(f"weight takes {k_w} features, found an input with {k}")
        if bias is not None:
            if bias.size not in (1, out) or bias.ndim > 2 or bias.ndim == 2 and bias.shape[0] != 1:
                self.fail(f"bias: expected shape [{out}] or [1, {out}], found {list(bias.shape)}")
            bias = np.broadcast_to(bias.reshape(-1), (out,))
        layer = Linear(k, out, bias=bias is not None)
        self.load(layer, weight, bias)
        self.add(layer, node.input[:1], node.output[0])

    def op_add(self, node, attrs):
        a, b = node.input
        if a in self.consts and b in self.consts:
            self.consts[node.output[0]] = self.consts[a] + self.consts[b]
            return
        if a in self.consts or b in self.consts:  # only a MatMul's bias: MatMul + Add is a Linear
            x, bias = (b, self.consts[a]) if a in self.consts else (a, self.consts[b])
            uses = sum(name == x for n in self.graph.node for name in n.input)
            if x not in self.matmul or uses != 1:
                self.fail("an Add of a constant is supported only as the bias right after a MatMul")
            index = self.matmul.pop(x)
            old, inputs, _ = self.nodes[index]
            if bias.size not in (1, old.out_features) or bias.ndim > 2:
                self.fail(f"bias: expected shape [{old.out_features}], found {list(bias.shape)}")
            layer = Linear(old.in_features, old.out_features)
            self.load(layer, old.weight.data, np.broadcast_to(bias.reshape(-1), (old.out_features,)))
            self.nodes[index] = [layer, inputs, node.output[0]]
            self.set(node.output[0], index, self.shapes[x])
            return
        if self.tensor(a) != self.tensor(b):
            self.fail(f"inputs of shapes (batch, {self.shapes[a]}) and (batch, {self.shapes[b]}): expected "
                      "equal shapes (no broadcasting)")
        self.add(Add(), [a, b], node.output[0])

    def op_concat(self, node, attrs):
        if all(name in self.consts for name in node.input):
            self.consts[node.output[0]] = np.concatenate([np.atleast_1d(self.consts[n]) for n in node.input],
                                                         axis=attrs["axis"])
            return
        shapes = [self.tensor(name) for name in node.input]
        axis = attrs["axis"] + len(shapes[0]) + 1 if attrs["axis"] < 0 else attrs["axis"]
        if axis != 1 or any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            self.fail(f"inputs {[list(s) for s in shapes]} along axis {attrs['axis']}: expected the channel "
                      "axis 1 and equal other dimensions")
        self.add(Concat(axis=1), list(node.input), node.output[0])

    def op_pool(self, node, attrs):
        _, h, w = self.tensor(node.input[0], rank=4)
        self.only_output(node)
        kernel = tuple(attrs.get("kernel_shape", ()))
        stride, padding, dilation = self.spatial(attrs, kernel)
        if dilation != (1, 1):
            self.fail(f"dilations {list(dilation)}: expected 1")
        ceil = bool(attrs.get("ceil_mode", 0))
        if kernel[0] > h + 2 * padding[0] or kernel[1] > w + 2 * padding[1]:
            self.fail(f"kernel {list(kernel)} is larger than its padded input ({h}, {w})")
        if node.op_type == "MaxPool":
            layer = MaxPool2d(kernel, stride, padding, ceil)
        else:
            layer = AvgPool2d(kernel, stride, padding, ceil, bool(attrs.get("count_include_pad", 0)))
        self.add(layer, node.input[:1], node.output[0])

    def op_global_pool(self, node, attrs):
        self.tensor(node.input[0], rank=4)
        self.add(layers.GlobalAvgPool2d(), node.input[:1], node.output[0])

    def op_reduce_mean(self, node, attrs):
        """A mean over H and W (``x.mean((2, 3))`` in PyTorch): global average pooling, then a Flatten
        unless the dimensions are kept."""
        self.tensor(node.input[0], rank=4)
        axes = attrs.get("axes") if len(node.input) < 2 else self.const(node.input[1], "axes").tolist()
        if sorted(a % 4 for a in axes or ()) != [2, 3] or attrs.get("noop_with_empty_axes", 0):
            self.fail(f"axes {axes}: expected the mean over H and W (axes 2 and 3)")
        if attrs.get("keepdims", 1):
            self.add(layers.GlobalAvgPool2d(), node.input[:1], node.output[0])
            return
        self.add(layers.GlobalAvgPool2d(), node.input[:1], f"{node.output[0]}/pooled")
        self.add(Flatten(), [f"{node.output[0]}/pooled"], node.output[0])

    def op_batchnorm(self, node, attrs):
        shape = self.tensor(node.input[0])
        self.only_output(node)
        if attrs.get("training_mode", 0):
            self.fail("training_mode=1; expected inference batch normalization (export in eval mode)")
        scale, bias, mean, var = (self.const(name) for name in node.input[1:5])
        if any(a.shape != (shape[0],) for a in (scale, bias, mean, var)) or len(shape) not in (1, 3):
            self.fail(f"parameters of shapes {[list(a.shape) for a in (scale, bias, mean, var)]} for an "
                      f"input (batch, {', '.join(map(str, shape))}): expected ({shape[0]},) each and an "
                      "input of 2 or 4 dimensions")
        if (var < 0).any():
            self.fail("negative running variance")
        cls = layers.BatchNorm2d if len(shape) == 3 else layers.BatchNorm1d
        # ONNX's momentum weighs the running value, PyTorch's the new batch statistic.
        layer = cls(shape[0], eps=float(attrs.get("epsilon", 1e-5)),
                    momentum=1.0 - float(attrs.get("momentum", 0.9)))
        layer.weight.data[...], layer.bias.data[...] = scale, bias
        layer.running_mean[...], layer.running_var[...] = mean, var
        self.add(layer, node.input[:1], node.output[0])

    def op_activation(self, node, attrs):
        self.tensor(node.input[0])
        if node.op_type == "LeakyRelu":
            layer = layers.LeakyReLU(float(attrs.get("alpha", 0.01)))
        elif node.op_type == "Tanh":
            layer = layers.Tanh()
        else:
            layer = {"Relu": ReLU, "Sigmoid": Sigmoid}[node.op_type]()
        self.add(layer, node.input[:1], node.output[0])

    def op_clip(self, node, attrs):
        self.tensor(node.input[0])
        names = list(node.input[1:3]) + ["", ""]
        bounds = [self.const(n, "bound") if n else np.array(math.inf) for n in names]
        if bounds[0].size != 1 or bounds[1].size != 1:
            self.fail(f"bounds of shapes {[list(b.shape) for b in bounds[:2]]}: expected scalars")
        low, high = (float(b.reshape(-1)[0]) for b in bounds[:2])
        if low == 0.0 and high == 6.0:
            layer = layers.ReLU6()
        elif low == 0.0 and high == math.inf:
            layer = ReLU()
        else:
            self.fail(f"Clip({low}, {high}): expected Clip(0, 6) (ReLU6) or Clip(0) (ReLU)")
        self.add(layer, node.input[:1], node.output[0])

    def op_softmax(self, node, attrs):
        shape = self.tensor(node.input[0], rank=2)
        if attrs.get("axis", -1) not in (1, -1):
            self.fail(f"axis={attrs['axis']}: expected the class axis (1 or -1) of (batch, {shape[0]}) "
                      "scores")
        self.add(Softmax(), node.input[:1], node.output[0])

    def op_flatten(self, node, attrs):
        shape = self.tensor(node.input[0])
        axis = attrs.get("axis", 1)
        if axis not in (1, -len(shape)):
            self.fail(f"axis={axis}: expected 1 (keep the batch axis)")
        self.flatten(node, shape)

    def flatten(self, node, shape):
        if len(shape) == 1:
            self.alias(node, node.input[0])
        else:
            self.add(Flatten(), node.input[:1], node.output[0])

    def op_reshape(self, node, attrs):
        shape = self.tensor(node.input[0])
        target = [int(v) for v in self.const(node.input[1], "shape").reshape(-1)]
        size = math.prod(shape)
        if not attrs.get("allowzero", 0):
            target = [_BATCH if (i == 0 and d == 0) else d for i, d in enumerate(target)]
        batch_first = len(target) == 2 and (target[0] == _BATCH or self.batch and target[0] == self.batch
                                            or target[0] == -1 and target[1] == size)
        if not batch_first or target[1] not in (-1, size):
            shown = ["batch" if d == _BATCH else d for d in target]
            self.fail(f"target shape {shown} for an input (batch, {', '.join(map(str, shape))}): expected "
                      f"(batch, {size}) or (batch, -1); only a reshape to (batch, features) is supported")
        self.flatten(node, shape)

    def op_identity(self, node, attrs):
        if node.input[0] not in self.consts:
            self.tensor(node.input[0])
        self.alias(node, node.input[0])

    def op_dropout(self, node, attrs):
        self.tensor(node.input[0])
        self.only_output(node)
        if len(node.input) > 2 and node.input[2] and bool(self.const(node.input[2])):
            self.fail("training_mode is true; expected inference dropout")
        self.alias(node, node.input[0])

    # Shape arithmetic: evaluated on constants, the batch axis carried as the _BATCH marker.
    def op_shape(self, node, attrs):
        shape = np.array([_BATCH, *self.tensor(node.input[0])], np.int64)
        self.consts[node.output[0]] = shape[attrs.get("start", 0):attrs.get("end", len(shape))]

    def op_constant(self, node, attrs):
        from onnx import TensorProto

        if len(attrs) != 1:
            self.fail(f"expected one value attribute, found {sorted(attrs)}")
        (key, value), = attrs.items()
        if isinstance(value, TensorProto):
            value = self.array(value, "value")
        elif key in ("value_float", "value_floats", "value_int", "value_ints"):
            value = np.array(value, np.float32 if "float" in key else np.int64)
        else:
            self.fail(f"unsupported Constant attribute {key!r}")
        self.consts[node.output[0]] = value

    def folded(self, node, attrs):
        """Constant inputs in, a constant out (the op on small integer or float arrays)."""
        if any(name in self.shapes for name in node.input):
            self.fail("unsupported on a computed tensor (read only as shape arithmetic on constants)")
        xs = [self.const(name) for name in node.input if name]
        op = node.op_type
        if op == "Gather":
            out = np.take(xs[0], xs[1], axis=attrs.get("axis", 0))
        elif op == "Unsqueeze":
            out = np.expand_dims(xs[0], tuple(int(a) for a in xs[1].reshape(-1)))
        elif op == "Squeeze":
            out = np.squeeze(xs[0], tuple(int(a) for a in xs[1].reshape(-1)) if len(xs) > 1 else None)
        elif op == "Cast":
            out = xs[0].astype(np.float32 if attrs["to"] == 1 else np.int64)
        elif op == "Slice":
            axes = xs[3] if len(xs) > 3 else range(len(xs[1]))
            steps = xs[4] if len(xs) > 4 else [1] * len(xs[1])
            index = [slice(None)] * xs[0].ndim
            for s, e, a, st in zip(xs[1], xs[2], axes, steps, strict=True):
                index[int(a)] = slice(int(s), int(e), int(st))
            out = xs[0][tuple(index)]
        else:  # Mul, Div, Sub; ONNX's integer division truncates, which floor equals on sizes >= 0
            divide = np.true_divide if xs[0].dtype.kind == "f" else np.floor_divide
            out = {"Mul": np.multiply, "Sub": np.subtract, "Div": divide}[op](xs[0], xs[1])
        self.consts[node.output[0]] = np.asarray(out)

    # op type -> (translator, (fewest, most) inputs)
    OPS = {"Conv": (op_conv, (2, 3)), "Gemm": (op_gemm, (2, 3)), "MatMul": (op_matmul, (2, 2)),
           "Add": (op_add, (2, 2)), "Concat": (op_concat, (1, 1 << 16)), "MaxPool": (op_pool, (1, 1)),
           "AveragePool": (op_pool, (1, 1)), "GlobalAveragePool": (op_global_pool, (1, 1)),
           "BatchNormalization": (op_batchnorm, (5, 5)), "Relu": (op_activation, (1, 1)),
           "Sigmoid": (op_activation, (1, 1)), "Tanh": (op_activation, (1, 1)),
           "LeakyRelu": (op_activation, (1, 1)), "Clip": (op_clip, (1, 3)),
           "Softmax": (op_softmax, (1, 1)), "Flatten": (op_flatten, (1, 1)), "Reshape": (op_reshape, (2, 2)),
           "Identity": (op_identity, (1, 1)),
           "Dropout": (op_dropout, (1, 3)), "ReduceMean": (op_reduce_mean, (1, 2)),
           "Shape": (op_shape, (1, 1)), "Constant": (op_constant, (0, 0)),
           "Gather": (folded, (2, 2)), "Unsqueeze": (folded, (2, 2)), "Squeeze": (folded, (1, 2)),
           "Cast": (folded, (1, 1)), "Slice": (folded, (3, 5)), "Mul": (folded, (2, 2)),
           "Div": (folded, (2, 2)), "Sub": (folded, (2, 2))}

    def load(self, layer, weight, bias):
        layer.weight.data[...] = weight
        if bias is not None:
            layer.bias.data[...] = bias

    def build(self, output):
        """A Sequential when every node reads the one before it, else a Graph."""
        layers = [layer for layer, _, _ in self.nodes]
        names = layer_names(layers)
        if all(inputs == [i - 1 if i else "input"] for i, (_, inputs, _) in enumerate(self.nodes)) and \
                self.source[output] == len(self.nodes) - 1:
            return Sequential(*layers, input_shape=self.input_shape)
        nodes = [(names[i], layer, [names[j] if j != "input" else "input" for j in inputs])
                 for i, (layer, inputs, _) in enumerate(self.nodes)]
        return Graph(nodes, ["input"], [names[self.source[output]]], input_shape=self.input_shape)


# -- export -------------------------------------------------------------------------------------------
def _export_nodes(model, softmax: bool):
    """(name, layer, input tensor names, state_dict prefix) of each node, and the output tensor's name."""
    if not isinstance(model, Sequential | Graph):
        raise InputError(f"export_onnx: expected a microcnn Sequential or Graph, found "
                         f"{type(model).__name__}")
    chain = isinstance(model, Sequential)  # state_dict keys: "0.weight" here, "conv1.weight" in a Graph
    nodes = [(n.name, n.layer, ["input" if i == INPUT else i for i in n.inputs],
              f"{k}." if chain else f"{n.name}.") for k, n in enumerate(model.layer_nodes())]
    if not softmax and nodes and isinstance(nodes[-1][1], Softmax):  # the last node is the output
        nodes = nodes[:-1]
    if not nodes:
        raise InputError("export_onnx: expected a model with at least one layer before its output")
    return nodes, nodes[-1][0]


def _onnx_nodes(layer, name, inputs, out, linear_as, init):
    """The ONNX node(s) computing ``layer``; ``init(suffix, array)`` adds an initializer, returns its name."""
    from onnx import helper

    node = lambda op, ins, **kw: helper.make_node(op, ins, [out], name=name, **kw)  # noqa: E731
    kind = type(layer)
    if kind is Conv2d:
        (ph, pw) = layer.padding
        params = [init("weight", layer.weight.data)]
        params += [init("bias", layer.bias.data)] if layer.bias is not None else []
        return [node("Conv", [*inputs, *params], kernel_shape=list(layer.kernel_size),
                     strides=list(layer.stride), pads=[ph, pw, ph, pw], dilations=list(layer.dilation),
                     group=layer.groups)]
    if kind is Linear and linear_as == "gemm":
        params = [init("weight", layer.weight.data)]
        params += [init("bias", layer.bias.data)] if layer.bias is not None else []
        return [node("Gemm", [*inputs, *params], transB=1)]
    if kind is Linear:  # MatMul + Add, as torch writes it (ORT's 4-bit quantizer takes it)
        weight = init("weight", layer.weight.data.T)
        if layer.bias is None:
            return [node("MatMul", [*inputs, weight])]
        product = f"{name}_matmul"
        return [helper.make_node("MatMul", [*inputs, weight], [product], name=name),
                helper.make_node("Add", [product, init("bias", layer.bias.data)], [out], name=f"{name}_bias")]
    if kind in (MaxPool2d, AvgPool2d):
        (ph, pw) = layer.padding
        extra = {} if kind is MaxPool2d else {"count_include_pad": int(layer.count_include_pad)}
        return [node("MaxPool" if kind is MaxPool2d else "AveragePool", inputs,
                     kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=[ph, pw, ph, pw],
                     ceil_mode=int(layer.ceil_mode), **extra)]
    if kind in (layers.BatchNorm1d, layers.BatchNorm2d):
        stats = [init(k, getattr(layer, k).data if k in ("weight", "bias") else getattr(layer, k))
                 for k in ("weight", "bias", "running_mean", "running_var")]
        # ONNX's momentum weighs the running value, PyTorch's the new batch statistic.
        return [node("BatchNormalization", [*inputs, *stats], epsilon=float(layer.eps),
                     momentum=1.0 - float(layer.momentum))]
    if kind is layers.ReLU6:
        return [node("Clip", [*inputs, init("min", np.float32(0)), init("max", np.float32(6))])]
    if kind is layers.LeakyReLU:
        return [node("LeakyRelu", inputs, alpha=float(layer.negative_slope))]
    if kind is layers.Dropout:  # the identity at inference; the ratio travels for training
        return [node("Dropout", [*inputs, init("ratio", np.float32(layer.p))])]
    if kind is Add:  # ONNX's Add takes two inputs: a chain for more
        sums = [f"{name}_sum{k}" for k in range(1, len(inputs) - 1)] + [out]
        return [helper.make_node("Add", [a, b], [s], name=f"{name}" if k == 0 else f"{name}_{k}")
                for k, (a, b, s) in enumerate(zip([inputs[0], *sums[:-1]], inputs[1:], sums, strict=True))]
    if kind is Concat:
        return [node("Concat", inputs, axis=layer.axis)]
    simple = {ReLU: "Relu", Sigmoid: "Sigmoid", layers.Tanh: "Tanh",
              layers.GlobalAvgPool2d: "GlobalAveragePool"}
    if kind in simple:
        return [node(simple[kind], inputs)]
    if kind is Flatten:
        return [node("Flatten", inputs, axis=1)]
    if kind is Softmax:
        return [node("Softmax", inputs, axis=1)]
    raise InputError(f"export_onnx: no ONNX equivalent for layer {layer!r}")


def to_model_proto(model, *, softmax: bool = True, linear_as: str = "gemm", opset: int = EXPORT_OPSET):
    """``model`` as an ONNX ``ModelProto`` (batch axis dynamic), checked with ``onnx.checker``.

    Initializers are named like the state_dict (``0.weight`` in a Sequential, ``conv1.weight`` in a Graph).
    ``softmax=False`` drops a final Softmax so the output is logits. ``linear_as="matmul"`` writes Linear
    as MatMul + Add instead of Gemm (as torch's exporter does).
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    if linear_as not in ("gemm", "matmul"):
        raise InputError(f"linear_as: expected 'gemm' or 'matmul', found {linear_as!r}")
    nodes, output = _export_nodes(model, softmax)
    graph_nodes, inits = [], []
    for name, layer, inputs, prefix in nodes:
        def init(suffix, data, prefix=prefix):
            inits.append(numpy_helper.from_array(np.array(data, np.float32, order="C"), prefix + suffix))
            return prefix + suffix
        rename = lambda t: "output" if t == output else t  # noqa: E731
        graph_nodes += _onnx_nodes(layer, name, [rename(i) for i in inputs], rename(name), linear_as, init)
    in_shape = ["batch", *(model.input_shape or ("channels", "height", "width"))]
    out_shape = None
    if model.input_shape is not None:
        shapes = output_shapes([LayerNode(n, layer, tuple(i)) for n, layer, i, _ in nodes], model.input_shape)
        out_shape = ["batch", *shapes[output]]
    graph = helper.make_graph(
        graph_nodes, "microcnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="microcnn")
    # The oldest IR version that carries this opset: newer onnx writes IR versions runtimes may not read yet.
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model, path, *, overwrite: bool = False, **options):
    """Write ``model`` to the ONNX file ``path`` atomically (see ``fileutil``); an existing file is
    refused unless ``overwrite=True``. ``options``: those of ``to_model_proto``. Returns the proto."""
    from .fileutil import atomic_write_bytes, check_destination

    check_destination(path, overwrite)
    proto = to_model_proto(model, **options)
    atomic_write_bytes(path, proto.SerializeToString(), overwrite)
    return proto
