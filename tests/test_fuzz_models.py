"""Fuzzing the model-file parsers (``read_safetensors``, ``load_raw``, ``load_model`` and the quantized
loader behind it): whatever the bytes, the result is a model that works or a ``MicrocnnError``
(``FileNotFoundError`` for a missing file), never another exception, and quickly.

Run with ``pytest -s`` to see how many inputs each test tried and how they ended.
"""

from __future__ import annotations

import copy
import json
import struct
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microcnn
from microcnn import io
from microcnn.errors import MicrocnnError
from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Softmax
from microcnn.network import Sequential

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_SECONDS_PER_INPUT = 2.0
DTYPES = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
NUMPY_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
# Values a corrupted or forged header likes to hold: boundaries, wrong types, NaN (json reads "NaN").
JSON_VALUES = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, -1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 255, 256, 2**31 - 1, 2**31, 10**9, 2**63,
                     10**30]),
    st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6),
    st.sampled_from(["Conv2d", "Linear", "MaxPool2d", "Softmax", "Flatten", "qconv2d", "qlinear", "float",
                     "quantize", "dequantize", "qmaxpool2d", "qrelu", "flatten", "fixedpoint", "fp32",
                     "quantized", "compressed-int8", "compressed-fp16", "calibration", "microcnn"]),
    st.lists(st.integers(-2, 10), max_size=4), st.lists(st.lists(st.integers(-1, 4), max_size=3), max_size=3),
    st.dictionaries(st.sampled_from(["type", "layers", "kind", "bits", "x"]), st.integers(-1, 9), max_size=2),
)
IMAGES = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)


def small_net(seed: int = 0) -> Sequential:
    """Every stage kind the quantizer emits (fused pool, unpooled conv, flatten, dense, float softmax)
    in a network small enough to load hundreds of times a second."""
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(1, 4, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2), Conv2d(4, 6, 3, rng=rng),
                      ReLU(), Flatten(), Linear(24, 5, rng=rng), ReLU(), Linear(5, 3, rng=rng), Softmax(),
                      input_shape=(1, 8, 8))


class Outcomes:
    """Feeds inputs to a loader and tallies how they ended; any other exception fails the test."""

    def __init__(self, path):
        self.path = path
        self.counts: Counter[str] = Counter()
        self.slowest = 0.0

    def run(self, load, data: bytes) -> tuple[bool, object]:
        """(loaded, result): whether ``load`` returned, and what."""
        self.path.write_bytes(data)
        start = time.perf_counter()
        try:
            result = load(self.path)
        except (MicrocnnError, FileNotFoundError) as err:
            assert str(self.path) in str(err), err  # every refusal names the file
            self.counts[type(err).__name__] += 1
            loaded, result = False, None
        else:
            self.counts["loaded"] += 1
            loaded = True
        self.slowest = max(self.slowest, time.perf_counter() - start)
        return loaded, result

    def report(self, label: str, minimum: int) -> None:
        total = sum(self.counts.values())
        print(f"\n{label}: {total} inputs tried, {dict(self.counts)}, slowest {self.slowest * 1e3:.1f} ms")
        assert total >= minimum
        assert self.slowest < MAX_SECONDS_PER_INPUT


class PredictRefused(MicrocnnError):
    """Counted apart: the file loaded, then ``predict`` refused cleanly (e.g. the file declares another
    input shape, or weights so large that the outputs overflow)."""


def load_and_predict(path):
    """microcnn.load, then one prediction: an accepted file must give a model that works or says why
    not with a MicrocnnError, whatever the loader let through."""
    model = microcnn.load(path)
    if isinstance(model, Sequential):  # skip the conv auto-tuner's timing runs: hundreds of fresh models
        model.set_conv_algorithm("im2col")
    try:
        probs = model.predict(IMAGES)
    except MicrocnnError as err:
        raise PredictRefused(f"{path}: loaded, then predict refused: {err}") from None
    # Finite; not necessarily probabilities: a mutated architecture may have lost its Softmax.
    assert probs.shape[0] == len(IMAGES) and np.isfinite(probs).all(), probs
    return model


# -- JSON structure mutations ----------------------------------------------------------------------
def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def mutate_json(obj, data):
    """Replace, delete or duplicate one node of ``obj`` (a deep copy) chosen by hypothesis."""
    obj = copy.deepcopy(obj)
    paths = list(_paths(obj))
    path = paths[data.draw(st.integers(0, len(paths) - 1), label="node")]
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]), label="op")
    if not path:
        return data.draw(JSON_VALUES, label="root") if op == "replace" else obj
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "replace":
        parent[key] = data.draw(JSON_VALUES, label="value")
    elif op == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent[key + "_"] = copy.deepcopy(parent[key])
    return obj


