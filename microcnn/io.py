"""Model files.

Two formats:

* ``.raw`` -- the bare format other LeNet tools exchange: little-endian float32, layers in network
  order, each layer's weight then bias, PyTorch layouts (Conv2d [out][in][kh][kw], Linear
  [out][in]), nothing else. The network's architecture must be known to read it.
* ``.safetensors`` -- self-describing: a little-endian u64 header length, a JSON header naming every
  tensor's dtype, shape and byte range, then the raw bytes. microcnn stores the architecture and
  metadata in the header's ``__metadata__``. The ``safetensors`` package reads these files and writes
  files this module reads (the tests check both ways); microcnn keeps its own reader and writer for
  the same bytes in every process, stricter header checks and no memory mapping (docs/dependencies.md).
  Nothing from the file is ever executed.

Every reader checks sizes against the file before allocating, and every writer is atomic.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from .errors import FileFormatError, InputError
from .fileutil import atomic_open, regular_file_size
from .jsonutil import load_json_bounded

FORMAT_NAME = "microcnn"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 4 * 1024**3
MAX_TENSOR_NDIM = 32  # NumPy 1.x's limit; more is a corrupt header, not a tensor
MAX_ACTIVATION_ELEMENTS = 2**26  # per image, for a file's architecture; LeNet-5's largest is 4,704

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_DTYPE_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _file_size(path, what: str) -> int:
    size = regular_file_size(path, what)
    if size > MAX_FILE_BYTES:
        raise FileFormatError(path, f"{what} is implausibly large", f"<= {MAX_FILE_BYTES} bytes",
                              f"{size} bytes")
    return size


def check_finite(path, name: str, arr: np.ndarray) -> None:
    # Non-finite weights make every prediction NaN; refusing at load time names the culprit.
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise FileFormatError(path, f"tensor {name} holds {n_bad} NaN/Inf values",
                              "finite weights", f"{n_bad} non-finite")


def _refuse_nonfinite_save(net, path) -> None:
    # Every loader refuses NaN/Inf weights, so writing them would replace a good file with a dead one.
    for name, p in net.named_parameters():
        if not np.isfinite(p.data).all():
            raise InputError(f"{path}: not saved: parameter {name} holds {int((~np.isfinite(p.data)).sum())} "
                             "NaN/Inf values (diverged training?); nothing was written")


# -- .raw ------------------------------------------------------------------------------------------
def save_raw(net, path) -> None:
    _refuse_nonfinite_save(net, path)
    with atomic_open(path, "wb") as f:
        for p in net.parameters():
            f.write(np.ascontiguousarray(p.data, dtype="<f4").tobytes())


def load_raw(net, path) -> None:
    """Fill ``net``'s parameters from a ``.raw`` file; the size must match exactly, NaN/Inf is refused."""
    named = net.named_parameters()
    expected = sum(p.data.size for _, p in named) * 4
    size = _file_size(path, "weight file")
    if size != expected:
        raise FileFormatError(path, "weight file size does not match the network",
                              f"{expected} bytes ({expected // 4} float32 parameters)",
                              f"{size} bytes" + (f" ({size / 4:g} floats)" if size % 4 == 0 else ""))
    flat = np.fromfile(path, dtype="<f4")
    if flat.size * 4 != expected:  # the file changed between stat and read
        raise FileFormatError(path, "weight file changed while reading", f"{expected} bytes",
                              f"{flat.size * 4} bytes")
    state, offset = {}, 0
    for name, p in named:
        chunk = flat[offset:offset + p.data.size].reshape(p.data.shape)
        check_finite(path, name, chunk)
        state[name] = chunk
        offset += p.data.size
    net.load_state_dict(state, source=str(path))


# -- safetensors -------------------------------------------------------------------------------------
def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    header, offset, data = {}, 0, []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        code = _DTYPE_CODES.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if code is None:
            raise FileFormatError(path, f"cannot store tensor {name}", "a numeric dtype", arr.dtype)
        # Written from the array itself (copied only to fix layout or byte order): saving needs no
        # second copy of the model in memory.
        raw = np.ascontiguousarray(arr, dtype=_DTYPES[code]).reshape(-1).view(np.uint8)
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + raw.size]}
        data.append(raw)
        offset += raw.size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # 8-byte alignment of the data, as the reference writer does
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in data:
            f.write(raw)


