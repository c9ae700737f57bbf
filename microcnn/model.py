"""The one model interface: what every model the workbench runs answers to (FP32 ``Sequential`` and
``Graph``, ``QuantizedSequential``, storage-compressed models), so no caller asks a model what it can do.

What is the same for every model lives here once: input checks, batching and progress in ``predict``,
``accuracy`` from ``predict``, the layer table (output shapes, parameters, MACs). A subclass supplies
how one checked batch runs (``forward``, ``logits``), ``trace``, ``nbytes``, ``save`` and its layers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .checks import as_image_batch, check_count
from .errors import InputError
from .kernels import elementwise
from .kernels.threads import split_batch
from .layers import Layer

INPUT = "input"  # the name of a model's input in layer tables and graphs
# ``predict`` runs a batch as one slice per thread when each slice gets at least this many images
# (below it, waking a second core costs about what it saves on LeNet-sized networks)
MIN_IMAGES_PER_THREAD = 64


@dataclass
class LayerTrace:
    """One layer's output in ``Model.trace``: its position, name, type, output and wall time."""

    index: int
    name: str
    type: str
    output: np.ndarray
    seconds: float


@dataclass(frozen=True)
class LayerNode:
    """One layer of a model as the layer table sees it: its name, the ``Layer`` and the names of the
    tensors it reads (``INPUT`` or other layers' names)."""

    name: str
    layer: Layer
    inputs: tuple[str, ...]


def layer_macs(layer, out_shape) -> int:
    """Multiply-accumulates of one sample through ``layer`` giving ``out_shape`` (C, H, W) or (F,):
    each weight is used once per output position. Conv2d: O x (C / groups) x kh x kw x H' x W' (the
    weight's shape already holds C / groups); Linear: in x out; 0 for layers without weights."""
    if layer.type == "Conv2d":
        return int(layer.weight.data.size) * math.prod(out_shape[1:])
    if layer.type == "Linear":
        return int(layer.weight.data.size)
    return 0


def sample_output_shape(layer, *shapes) -> tuple:
    """The output shape of one sample through ``layer`` from its input sample shapes, after the layer's
    own input check, run on shapes alone (a zero-stride view allocates nothing); InputError when the
    inputs do not fit. Loaders and graphs check architectures with it before anything runs."""
    if len(shapes) == 1:
        layer._check_input(np.broadcast_to(np.float32(0), (1, *shapes[0])))
    return tuple(layer.output_shape(*shapes))


def output_shapes(nodes: list[LayerNode], input_shape: tuple | None, input_name: str = INPUT) -> dict:
    """Tensor name -> one sample's shape (None throughout when ``input_shape`` is None)."""
    shapes: dict = {input_name: tuple(input_shape) if input_shape is not None else None}
    for node in nodes:
        ins = [shapes[i] for i in node.inputs]
        shapes[node.name] = None if None in ins else sample_output_shape(node.layer, *ins)
    return shapes