def mutate_tensors(tensors: dict, data) -> dict:
    tensors = dict(tensors)
    names = sorted(tensors)
    name = data.draw(st.sampled_from(names), label="tensor")
    arr = tensors[name]
    op = data.draw(st.sampled_from(["dtype", "shape", "values", "values", "drop", "extra"]),
                   label="tensor op")
    if op == "dtype":
        tensors[name] = arr.astype(data.draw(st.sampled_from(NUMPY_DTYPES), label="dtype"))
    elif op == "shape":
        change = data.draw(st.sampled_from(["flat", "row", "shorter", "longer"]), label="shape op")
        tensors[name] = {"flat": lambda a: a.reshape(-1), "row": lambda a: a.reshape(1, -1),
                         "shorter": lambda a: a.reshape(-1)[:-1], "longer": lambda a: np.append(a, a.flat[:1])
                         }[change](arr)
    elif op == "values":
        if arr.dtype.kind == "f":
            extremes = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-45, 3e38, -3e38]
        else:
            info = np.iinfo(arr.dtype)
            extremes = [info.min, info.max, 0, 1]
        new = arr.copy().reshape(-1)
        if new.size:
            where = data.draw(st.lists(st.integers(0, new.size - 1), min_size=1, max_size=4), label="where")
            new[where] = data.draw(st.sampled_from(extremes), label="extreme")
        tensors[name] = new.reshape(arr.shape)
    elif op == "drop":
        del tensors[name]
    else:
        tensors[name + "x"] = arr
    return tensors


# -- read_safetensors ------------------------------------------------------------------------------
def test_read_safetensors_random_bytes(tmp_path):
    outcomes = Outcomes(tmp_path / "random.safetensors")

    @FUZZ
    @given(data=st.binary(max_size=300))
    def run(data):
        outcomes.run(io.read_safetensors, data)

    run()
    outcomes.report("read_safetensors, random bytes", minimum=150)


_TENSOR = st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3))


def test_read_safetensors_random_headers(tmp_path):
    # Random bytes rarely get past the header length. These headers follow the schema with a consistent
    # layout (so some load), then hypothesis may replace, delete or duplicate one node of the JSON.
    outcomes = Outcomes(tmp_path / "header.safetensors")

    @FUZZ
    @given(tensors=st.dictionaries(st.text(min_size=1, max_size=3), _TENSOR, max_size=4),
           metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                          max_size=2)),
           mutate=st.booleans(), extra=st.binary(max_size=3), data=st.data())
    def run(tensors, metadata, mutate, extra, data):
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            nbytes = int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[DTYPES.index(dtype)]).itemsize
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata is not None:
            header["__metadata__"] = metadata
        if mutate:
            header = mutate_json(header, data)
        body = data.draw(st.binary(min_size=offset, max_size=offset), label="body") + extra
        head = json.dumps(header).encode()
        loaded, result = outcomes.run(io.read_safetensors, struct.pack("<Q", len(head)) + head + body)
        if loaded:
            loaded_tensors, loaded_metadata = result
            assert loaded_metadata == (header.get("__metadata__") or {})
            for name, arr in loaded_tensors.items():
                entry = header[name]
                begin, end = entry["data_offsets"]
                assert list(arr.shape) == entry["shape"]
                assert arr.dtype == np.dtype(NUMPY_DTYPES[DTYPES.index(entry["dtype"])]).newbyteorder("<")
                assert arr.tobytes() == body[begin:end]
        elif not mutate and not extra:
            raise AssertionError(f"a consistent header was refused: {header}")

    run()
    outcomes.report("read_safetensors, schema-shaped headers, mutated or not", minimum=150)
    assert outcomes.counts["loaded"] > 20 and outcomes.counts["FileFormatError"] > 20