def _refuse_foreign(path, first: bytes) -> None:
    """Name a pickle, zip or gzip file from its first 9 bytes. Called only once they failed as a
    safetensors header: a header length may itself begin with 0x80 or "PK" (128 + 256k, 0x4B50 +
    65536k bytes), but a safetensors header then opens its JSON with "{"."""
    if first[8:9] == b"{":
        return
    if first[:1] == b"\x80" or first[:2] in (b"PK", b"\x1f\x8b"):
        kind = {b"\x80": "a pickle", b"PK": "a zip archive (torch.save/npz)",
                b"\x1f\x8b": "gzip data"}.get(first[:1] if first[:1] == b"\x80" else first[:2])
        raise FileFormatError(path, f"this is {kind}, not a safetensors model; microcnn never unpickles "
                              "(convert PyTorch weights with microcnn.compare or save them as .raw)",
                              "safetensors header", f"leading bytes {first[:8]!r}")


class SafetensorsFile:
    """An open safetensors file whose header has been read and validated, and no tensor yet:
    ``metadata``, ``entries`` (name -> (dtype, shape)) and ``nbytes`` let a caller check the file
    against what it expects before ``read()`` allocates anything for the data. Use as a context
    manager; ``read_safetensors`` does both steps at once."""

    def __init__(self, path):
        self.path = path
        size = _file_size(path, "model file")
        self._file = open(path, "rb")  # noqa: SIM115 -- closed by __exit__ / close
        try:
            self._read_header(size)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._file.close()

    def _read_header(self, size: int) -> None:
        path, f = self.path, self._file
        first = f.read(8)
        if len(first) < 8:
            raise FileFormatError(path, "file too short for a safetensors header", ">= 8 bytes",
                                  f"{len(first)} bytes")
        (n,) = struct.unpack("<Q", first)
        if n > min(size - 8, MAX_HEADER_BYTES):
            _refuse_foreign(path, first + f.read(1))
            raise FileFormatError(path, "header length exceeds the file",
                                  f"<= {min(size - 8, MAX_HEADER_BYTES)} bytes", f"{n} bytes")
        head = f.read(n)
        try:
            header = load_json_bounded(head, path, "safetensors header")
        except FileFormatError:
            _refuse_foreign(path, first + head[:1])
            raise
        if not isinstance(header, dict):
            raise FileFormatError(path, "header is not a JSON object", "object", type(header).__name__)
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FileFormatError(path, "__metadata__ must map strings to strings")
        buffer_len = size - 8 - n
        entries = sorted((_validated_entry(path, name, e, buffer_len), name) for name, e in header.items())
        # Every data byte belongs to exactly one tensor: no gap, overlap or tail can hide other data.
        end = 0
        for (begin, stop, _, _), name in entries:
            if begin != end:
                raise FileFormatError(path, f"tensor {name} does not follow the previous one "
                                      f"({'a gap of unused bytes' if begin > end else 'overlapping it'})",
                                      f"offset {end}", f"offset {begin}")
            end = stop
        if end != buffer_len:
            raise FileFormatError(path, "data section size does not match the header "
                                  "(unused bytes after the last tensor)" if buffer_len > end else
                                  "data section size does not match the header",
                                  f"{end} bytes", f"{buffer_len} bytes")
        self.metadata = metadata
        self._entries = [(name, dtype, shape, stop - begin) for (begin, stop, dtype, shape), name in entries]
        self.entries = {name: (dtype, shape) for name, dtype, shape, _ in self._entries}
        self.nbytes = buffer_len

    def read(self) -> dict:
        """Every tensor, in file order (the header guarantees they tile the data section)."""
        tensors = {}
        for name, dtype, shape, nbytes in self._entries:
            arr = np.empty(shape, dtype)
            got = self._file.readinto(arr.reshape(-1).view(np.uint8).data) if nbytes else 0
            if got != nbytes:
                raise FileFormatError(self.path, "file changed while reading", f"{nbytes} bytes of tensor "
                                      f"{name}", f"{got} bytes")
            tensors[name] = arr
        if self._file.read(1):
            raise FileFormatError(self.path, "file changed while reading", f"{self.nbytes} data bytes",
                                  "more")
        return tensors


