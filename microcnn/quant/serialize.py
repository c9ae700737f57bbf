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
from ..io import FORMAT_NAME, FORMAT_VERSION, SafetensorsFile, write_safetensors
from ..jsonutil import load_json_bounded
from ..layers import layer_from_config
from .params import KERNEL_BITS, ActQuant, check_bits

KIND_QUANTIZED = "quantized"
KIND_CALIBRATION = "calibration"
COMPRESSED_KINDS = ("compressed-int8", "compressed-fp16")
MODEL_KINDS = ("fp32", KIND_QUANTIZED, *COMPRESSED_KINDS)
INPUT = "input"  # name of the network-input tensor; layer outputs use the layer names (conv1, relu1, ...)


def _meta(kind: str, architecture: dict, **extra) -> dict:
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
            "architecture": json.dumps(architecture)}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    return meta


def _json(path, metadata, key):
    if key not in metadata:
        raise FileFormatError(path, f"metadata {key!r} missing")
    return load_json_bounded(metadata[key], path, f"metadata {key!r}")


# -- quantized networks ------------------------------------------------------------------------------
def save_quantized(qnet, path, specs: list | None = None, **extra) -> None:
    """Write ``qnet``'s stages (``specs``: their descriptions, default each stage's ``spec()``; ``extra``:
    more metadata, e.g. a graph's outputs)."""
    tensors = {}
    for i, stage in enumerate(qnet.stages):
        for name, arr in stage.tensors().items():
            tensors[f"{i}.{name}"] = arr
    write_safetensors(path, tensors, _meta(KIND_QUANTIZED, qnet.architecture,
                                           stages=specs or [s.spec() for s in qnet.stages],
                                           settings=qnet.settings, **extra))


def refuse_kind(path, kind):
    """A file ``microcnn.load`` cannot rebuild: a calibration file (with advice) or an unknown kind."""
    if kind == KIND_CALIBRATION:
        raise FileFormatError(path, "this is a calibration file, not a model; load it with "
                              "microcnn.quant.Calibration.load(path, net)", "a model", "kind=calibration")
    raise FileFormatError(path, "unknown model kind", MODEL_KINDS, kind)


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
        """The stored output quantization of a stage; ``bits`` must already be a checked kernel width."""
        scale = float(self.get(f"{prefix}.out_scale", np.float32, (1,))[0])
        zp = int(self.get(f"{prefix}.out_zero_point", np.uint8, (1,))[0])
        qmax = (1 << bits) - 1
        with np.errstate(over="ignore"):  # dequantizing the largest code must stay finite in float32
            largest = np.float32(qmax) * np.float32(scale)
        if not scale > 0 or zp > qmax or not np.isfinite(largest):
            raise FileFormatError(self.path, f"{prefix}: bad activation quantization",
                                  f"scale > 0, scale * {qmax} finite in float32 and zero point <= {qmax}",
                                  f"scale {scale}, zero point {zp}")
        return ActQuant(scale, zp, bits)

    def finish(self):
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise FileFormatError(self.path, "unexpected tensors", "only the stages' tensors", extra[:5])


# FP32 layer types each stage kind may implement, in order (a weighted stage fuses a following ReLU and,
# for convolutions, a following MaxPool2d). A "float" stage runs any one layer.
# A BatchNorm after the weighted layer is folded into its weights and covered by the same stage.
STAGE_LAYERS: dict[str, list[list[str]]] = {
    "quantize": [[]], "dequantize": [[]],
    "qconv2d": [["Conv2d", *bn, *tail] for bn in ([], ["BatchNorm2d"])
                for tail in ([], ["ReLU"], ["MaxPool2d"], ["ReLU", "MaxPool2d"])],
    "qlinear": [["Linear", *bn, *tail] for bn in ([], ["BatchNorm1d"]) for tail in ([], ["ReLU"])],
    "qmaxpool2d": [["MaxPool2d"]], "qrelu": [["ReLU"]], "flatten": [["Flatten"]],
}
FOLDED_FLOAT = (["Conv2d", "BatchNorm2d"], ["Linear", "BatchNorm1d"])  # an FP32 stage of a folded pair
INTEGER_INPUT = ("dequantize", "qconv2d", "qlinear", "qmaxpool2d", "qrelu")  # need a quantized input
FLOAT_INPUT = ("quantize", "float")  # need a real-valued input


