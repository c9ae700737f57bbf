"""``load_model``: any self-describing model file (FP32, quantized or storage-compressed) back to a model.

The dispatch on the file's ``kind`` lives here, above both the engine's file format (``microcnn.io``)
and the quantized models it can rebuild: the engine never imports the quantization package.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FileFormatError, InputError
from ..fileutil import StrPath
from ..graph import Graph, is_graph_config, load_graph
from ..io import (
    SafetensorsFile,
    architecture_of,
    check_activation_sizes,
    check_declared_sizes,
    check_weights,
)
from ..network import Sequential
from .compress import CompressedModel
from .qgraph import QuantizedGraph
from .qnetwork import QuantizedSequential
from .serialize import (
    COMPRESSED_KINDS,
    KIND_CALIBRATION,
    KIND_QUANTIZED,
    MODEL_KINDS,
    read_quantized,
    read_quantized_graph,
    refuse_kind,
)


def load_model(path: StrPath) -> Sequential | Graph | QuantizedSequential | QuantizedGraph | CompressedModel:
    """Rebuild a network (FP32, quantized or storage-compressed) from a self-describing file. The header
    and the architecture it carries are checked (sizes, activations) before any layer is built and
    before any tensor byte is read.

    Args:
        path: a ``.safetensors`` file written by ``net.save``, ``microcnn.save_model`` or ``microcnn
            quantize``, or an ``.onnx`` file (``onnx_io.load_onnx``: the optional ``onnx`` package).
            A ``.raw`` file has no architecture: use ``lenet(weights=path)``.

    Returns:
        A ``Sequential`` or ``Graph`` (FP32), ``QuantizedSequential``, ``QuantizedGraph`` or
        ``CompressedModel``, each with
        ``predict``.

    Raises:
        FileFormatError: naming the file, what was expected and what was found.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> from microcnn import lenet
        >>> path = Path(tempfile.mkdtemp()) / "lenet.safetensors"
        >>> lenet(weights="bundled").save(path)
        >>> net = load_model(path)
        >>> type(net).__name__, sum(p.data.size for p in net.parameters())
        ('Sequential', 61706)
    """
    path = Path(path)
    if path.suffix == ".raw":
        raise FileFormatError(path, "a .raw file has no architecture; build the network and call "
                              "net.load(path) (e.g. microcnn.lenet(weights=path))")
    if path.suffix.lower() == ".onnx":  # not read as safetensors: its first bytes are no header length
        from ..onnx_io import load_onnx

        return load_onnx(path)
    with SafetensorsFile(path) as st:
        metadata = st.metadata
        arch = architecture_of(path, metadata, allow_graph=True)
        if is_graph_config(arch) and metadata.get("kind") == KIND_QUANTIZED:
            tensors = st.read()  # checked stage by stage against the graph, which is built first
            steps, settings, outputs = read_quantized_graph(tensors, metadata, arch, path)
            return QuantizedGraph(steps, arch, settings, *outputs)
        if is_graph_config(arch):
            return load_graph(path, st)
        kind = metadata.get("kind", "fp32")
        if kind == KIND_CALIBRATION or kind not in MODEL_KINDS:  # refused before anything is built
            refuse_kind(path, kind)
        check_declared_sizes(path, arch, st.entries, kind)
        try:  # every kind is rebuilt from this architecture: it must build (allocation is bounded above)
            net = Sequential.from_config(arch)
        except InputError as exc:
            raise FileFormatError(path, f"architecture is invalid ({exc})") from None
        check_activation_sizes(path, net)
        tensors = st.read()
    if kind == KIND_QUANTIZED:
        stages, settings = read_quantized(tensors, metadata, arch, path)
        return QuantizedSequential(stages, arch, settings)
    if kind in COMPRESSED_KINDS:
        return CompressedModel.from_tensors(tensors, kind, arch, path)
    for name, arr in tensors.items():
        check_weights(path, name, arr)
    net.load_state_dict(tensors, source=str(path))
    return net