def read_safetensors(path) -> tuple[dict, dict]:
    """Return (tensors, metadata) after validating every offset, shape and dtype against the file."""
    with SafetensorsFile(path) as st:
        return st.read(), st.metadata


def _validated_entry(path, name, e, buffer_len):
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise FileFormatError(path, f"tensor {name}: entry must have dtype, shape, data_offsets",
                              found=str(e)[:120])
    if not isinstance(e["dtype"], str) or e["dtype"] not in _DTYPES:
        raise FileFormatError(path, f"tensor {name}: unknown dtype", sorted(_DTYPES), str(e["dtype"])[:40])
    shape, offs = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_NDIM
            and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise FileFormatError(path, f"tensor {name}: bad shape",
                              f"list of at most {MAX_TENSOR_NDIM} non-negative ints", str(shape)[:120])
    # A zero-length axis makes the tensor empty, yet NumPy still refuses an absurd product of the others.
    if math.prod(max(d, 1) for d in shape) > MAX_FILE_BYTES:
        raise FileFormatError(path, f"tensor {name}: bad shape", f"at most {MAX_FILE_BYTES} elements "
                              "over the non-zero axes", shape)
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
            and 0 <= offs[0] <= offs[1] <= buffer_len):
        raise FileFormatError(path, f"tensor {name}: data_offsets outside the data section",
                              f"0 <= begin <= end <= {buffer_len}", offs)
    dtype = np.dtype(_DTYPES[e["dtype"]])
    need = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if need != offs[1] - offs[0]:
        raise FileFormatError(path, f"tensor {name}: shape {shape} {e['dtype']} does not fit its bytes",
                              f"{need} bytes", f"{offs[1] - offs[0]} bytes")
    return offs[0], offs[1], dtype, tuple(shape)


def save_model(net, path, metadata: dict | None = None) -> None:
    """Save an FP32 network with its architecture so ``load_model`` can rebuild it alone."""
    _refuse_nonfinite_save(net, path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "fp32",
            "architecture": json.dumps(net.config())}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    write_safetensors(path, net.state_dict(), meta)


def architecture_of(path, metadata, allow_graph: bool = False) -> dict:
    """The architecture a file's metadata declares: ``{"layers": [...]}`` (a Sequential) or, with
    ``allow_graph``, ``{"nodes": [...], ...}`` (a ``graph.Graph``, checked in full when built)."""
    if metadata.get("format") != FORMAT_NAME:
        raise FileFormatError(path, "not a microcnn model (no architecture in __metadata__)",
                              f"format={FORMAT_NAME}", metadata.get("format"))
    if "architecture" not in metadata:
        raise FileFormatError(path, "architecture metadata missing or invalid (no 'architecture' key)")
    try:
        arch = load_json_bounded(metadata["architecture"], path, "architecture")
    except FileFormatError as exc:
        raise FileFormatError(path, f"architecture metadata missing or invalid ({exc.what})") from None
    key = "nodes" if allow_graph and isinstance(arch, dict) and "nodes" in arch else "layers"
    if not (isinstance(arch, dict) and isinstance(arch.get(key), list)
            and all(isinstance(c, dict) for c in arch[key])):
        raise FileFormatError(path, "architecture metadata malformed", '{"layers": [{...}, ...]}' +
                              (' or {"nodes": [{...}, ...], ...}' if allow_graph else ""),
                              metadata["architecture"][:120])
    return arch