def read_quantized(tensors: dict, metadata: dict, arch: dict, path) -> tuple[list, dict]:
    """The stages and settings of a quantized file, every stage checked against the architecture and
    the tensors (``QuantizedSequential(stages, arch, settings)`` is the model)."""
    specs = _json(path, metadata, "stages")
    settings = _json(path, metadata, "settings")
    if not isinstance(specs, list) or not isinstance(settings, dict):
        raise FileFormatError(path, "stages/settings metadata malformed", "a list and an object",
                              f"{type(specs).__name__} and {type(settings).__name__}")
    layers_cfg = arch.get("layers") if isinstance(arch, dict) else None
    if not isinstance(layers_cfg, list) or not all(isinstance(c, dict) for c in layers_cfg):
        raise FileFormatError(path, "architecture metadata malformed", '{"layers": [{...}, ...]}',
                              str(arch)[:120])
    reader = _Reader(tensors, path)
    stages, act, next_layer, where = [], None, 0, "the stages"
    try:
        for i, spec in enumerate(specs):
            where = f"stage {i}"
            kind, covered = _stage_kind(path, i, spec, STAGE_LAYERS), spec.get("layers")
            if not (isinstance(covered, list) and all(type(j) is int for j in covered)
                    and covered == list(range(next_layer, next_layer + len(covered)))):
                raise FileFormatError(path, f"stage {i} does not continue the layer sequence",
                                      f"layers from {next_layer}", covered)
            if next_layer + len(covered) > len(layers_cfg):
                raise FileFormatError(path, f"stage {i} refers to layers beyond the architecture",
                                      f"< {len(layers_cfg)}", covered)
            types = [layers_cfg[j].get("type") for j in covered]
            if types not in STAGE_LAYERS.get(kind, [types] if len(types) == 1 else FOLDED_FLOAT):
                raise FileFormatError(path, f"stage {i} ({kind}) does not match layers {covered}",
                                      STAGE_LAYERS.get(kind, "one layer"), types)
            next_layer += len(covered)
            if kind in INTEGER_INPUT:
                _need(act, path, i)
            elif kind in FLOAT_INPUT and act is not None:
                raise FileFormatError(path, f"stage {i} ({kind}) needs a real-valued input but the previous "
                                      "stage outputs integers")
            # The covered layers are built stage by stage, each after the stages before it passed: a file
            # refused early allocates none of them. Their configs normalise what the stage is compared to.
            layers = [layer_from_config(layers_cfg[j]) for j in covered]
            stage = _stage(kind, spec, covered, layers, act, reader, i, path)
            stages.append(stage)
            act = stage.out_act
        where = "the network"
        if act is not None:
            raise FileFormatError(path, "the last stage outputs integers", "real values (a dequantize stage)",
                                  f"stage {len(specs) - 1} ({specs[-1].get('kind')})")
        reader.finish()
        _check_settings(path, settings, stages, layers_cfg)
        return stages, settings
    except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(path, f"quantized model does not describe a valid network ({where}: {exc})"
                              ) from None


MERGE_LAYERS = {"qadd": [["Add"], ["Add", "ReLU"]], "qconcat": [["Concat"]]}  # a graph's integer merges


def _strip(key: str) -> str:
    """The graph tensor a step's key holds: "t:q" / "t:f" are t quantized / dequantized."""
    return key[:-2] if key.endswith((":q", ":f")) else key


