"""Quantized, storage-compressed and calibration files in microcnn's self-describing safetensors format.

Every file carries the FP32 architecture; quantized files add ``kind=quantized`` and a JSON ``stages``
list, tensors are named ``<stage>.<array>``. Loading re-derives everything else (requantization
multipliers, clamp bounds) and validates names, dtypes, shapes and values against the architecture, so a
file that does not match raises ``FileFormatError`` naming the file, the expectation and the finding.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import FileFormatError, InputError
from ..io import FORMAT_NAME, FORMAT_VERSION, read_safetensors, write_safetensors
from ..layers import layer_from_config
from .params import ActQuant

KIND_QUANTIZED = "quantized"
KIND_CALIBRATION = "calibration"
COMPRESSED_KINDS = ("compressed-int8", "compressed-fp16")


def _meta(kind: str, architecture: dict, **extra) -> dict:
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
            "architecture": json.dumps(architecture)}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    return meta


def _json(path, metadata, key):
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FileFormatError(path, f"metadata {key!r} missing or not JSON ({exc})") from None


# -- quantized networks ------------------------------------------------------------------------------
def save_quantized(qnet, path) -> None:
    tensors = {}
    for i, stage in enumerate(qnet.stages):
        for name, arr in stage.tensors().items():
            tensors[f"{i}.{name}"] = arr
    write_safetensors(path, tensors, _meta(KIND_QUANTIZED, qnet.architecture,
                                           stages=[s.spec() for s in qnet.stages], settings=qnet.settings))


def load_from_tensors(tensors: dict, metadata: dict, arch: dict, path):
    """Rebuild the model of a non-FP32 file (called by ``microcnn.io.load_model``)."""
    kind = metadata.get("kind")
    if kind == KIND_QUANTIZED:
        return _load_quantized(tensors, metadata, arch, path)
    if kind in COMPRESSED_KINDS:
        from .compress import CompressedModel

        return CompressedModel.from_tensors(tensors, kind, arch, path)
    if kind == KIND_CALIBRATION:
        raise FileFormatError(path, "this is a calibration file, not a model; load it with "
                              "microcnn.quant.Calibration.load(path, net)", "a model", "kind=calibration")
    raise FileFormatError(path, "unknown model kind", ("fp32", KIND_QUANTIZED, *COMPRESSED_KINDS), kind)


class _Reader:
    """Hands out the tensors of one stage, checking dtype/shape, and finally that none is left over."""

    def __init__(self, tensors, path):
        self.tensors, self.path, self.used = tensors, path, set()

    def get(self, key, dtype, shape):
        if key not in self.tensors:
            raise FileFormatError(self.path, f"tensor {key} is missing", f"{np.dtype(dtype)} {shape}",
                                  "nothing")
        arr = self.tensors[key]
        if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
            raise FileFormatError(self.path, f"tensor {key} has the wrong dtype or shape",
                                  f"{np.dtype(dtype)} {tuple(shape)}", f"{arr.dtype} {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise FileFormatError(self.path, f"tensor {key} holds NaN/Inf", "finite values", "non-finite")
        self.used.add(key)
        return arr

    def act(self, prefix, bits) -> ActQuant:
        scale = float(self.get(f"{prefix}.out_scale", np.float32, (1,))[0])
        zp = int(self.get(f"{prefix}.out_zero_point", np.uint8, (1,))[0])
        if not scale > 0 or zp > (1 << bits) - 1:
            raise FileFormatError(self.path, f"{prefix}: bad activation quantization",
                                  f"scale > 0 and zero point <= {(1 << bits) - 1}",
                                  f"scale {scale}, zero point {zp}")
        return ActQuant(scale, zp, bits)

    def finish(self):
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise FileFormatError(self.path, "unexpected tensors", "only the stages' tensors", extra[:5])


def _load_quantized(tensors, metadata, arch, path):
    from .qlayers import (
        DequantizeStage,
        FlattenStage,
        FloatStage,
        QConv2d,
        QLinear,
        QMaxPool2d,
        QReLU,
        QuantizeStage,
        QWeighted,
    )
    from .qnetwork import QuantizedSequential

    specs = _json(path, metadata, "stages")
    settings = _json(path, metadata, "settings")
    layers_cfg = arch.get("layers")
    if not isinstance(specs, list) or not isinstance(layers_cfg, list):
        raise FileFormatError(path, "stages/architecture metadata malformed", "lists", type(specs).__name__)
    reader = _Reader(tensors, path)
    stages, act, next_layer = [], None, 0
    try:
        for i, spec in enumerate(specs):
            kind, covered = spec.get("kind"), spec.get("layers")
            if not isinstance(covered, list) or covered != list(range(next_layer, next_layer + len(covered))):
                raise FileFormatError(path, f"stage {i} does not continue the layer sequence",
                                      f"layers from {next_layer}", covered)
            types = [layers_cfg[j]["type"] for j in covered if j < len(layers_cfg)]
            if len(types) != len(covered):
                raise FileFormatError(path, f"stage {i} refers to layers beyond the architecture",
                                      f"< {len(layers_cfg)}", covered)
            next_layer += len(covered)
            if kind == "quantize":
                bits = int(spec["bits"])
                stage = QuantizeStage(reader.act(str(i), bits))
            elif kind == "dequantize":
                stage = DequantizeStage(_need(act, path, i))
            elif kind in ("qconv2d", "qlinear"):
                expected = "Conv2d" if kind == "qconv2d" else "Linear"
                cfg = layers_cfg[covered[0]]
                if types[0] != expected:
                    raise FileFormatError(path, f"stage {i} ({kind}) does not match layer {covered[0]}",
                                          expected, types[0])
                shape = _weight_shape(cfg)
                if list(shape) != spec.get("weight_shape"):
                    raise FileFormatError(path, f"stage {i}: weight shape differs from the architecture",
                                          list(shape), spec.get("weight_shape"))
                wbits, abits = int(spec["weight_bits"]), int(spec["act_bits"])
                if wbits not in (4, 8) or abits not in (4, 8):
                    raise FileFormatError(path, f"stage {i}: unsupported bit widths", "4 or 8",
                                          (wbits, abits))
                n = int(np.prod(shape))
                if wbits == 8:
                    wq = reader.get(f"{i}.weight", np.int8, shape)
                else:
                    packed = reader.get(f"{i}.weight", np.uint8, ((n + 1) // 2,))
                    from ..kernels.integer import unpack_weights

                    wq = unpack_weights(packed, 4, n).reshape(shape)
                o = shape[0]
                wscale = tensors.get(f"{i}.weight_scale")
                wscale = reader.get(f"{i}.weight_scale", np.float32, (1,) if wscale is not None and
                                    wscale.shape == (1,) else (o,))
                bias = reader.get(f"{i}.bias", np.int32, (o,))
                in_act = _need(act, path, i)
                if in_act.bits != abits:
                    raise FileFormatError(path, f"stage {i}: input activation bits", abits, in_act.bits)
                out_act = None if spec.get("float_output") else reader.act(str(i), abits)
                common = (covered, wq, wbits, wscale, bias, in_act, out_act, bool(spec["relu"]))
                if kind == "qconv2d":
                    pool = spec.get("pool")
                    stage = QConv2d(*common, stride=spec["stride"], padding=spec["padding"],
                                    pool=None if pool is None else (pool[0], pool[1]),
                                    requant=spec["requant"])
                    if list(stage.stride) != cfg["stride"] or list(stage.padding) != cfg["padding"]:
                        raise FileFormatError(path, f"stage {i}: stride/padding differ from the architecture",
                                              (cfg["stride"], cfg["padding"]),
                                              (spec["stride"], spec["padding"]))
                else:
                    stage = QLinear(*common, requant=spec["requant"])
            elif kind == "qmaxpool2d":
                stage = QMaxPool2d(covered, _need(act, path, i), spec["kernel_size"], spec["stride"])
            elif kind == "qrelu":
                stage = QReLU(covered, _need(act, path, i))
            elif kind == "flatten":
                stage = FlattenStage(covered, act)
            elif kind == "float":
                layer = layer_from_config(layers_cfg[covered[0]])
                for pname, p in zip(("weight", "bias"), layer.parameters(), strict=False):
                    p.data[...] = reader.get(f"{i}.{pname}", np.float32, p.data.shape)
                stage = FloatStage(covered, layer)
            else:
                raise FileFormatError(path, f"stage {i}: unknown stage kind", "a known stage", kind)
            if isinstance(stage, QWeighted) and stage.layers != tuple(covered):
                raise FileFormatError(path, f"stage {i}: layer list mismatch", covered, stage.layers)
            stages.append(stage)
            act = stage.out_act
        reader.finish()
        return QuantizedSequential(stages, arch, settings)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(path, f"quantized model does not describe a valid network ({exc})") from None


def _need(act, path, i):
    if act is None:
        raise FileFormatError(path, f"stage {i} needs a quantized input but the previous stage outputs "
                              "floats")
    return act


def _weight_shape(cfg) -> tuple:
    if cfg["type"] == "Conv2d":
        kh, kw = cfg["kernel_size"]
        return (cfg["out_channels"], cfg["in_channels"], kh, kw)
    return (cfg["out_features"], cfg["in_features"])


# -- calibration -------------------------------------------------------------------------------------
def save_calibration(cal, path) -> None:
    tensors = {"images": cal.images}
    observers = []
    for name, obs in cal.observers.items():
        observers.append({"tensor": name, "kind": obs.kind, "params": obs.params()})
        for key, arr in obs.state().items():
            tensors[f"{name}.{key}"] = np.asarray(arr)
    write_safetensors(path, tensors, _meta(KIND_CALIBRATION, cal.architecture, method=cal.method,
                                           observers=observers, seed=cal.seed))


def load_calibration(path, net=None):
    """Read a calibration file; with ``net``, refuse one made for another architecture."""
    from .calibrate import Calibration
    from .observers import OBSERVERS

    tensors, metadata = read_safetensors(path)
    if metadata.get("kind") != KIND_CALIBRATION:
        raise FileFormatError(path, "not a calibration file", f"kind={KIND_CALIBRATION}",
                              f"kind={metadata.get('kind')}")
    arch = _json(path, metadata, "architecture")
    if net is not None and arch.get("layers") != net.config()["layers"]:
        raise FileFormatError(path, "calibration statistics belong to another architecture",
                              [c["type"] for c in net.config()["layers"]],
                              [c.get("type") for c in arch.get("layers", [])])
    from collections import OrderedDict

    observers = OrderedDict()
    try:
        for entry in _json(path, metadata, "observers"):
            cls = OBSERVERS[entry["kind"]]
            obs = cls(entry["tensor"], **entry["params"])
            prefix = entry["tensor"] + "."
            obs.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            observers[entry["tensor"]] = obs
    except (KeyError, TypeError, InputError) as exc:
        raise FileFormatError(path, f"calibration observers malformed ({exc})") from None
    if net is not None and list(observers) != ["input", *net.names]:
        raise FileFormatError(path, "calibration tensors do not match the network",
                              ["input", *net.names], list(observers))
    images = tensors.get("images")
    if images is None or images.dtype != np.float32 or images.ndim != 4:
        raise FileFormatError(path, "calibration images missing or malformed", "float32 (N, C, H, W)",
                              None if images is None else f"{images.dtype} {images.shape}")
    return Calibration(json.loads(metadata["method"]), observers, arch, images,
                       int(json.loads(metadata.get("seed", "0"))))
