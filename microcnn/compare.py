"""microcnn side by side with PyTorch and ONNX Runtime: same weights, same images, same thread count.

* Weight conversion: ``to_torch(net)`` builds an ``nn.Sequential`` whose state_dict keys equal
  microcnn's (``0.weight``, ...); ``from_torch`` goes back from an ``nn.Sequential``, another module
  or a bare state_dict; ``load_torch_file`` reads a ``.pt`` state_dict (``weights_only=True``).
* ``to_onnx(net, path)`` writes the network as ONNX with ``microcnn.onnx_io``'s exporter. It needs neither
  torch nor onnxscript (which torch 2.9+'s default exporter requires and which is not a dependency).
* ``compare_table`` times and scores FP32, INT8 and 4-bit models of every system on the same test
  images, calibrated on the same training images; ``microcnn compare`` prints it.
* ``torch_train_throughput`` is PyTorch's side of the training benchmark.

torch, onnx and onnxruntime are the optional ``compare`` extra: they are imported inside functions
only, so ``import microcnn.compare`` works without them.
"""

from __future__ import annotations

import contextlib
import functools
import io as _io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from .checks import as_image_batch
from .errors import FileFormatError, InputError, MicrocnnError
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Softmax
from .network import Sequential
from .onnx_io import MissingDependencyError, require
from .quant.precision import PRECISIONS, build_precision, parse_precision_list
from .timing import batch1_latency, median_time, pinned_threads

INSTALL_HINT = 'pip install -e ".[compare]"'
ONNX_OPSET = 17
# Opset 21 is the first whose QuantizeLinear/DequantizeLinear accept 4-bit types.
ONNX_INT4_OPSET = 21
SYSTEMS = ("all", "torch", "onnxruntime")
# Labels of microcnn precisions in this table (FP32, INT8, W4A8, W4A4) -> their names (fp32, ..., int4).
MICROCNN_PRECISIONS = {p.label: p.name for p in PRECISIONS.values()}
ORT_CALIBRATIONS = ("MinMax", "Entropy", "Percentile")
COLUMNS = ["System", "Precision", "Accuracy", "Time (ms)", "Per Image (us)", "Latency (us)",
           "Model Bytes", "Ratio vs microcnn"]
JSON_KEYS = {"System": "system", "Precision": "precision", "Accuracy": "accuracy", "Time (ms)": "time_ms",
             "Per Image (us)": "per_image_us", "Latency (us)": "latency_us", "Model Bytes": "model_bytes",
             "Ratio vs microcnn": "ratio_vs_microcnn"}


def systems_modules(systems: str) -> tuple[str, ...]:
    """The optional modules a ``systems`` choice needs."""
    if systems not in SYSTEMS:
        raise InputError(f"systems: expected one of {SYSTEMS}, found {systems!r}")
    return {"all": ("torch", "onnx", "onnxruntime"), "torch": ("torch",),
            "onnxruntime": ("onnx", "onnxruntime")}[systems]


# -- microcnn <-> PyTorch ----------------------------------------------------------------------------
def _torch_module(layer):
    """The ``torch.nn`` module computing one FP32 layer (a graph's Add and Concat run in its forward)."""
    from . import layers

    nn = require("torch").nn
    kind = type(layer)
    if kind is Conv2d:
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None)
    if kind is Linear:
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    if kind is MaxPool2d:
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
    if kind is AvgPool2d:
        return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                            layer.count_include_pad)
    if kind in (layers.BatchNorm1d, layers.BatchNorm2d):
        cls = nn.BatchNorm2d if kind is layers.BatchNorm2d else nn.BatchNorm1d
        return cls(layer.num_features, layer.eps, layer.momentum)
    if kind is layers.LeakyReLU:
        return nn.LeakyReLU(layer.negative_slope)
    if kind is layers.Dropout:
        return nn.Dropout(layer.p)
    simple = {ReLU: nn.ReLU, Sigmoid: nn.Sigmoid, Flatten: nn.Flatten, layers.ReLU6: nn.ReLU6,
              layers.Tanh: nn.Tanh, layers.GlobalAvgPool2d: lambda: nn.AdaptiveAvgPool2d(1),
              Softmax: lambda: nn.Softmax(dim=1)}
    if kind in simple:
        return simple[kind]()
    raise InputError(f"to_torch: no PyTorch equivalent for layer {layer!r}; expected an FP32 model")


def _torch_graph(net):
    """An ``nn.Module`` running a Graph's nodes in order; submodules are named after the nodes."""
    torch = require("torch")
    from .graph import Add, Concat
    from .model import INPUT

    class TorchGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = []  # (node name, Add/Concat layer or None for a submodule, input names)
            for node in net.layer_nodes():
                joins = isinstance(node.layer, Add | Concat)
                if not joins:
                    self.add_module(node.name, _torch_module(node.layer))
                self.steps.append((node.name, node.layer if joins else None, node.inputs))

        def forward(self, x):
            env = {INPUT: x}
            for name, join, inputs in self.steps:
                xs = [env[i] for i in inputs]
                if join is None:
                    env[name] = getattr(self, name)(xs[0])
                elif isinstance(join, Add):
                    env[name] = sum(xs[1:], xs[0])  # in the inputs' order, as ours
                else:
                    env[name] = torch.cat(xs, dim=join.axis)
            return env[name]

    return TorchGraph()