def read_quantized_graph(tensors: dict, metadata: dict, arch: dict, path) -> tuple[list, dict, list]:
    """The steps, settings and (output, logits) keys of a quantized file whose architecture is a graph
    (``QuantizedGraph(steps, arch, settings, *outputs)`` is the model): every step checked against the
    graph (node types, which tensors it reads and writes, the domain of each) and the tensors."""
    from ..graph import Graph
    from .qlayers import QAdd, QConcat

    specs, settings, outputs = (_json(path, metadata, k) for k in ("stages", "settings", "outputs"))
    if not (isinstance(specs, list) and isinstance(settings, dict) and isinstance(outputs, list)
            and len(outputs) == 2 and all(isinstance(o, str) for o in outputs)):
        raise FileFormatError(path, "stages/settings/outputs metadata malformed",
                              "a list, an object and two tensor names", str(outputs)[:80])
    try:
        graph = Graph.from_config(arch)
    except InputError as exc:
        raise FileFormatError(path, f"architecture is invalid ({exc})") from None
    nodes = graph.nodes
    layers_cfg = [{"type": n.layer.type, **n.layer.config()} for n in nodes]
    domains: dict[str, ActQuant | None] = {graph.input_name: None}  # each tensor key: its quantization
    reader, seen, steps = _Reader(tensors, path), set(), []
    where = "the stages"
    try:
        for i, spec in enumerate(specs):
            where = f"stage {i}"
            allowed = {**STAGE_LAYERS, **MERGE_LAYERS}
            kind = _stage_kind(path, i, spec, allowed)
            covered, ins, out = (spec.get(k) for k in ("layers", "inputs", "output"))
            if not (isinstance(covered, list) and all(type(j) is int and 0 <= j < len(nodes) and j not in seen
                                                      for j in covered) and isinstance(ins, list) and ins
                    and all(isinstance(k, str) and k in domains for k in ins)
                    and isinstance(out, str) and out not in domains):
                raise FileFormatError(path, f"stage {i}: layers, inputs or output do not fit the graph",
                                      "new node indices, earlier tensors, a new name", [covered, ins, out])
            seen.update(covered)
            types = [layers_cfg[j]["type"] for j in covered]
            if types not in allowed.get(kind, [types] if len(types) == 1 else FOLDED_FLOAT):
                raise FileFormatError(path, f"stage {i} ({kind}) does not match nodes {covered}",
                                      allowed.get(kind, "one node"), types)
            chain = [nodes[j] for j in covered]
            if chain:  # reads its first node's inputs, writes its last one's output, each reads the last
                wired = ([_strip(k) for k in ins] == list(chain[0].inputs) and out == chain[-1].name
                         and all(b.inputs == (a.name,) for a, b in zip(chain, chain[1:], strict=False)))
            else:  # a conversion writes its input's tensor in the other domain
                wired = len(ins) == 1 and out == _strip(ins[0]) + (":q" if kind == "quantize" else ":f")
            if not wired:
                raise FileFormatError(path, f"stage {i} ({kind}) reads or writes other tensors than its "
                                      "nodes",
                                      [n.inputs for n in chain], [ins, out])
            acts = [domains[k] for k in ins]
            if (kind in (*INTEGER_INPUT, *MERGE_LAYERS) and None in acts) or (
                    kind in FLOAT_INPUT and acts[0] is not None):
                raise FileFormatError(path, f"stage {i} ({kind}) gets its input in the wrong domain",
                                      "integers" if kind not in FLOAT_INPUT else "real values",
                                      ["real" if a is None else "integer" for a in acts])
            if kind in MERGE_LAYERS:
                out_act = reader.act(str(i), check_bits(spec.get("bits"), "bits"))
                stage = (QAdd(covered, acts, out_act, relu=len(covered) == 2) if kind == "qadd"
                         else QConcat(covered, acts, out_act, layers_cfg[covered[0]]["axis"]))
            else:
                stage = _stage(kind, spec, covered, [n.layer for n in chain], acts[0], reader, i, path)
            steps.append((stage, tuple(ins), out))
            domains[out] = stage.out_act
        where = "the network"
        if not all(domains.get(o, 0) is None for o in outputs):
            raise FileFormatError(path, "the outputs are not real-valued tensors of the steps", "dequantized",
                                  outputs)
        reader.finish()
        _check_settings(path, settings, [s for s, _, _ in steps], layers_cfg, graph.names)
        return steps, settings, outputs
    except (KeyError, IndexError, TypeError, ValueError, ArithmeticError, InputError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(path, f"quantized graph does not describe a valid network ({where}: {exc})"
                              ) from None


def _stage_kind(path, i: int, spec, allowed: dict) -> str:
    """The kind of stage ``i``'s description: a known one (``allowed`` or "float") of a JSON object."""
    if not isinstance(spec, dict):
        raise FileFormatError(path, f"stage {i} is not an object", "a JSON object", type(spec).__name__)
    kind = spec.get("kind")
    if not isinstance(kind, str) or (kind not in allowed and kind != "float"):
        raise FileFormatError(path, f"stage {i}: unknown stage kind", [*allowed, "float"], kind)
    return kind


def _check_settings(path, settings: dict, stages, layers_cfg, names=None) -> None:
    """The bit widths ``settings`` reports (and the command line prints as the precision) must be the
    ones the stages compute with: per weighted layer in ``layer_bits`` (32 for a layer left in FP32),
    ``weight_bits`` when every layer has the same width, ``act_bits`` for every integer stage."""
    from types import SimpleNamespace

    from ..network import layer_names
    from .qlayers import FloatStage, QWeighted

    names = names or layer_names([SimpleNamespace(type=c.get("type")) for c in layers_cfg])
    used = {}
    for stage in stages:
        if isinstance(stage, QWeighted):
            used[names[stage.layers[0]]] = stage.weight_bits
        elif isinstance(stage, FloatStage) and stage.layer.parameters():
            used[names[stage.layers[0]]] = 32
    acts = {stage.in_act.bits for stage in stages if isinstance(stage, QWeighted)}
    found = {k: settings.get(k) for k in ("weight_bits", "act_bits", "layer_bits")}
    ok = "layer_bits" not in settings or settings["layer_bits"] == used
    ok = ok and ("act_bits" not in settings or acts <= {settings["act_bits"]})
    widths = set(used.values()) - {32}
    wbits = settings.get("weight_bits", next(iter(widths), 8))
    ok = ok and type(wbits) is int and wbits in KERNEL_BITS and (len(widths) != 1 or widths == {wbits})
    ok = ok and settings.get("symmetric", True) == all(
        s.symmetric for s in stages if isinstance(s, QWeighted))
    if not ok:
        raise FileFormatError(path, "settings report other bit widths than the stages compute with",
                              {"weight_bits": widths.pop() if len(widths) == 1 else "mixed",
                               "act_bits": sorted(acts), "layer_bits": used}, found)


def _agree(path, i, spec, key, expected):
    """A stage's copy of an architecture setting must be the architecture's."""
    found = spec.get(key)
    if found != expected or (isinstance(expected, bool) and not isinstance(found, bool)):
        raise FileFormatError(path, f"stage {i}: {key} differs from the architecture", expected, found)


def _stage(kind, spec, covered, layers, act, reader, i, path):
    """Stage ``i`` of a file, built from its spec and the architecture's ``layers`` it covers (already
    checked to be the types ``kind`` implements, with an input in the domain it needs)."""
    from ..network import fold_pair
    from .qlayers import (
        DequantizeStage,
        FlattenStage,
        FloatStage,
        QConv2d,
        QLinear,
        QMaxPool2d,
        QReLU,
        QuantizeStage,
    )

    if kind == "quantize":  # bits are checked before any use (1 << 2**31 is a 256 MB integer)
        return QuantizeStage(reader.act(str(i), check_bits(spec.get("bits"), "bits")))
    if kind == "dequantize":
        return DequantizeStage(act)
    if kind == "qmaxpool2d":
        _agree(path, i, spec, "kernel_size", list(layers[0].kernel_size))
        _agree(path, i, spec, "stride", list(layers[0].stride))
        return QMaxPool2d(covered, act, layers[0].kernel_size, layers[0].stride)
    if kind == "qrelu":
        return QReLU(covered, act)
    if kind == "flatten":
        return FlattenStage(covered, act)
    if kind == "float":
        # a folded pair: the weighted layer with a bias (the fold's shapes; the file holds the values)
        layer = fold_pair(*layers) if len(layers) == 2 else layers[0]
        for pname, p in zip(("weight", "bias"), layer.parameters(), strict=False):
            p.data[...] = reader.get(f"{i}.{pname}", np.float32, p.data.shape)
        return FloatStage(covered, layer)
    # qconv2d / qlinear: the architecture says which ReLU and pooling are fused, and how
    layer, types = layers[0], [x.type for x in layers]
    relu = "ReLU" in types
    pool = (layers[-1].kernel_size, layers[-1].stride) if types[-1] == "MaxPool2d" else None
    shape = layer.weight.data.shape
    _agree(path, i, spec, "weight_shape", list(shape))
    _agree(path, i, spec, "relu", relu)
    wbits = check_bits(spec.get("weight_bits"), "weight_bits")
    abits = check_bits(spec.get("act_bits"), "act_bits")
    if act.bits != abits:
        raise FileFormatError(path, f"stage {i}: input activation bits", abits, act.bits)
    float_output = spec.get("float_output")
    if not isinstance(float_output, bool):
        raise FileFormatError(path, f"stage {i}: float_output", "true or false", float_output)
    wq = _weight_codes(reader, f"{i}.weight", shape, wbits)
    o = shape[0]
    wscale = reader.tensors.get(f"{i}.weight_scale")
    wscale = reader.get(f"{i}.weight_scale", np.float32,
                        (1,) if wscale is not None and wscale.shape == (1,) else (o,))
    bias = reader.get(f"{i}.bias", np.int32, (o,))
    symmetric = spec.get("weight_symmetric", True)  # files before asymmetric weights: symmetric
    if not isinstance(symmetric, bool):
        raise FileFormatError(path, f"stage {i}: weight_symmetric", "true or false", symmetric)
    wzp = None if symmetric else reader.get(f"{i}.weight_zero_point", np.int8, wscale.shape)
    out_act = None if float_output else reader.act(str(i), abits)
    common = (covered, wq, wbits, wscale, bias, act, out_act, relu)
    if kind == "qlinear":
        return QLinear(*common, requant=spec.get("requant"), weight_zero_point=wzp)
    _agree(path, i, spec, "stride", list(layer.stride))
    _agree(path, i, spec, "padding", list(layer.padding))
    _agree(path, i, spec, "pool", None if pool is None else [list(pool[0]), list(pool[1])])
    _agree(path, i, spec, "groups", layer.groups if layer.groups > 1 else None)
    return QConv2d(*common, stride=layer.stride, padding=layer.padding, pool=pool,
                   requant=spec.get("requant"), weight_zero_point=wzp, groups=layer.groups)


def _weight_codes(reader, key, shape, bits: int) -> np.ndarray:
    """The signed weight codes of a stage: an int8 tensor of the weight's shape at 8 bits, else the
    packed stream of exactly ceil(n * bits / 8) bytes whose unused last bits are 0."""
    from ..kernels.packing import packed_size, padding_is_zero, unpack_bits

    if bits == 8:
        return reader.get(key, np.int8, shape)
    n = int(np.prod(shape))
    packed = reader.get(key, np.uint8, (packed_size(n, bits),))
    if not padding_is_zero(packed, n, bits):
        raise FileFormatError(reader.path, f"tensor {key}: bits set after the last of {n} {bits}-bit codes",
                              "zero padding bits", f"last byte {int(packed[-1]):#04x}")
    return unpack_bits(packed, bits, n, True).reshape(shape)


def _need(act, path, i):
    if act is None:
        raise FileFormatError(path, f"stage {i} needs a quantized input but the previous stage outputs "
                              "floats")
    return act


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


# Bounds on what a calibration file may ask for (defaults: 4096 bins, 100 / 512 candidates). The range
# searches cost candidates x bins per tensor: these keep the worst file to seconds, not hours.
MAX_BINS = 1 << 16
MAX_CANDIDATES = 1000  # MSEObserver
MAX_KL_CANDIDATES = 4096  # EntropyObserver
MAX_SEED = 2**63 - 1
# name: (type, lowest, highest) of every observer constructor setting a file may give; the constructor
# then applies its own finer rule (bins a multiple of 4, 50 < percentile, 0 < averaging_constant).
_PARAM_BOUNDS = {"bins": (int, 64, MAX_BINS), "candidates": (int, 1, MAX_CANDIDATES),
                 "max_candidates": (int, 1, MAX_KL_CANDIDATES), "percentile": (float, 50, 100),
                 "averaging_constant": (float, 0, 1)}
_OBSERVER_PARAMS = {"minmax": (), "ema": ("averaging_constant",), "percentile": ("bins", "percentile"),
                    "mse": ("bins", "candidates"), "entropy": ("bins", "max_candidates")}


def observer_state_layout(kind: str, params: dict) -> dict:
    """name -> (dtype, shape) of the state an observer of ``kind`` saves, from its settings alone: the
    file's tensors are compared with it before any observer (or its histogram) is allocated."""
    count = {"count": (np.dtype(np.int64), (1,))}
    if kind in ("minmax", "ema"):
        return {"minmax": (np.dtype(np.float64), (2,)), **count}
    bins = params["bins"]
    return {"pos": (np.dtype(np.int64), (bins,)), "neg": (np.dtype(np.int64), (bins,)),
            "scalars": (np.dtype(np.float64), (3,)), **count}


def _calibration_field(path, field: str, expected: str, found):
    """The error for one field of a calibration file: ``<path>: calibration field <field> (expected
    <expected>, found <found>)``."""
    return FileFormatError(path, f"calibration field {field}", expected.removeprefix("expected "),
                           str(found)[:120])


def _observer_specs(path, specs, expected_names) -> list:
    """(tensor, kind, params) of every observer entry, each field checked and bounded."""
    from .observers import OBSERVERS

    if not isinstance(specs, list) or len(specs) != len(expected_names):
        raise _calibration_field(path, "observers", f"expected a list of {len(expected_names)} entries "
                                 f"(one per tensor: {expected_names})", type(specs).__name__
                                 if not isinstance(specs, list) else f"{len(specs)} entries")
    out = []
    for i, entry in enumerate(specs):
        field = f"observers[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"tensor", "kind", "params"}:
            raise _calibration_field(path, field, 'expected {"tensor", "kind", "params"}', entry)
        tensor, kind, params = entry["tensor"], entry["kind"], entry["params"]
        if tensor != expected_names[i]:
            raise _calibration_field(path, f"{field}.tensor", f"expected {expected_names[i]!r}", tensor)
        if not isinstance(kind, str) or kind not in OBSERVERS:
            raise _calibration_field(path, f"{field}.kind", f"expected one of {sorted(OBSERVERS)}", kind)
        if not isinstance(params, dict) or set(params) != set(_OBSERVER_PARAMS[kind]):
            raise _calibration_field(path, f"{field}.params", f"expected keys {list(_OBSERVER_PARAMS[kind])}",
                                     params)
        for key, value in params.items():
            kind_of, lo, hi = _PARAM_BOUNDS[key]
            ok = isinstance(value, int if kind_of is int else int | float) and not isinstance(value, bool)
            if not (ok and lo <= value <= hi):
                raise _calibration_field(path, f"{field}.params.{key}", f"expected {kind_of.__name__} in "
                                         f"[{lo}, {hi}]", repr(value))
        out.append((tensor, kind, params))
    return out


def _check_observer_state(path, tensor, kind, state) -> None:
    """The statistics an observer could have collected: at least one value, finite ordered extremes,
    histograms whose counts add up to the value count and whose width covers the extremes."""
    count = int(state["count"][0])
    field = f"tensor {tensor}"
    if not 1 <= count <= 2**62:
        raise _calibration_field(path, f"{field}.count", "expected 1 .. 2**62 observed values", count)
    lo, hi = (state["minmax"] if "minmax" in state else state["scalars"][1:]).tolist()
    if not (np.isfinite([lo, hi]).all() and lo <= hi):
        raise _calibration_field(path, f"{field} min/max", "expected finite min <= max", [lo, hi])
    if "scalars" in state:
        limit = float(state["scalars"][0])
        top = max(abs(lo), abs(hi))
        # The observer starts at max|x| * (1 + 1e-6) and doubles while max|x| reaches it.
        if not (top < limit <= 2.00001 * top or top == limit == 0.0):
            raise _calibration_field(path, f"{field} histogram limit", f"expected above max |x| {top:g} and "
                                     "at most twice it (0 when every value is 0)", limit)
        pos, neg = state["pos"], state["neg"]
        if (pos < 0).any() or (neg < 0).any():
            raise _calibration_field(path, f"{field} histogram", "expected counts >= 0", "negative counts")
        total = sum(int(c) for c in pos[pos > 0]) + sum(int(c) for c in neg[neg > 0])  # Python ints
        if total != count:
            raise _calibration_field(path, f"{field} histogram", f"expected counts adding up to {count}",
                                     total)


def read_calibration(path, net=None) -> tuple:
    """Read a calibration file: ``(method, observers, architecture, images, seed)``, the arguments of
    ``Calibration``. With ``net``, refuse one made for another architecture. Every field of the metadata
    is checked and bounded, and every tensor's name, dtype and shape compared with what the observers
    need, before any tensor is read or any observer allocated."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from ..io import architecture_of
    from ..network import layer_names
    from .observers import OBSERVERS

    with SafetensorsFile(path) as st:
        metadata = st.metadata
        if metadata.get("kind") != KIND_CALIBRATION:
            raise FileFormatError(path, "not a calibration file", f"kind={KIND_CALIBRATION}",
                                  f"kind={metadata.get('kind')}")
        arch = architecture_of(path, metadata)
        types = [c.get("type") for c in arch["layers"]]
        if not all(isinstance(t, str) for t in types):
            raise _calibration_field(path, "architecture.layers", "expected a type name per layer", types)
        if net is not None and arch["layers"] != net.config()["layers"]:
            raise FileFormatError(path, "calibration statistics belong to another architecture",
                                  [c["type"] for c in net.config()["layers"]], types)
        names = [INPUT, *(net.names if net is not None else
                          layer_names([SimpleNamespace(type=t) for t in types]))]
        method = _json(path, metadata, "method")
        if not isinstance(method, str) or method not in OBSERVERS:
            raise _calibration_field(path, "method", f"expected one of {sorted(OBSERVERS)}", method)
        seed = _json(path, metadata, "seed") if "seed" in metadata else 0
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise _calibration_field(path, "seed", f"expected an integer in 0..{MAX_SEED}", seed)
        specs = _observer_specs(path, _json(path, metadata, "observers"), names)
        expected = {f"{t}.{k}": v for t, kind, params in specs
                    for k, v in observer_state_layout(kind, params).items()}
        images = st.entries.get("images")
        if images is None or images[0] != np.float32 or len(images[1]) != 4 or images[1][0] < 1:
            raise _calibration_field(path, "images", "expected float32 (N >= 1, C, H, W)", images)
        shape = arch.get("input_shape")
        if shape is not None and list(images[1][1:]) != shape:
            raise _calibration_field(path, "images", f"expected images of the architecture's input_shape "
                                     f"{shape}", list(images[1]))
        found = {k: v for k, v in st.entries.items() if k != "images"}
        if found != expected:
            name = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
            raise _calibration_field(path, f"tensor {name[0]}", f"expected {expected.get(name[0], 'none')}",
                                     found.get(name[0], "missing"))
        tensors = st.read()
    if not np.isfinite(tensors["images"]).all():
        raise _calibration_field(path, "images", "expected finite values", "NaN/Inf")
    observers = OrderedDict()
    for tensor, kind, params in specs:
        prefix = tensor + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _check_observer_state(path, tensor, kind, state)
        try:
            obs = OBSERVERS[kind](tensor, **params)
            obs.load_state(state)
        except InputError as exc:
            raise _calibration_field(path, f"observer {tensor}", str(exc), params) from None
        observers[tensor] = obs
    return method, observers, arch, tensors["images"], seed