# -- load_raw --------------------------------------------------------------------------------------
def test_load_raw_random_bytes(tmp_path):
    net = Sequential(Flatten(), Linear(4, 3), Softmax())  # 15 float32 parameters: 60 bytes
    outcomes = Outcomes(tmp_path / "random.raw")

    @FUZZ
    @given(data=st.one_of(st.binary(max_size=80), st.binary(min_size=56, max_size=64),
                          st.binary(min_size=60, max_size=60)))
    def run(data):
        before = np.concatenate([p.reshape(-1) for p in net.state_dict().values()])
        loaded, _ = outcomes.run(lambda p: io.load_raw(net, p), data)
        floats = np.frombuffer(data[:len(data) // 4 * 4], "<f4")
        assert loaded == (len(data) == 60 and bool(np.isfinite(floats).all()))
        after = np.concatenate([p.reshape(-1) for p in net.state_dict().values()])
        # Accepted: the bytes, in layer order. Refused: nothing changed.
        np.testing.assert_array_equal(after, floats if loaded else before)

    run()
    outcomes.report("load_raw, random bytes", minimum=150)
    assert outcomes.counts["loaded"] > 0 and outcomes.counts["FileFormatError"] > 0


# -- load_model: FP32 files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "small.safetensors"
    small_net().save(path)
    load_and_predict(path)  # compiles the kernels before any input is timed
    return path.read_bytes()


def _byte_mutation(valid: bytes, data) -> bytes:
    head_end = 8 + struct.unpack("<Q", valid[:8])[0]
    op = data.draw(st.sampled_from(["flip", "flip_header", "truncate", "insert", "delete"]), label="byte op")
    out = bytearray(valid)
    if op in ("flip", "flip_header"):
        limit = head_end if op == "flip_header" else len(out)
        for pos, mask in data.draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(1, 255)),
                                            min_size=1, max_size=3), label="flips"):
            out[pos] ^= mask
    elif op == "truncate":
        del out[data.draw(st.integers(0, len(out) - 1), label="cut"):]
    elif op == "insert":
        pos = data.draw(st.integers(0, len(out)), label="pos")
        out[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
    else:
        pos = data.draw(st.integers(0, len(out) - 1), label="pos")
        del out[pos:pos + data.draw(st.integers(1, 8), label="deleted")]
    return bytes(out)


def _rewritten(path, tensors, metadata) -> bytes:
    io.write_safetensors(path, tensors, metadata)
    return path.read_bytes()


def _structural_mutation(tmp_path, valid_path, data) -> bytes:
    tensors, metadata = io.read_safetensors(valid_path)
    json_keys = sorted(k for k in metadata if k in ("architecture", "stages", "settings"))
    target = data.draw(st.sampled_from([*json_keys, "tensors", "metadata"]), label="target")
    if target == "tensors":
        tensors = mutate_tensors(tensors, data)
    elif target == "metadata":
        mutated = mutate_json(metadata, data)
        if isinstance(mutated, dict):  # the writer stores str(value) for each key
            metadata = mutated
    else:
        metadata = {**metadata, target: json.dumps(mutate_json(json.loads(metadata[target]), data))}
    return _rewritten(tmp_path / "mutant.tmp", tensors, metadata)


def test_load_model_mutated_fp32_files(tmp_path, fp32_file):
    valid = tmp_path / "valid.safetensors"
    valid.write_bytes(fp32_file)
    outcomes = Outcomes(tmp_path / "mutant.safetensors")

    @FUZZ
    @given(data=st.data(), structural=st.booleans())
    def run(data, structural):
        if structural:
            mutant = _structural_mutation(tmp_path, valid, data)
        else:
            mutant = _byte_mutation(fp32_file, data)
        outcomes.run(load_and_predict, mutant)

    run()
    outcomes.report("load_model, mutated FP32 files", minimum=150)
    assert outcomes.counts["FileFormatError"] > 0


# -- the quantized loader ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized_files(tmp_path_factory):
    from microcnn.quant import calibrate, compress, quantize

    net = small_net()
    cal = calibrate(net, np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32), method="minmax",
                    samples=8, progress=False)
    folder = tmp_path_factory.mktemp("quant")
    models = {"int8": quantize(net, cal, 8, 8), "w4a4": quantize(net, cal, 4, 4, requant="float"),
              "mixed": quantize(net, cal, 8, 4, layer_bits={"conv2": 32, "fc2": 4}, per_channel=False),
              "compressed": compress(net, "int8")}
    files = {}
    for name, model in models.items():
        model.save(folder / f"{name}.safetensors")
        files[name] = folder / f"{name}.safetensors"
        load_and_predict(files[name])  # the unmutated files load and run (and the kernels compile)
    return files


def test_quantized_loader_mutated_files(tmp_path, quantized_files):
    outcomes = Outcomes(tmp_path / "mutant.safetensors")

    @FUZZ
    @given(data=st.data(), which=st.sampled_from(["int8", "w4a4", "mixed", "compressed"]),
           structural=st.sampled_from([True, True, True, False]))
    def run(data, which, structural):
        valid = quantized_files[which]
        if structural:
            mutant = _structural_mutation(tmp_path, valid, data)
        else:
            mutant = _byte_mutation(valid.read_bytes(), data)
        outcomes.run(load_and_predict, mutant)

    run()
    outcomes.report("quantized loader, mutated files", minimum=150)
    assert outcomes.counts["FileFormatError"] > 0