def to_torch(net):
    """A ``torch.nn`` module in eval mode with the same layers and weights, state_dict keys equal to ours:
    an ``nn.Sequential`` for a Sequential, a module running the nodes in order for a Graph."""
    torch = require("torch")
    from .graph import Graph

    if isinstance(net, Sequential):
        module = torch.nn.Sequential(*[_torch_module(layer) for layer in net.layers])
    elif isinstance(net, Graph):
        module = _torch_graph(net)
    else:
        raise InputError(f"to_torch: expected a microcnn Sequential or Graph, found {type(net).__name__}")
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in net.state_dict().items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # a torch BatchNorm counter
    if missing or unexpected:
        raise InputError(f"to_torch: state_dict keys do not match (missing {missing}, unexpected "
                         f"{unexpected})")
    return module.eval()


def from_torch(module_or_state_dict, net: Sequential | None = None, input_shape=None) -> Sequential:
    """A microcnn network from PyTorch.

    * an ``nn.Module``: converted with its architecture by ``microcnn.torch_io.from_torch`` (an
      ``nn.Sequential`` layer by layer, other modules through ONNX, which needs ``input_shape``).
    * a state_dict, or a module with ``net`` given: a state_dict carries no architecture, so its weights
      go into ``net`` (default: a fresh LeNet-5), matched by key, else by order and shape
      (see ``load_torch_state_dict``).
    """
    torch = require("torch")
    if isinstance(module_or_state_dict, torch.nn.Module) and net is None:
        from .torch_io import from_torch as convert

        return convert(module_or_state_dict, input_shape)
    if isinstance(module_or_state_dict, torch.nn.Module):
        module_or_state_dict = module_or_state_dict.state_dict()
    if not isinstance(module_or_state_dict, Mapping):
        raise InputError(f"from_torch: expected an nn.Module or a state_dict, found "
                         f"{type(module_or_state_dict).__name__}")
    if net is None:
        from .lenet import lenet

        net = lenet()
    load_torch_state_dict(net, module_or_state_dict)
    return net


def _as_array(value):
    if hasattr(value, "detach"):  # a torch tensor; no torch import needed to recognise it
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _spatial_size_before(net: Sequential, index: int):
    """(H, W) of the input of layer ``index``, or None when the network's input shape is unknown."""
    shape = net.input_shape
    if shape is None:
        return None
    for layer in net.layers[:index]:
        shape = layer.output_shape(shape)
    return tuple(shape[1:]) if len(shape) == 3 else None


def _fits(net: Sequential, name: str, target: np.ndarray, arr: np.ndarray) -> np.ndarray | None:
    """``arr`` shaped as the parameter ``name`` (``target``), or None if it does not belong there.

    Besides equal shapes, one reshape is accepted: a Linear weight (O, C*KH*KW) for a Conv2d
    weight (O, C, KH, KW) whose kernel covers its whole unpadded input, as LeNet-5's third layer
    does when written as ``Linear(16*5*5, 120)`` after a flatten. Both compute the same products in
    the same (C, H, W) order, so the values carry over unchanged.
    """
    if arr.shape == target.shape:
        return arr
    index = int(name.split(".")[0])
    layer = net.layers[index]
    if (name.endswith(".weight") and isinstance(layer, Conv2d) and arr.ndim == 2
            and arr.shape == (target.shape[0], int(np.prod(target.shape[1:])))
            and layer.padding == (0, 0) and _spatial_size_before(net, index) == layer.kernel_size):
        return arr.reshape(target.shape)
    return None


def load_torch_state_dict(net: Sequential, state: Mapping, source: str = "state_dict") -> Sequential:
    """Copy a PyTorch state_dict into ``net`` (all or nothing).

    Keys equal to microcnn's (``0.weight``, ...) are matched by name. Otherwise (``conv1.weight``,
    ``features.0.weight``, ...) the state_dict's floating-point tensors are matched to the network's
    parameters in order, each checked for shape; a mismatch names both sides.
    """
    state = {str(k): _as_array(v) for k, v in state.items()}
    params = net.named_parameters()
    if set(state) == {k for k, _ in params}:
        net.load_state_dict(state, source=source)
        return net
    floats = [(k, v) for k, v in state.items() if np.issubdtype(v.dtype, np.floating)]
    ours = [(k, p.data.shape) for k, p in params]
    if len(floats) != len(params):
        raise InputError(
            f"{source}: expected {len(params)} floating-point tensors to match by order "
            f"({', '.join(f'{k} {s}' for k, s in ours)}), found {len(floats)} "
            f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in floats)})")
    mapped = {}
    for (theirs, arr), (name, p) in zip(floats, params, strict=True):
        fitted = _fits(net, name, p.data, arr)
        if fitted is None:
            raise InputError(f"{source}: tensor {theirs} {tuple(arr.shape)} does not fit parameter "
                             f"{name} {p.data.shape} (matched by order)")
        mapped[name] = fitted
    net.load_state_dict(mapped, source=source)
    return net


_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def load_torch_file(path, net: Sequential | None = None) -> Sequential:
    """Load a PyTorch ``.pt`` state_dict (``torch.save(model.state_dict(), path)``) into ``net``
    (default LeNet-5). Loaded with ``weights_only=True``: no arbitrary code from the file runs.
    A checkpoint dict holding the state_dict under ``state_dict``/``model_state_dict``/``model`` works too.
    """
    torch = require("torch")
    from .io import check_finite

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: PyTorch weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises assorted types for corrupt files and pickled modules
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise FileFormatError(path, f"not loadable with torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {first})",
                              "a state_dict saved with torch.save(model.state_dict(), path)",
                              "something else (a pickled module or a corrupt file?)") from None
    for key in _CHECKPOINT_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FileFormatError(path, "expected a state_dict (a mapping of names to tensors)",
                              "dict[str, Tensor]", type(obj).__name__)
    for name, value in obj.items():
        check_finite(path, name, _as_array(value))
    net = net if net is not None else _default_lenet()
    load_torch_state_dict(net, obj, source=str(path))
    return net


