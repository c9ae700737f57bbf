"""Storage-only compression: weights kept on disk (and in ``nbytes``) as int8 (per-channel symmetric,
float32 scales, float32 biases) or float16; after loading, the network computes in FP32 on the
decompressed weights. Smaller files, no integer kernels, accuracy close to FP32."""

from __future__ import annotations

import numpy as np

from ..errors import FileFormatError, InputError
from ..model import LayerNode, LayerTrace, Model
from ..network import Sequential
from .quantize import quantize_weight

FORMATS = ("int8", "fp16")


class CompressedModel(Model):
    """A Sequential whose stored form is compressed. Inference (``forward``, ``logits``, ``trace``,
    hence ``predict`` and ``accuracy``) is the decompressed FP32 network's; ``nbytes`` and ``save`` are
    the compressed form's."""

    def __init__(self, stored: dict, fmt: str, network: Sequential):
        self.stored = stored  # tensor name -> stored array
        self.format = fmt
        self.network = network
        self.input_shape = network.input_shape

    def __getattr__(self, name):  # the FP32 network's other attributes: names, layers, config, ...
        if name in ("network", "stored", "format"):
            raise AttributeError(name)
        return getattr(self.network, name)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.network.forward(x)

    def logits(self, x):
        return self.network.logits(x)

    def trace(self, x) -> list[LayerTrace]:
        return self.network.trace(x)

    def layer_nodes(self) -> list[LayerNode]:
        return self.network.layer_nodes()

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.stored.values())

    @property
    def kind(self) -> str:
        return f"compressed-{self.format}"

    def save(self, path) -> None:
        from ..io import FORMAT_NAME, FORMAT_VERSION, write_safetensors

        write_safetensors(path, self.stored, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                              "kind": self.kind, "architecture": _arch_json(self.network)})

    @classmethod
    def from_tensors(cls, tensors: dict, kind: str, arch: dict, path) -> CompressedModel:
        fmt = kind.split("-", 1)[1]
        net = Sequential.from_config(arch)
        expected = _expected(net, fmt)
        if set(tensors) != set(expected):
            raise FileFormatError(path, "tensors do not match the architecture", sorted(expected),
                                  sorted(tensors))
        for name, (dtype, shape) in expected.items():
            arr = tensors[name]
            if arr.dtype != dtype or arr.shape != shape:
                raise FileFormatError(path, f"tensor {name} has the wrong dtype or shape",
                                      f"{dtype} {shape}", f"{arr.dtype} {arr.shape}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise FileFormatError(path, f"tensor {name} holds NaN/Inf", "finite values", "non-finite")
            if name.endswith("_scale") and not (arr > 0).all():  # as the quantized loader refuses them
                raise FileFormatError(path, f"tensor {name} holds scales <= 0", "scales > 0",
                                      f"{int((arr <= 0).sum())} of {arr.size}, smallest {float(arr.min()):g}")
        state = _decompress(net, tensors, fmt)
        bad = _first_nonfinite(state)
        if bad:  # finite int8 weights times a finite but huge scale (3e38) overflow float32
            raise FileFormatError(path, f"tensor {bad[0]} decompresses to NaN/Inf (weights x {bad[0]}_scale "
                                  "overflow float32)", "finite weights", f"{bad[1]} non-finite values")
        net.load_state_dict(state, source=str(path))
        return cls(dict(tensors), fmt, net)

    def __repr__(self):
        return f"CompressedModel({self.format}, {self.nbytes} bytes)"


def _arch_json(net) -> str:
    import json

    return json.dumps(net.config())


def _expected(net, fmt) -> dict:
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}  # name -> (dtype, shape)
    for name, p in net.named_parameters():
        if fmt == "fp16":
            out[name] = (np.dtype(np.float16), p.data.shape)
        elif name.endswith(".weight"):
            out[name] = (np.dtype(np.int8), p.data.shape)
            out[name + "_scale"] = (np.dtype(np.float32), (p.data.shape[0],))
        else:
            out[name] = (np.dtype(np.float32), p.data.shape)
    return out


def _decompress(net, stored, fmt) -> dict:
    """The float32 parameters of ``net`` from the stored tensors (may hold Inf: see _first_nonfinite)."""
    state = {}
    for name, _ in net.named_parameters():
        arr = stored[name]
        if fmt == "int8" and name.endswith(".weight"):
            scale = stored[name + "_scale"].astype(np.float32)
            with np.errstate(over="ignore"):
                arr = arr.astype(np.float32) * scale.reshape((-1,) + (1,) * (arr.ndim - 1))
        state[name] = arr.astype(np.float32)
    return state


def _first_nonfinite(state: dict) -> tuple[str, int] | None:
    for name, arr in state.items():
        count = int(arr.size - np.isfinite(arr).sum())
        if count:
            return name, count
    return None


def compress(net, fmt: str = "int8", weight_clipping: str = "mse") -> CompressedModel:
    """Compress ``net``'s stored weights: "int8" (per-channel symmetric int8 weights + float32 scales,
    float32 biases) or "fp16" (every parameter as float16). The returned model computes in FP32."""
    if not isinstance(net, Sequential):
        raise InputError(f"net: expected a microcnn Sequential, found {type(net).__name__}")
    if fmt not in FORMATS:
        raise InputError(f"fmt: expected one of {FORMATS}, found {fmt!r}")
    stored = {}
    for name, p in net.named_parameters():
        if fmt == "fp16":
            stored[name] = p.data.astype(np.float16)
            if not np.isfinite(stored[name]).all():
                raise InputError(f"{name}: values beyond float16's range (max |w| {np.abs(p.data).max():g})")
        elif name.endswith(".weight"):
            q, scale, _ = quantize_weight(p.data, 8, per_channel=True, clipping=weight_clipping)
            stored[name], stored[name + "_scale"] = q, scale
        else:
            stored[name] = p.data.astype(np.float32)
    copy = Sequential.from_config(net.config())
    state = _decompress(copy, stored, fmt)
    bad = _first_nonfinite(state)
    if bad:
        largest = float(np.abs(dict(net.named_parameters())[bad[0]].data).max())
        raise InputError(f"{bad[0]}: {bad[1]} weights overflow float32 once compressed and decompressed "
                         f"(largest |w| {largest:g}, expected finite weights well inside float32's range)")
    copy.load_state_dict(state, source="compressed model")
    return CompressedModel(stored, fmt, copy)