def _declared_parameters(path, arch) -> dict:
    """name -> shape of every parameter the architecture declares, computed without allocating any."""
    from .layers import state_shapes

    declared: dict[str, tuple[int, ...]] = {}
    for i, cfg in enumerate(arch["layers"]):
        try:
            shapes = state_shapes(cfg)
        except InputError as exc:
            raise FileFormatError(path, f"architecture layer {i} is invalid ({exc})") from None
        declared.update((f"{i}.{name}", shape) for name, shape in shapes.items())
    return declared


def check_declared_sizes(path, arch, entries: dict, kind: str, declared: dict | None = None) -> None:
    """Refuse an architecture the file's tensors cannot back, and tensors the architecture cannot use,
    from the header alone: before any layer allocates its weights (a forged ``Linear(10**9, 10**9)``
    would otherwise ask for gigabytes) and before any tensor byte is read (a sparse file can declare
    gigabytes of data it never needed). ``entries``: name -> (dtype, shape); ``declared``: name ->
    shape of the parameters, when the architecture is not a chain of layers
    (``graph.declared_parameters``)."""
    declared = _declared_parameters(path, arch) if declared is None else declared
    if kind == "fp32":
        found = {name: shape for name, (_, shape) in entries.items()}
        if found != declared:
            bad = sorted(set(found) ^ set(declared)) or [k for k in declared if found[k] != declared[k]]
            name = bad[0]
            raise FileFormatError(path, f"tensors do not match the architecture (first: {name})",
                                  declared.get(name, "no such tensor"), found.get(name, "missing"))
        return
    count = sum(math.prod(s) for s in declared.values())
    stored = sum(math.prod(shape) * dtype.itemsize for dtype, shape in entries.values())
    # Other kinds store every parameter in at least 2 bits (packed 2-bit weights, wider biases) ...
    if count > 4 * stored:
        raise FileFormatError(path, "architecture declares more parameters than the file can hold",
                              f"<= {4 * stored} (2 bits each in {stored} bytes)", f"{count} parameters")
    # ... and at most 16 bytes (an int8 weight alone in its output channel also brings a float32 scale
    # and an int32 bias, even in a layer without bias: 9 bytes), plus output quantization per layer.
    allowed = 16 * count + 64 * (len(arch["layers"]) + 2)
    if stored > allowed:
        raise FileFormatError(path, "tensors hold more data than the architecture can use",
                              f"<= {allowed} bytes for {count} parameters", f"{stored} bytes")


DEFAULT_INPUT_HW = (28, 28)  # MNIST's, what the command line feeds: the guard's input when none is declared


def _default_input_shape(layers) -> tuple:
    """(C, 28, 28), C being the first convolution's input channels if one comes before any flattening."""
    from .layers import Conv2d, Flatten, Linear

    for layer in layers:
        if isinstance(layer, Conv2d):
            return (layer.in_channels, *DEFAULT_INPUT_HW)
        if isinstance(layer, Flatten | Linear):
            break
    return (1, *DEFAULT_INPUT_HW)


def _fit_input(layer, shape: tuple) -> tuple:
    """The input nearest ``shape`` that ``layer`` accepts: the guard of a file without ``input_shape``
    follows the sizes a real input would reach, even where the default image is not the one the
    network was made for (another channel count, a map smaller than a kernel, another feature count)."""
    from .layers import AvgPool2d, Conv2d, Linear, MaxPool2d, Softmax

    if isinstance(layer, Conv2d | MaxPool2d | AvgPool2d):
        c, h, w = shape if len(shape) == 3 else (1, 1, 1)
        (kh, kw), (ph, pw) = layer.kernel_size, getattr(layer, "padding", (0, 0))
        return (layer.in_channels if isinstance(layer, Conv2d) else c, max(h, kh - 2 * ph, 1),
                max(w, kw - 2 * pw, 1))
    if isinstance(layer, Linear):
        return (layer.in_features,)
    if isinstance(layer, Softmax):
        return (math.prod(shape),)
    return shape