def _default_lenet() -> Sequential:
    from .lenet import lenet

    return lenet()


# -- ONNX ------------------------------------------------------------------------------------------
def to_onnx(net, path=None, *, softmax: bool = True, linear_as: str = "gemm", opset: int = ONNX_OPSET):
    """The model as an ONNX ``ModelProto`` (``microcnn.onnx_io.to_model_proto``: the one exporter),
    written atomically to ``path`` if given (replacing a file there: an explicit request)."""
    from .onnx_io import export_onnx, to_model_proto

    if path is not None:
        return export_onnx(net, path, overwrite=True, softmax=softmax, linear_as=linear_as, opset=opset)
    return to_model_proto(net, softmax=softmax, linear_as=linear_as, opset=opset)


def _ort_session(model, threads: int, optimization: str = "all"):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and one inter-op thread."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3  # errors only: its notices about unused initializers are noise here
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _ort_runner(session) -> SimpleNamespace:
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    return SimpleNamespace(predict=lambda x: session.run([out_name], {in_name: x})[0])


def _torch_runner(module) -> SimpleNamespace:
    torch = require("torch")

    def predict(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return SimpleNamespace(predict=predict)


# -- quantized models of the other systems ------------------------------------------------------------
def torch_int8(net: Sequential, calibration_images: np.ndarray, observer: str = "histogram"):
    """PyTorch eager-mode static post-training quantization (x86 backend), per-channel int8 weights.

    ``observer``: "histogram" is PyTorch's x86 default (activation range minimising quantization
    error); "minmax" uses plain min/max. Both keep PyTorch's ``reduce_range=True`` for activations
    on x86 (7-bit ranges, to avoid int16 overflow in its non-VNNI kernels). Conv/Linear + ReLU are
    fused first, as the eager flow requires for fused quantized kernels. A trailing Softmax runs in
    float after dequantization.
    """
    torch = require("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit notices raised on first import
        from torch.ao import quantization as tq

    float_model = to_torch(net)
    modules = list(float_model.children())
    tail = [modules.pop()] if modules and isinstance(modules[-1], torch.nn.Softmax) else []
    model = torch.nn.Sequential(tq.QuantStub(), *modules, tq.DeQuantStub(), *tail).eval()
    nn = torch.nn
    fuse = [[str(i), str(i + 1)] for i in range(1, len(modules))
            if isinstance(model[i], nn.Conv2d | nn.Linear) and isinstance(model[i + 1], nn.ReLU)]
    if fuse:
        tq.fuse_modules(model, fuse, inplace=True)
    observers: dict[str, type[tq.ObserverBase]] = {"histogram": tq.HistogramObserver,
                                                   "minmax": tq.MinMaxObserver}
    activation = observers.get(observer)
    if activation is None:
        raise InputError(f"observer: expected 'histogram' or 'minmax', found {observer!r}")
    model.qconfig = tq.QConfig(activation=activation.with_args(reduce_range=True),
                               weight=tq.default_per_channel_weight_observer)
    for m in tail:
        m.qconfig = None
    with _torch_engine("x86"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices about the eager flow moving to torchao
        tq.prepare(model, inplace=True)
        with torch.inference_mode():
            model(torch.from_numpy(calibration_images))
        tq.convert(model, inplace=True)
    return model


@contextlib.contextmanager
def _torch_engine(engine: str):
    torch = require("torch")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _calibration_reader(input_name: str, images: np.ndarray):
    """All calibration images in one batch: ORT's histogram calibrators stack per-batch outputs and
    fail on a shorter last batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._batches, None)

        def rewind(self):
            self._batches = iter([{input_name: images}])

    return Reader()


def ort_quantize(net: Sequential, calibration_images: np.ndarray, method: str = "MinMax",
                 weight_bits: int = 8, act_bits: int = 8) -> bytes:
    """ONNX Runtime ``quantize_static`` (QDQ, per-channel signed weights, signed activations, its
    defaults otherwise) calibrated with ``method`` on ``calibration_images``; the model's bytes.

    4-bit weights or activations use QInt4 QDQ (opset 21). ONNX Runtime has no 4-bit Conv/Gemm
    kernel on CPU, so those nodes run as DequantizeLinear + float op: the accuracy is that of 4-bit
    values, the speed is not that of a 4-bit kernel.
    """
    require("onnx", "onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {8: QuantType.QInt8, 4: QuantType.QInt4}
    if weight_bits not in types or act_bits not in types:
        raise InputError(f"bits: expected 8 or 4, found weight_bits={weight_bits}, act_bits={act_bits}")
    if method not in ORT_CALIBRATIONS:
        raise InputError(f"method: expected one of {ORT_CALIBRATIONS}, found {method!r}")
    opset = ONNX_OPSET if weight_bits == act_bits == 8 else ONNX_INT4_OPSET
    # ORT's CPU MaxPool/AveragePool take no int4 input: with 4-bit activations only Conv and Gemm get
    # Q/DQ pairs and pooling runs in FP32 between them.
    op_types = ["Conv", "Gemm"] if act_bits == 4 else None
    model = to_onnx(net, opset=opset)
    with tempfile.TemporaryDirectory() as tmp, _quiet_logging():
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "quantized.onnx")
        Path(src).write_bytes(model.SerializeToString())
        quantize_static(src, dst, _calibration_reader("input", calibration_images),
                        quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=op_types,
                        activation_type=types[act_bits], weight_type=types[weight_bits],
                        calibrate_method=getattr(CalibrationMethod, method))
        return Path(dst).read_bytes()


def ort_matmul_nbits(net: Sequential, block_size: int = 32) -> bytes:
    """ONNX Runtime's 4-bit kernel path: the ``com.microsoft.MatMulNBits`` op (weight-only,
    blockwise along K, symmetric: zero point 8) for every Linear layer; convolutions stay FP32,
    activations FP32. The weights are packed by ONNX Runtime's own routine
    (``quantize_matmul_4bits``), the graph is written here, because ORT's ``MatMulNBitsQuantizer``
    wrapper needs the extra ``onnx_ir`` package and only rewrites MatMul nodes anyway.
    """
    require("onnx", "onnxruntime")
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"block_size: expected a power of two >= 16, found {block_size}")
    model = to_onnx(net, linear_as="matmul")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for k, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # (K, N)
        rows, cols = weight.shape
        k_blocks = -(-rows // block_size)
        packed = np.zeros((cols, k_blocks, block_size // 2), np.uint8)
        scales = np.zeros((cols, k_blocks), np.float32)
        zero_points = np.zeros((cols, -(-k_blocks // 2)), np.uint8)  # unused when symmetric
        padded = np.zeros((k_blocks * block_size, cols), np.float32)
        padded[:rows] = weight
        quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, cols, rows, True)
        name = node.input[1]
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_q4"),
                                  numpy_helper.from_array(scales, f"{name}_scales")])
        graph.node[k].CopyFrom(helper.make_node(
            "MatMulNBits", [node.input[0], f"{name}_q4", f"{name}_scales"], list(node.output), name=node.name,
            domain="com.microsoft", K=rows, N=cols, bits=4, block_size=block_size))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet_logging():
    # ORT's quantizers log advice (run pre-processing, ...) at WARNING through the root logger, and its
    # histogram calibrators print progress to stdout, which would corrupt `microcnn compare --json`.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(_io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


# -- the table ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _all_threads_pinned(threads: int, torch=None):
    """Numba (via timing.pinned_threads) and torch intra-op threads pinned, torch's quantized engine set
    to x86; ORT sessions get their thread counts when they are created."""
    with pinned_threads(threads):
        if torch is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            with _torch_engine("x86"):
                yield
        finally:
            torch.set_num_threads(before)


def _torch_bytes(module) -> int:
    torch = require("torch")
    buffer = _io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def _nan_row(system: str, precision: str) -> dict:
    return {"System": system, "Precision": precision, "Accuracy": math.nan, "Time (ms)": math.nan,
            "Per Image (us)": math.nan, "Latency (us)": math.nan, "Model Bytes": math.nan}


def _measure(system: str, precision: str, runner, images, labels, repeats: int, batch1_samples: int,
             model_bytes: int) -> dict:
    """Accuracy, batched time (median of ``repeats`` after a warm-up) and batch-1 latency of one model."""
    probs = np.asarray(runner.predict(images))
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    seconds = median_time(lambda: runner.predict(images), repeats)
    latency = batch1_latency(runner, images, batch1_samples, repeats) if batch1_samples > 0 else math.nan
    return {"System": system, "Precision": precision, "Accuracy": accuracy, "Time (ms)": seconds * 1e3,
            "Per Image (us)": seconds * 1e6 / len(images), "Latency (us)": latency * 1e6,
            "Model Bytes": int(model_bytes)}


def add_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """``Ratio vs microcnn`` = a row's time / the time of the first microcnn row of the same precision
    (> 1: microcnn is faster). NaN where microcnn has no row at that precision."""
    df = df.copy()
    base = df[df["System"].str.startswith("microcnn")].groupby("Precision", sort=False)["Time (ms)"].first()
    df["Ratio vs microcnn"] = df["Time (ms)"] / df["Precision"].map(base).astype(float)
    return df


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _environment(threads: int) -> dict:
    import numba

    env = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
           "machine": platform.machine(), "processor": _cpu_name(),
           "cpu_count": os.cpu_count(), "threads": threads}
    for name in ("torch", "onnxruntime", "onnx"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = module.__version__
    return env


def compare_table(net: Sequential, images, labels, calibration_images, threads: int = 1, repeats: int = 5,
                  systems: str = "all", batch1_samples: int = 200, *, method: str = "mse",
                  precisions=("FP32", "INT8", "W4A8", "W4A4"), torch_compile: bool = True,
                  ort_calibrations=ORT_CALIBRATIONS, progress: bool = False,
                  onnx_file: bytes | None = None) -> pd.DataFrame:
    """microcnn next to PyTorch and ONNX Runtime on the same weights, test images and calibration images.

    Rows per precision (microcnn first): FP32 -- microcnn, PyTorch eager, ``torch.compile`` (if it
    compiles here), ONNX Runtime; INT8 -- microcnn PTQ (``method`` calibration), PyTorch eager static
    PTQ (x86, histogram and min-max observers), ONNX Runtime ``quantize_static`` QDQ per
    ``ort_calibrations``; W4A8 / W4A4 -- microcnn, ONNX Runtime QInt4 QDQ, ONNX Runtime MatMulNBits
    (Linear weights only, precision ``W4A32``), and a NaN row for PyTorch, which has no 4-bit path for
    Conv2d/Linear. ``systems`` limits the other systems to "torch" or "onnxruntime". ``onnx_file``: the
    bytes of the ONNX file ``net`` was imported from, which ONNX Runtime's FP32 row then runs as it is
    (PyTorch runs ``to_torch(net)``, the graph as we read it).

    Accuracy is the fraction of ``labels`` predicted. Time is the median of ``repeats`` batched runs
    over all ``images`` after a warm-up; Latency the median per-image time of ``batch1_samples``
    single-image calls. numba, torch and ORT all run ``threads`` threads. ``df.attrs`` holds
    ``notes`` (omitted rows, how bytes are measured, caveats) and ``environment``.
    """
    modules = systems_modules(systems)
    want_torch, want_ort = "torch" in modules, "onnxruntime" in modules
    require(*modules)
    torch = require("torch") if want_torch else None
    images = as_image_batch(images, net.input_shape)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise InputError(f"labels: expected shape ({len(images)},), found {labels.shape}")
    calibration_images = as_image_batch(calibration_images, net.input_shape, name="calibration_images")
    unknown = [p for p in precisions if p not in MICROCNN_PRECISIONS]
    if unknown:
        raise InputError(f"precisions: expected a subset of {list(MICROCNN_PRECISIONS)}, found {unknown}")
    if threads < 1 or repeats < 1:
        raise InputError(f"threads and repeats: expected >= 1, found {threads} and {repeats}")

    notes = [
        f"{len(images)} test images; INT8/4-bit models calibrated on the same {len(calibration_images)} "
        f"training images; {threads} thread(s) for numba, torch (set_num_threads) and ONNX Runtime "
        f"(intra_op={threads}, inter_op=1); times are medians of {repeats} runs after a warm-up.",
        "Model Bytes: microcnn = bytes of the weights, biases and quantization parameters it stores; "
        "PyTorch = size of torch.save(state_dict) (includes the zip/pickle container); "
        "ONNX Runtime = size of the serialized .onnx model (includes graph and names).",
    ]
    jobs = []  # (system, precision, build) where build() -> (runner, model_bytes) or raises
    cal = {}

    def microcnn_job(label):
        def build():
            if MICROCNN_PRECISIONS[label] != "fp32" and "stats" not in cal:
                from .quant import calibrate

                # samples=all: microcnn would otherwise subsample, and every system must see the same images
                cal["stats"] = calibrate(net, calibration_images, method=method,
                                         samples=len(calibration_images), progress=False)
            model = build_precision(net, MICROCNN_PRECISIONS[label], cal.get("stats"))
            runner = SimpleNamespace(predict=lambda x: model.predict(x, batch_size=len(x)))
            return runner, model.nbytes
        return build

    for label in precisions:
        name = "microcnn" if label == "FP32" else f"microcnn ({method})"
        jobs.append((name, label, microcnn_job(label)))
        if label == "FP32":
            if want_torch:
                jobs.append(("PyTorch eager", label, lambda: _torch_job(to_torch(net))))
                if torch_compile:
                    jobs.append(("PyTorch torch.compile", label, lambda: _compiled_torch(net, images, notes)))
            if want_ort:
                jobs.append(("ONNX Runtime", label, lambda: _ort_job(
                    onnx_file if onnx_file is not None else to_onnx(net).SerializeToString(), threads)))
        elif label == "INT8":
            if want_torch and not isinstance(net, Sequential):
                notes.append("PyTorch eager INT8: its static quantization flow needs QuantStub/DeQuantStub "
                             "placed around every residual Add and Concat by hand; no rows for a graph.")
            elif want_torch:
                for obs in ("histogram", "minmax"):
                    def build(obs=obs):
                        q = torch_int8(net, calibration_images, obs)
                        return _torch_runner(q), _torch_bytes(q)
                    jobs.append((f"PyTorch eager x86 ({obs})", label, build))
            if want_ort:
                for m in ort_calibrations:
                    jobs.append((f"ONNX Runtime QDQ ({m})", label,
                                 lambda m=m: _ort_job(ort_quantize(net, calibration_images, m), threads)))
        else:
            act = 8 if label == "W4A8" else 4
            if want_torch and label == next(p for p in precisions if p.startswith("W4")):
                jobs.append(("PyTorch (no 4-bit Conv2d/Linear path)", label, None))
                notes.append("PyTorch: torch.ao.quantization has no 4-bit Conv2d/Linear kernels (quint4x2 "
                             "is for EmbeddingBag only; int4 Linear lives in the separate torchao package): "
                             "row left NaN.")
            if want_ort:
                # Extended optimizations move int4 tensors into MaxPool, which has no int4 kernel.
                level = "all" if act == 8 else "basic"
                jobs.append(("ONNX Runtime QDQ QInt4 (MinMax)", label,
                             lambda act=act, level=level: _ort_job(
                                 ort_quantize(net, calibration_images, "MinMax", 4, act), threads, level)))
                if label == "W4A8":
                    jobs.append(("ONNX Runtime MatMulNBits (Linear only)", "W4A32",
                                 lambda: _ort_job(ort_matmul_nbits(net), threads)))
    if onnx_file is not None:
        notes.append("ONNX Runtime FP32 runs the original .onnx file; its quantized rows and PyTorch run the "
                     "graph as microcnn read it (exported again, or rebuilt as torch modules).")
    if want_ort and any(p in precisions for p in ("W4A8", "W4A4")):
        notes.append("ONNX Runtime QInt4 QDQ: no 4-bit Conv/Gemm kernel on CPU, so 4-bit nodes run as "
                     "DequantizeLinear + FP32 op (4-bit accuracy, not 4-bit speed). With 4-bit "
                     "activations only Conv/Gemm inputs are quantized and the session uses basic graph "
                     "optimizations: the extended ones move int4 tensors into MaxPool, which then fails.")
        if "W4A8" in precisions:
            notes.append("ONNX Runtime MatMulNBits quantizes MatMul weights only: the two Linear layers "
                         "(10,920 of LeNet-5's 61,706 parameters) get 4-bit weights (blocks of 32, "
                         "symmetric), convolutions stay FP32; activations FP32 (precision W4A32, no "
                         "microcnn counterpart, so no ratio).")

    rows = []
    iterator = jobs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="compare", unit="model")
    with _all_threads_pinned(threads, torch):
        for system, precision, build in iterator:
            if build is None:
                rows.append(_nan_row(system, precision))
                continue
            try:
                runner, nbytes = build()
            except Exception as exc:
                if system.startswith("microcnn") or isinstance(exc, MicrocnnError):
                    raise  # another system's failure omits its row, it does not end the table
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                notes.append(f"{system} {precision}: row omitted ({type(exc).__name__}: {first})")
                continue
            rows.append(_measure(system, precision, runner, images, labels, repeats, batch1_samples, nbytes))
    df = add_ratios(pd.DataFrame(rows, columns=COLUMNS[:-1]))
    df.attrs["notes"] = notes
    df.attrs["environment"] = _environment(threads)
    df.attrs.update(threads=threads, samples=len(images), calibration_samples=len(calibration_images),
                    repeats=repeats)
    return df


def _torch_job(module):
    return _torch_runner(module), _torch_bytes(module)


def _ort_job(model_bytes: bytes, threads: int, optimization: str = "all"):
    return _ort_runner(_ort_session(model_bytes, threads, optimization)), len(model_bytes)


def _compiled_torch(net: Sequential, images: np.ndarray, notes: list):
    """torch.compile (inductor, static shapes) of the FP32 model, compiled for both timed shapes now."""
    torch = require("torch")
    module = to_torch(net)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit notices from dynamo's imports
        runner = _torch_runner(torch.compile(module, dynamic=False))
        runner.predict(images)
        runner.predict(images[:1])
    notes.append(f"torch.compile (inductor, dynamic=False): {time.perf_counter() - t0:.1f} s to compile "
                 "both shapes (batch and 1), excluded from the times.")
    return runner, _torch_bytes(module)


# -- accuracy at the points other systems offer --------------------------------------------------------
ACCURACY_COLUMNS = ["system", "precision", "calibration", "accuracy", "ours", "delta", "flips", "ours_flips"]
TORCH_OBSERVERS = ("histogram", "minmax")
_PREDICT_BATCH = 1000  # images per call: ORT's FP32 intermediates of 10,000 Fashion images would take GBs


def _other_points(net: Sequential, precisions, systems: str, ort_calibrations) -> list:
    """(system, precision label, build) of every point where PyTorch or ONNX Runtime offers a precision;
    ``build(images)`` quantizes on those calibration images and returns a ``predict`` function."""
    def torch_point(obs):
        return lambda x: _torch_runner(torch_int8(net, x, obs)).predict

    def ort_point(method, weight_bits, act_bits):
        level = "basic" if act_bits == 4 else "all"  # see compare_table's note on int4 and MaxPool
        return lambda x: _ort_runner(_ort_session(ort_quantize(net, x, method, weight_bits, act_bits), 1,
                                                  level)).predict

    modules = systems_modules(systems)
    points = []
    if "INT8" in precisions and "torch" in modules and isinstance(net, Sequential):
        points += [(f"PyTorch eager x86 ({obs})", "INT8", torch_point(obs)) for obs in TORCH_OBSERVERS]
    if "onnxruntime" in modules:
        for label in precisions:
            bits = (8, 8) if label == "INT8" else (4, 4 if label == "W4A4" else 8)
            for m in ort_calibrations if label == "INT8" else ("MinMax",):
                system = f"ONNX Runtime QDQ ({m})" if label == "INT8" else f"ONNX Runtime QDQ QInt4 ({m})"
                points.append((system, label, ort_point(m, *bits)))
    return points


def _top1(predict, images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(predict(images[s:s + _PREDICT_BATCH])).argmax(axis=1)
                           for s in range(0, len(images), _PREDICT_BATCH)])


def quantized_accuracy(net: Sequential, images, labels, train_images, *, seeds=(0, 1, 2),
                       calibration: int = 100, precisions=("INT8", "W4A8", "W4A4"), systems: str = "all",
                       method: str = "mse",
                       ort_calibrations=ORT_CALIBRATIONS, progress: bool = False) -> pd.DataFrame:
    """Accuracy at every point where PyTorch or ONNX Runtime offers a quantized precision, next to
    microcnn's default quantization of the same weights on the same calibration images.

    For each seed, ``calibrate(net, train_images, method, samples=calibration, seed=seed)`` draws the
    calibration images (a seeded subset of the training split) and every system is calibrated on exactly
    those. Ours: ``build_precision(net, precision, calibration)`` with its defaults (what ``microcnn eval
    --precision`` runs). Points: INT8 -- ONNX Runtime QDQ per ``ort_calibrations`` and PyTorch eager x86
    (histogram and min-max observers; Sequential only); W4A8 and W4A4 -- ONNX Runtime QInt4 QDQ (MinMax:
    its only 4-bit calibration that runs here). PyTorch has no 4-bit Conv2d/Linear path, so no point.

    Returns one row per (point, seed) with ``ACCURACY_COLUMNS``: accuracy (theirs) and ours as fractions
    of ``labels`` predicted, delta = ours - theirs, and flips / ours_flips: how many images each
    quantized model classifies differently from the FP32 model (a test set of 10,000 images decides
    ties of a few images by chance; the flips say which model is closer to the network it quantizes).
    ``df.attrs`` holds samples, calibration, seeds and fp32 (the FP32 model's accuracy).
    """
    from .quant import calibrate

    modules = systems_modules(systems)
    require(*modules)
    images = as_image_batch(images, net.input_shape)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise InputError(f"labels: expected shape ({len(images)},), found {labels.shape}")
    unknown = [p for p in precisions if p not in MICROCNN_PRECISIONS or p == "FP32"]
    if unknown or not precisions:
        raise InputError(f"precisions: expected a non-empty subset of INT8, W4A8, W4A4, found "
                         f"{list(precisions)}")
    points = _other_points(net, precisions, systems, ort_calibrations)
    jobs = [(seed, label) for seed in seeds for label in precisions]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="quantized accuracy", unit="precision")
    rows = []
    with _all_threads_pinned(1, require("torch") if "torch" in modules else None), _quiet_logging():
        fp32 = _top1(net.predict, images)
        cal = None
        for seed, label in jobs:
            if cal is None or cal.seed != seed:
                cal = calibrate(net, train_images, method=method, samples=calibration, seed=seed,
                                progress=False)
            model = build_precision(net, MICROCNN_PRECISIONS[label], cal)
            ours = _top1(functools.partial(model.predict, batch_size=_PREDICT_BATCH), images)
            for system, precision, build in points:
                if precision == label:
                    theirs = _top1(build(cal.images), images)
                    acc, our_acc = float((theirs == labels).mean()), float((ours == labels).mean())
                    rows.append({"system": system, "precision": label,
                                 "calibration": f"seed {seed}, {cal.samples} images", "accuracy": acc,
                                 "ours": our_acc, "delta": our_acc - acc,
                                 "flips": int((theirs != fp32).sum()),
                                 "ours_flips": int((ours != fp32).sum())})
    df = pd.DataFrame(rows, columns=ACCURACY_COLUMNS)
    df.attrs.update(samples=len(images), calibration=calibration, seeds=list(seeds), method=method,
                    fp32=float((fp32 == labels).mean()))
    return df


# -- PyTorch training throughput ----------------------------------------------------------------------
def torch_train_throughput(images, labels, batch_size: int = 64, threads: int = 1, seconds: float = 3.0,
                           optimizer: str = "sgd", lr: float = 0.01, seed: int = 0) -> float:
    """Training images per second of LeNet-5 in PyTorch eager: forward, cross-entropy on logits,
    backward, optimizer step ("sgd" with momentum 0.9, or "adam") on batches of ``batch_size`` in a
    seeded shuffled order; three warm-up steps, then as many steps as fit in ``seconds``."""
    torch = require("torch")
    from .lenet import lenet

    x_all = as_image_batch(images, (1, 28, 28))
    y_all = np.asarray(labels, dtype=np.int64)
    if y_all.shape != (len(x_all),):
        raise InputError(f"labels: expected shape ({len(x_all)},), found {y_all.shape}")
    if batch_size < 1 or batch_size > len(x_all):
        raise InputError(f"batch_size: expected 1..{len(x_all)}, found {batch_size}")
    model = torch.nn.Sequential(*list(to_torch(lenet(seed=seed)).children())[:-1]).train()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise InputError(f"optimizer: expected 'sgd' or 'adam', found {optimizer!r}")
    loss_fn = torch.nn.CrossEntropyLoss()
    order = np.random.default_rng(seed).permutation(len(x_all))
    x_all, y_all = torch.from_numpy(x_all[order]), torch.from_numpy(y_all[order])
    n_batches = len(x_all) // batch_size

    def step(k):
        s = (k % n_batches) * batch_size
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_all[s:s + batch_size]), y_all[s:s + batch_size])
        loss.backward()
        opt.step()

    with _all_threads_pinned(threads, torch):
        for k in range(3):
            step(k)
        done, t0 = 0, time.perf_counter()
        while True:
            step(3 + done)
            done += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    return done * batch_size / elapsed


# -- output and CLI ---------------------------------------------------------------------------------------
def _cell(column: str, v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if column == "Accuracy":
        return f"{v * 100:.2f}%"
    if column == "Model Bytes":
        return f"{int(v):,}"
    if column == "Ratio vs microcnn":
        return f"{v:.2f}x"
    if column in ("Time (ms)",):
        return f"{v:.3f}"
    if column in ("Per Image (us)", "Latency (us)"):
        return f"{v:.1f}"
    return str(v)


def format_compare(df: pd.DataFrame) -> str:
    """The table as aligned plain text."""
    cells = [[_cell(c, v) for c, v in zip(COLUMNS, row, strict=True)]
             for row in df[COLUMNS].itertuples(index=False)]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    left = {"System", "Precision"}
    fmt = lambda r: "  ".join(v.ljust(w) if c in left else v.rjust(w)  # noqa: E731
                              for c, v, w in zip(COLUMNS, r, widths, strict=True))
    return "\n".join([fmt(COLUMNS), *map(fmt, cells)])


def markdown_table(df: pd.DataFrame) -> str:
    """The table as GitHub markdown (no optional tabulate dependency)."""
    right = [c not in ("System", "Precision") for c in COLUMNS]
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    for row in df[COLUMNS].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(c, v) for c, v in zip(COLUMNS, row, strict=True)) + " |")
    return "\n".join(lines)


def records(df: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN -> None)."""
    out = []
    for row in df[COLUMNS].to_dict("records"):
        rec = {}
        for column, key in JSON_KEYS.items():
            v = row[column]
            if isinstance(v, float) and math.isnan(v):
                v = None
            elif column == "Model Bytes":
                v = int(v)
            elif isinstance(v, float):
                v = round(v, 6)
            rec[key] = v
        out.append(rec)
    return out


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"fp32,int8"`` -> ``("FP32", "INT8")``: any name or alias of ``microcnn.quant.precision``
    (``int4`` means W4A4, as in ``microcnn bench``), as the labels of this table."""
    found, unknown = parse_precision_list(text)
    labels = tuple(dict.fromkeys(p.label for p in found))
    unknown += [p for p in labels if p not in MICROCNN_PRECISIONS]
    if unknown or not labels:
        raise InputError(f"--precisions: expected a comma-separated subset of fp32,int8,w4a8,w4a4, "
                         f"found {text!r}")
    return labels


def load_any_model(spec: str) -> Sequential:
    """A model spec of ``microcnn.resolve.load_model_spec``, or a PyTorch ``.pt``/``.pth`` state_dict of
    LeNet-5."""
    if Path(spec).suffix in (".pt", ".pth"):
        return load_torch_file(spec)
    from .resolve import load_model_spec

    return load_model_spec(spec)


def run_compare(model: str = "bundled", *, data: str | None = None, samples: int = 1000, threads: int = 1,
                repeats: int = 5, calibration: int = 100, method: str = "mse", systems: str = "all",
                precisions: str = "fp32,int8,w4a8,w4a4", torch_compile: bool = True,
                output: str = "table", dataset: str | None = None, seeds=None) -> int:
    """``microcnn compare``: print the table (``output``: "table", "json" or "markdown"); 2 with a
    message if an extra is missing. ``model`` is a spec of ``load_any_model``; ``data`` the dataset
    directory (``microcnn.resolve.data_dir``); ``dataset`` mnist, fashion-mnist or an .npz path (default:
    the model's own). With ``seeds`` (``--quantized-accuracy``) the table is ``quantized_accuracy``'s
    instead, over those calibration seeds (no timing)."""
    from .resolve import check_data_fits, dataset_of, load_calibration_images, load_test_images

    try:
        needed = systems_modules(systems)
        if Path(model).suffix in (".pt", ".pth"):
            needed = ("torch", *needed)
        onnx = Path(model).suffix == ".onnx"
        require(*dict.fromkeys(needed + ("onnx",) * onnx))
    except MissingDependencyError as exc:
        print(f"microcnn compare: error: {exc}", file=sys.stderr)
        return 2
    net = load_any_model(model)
    onnx_file = Path(model).read_bytes() if onnx else None  # read after load_any_model checked it
    dataset = dataset or dataset_of(model)
    images, labels = load_test_images(samples, data, "--samples", dataset)
    check_data_fits(net, images, labels, f"--dataset {dataset}")
    if seeds is not None:
        return _print_quantized_accuracy(net, images, labels, data, dataset, seeds, calibration,
                                         method, systems, precisions, output)
    calibration_images = load_calibration_images(calibration, data, "--calibration", dataset)
    df = compare_table(net, images, labels, calibration_images,
                       threads=threads, repeats=repeats, systems=systems, method=method,
                       precisions=parse_precisions(precisions), torch_compile=torch_compile,
                       progress=output == "table", onnx_file=onnx_file)
    notes = df.attrs["notes"]
    if output == "json":
        print(json.dumps({"rows": records(df), "threads": threads, "samples": len(images),
                          "notes": notes, "environment": df.attrs["environment"]}))
    elif output == "markdown":
        print(markdown_table(df))
        print()
        print("\n".join(f"- {n}" for n in notes))
    else:
        env = df.attrs["environment"]
        title = Path(model).name if onnx else f"LeNet-5 ({model})"
        print(f"{title} on {len(images)} MNIST test images; {threads} thread(s); "
              f"{env['cpu_count']} CPU core(s), {env['processor']}")
        print(format_compare(df))
        print("\nNotes:")
        print("\n".join(f"- {n}" for n in notes))
    return 0


def _print_quantized_accuracy(net, images, labels, data, dataset, seeds, calibration, method, systems,
                              precisions, output) -> int:
    from .datasets import load_dataset
    from .resolve import data_dir

    train = load_dataset(dataset, "train", data_dir=data_dir(data), progress=False)[0]
    wanted = tuple(p for p in parse_precisions(precisions) if p != "FP32")
    df = quantized_accuracy(net, images, labels, train, seeds=seeds, calibration=calibration,
                            precisions=wanted, systems=systems, method=method, progress=output == "table")
    if output == "json":
        print(json.dumps({"rows": df.to_dict("records"), **df.attrs}))
        return 0
    shown = df.assign(**{c: df[c].map(lambda v: f"{v * 100:.2f}%") for c in ("accuracy", "ours")},
                      delta=df["delta"].map(lambda v: f"{v * 100:+.2f}"))
    if output == "markdown":
        lines = ["| " + " | ".join(ACCURACY_COLUMNS) + " |", "|:---|:---|:---" + "|---:" * 5 + "|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in shown.itertuples(index=False)]
        print("\n".join(lines))
    else:
        print(f"{len(images)} test images (FP32 {df.attrs['fp32'] * 100:.2f}%); microcnn ({method} "
              f"calibration, default quantization) against each other system on the same {calibration} "
              "calibration images per seed; delta in points; flips: images classified otherwise than by the "
              "FP32 model")
        print(shown.to_string(index=False))
    behind = df[df["delta"] < 0]
    if len(behind):
        print(f"\nmicrocnn is behind at {len(behind)} of {len(df)} points (delta < 0)")
    return 0