class Model(ABC):
    """Base class of every model: PyTorch-style inference on NCHW images.

    Attributes:
        input_shape: (C, H, W) of one sample, or None when the model does not record it.
        input_name: the name the first layers read the input by (``"input"``, a Graph's own).

    Shape:
        ``predict``/``logits``: (N, C, H, W) (or one (C, H, W) image) -> (N, classes).

    Example::

        >>> model = microcnn.load("net.safetensors")          # any kind of model
        >>> model.accuracy(images, labels), model.nbytes, model.layer_names()
        >>> model.layer_table()                               # names, shapes, parameters, MACs
    """

    input_shape: tuple | None = None
    input_name: str = INPUT  # what the first layers read, in ``layer_nodes``

    # -- what each model defines -----------------------------------------------------------------
    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's output (probabilities when it ends in Softmax) for a checked float32 batch."""

    @abstractmethod
    def logits(self, x):
        """Scores before a final Softmax."""

    @abstractmethod
    def trace(self, x) -> list[LayerTrace]:
        """Run once, keeping every layer's output and wall time."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the model stores (weights, scales, biases) in its own representation."""

    @abstractmethod
    def save(self, path) -> None:
        """Write the model to ``path`` (``microcnn.load`` reads it back)."""

    @abstractmethod
    def layer_nodes(self) -> list[LayerNode]:
        """The FP32 layers the model computes, in order, with the tensors each reads."""

    def layer_names(self) -> list[str]:
        """Names of the layers, in order (the names of ``trace`` and of the layer table)."""
        return [node.name for node in self.layer_nodes()]

    # -- shared behaviour ------------------------------------------------------------------------
    def check_input(self, x, name: str = "images") -> np.ndarray:
        """``x`` as a float32 (N, C, H, W) batch of the model's input shape, or InputError."""
        return as_image_batch(x, self.input_shape, name=name)

    def predict(self, x, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Class probabilities for a batch of images (validated, processed in chunks of ``batch_size``,
        each cut into one slice per Numba thread, a tqdm bar with ``progress``)."""
        check_count("batch_size", batch_size)
        x = self.check_input(x)
        if len(x) <= batch_size:
            out = self._forward_threads(x)
        else:
            starts = range(0, len(x), batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="predict", unit="batch")
            out = np.concatenate([self._forward_threads(x[s:s + batch_size]) for s in starts])
        if not elementwise.all_finite(out.reshape(-1)):
            finite = np.isfinite(out).reshape(len(out), -1).all(axis=1)
            # Finite weights and inputs give NaN only through float32 overflow (|x| of ~1e37 and more).
            first = int(np.flatnonzero(~finite)[0])
            raise InputError(f"images: the network's outputs overflowed to NaN/Inf for "
                             f"{int((~finite).sum())} images (first: image {first}, largest |input| "
                             f"{float(np.abs(x).max()):g}); scale inputs like the training data "
                             "(MNIST pixels: 0..1)")
        return out

    def _forward_threads(self, x: np.ndarray) -> np.ndarray:
        """``forward`` on Numba's thread count: one slice of the batch per thread, each slice on one
        thread (``kernels.threads.split_batch``: the same bits as one call)."""
        return split_batch(self.forward, x, MIN_IMAGES_PER_THREAD)

    def predict_classes(self, x, batch_size: int = 256) -> np.ndarray:
        """The most probable class of each image."""
        return self.predict(x, batch_size).argmax(axis=1)

    def accuracy(self, images, labels, batch_size: int = 256, progress: bool = False) -> float:
        """Fraction of ``images`` whose predicted class is the label."""
        labels = np.asarray(labels)
        pred = self.predict(images, batch_size, progress=progress).argmax(axis=1)
        if pred.shape != labels.shape:
            raise InputError(f"labels: expected shape {pred.shape}, found {labels.shape}")
        return float((pred == labels).mean())

    def summary(self):
        """A table of layers: name, type, output shape, parameter count (``layer_table`` has more)."""
        return self.layer_table()[["Layer", "Type", "Output Shape", "Parameters"]]

    def layer_table(self, input_shape: tuple | None = None):
        """A pandas DataFrame, one row per layer: Layer, Type, Inputs, Output Shape (one sample),
        Parameters, MACs (per sample; Conv2d and Linear, 0 for the others). Shapes and MACs need an
        input shape: ``input_shape`` or the model's own (None columns without either)."""
        import pandas as pd

        shape = input_shape if input_shape is not None else self.input_shape
        if shape is not None:
            shape = tuple(shape)
            if len(shape) != 3 or not all(isinstance(d, int | np.integer) and d >= 1 for d in shape):
                raise InputError(f"input_shape: expected (C, H, W) positive integers, found {input_shape!r}")
        nodes = self.layer_nodes()
        try:
            shapes = output_shapes(nodes, shape, self.input_name)
        except (InputError, ValueError, IndexError) as exc:
            raise InputError(f"input_shape {shape}: the model cannot run on it ({exc})") from None
        rows = []
        for node in nodes:
            out = shapes[node.name]
            rows.append({"Layer": node.name, "Type": node.layer.type, "Inputs": ", ".join(node.inputs),
                         "Output Shape": out,
                         "Parameters": sum(int(p.data.size) for p in node.layer.parameters()),
                         "MACs": layer_macs(node.layer, out) if out is not None else None})
        return pd.DataFrame(rows, columns=["Layer", "Type", "Inputs", "Output Shape", "Parameters", "MACs"])