def check_activation_sizes(path, net) -> None:
    """Run each layer's own input check on shapes alone (a zero-stride view allocates nothing): an
    inconsistent architecture fails at load time naming the file, and absurd sizes are refused (a
    forged padding of 10**5 would make predict ask for terabytes). A file that declares no input shape
    is checked from the MNIST image (C, 28, 28), each layer given the nearest input it accepts."""
    from .layers import Conv2d
    from .model import sample_output_shape

    declared = net.input_shape is not None
    shape = net.input_shape if declared else _default_input_shape(net.layers)
    at = "" if declared else (f"; the file declares no input_shape, checked from the default input "
                              f"{list(shape)}")
    if math.prod(shape) > MAX_ACTIVATION_ELEMENTS:  # before any NumPy view of that shape is made
        raise FileFormatError(path, "architecture input_shape is implausibly large",
                              f"<= {MAX_ACTIVATION_ELEMENTS} values per image", list(shape))
    for i, layer in enumerate(net.layers):
        if not declared:
            shape = _fit_input(layer, shape)
            if math.prod(shape) > MAX_ACTIVATION_ELEMENTS:  # a kernel of 2**30 rows needs as many
                raise FileFormatError(path, f"architecture layer {i} ({layer.type}) needs implausibly "
                                      f"large activations{at}", f"<= {MAX_ACTIVATION_ELEMENTS} values "
                                      "per image", math.prod(shape))
        try:
            out = sample_output_shape(layer, shape)
        except InputError as exc:
            raise FileFormatError(path, f"architecture layer {i} ({layer.type}) does not fit its input "
                                  f"{shape} ({exc})") from None
        sizes = [math.prod(shape), math.prod(out)]
        if isinstance(layer, Conv2d):  # the zero-padded copy of the input
            sizes.append(shape[0] * (shape[1] + 2 * layer.padding[0]) * (shape[2] + 2 * layer.padding[1]))
        if max(sizes) > MAX_ACTIVATION_ELEMENTS:
            raise FileFormatError(path, f"architecture layer {i} ({layer.type}) needs implausibly large "
                                  f"activations{at}", f"<= {MAX_ACTIVATION_ELEMENTS} values per image",
                                  max(sizes))
        shape = out


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_weights(path, name: str, arr: np.ndarray) -> None:
    """FP32 weights as they will be used: finite, and (for F64 tensors) within float32's range, which
    the conversion to float32 would otherwise turn into Inf."""
    check_finite(path, name, arr)
    if arr.dtype.itemsize > 4 and arr.dtype.kind == "f" and arr.size:
        beyond = np.abs(arr) > _FLOAT32_MAX
        if beyond.any():
            raise FileFormatError(path, f"tensor {name} holds {int(beyond.sum())} values beyond float32's "
                                  "range", f"|w| <= {_FLOAT32_MAX:.4g} (weights run in float32)",
                                  f"largest |w| {float(np.abs(arr).max()):.4g}")


def _structure(arch: dict):
    return arch.get("layers", arch.get("nodes"))


def _layer_types(arch: dict) -> list:
    if "nodes" in arch:
        return [c["layer"].get("type") if isinstance(c.get("layer"), dict) else None for c in arch["nodes"]]
    return [c.get("type") for c in arch["layers"]]


def read_model_state(path, expected: dict | None = None, declared: dict | None = None) -> dict:
    """FP32 weights of a self-describing file, checked against an expected architecture if given
    (``declared``: its parameters' names and shapes, needed for a Graph's). Header and architecture
    are checked before any tensor is read."""
    with SafetensorsFile(path) as st:
        metadata = st.metadata
        if metadata.get("kind", "fp32") != "fp32":
            raise FileFormatError(path, "expected FP32 weights", "kind=fp32", f"kind={metadata.get('kind')}")
        arch = architecture_of(path, metadata, allow_graph=True) if metadata else None
        if expected is not None and arch is not None and _structure(arch) != _structure(expected):
            raise FileFormatError(path, "architecture differs from the network being loaded",
                                  _layer_types(expected), _layer_types(arch))
        if expected is not None:
            check_declared_sizes(path, expected, st.entries, "fp32", declared)
        tensors = st.read()
    for name, arr in tensors.items():
        check_weights(path, name, arr)
    return tensors
