"""Hostile model and calibration files, second round (issue 18; issue 19's safetensors layout bullet).

Each test covers a class of input, not one example: every JSON field each loader reads, every file kind
without ``input_shape``, every calibration field malformed several ways, every layout of tensor bytes.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microcnn
from microcnn import io
from microcnn.errors import FileFormatError
from microcnn.jsonutil import MAX_JSON_DEPTH, MAX_NUMBER_CHARS, load_json_bounded
from microcnn.quant import Calibration, calibrate, compress, quantize
from microcnn.quant.serialize import MAX_BINS, MAX_CANDIDATES, MAX_KL_CANDIDATES, observer_state_layout
from tests.reference import peak_bytes

X = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
METHODS = ("minmax", "ema", "percentile", "mse", "entropy")
MODEL_KINDS = ("fp32", "int8", "w4a4", "compressed-int8", "compressed-fp16")


@pytest.fixture(scope="module")
def net():
    return microcnn.lenet(seed=3)


@pytest.fixture(scope="module")
def calibrations(net):
    images = np.random.default_rng(1).random((12, 1, 28, 28), dtype=np.float32)
    return {m: calibrate(net, images, method=m, samples=12, progress=False) for m in METHODS}


@pytest.fixture(scope="module")
def models(net, calibrations):
    cal = calibrations["minmax"]
    return {"fp32": net, "int8": quantize(net, cal, 8, 8), "w4a4": quantize(net, cal, 4, 4),
            "compressed-int8": compress(net, "int8"), "compressed-fp16": compress(net, "fp16")}


@pytest.fixture(scope="module")
def files(models, calibrations, tmp_path_factory):
    """Valid bytes of every kind of file."""
    folder = tmp_path_factory.mktemp("valid")
    out = {}
    for kind, model in {**models, **{f"calibration-{m}": c for m, c in calibrations.items()}}.items():
        model.save(folder / f"{kind}.safetensors")
        out[kind] = (folder / f"{kind}.safetensors").read_bytes()
    return out


# -- building files byte by byte -------------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def assemble(header, body: bytes) -> bytes:
    """A safetensors file from a header (a dict, or JSON text written as it is) and the data bytes."""
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text.encode())) + text.encode() + body


def with_metadata(data: bytes, **fields) -> bytes:
    header, body = split(data)
    header["__metadata__"] = {**header["__metadata__"], **fields}
    return assemble(header, body)


def rewrite_tensors(tmp_path, data: bytes, change, name="lie.safetensors"):
    """``data`` with ``change(tensors)`` applied, written by the real writer (metadata kept)."""
    src = tmp_path / "src.safetensors"
    src.write_bytes(data)
    tensors, metadata = io.read_safetensors(src)
    change(tensors)
    io.write_safetensors(tmp_path / name, tensors, metadata)
    return tmp_path / name


def write(tmp_path, data: bytes, name="lie.safetensors"):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def load_any(kind: str, path, net):
    if kind.startswith("calibration"):
        return Calibration.load(path, net)
    return microcnn.load(path)



# -- bounded JSON, every field every loader reads -----------------------------------------------------
HOSTILE_JSON = {
    "nested 33": "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
    "nested 100000": "[" * 100_000 + "]" * 100_000,
    "objects nested 5000": '{"a":' * 5000 + "1" + "}" * 5000,
    "5000-digit integer": "7" * 5000,
    "5000-digit float": "7" * 5000 + ".5",
    "long exponent": "1e" + "0" * 60 + "1",
    "float overflow": "1e999",
    "NaN": "NaN",
    "-Infinity": "-Infinity",
    "duplicate keys": '{"a": 1, "a": 2}',
    "not JSON": "{'layers': []}",
    "truncated": '{"layers": [',
}
# (file kind, metadata field) of every JSON text a loader parses
JSON_FIELDS = [("fp32", "architecture"), ("int8", "architecture"), ("int8", "stages"), ("int8", "settings"),
               ("w4a4", "stages"), ("compressed-int8", "architecture"), ("compressed-fp16", "architecture"),
               ("calibration-mse", "architecture"), ("calibration-mse", "observers"),
               ("calibration-mse", "method"), ("calibration-mse", "seed")]


def embed(valid: str, hostile: str) -> list[str]:
    """The hostile text as the whole field, and inside the field's valid value (a list element or an
    object member), so nesting is counted from the top of each document."""
    value = json.loads(valid)
    if isinstance(value, list):
        return [hostile, valid[:-1] + ", " + hostile + "]"]
    if isinstance(value, dict):
        return [hostile, valid[:-1] + ', "extra": ' + hostile + "}"]
    return [hostile]


@pytest.mark.parametrize("kind, field", JSON_FIELDS)
@pytest.mark.parametrize("hostile", sorted(HOSTILE_JSON))
def test_hostile_json_in_every_field_is_a_file_format_error(files, net, tmp_path, kind, field, hostile):
    valid = split(files[kind])[0]["__metadata__"][field]
    for text in embed(valid, HOSTILE_JSON[hostile]):
        path = write(tmp_path, with_metadata(files[kind], **{field: text}))
        with pytest.raises(FileFormatError) as info:
            load_any(kind, path, net)
        assert str(path) in str(info.value)
        if kind.startswith("calibration"):  # and without a network to compare with
            with pytest.raises(FileFormatError, match=str(path)):
                Calibration.load(path)


@pytest.mark.parametrize("hostile", sorted(HOSTILE_JSON))
def test_hostile_json_in_the_safetensors_header_itself(files, tmp_path, hostile):
    header, body = split(files["fp32"])
    text = json.dumps(header)
    for variant in (HOSTILE_JSON[hostile], text[:-1] + ', "extra": ' + HOSTILE_JSON[hostile] + "}"):
        path = write(tmp_path, assemble(variant, body))
        with pytest.raises(FileFormatError, match=str(path)):
            io.read_safetensors(path)


def test_json_limits_are_exact():
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert load_json_bounded(at_limit, "f") == eval(at_limit)  # noqa: S307 -- nested empty lists
    with pytest.raises(FileFormatError, match=f"nested too deeply .*{MAX_JSON_DEPTH + 1} levels"):
        load_json_bounded("[" + at_limit + "]", "f")
    brackets_in_strings = json.dumps({"a": "[" * 1000, "b": ["{" * 1000, '\\"[[[']})
    assert load_json_bounded(brackets_in_strings, "f") == json.loads(brackets_in_strings)
    assert load_json_bounded("9" * MAX_NUMBER_CHARS, "f") == int("9" * MAX_NUMBER_CHARS)
    with pytest.raises(FileFormatError, match=f"a number of {MAX_NUMBER_CHARS + 1} characters"):
        load_json_bounded("9" * (MAX_NUMBER_CHARS + 1), "f")
    with pytest.raises(FileFormatError, match="f: model header refused: duplicate key 'k'"):
        load_json_bounded('{"x": [{"k": 1, "j": 2, "k": 1}]}', "f", "model header")


JSON_TEXT = st.text(alphabet=st.sampled_from('[]{}"\\ ab\u00e9\n'), max_size=8)  # what a scan could miscount
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | JSON_TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(JSON_TEXT, kids, max_size=4),
    max_leaves=30)


def _depth(value) -> int:
    if isinstance(value, list | dict):
        items = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(v) for v in items), default=0)
    return 0


@settings(max_examples=300, deadline=None, database=None)
@given(value=JSON_VALUES, wrap=st.integers(0, 40), chunk=st.integers(1, 9), ascii_only=st.booleans())
def test_bounded_json_reads_what_json_writes_up_to_the_depth_limit(value, wrap, chunk, ascii_only):
    """Strings full of brackets, quotes and backslashes, with the depth scan's chunk boundary falling
    anywhere (1 to 9 bytes instead of 1 MB): the scan counts exactly the nesting of the parsed value."""
    from microcnn import jsonutil

    text = "[" * wrap + json.dumps(value, ensure_ascii=ascii_only) + "]" * wrap
    real_chunk, jsonutil._CHUNK = jsonutil._CHUNK, chunk
    try:
        scanned = jsonutil._depth(text.encode())
    finally:
        jsonutil._CHUNK = real_chunk
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # below that the scan is skipped
        assert scanned == _depth(value) + wrap
    if _depth(value) + wrap <= MAX_JSON_DEPTH:
        assert load_json_bounded(text, "f") == json.loads(text)
    else:
        with pytest.raises(FileFormatError, match="nested too deeply"):
            load_json_bounded(text, "f")


# -- duplicate keys in a safetensors header ------------------------------------------------------------
def test_duplicate_keys_in_the_header_are_refused(files, tmp_path):
    header, body = split(files["fp32"])
    text = json.dumps(header)
    entry = json.dumps(header["11.bias"])
    meta = json.dumps(header["__metadata__"])
    variants = {
        "tensor": text[:-1] + f', "11.bias": {entry}}}',  # same bytes: the last one used to win silently
        "metadata key": text.replace('"kind": "fp32"', '"kind": "fp32", "kind": "fp32"'),
        "__metadata__": text[:-1] + f', "__metadata__": {meta}}}',
        "key inside an entry": text.replace('"dtype": "F32"', '"dtype": "F32", "dtype": "F32"', 1),
    }
    for name, variant in variants.items():
        assert variant != text, name
        path = write(tmp_path, assemble(variant, body), f"{name}.safetensors")
        with pytest.raises(FileFormatError, match=r"safetensors header refused: duplicate key"):
            microcnn.load(path)


def test_duplicate_keys_inside_metadata_json_are_refused(files, net, tmp_path):
    for kind, field in JSON_FIELDS:
        valid = split(files[kind])[0]["__metadata__"][field]
        if not valid.startswith("{"):
            continue
        first, value = next(iter(json.loads(valid).items()))
        dup = valid[:-1] + f", {json.dumps(first)}: {json.dumps(value)}}}"
        path = write(tmp_path, with_metadata(files[kind], **{field: dup}))
        with pytest.raises(FileFormatError, match="duplicate key"):
            load_any(kind, path, net)


# -- unused bytes between, before and after tensors ----------------------------------------------------
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5), data=st.data())
def test_tensor_bytes_must_tile_the_data_section(tmp_path, sizes, data):
    """Tensors laid out with random gaps (>0), overlaps (<0) and a random tail: the file loads exactly
    when the tensors cover every data byte once, and then each tensor holds its own bytes."""
    gaps = data.draw(st.lists(st.integers(-3, 3), min_size=len(sizes), max_size=len(sizes)))
    tail = data.draw(st.integers(0, 3))
    header, offset = {}, 0
    for i, (size, gap) in enumerate(zip(sizes, gaps, strict=True)):
        begin = max(offset + gap, 0)
        header[f"t{i}"] = {"dtype": "U8", "shape": [size], "data_offsets": [begin, begin + size]}
        offset = begin + size
    end = max([0] + [e["data_offsets"][1] for e in header.values()])
    body = bytes(range(256))[: end + tail] if end + tail <= 256 else bytes(end + tail)
    path = write(tmp_path, assemble(header, body), "layout.safetensors")
    ranges = sorted(tuple(e["data_offsets"]) for e in header.values())
    tiles = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)) and ranges[0][0] == 0
    tiles = tiles and ranges[-1][1] == len(body)
    try:
        tensors, _ = io.read_safetensors(path)
    except FileFormatError as err:
        assert not tiles, err
        assert re.search(r"a gap of unused bytes|overlapping it|unused bytes after the last tensor", str(err))
    else:
        assert tiles
        for name, e in header.items():
            begin, stop = e["data_offsets"]
            assert tensors[name].tobytes() == body[begin:stop]


@pytest.mark.parametrize("lie, message", [
    ("gap", "does not follow the previous one \\(a gap of unused bytes\\)"),
    ("leading gap", "does not follow the previous one \\(a gap of unused bytes\\)"),
    ("overlap", "does not follow the previous one \\(overlapping it\\)"),
    ("trailing", "unused bytes after the last tensor"),
])
def test_unused_or_shared_bytes_in_a_real_model_are_refused(files, tmp_path, lie, message):
    header, body = split(files["fp32"])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    if lie == "gap":  # 4 bytes between two tensors: every later tensor moves
        for k in names[3:]:
            header[k]["data_offsets"] = [o + 4 for o in header[k]["data_offsets"]]
        begin = header[names[3]]["data_offsets"][0]
        body = body[:begin - 4] + bytes(4) + body[begin - 4:]
    elif lie == "leading gap":
        for k in names:
            header[k]["data_offsets"] = [o + 4 for o in header[k]["data_offsets"]]
        body = bytes(4) + body
    elif lie == "overlap":  # the last tensor also reads the 4 bytes before it; the file is as long
        header[names[-1]]["data_offsets"][0] -= 4
        header[names[-1]]["shape"] = [header[names[-1]]["shape"][0] + 1]
    else:
        body += bytes(8)
    path = write(tmp_path, assemble(header, body))
    with pytest.raises(FileFormatError, match=message):
        microcnn.load(path)


# -- the activation guard without input_shape, every file kind -----------------------------------------
def _without_input_shape(data: bytes, **layer_changes) -> bytes:
    header, body = split(data)
    arch = json.loads(header["__metadata__"]["architecture"])
    arch.pop("input_shape")
    for index, change in layer_changes.items():
        arch["layers"][int(index[1:])].update(change)
    header["__metadata__"]["architecture"] = json.dumps(arch)
    return assemble(header, body)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_files_without_input_shape_load_and_predict_the_same(models, files, tmp_path, kind):
    path = write(tmp_path, _without_input_shape(files[kind]))
    loaded = microcnn.load(path)
    np.testing.assert_array_equal(loaded.predict(X), models[kind].predict(X))


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("layer, padding", [(0, 100_000), (3, 100_000), (6, 5_000), (0, 2**30)])
def test_files_without_input_shape_are_guarded_at_the_default_input(files, tmp_path, kind, layer, padding):
    """A forged padding in any convolution of a file that declares no input shape is refused at load
    time, before anything of its size is allocated (it used to load, then predict asked for 559 GiB)."""
    forged = _without_input_shape(files[kind], **{f"L{layer}": {"padding": [padding, padding]}})
    path = write(tmp_path, forged)
    message = (rf"lie.safetensors: architecture layer {layer} \(Conv2d\) needs implausibly large "
               r"activations; the file declares no input_shape, checked from the default input \[1, 28, 28\]")

    def refused():
        with pytest.raises(FileFormatError, match=message):
            microcnn.load(path)

    assert peak_bytes(refused) < 4_000_000


def test_default_input_follows_networks_made_for_other_images(tmp_path):
    """No input_shape, 3 channels, 32x32 images, a first pool larger than 28: the guard adapts the
    default input to each layer (so such files load and work) and still refuses a forged padding."""
    from microcnn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

    rng = np.random.default_rng(0)
    net = Sequential(MaxPool2d(1), Conv2d(3, 4, 5, rng=rng), ReLU(), MaxPool2d(2), Flatten(),
                     Linear(4 * 14 * 14, 10, rng=rng))
    net.save(tmp_path / "cifar.safetensors")
    x = rng.random((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(microcnn.load(tmp_path / "cifar.safetensors").predict(x), net.predict(x))
    big_pool = Sequential(MaxPool2d(40), Conv2d(3, 4, 1, padding=100_000, rng=rng))
    big_pool.save(tmp_path / "pool.safetensors")
    with pytest.raises(FileFormatError, match=r"layer 1 \(Conv2d\) needs implausibly large activations; "
                                              r"the file declares no input_shape, .*\[3, 28, 28\]"):
        microcnn.load(tmp_path / "pool.safetensors")


# -- the header is checked before any tensor byte is read ------------------------------------------------
SPARSE_BYTES = 1 << 30  # 1 GiB that the file declares and never stores on disk


def _sparse(tmp_path, data: bytes, name: str, entry: dict) -> object:
    """``data`` plus a tensor ``name`` of SPARSE_BYTES declared after the others: the file is 1 GiB
    long but its tail is a hole (nothing written)."""
    header, body = split(data)
    header[name] = {**entry, "data_offsets": [len(body), len(body) + SPARSE_BYTES]}
    path = write(tmp_path, assemble(header, body), "sparse.safetensors")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + SPARSE_BYTES)
    return path


JUNK = {"dtype": "U8", "shape": [SPARSE_BYTES]}


@pytest.mark.parametrize("kind, message", [
    ("fp32", r"tensors do not match the architecture \(first: junk\)"),
    ("int8", "tensors hold more data than the architecture can use"),
    ("w4a4", "tensors hold more data than the architecture can use"),
    ("compressed-int8", "tensors hold more data than the architecture can use"),
    ("compressed-fp16", "tensors hold more data than the architecture can use"),
    ("calibration-mse", r"calibration field tensor junk"),
])
def test_sparse_files_are_refused_from_the_header_without_reading_the_data(files, net, tmp_path, kind,
                                                                             message):
    path = _sparse(tmp_path, files[kind], "junk", JUNK)
    assert path.stat().st_size > SPARSE_BYTES

    def refused():
        with pytest.raises(FileFormatError, match=message):
            load_any(kind, path, net)
        if kind == "fp32":  # loading into an existing network checks the same before reading
            with pytest.raises(FileFormatError, match=message):
                microcnn.lenet().load(path)

    assert peak_bytes(refused) < 8_000_000


def test_sparse_tensor_of_the_wrong_shape_is_refused_before_reading(files, tmp_path):
    header, body = split(files["fp32"])
    del header["0.weight"]  # the file's first tensor moves to the end, as a 1 GiB F32 tensor
    header = {k: v for k, v in header.items()}
    shift = 6 * 25 * 4
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [o - shift for o in v["data_offsets"]]
    data = assemble(header, body[shift:])
    path = _sparse(tmp_path, data, "0.weight", {"dtype": "F32", "shape": [SPARSE_BYTES // 4]})

    def refused():
        with pytest.raises(FileFormatError, match=r"tensors do not match the architecture \(first: 0.weight\)"
                                                  r" \(expected \(6, 1, 5, 5\), found \(268435456,\)\)"):
            microcnn.load(path)

    assert peak_bytes(refused) < 8_000_000


# -- F64 weights beyond float32's range ------------------------------------------------------------------
@pytest.mark.parametrize("value, loads", [(1e39, False), (-4e38, False), (1e300, False), (3.4e38, True),
                                          (-1e38, True)])
def test_f64_weights_beyond_float32_are_refused_naming_the_tensor(files, tmp_path, value, loads):
    def to_f64(tensors):
        for k in tensors:
            tensors[k] = tensors[k].astype(np.float64)
        tensors["9.weight"][3, 7] = value

    path = rewrite_tensors(tmp_path, files["fp32"], to_f64)
    for load in (microcnn.load, lambda p: microcnn.lenet().load(p)):
        if loads:
            assert load(path)[9].weight.data[3, 7] == np.float32(value)
        else:
            with pytest.raises(FileFormatError, match=r"lie.safetensors: tensor 9.weight holds 1 values "
                                                      r"beyond float32's range"):
                load(path)


# -- compressed scales ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor", ["0.weight_scale", "3.weight_scale", "6.weight_scale", "9.weight_scale",
                                    "11.weight_scale"])
@pytest.mark.parametrize("value", [0.0, -0.0, -1e-3, -3e38])
def test_compressed_scales_that_are_not_positive_are_refused(files, tmp_path, tensor, value):
    def change(tensors):
        tensors[tensor][-1] = value  # one channel, the last: every channel is checked

    path = rewrite_tensors(tmp_path, files["compressed-int8"], change)
    with pytest.raises(FileFormatError, match=rf"lie.safetensors: tensor {tensor} holds scales <= 0 "
                                              r"\(expected scales > 0, found 1 of \d+"):
        microcnn.load(path)


# -- calibration files, field by field ------------------------------------------------------------------
def _observers_change(change):
    def apply(meta):
        observers = json.loads(meta["observers"])
        change(observers)
        return {"observers": json.dumps(observers)}
    return apply


def _params(i, **params):
    return _observers_change(lambda obs: obs[i]["params"].update(params))


def _set_entry(i, key, value):
    return _observers_change(lambda obs: obs[i].__setitem__(key, value))


CALIBRATION_METADATA_LIES = {
    # field: [(method file, metadata change, message), ...]
    "method": [(m, lambda _, v=v: {"method": v}, "calibration field method") for m, v in
               (("mse", "5"), ("mse", '"kmeans"'), ("minmax", "null"), ("ema", '["mse"]'))],
    "seed": [("mse", lambda _, v=v: {"seed": v}, "calibration field seed") for v in
             ("-1", str(2**63), '"3"', "1.5", "true", "null")],
    "observers": [
        ("mse", lambda _: {"observers": "{}"}, "calibration field observers"),
        ("mse", lambda _: {"observers": '"input"'}, "calibration field observers"),
        ("mse", _observers_change(lambda obs: obs.pop()), "calibration field observers"),
        ("mse", _observers_change(lambda obs: obs.append(obs[0])), "calibration field observers"),
        ("mse", _observers_change(lambda obs: obs.__setitem__(2, "relu1")), r"field observers\[2\]"),
        ("mse", _observers_change(lambda obs: obs[1].update(extra=1)), r"calibration field observers\[1\]"),
        ("mse", _observers_change(lambda obs: obs[1].pop("params")), r"calibration field observers\[1\]"),
        ("mse", _set_entry(1, "tensor", "conv9"), r"observers\[1\].tensor"),
        ("mse", _set_entry(1, "tensor", 5), r"observers\[1\].tensor"),
        ("mse", _observers_change(lambda obs: obs.__setitem__(slice(1, 3), obs[2:0:-1])),
         r"observers\[1\].tensor"),
        ("mse", _set_entry(0, "kind", "kmeans"), r"observers\[0\].kind"),
        ("mse", _set_entry(0, "kind", ["mse"]), r"observers\[0\].kind"),
        ("mse", _set_entry(0, "params", []), r"observers\[0\].params"),
        ("mse", _set_entry(0, "kind", "entropy"), r"observers\[0\].params"),  # mse params for entropy
    ],
    "bins": [("mse", _params(3, bins=v), r"observers\[3\].params.bins") for v in
             (10**12, MAX_BINS + 4, 0, -64, 63, "4096", True, 4096.0, None)]
            + [("percentile", _params(3, bins=68), r"calibration field tensor pool1.pos")],
    "candidates": [("mse", _params(2, candidates=v), r"observers\[2\].params.candidates") for v in
                   (0, -5, 10**9, MAX_CANDIDATES + 1, 2.5, "100", False)],
    "max_candidates": [("entropy", _params(4, max_candidates=v), r"observers\[4\].params.max_candidates")
                       for v in (0, -1, 10**12, MAX_KL_CANDIDATES + 1, 0.5)],
    "percentile": [("percentile", _params(1, percentile=v), r"percentile") for v in
                   (200, 50, 10, -1, "99", None)],
    "averaging_constant": [("ema", _params(1, averaging_constant=v), r"averaging_constant") for v in
                           (0, 2, -0.5, "0.1", [0.1])],
    "extra param": [("minmax", _params(1, bins=64), r"observers\[1\].params"),
                    ("mse", _params(1, percentile=99.0), r"observers\[1\].params")],
    "architecture": [
        ("mse", lambda _: {"architecture": '{"layers": 5}'}, "architecture metadata malformed"),
        ("mse", lambda _: {"architecture": "[]"}, "architecture metadata malformed"),
        ("mse", lambda m: {"architecture": m["architecture"].replace('"Conv2d"', "7", 1)},
         "calibration field architecture.layers|another architecture"),
        ("mse", lambda m: {"architecture": m["architecture"].replace("[1, 28, 28]", "[1, 32, 32]")},
         r"calibration field images \(expected images of the architecture's input_shape"),
    ],
}


def _calibration_cases():
    for field, cases in CALIBRATION_METADATA_LIES.items():
        for i, (method, change, message) in enumerate(cases):
            yield pytest.param(method, change, message, id=f"{field}-{i}")


@pytest.mark.parametrize("method, change, message", list(_calibration_cases()))
def test_calibration_metadata_lies_are_refused_naming_file_and_field(files, net, tmp_path, method, change,
                                                                     message):
    data = files[f"calibration-{method}"]
    meta = split(data)[0]["__metadata__"]
    path = write(tmp_path, with_metadata(data, **change(meta)))
    for against in (net, None):
        if against is None and "another architecture" in message:
            continue
        with pytest.raises(FileFormatError, match=message) as info:
            Calibration.load(path, against)
        assert str(info.value).startswith(f"{path}: ")


def _state(tensor, key, fn):
    def change(tensors):
        name = f"{tensor}.{key}"
        tensors[name] = fn(tensors[name].copy())
    return change


def _put(index, value):
    def fn(arr):
        arr[index] = value
        return arr
    return fn


CALIBRATION_TENSOR_LIES = {
    "count 0": ("minmax", _state("conv1", "count", _put(0, 0)), r"tensor conv1.count"),
    "count negative": ("mse", _state("conv1", "count", _put(0, -7)), r"tensor conv1.count"),
    "count 2**63-1": ("minmax", _state("input", "count", _put(0, 2**63 - 1)), r"tensor input.count"),
    "count as float": ("minmax", _state("input", "count", lambda a: a.astype(np.float64)),
                       r"tensor input.count"),
    "count shape (0,)": ("minmax", _state("input", "count", lambda a: a[:0]), r"tensor input.count"),
    "min NaN": ("minmax", _state("fc1", "minmax", _put(0, np.nan)), "tensor fc1 min/max"),
    "max Inf": ("ema", _state("fc1", "minmax", _put(1, np.inf)), "tensor fc1 min/max"),
    "min > max": ("minmax", _state("fc1", "minmax", lambda a: a[::-1].copy()), "tensor fc1 min/max"),
    "minmax of 3": ("minmax", _state("fc1", "minmax", lambda a: np.append(a, 0.0)), "tensor fc1.minmax"),
    "minmax int": ("minmax", _state("fc1", "minmax", lambda a: a.astype(np.int64)), "tensor fc1.minmax"),
    "limit negative": ("mse", _state("conv2", "scalars", _put(0, -1.0)), "tensor conv2 histogram limit"),
    "limit Inf": ("entropy", _state("conv2", "scalars", _put(0, np.inf)), "tensor conv2 histogram limit"),
    "limit 1e300": ("percentile", _state("conv2", "scalars", _put(0, 1e300)), "tensor conv2 histogram limit"),
    "limit below max": ("mse", _state("conv2", "scalars", lambda a: _put(0, a[2] / 2)(a)),
                        "tensor conv2 histogram limit"),
    "hist min NaN": ("mse", _state("conv2", "scalars", _put(1, np.nan)), "tensor conv2 min/max"),
    "negative bin": ("entropy", _state("relu2", "pos", _put(0, -1)), "tensor relu2 histogram"),
    "bins do not add up": ("mse", _state("relu2", "pos", lambda a: _put(-1, a[-1] + 1)(a)),
                           "tensor relu2 histogram"),
    "bins overflow int64 sum": ("mse", _state("relu2", "pos", lambda a: _put(slice(0, 4), 2**62)(a)),
                                "tensor relu2 histogram"),
    "pos too short": ("percentile", _state("relu2", "pos", lambda a: a[:-4]), "tensor relu2.pos"),
    "neg missing": ("mse", lambda t: t.pop("relu2.neg"), "tensor relu2.neg"),
    "extra tensor": ("mse", lambda t: t.__setitem__("relu2.extra", np.zeros(1)), "tensor relu2.extra"),
    "images missing": ("mse", lambda t: t.pop("images"), "calibration field images"),
    "images float64": ("mse", lambda t: t.__setitem__("images", t["images"].astype(np.float64)),
                       "calibration field images"),
    "images 3-D": ("mse", lambda t: t.__setitem__("images", t["images"][:, 0]), "calibration field images"),
    "no images": ("mse", lambda t: t.__setitem__("images", t["images"][:0]), "calibration field images"),
    "images NaN": ("mse", lambda t: t["images"].__setitem__((0, 0, 0, 0), np.nan),
                   r"calibration field images \(expected finite values"),
    "images of another size": ("mse", lambda t: t.__setitem__("images", np.zeros((2, 1, 32, 32), np.float32)),
                               "calibration field images"),
}


@pytest.mark.parametrize("lie", sorted(CALIBRATION_TENSOR_LIES))
def test_calibration_tensor_lies_are_refused_naming_file_and_field(files, net, tmp_path, lie):
    method, change, message = CALIBRATION_TENSOR_LIES[lie]
    path = rewrite_tensors(tmp_path, files[f"calibration-{method}"], change)
    for against in (net, None):
        with pytest.raises(FileFormatError, match=message) as info:
            Calibration.load(path, against)
        assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("method", METHODS)
def test_valid_calibrations_load_with_the_same_ranges(files, net, calibrations, tmp_path, method):
    path = write(tmp_path, files[f"calibration-{method}"])
    original = calibrations[method]
    for against in (net, None):
        back = Calibration.load(path, against)
        assert back.method == method and back.names == original.names and back.seed == original.seed
        np.testing.assert_array_equal(back.images, original.images)
        for name in back.names:
            assert back.observer(name).params() == original.observer(name).params()
            for key, value in original.observer(name).state().items():
                np.testing.assert_array_equal(back.observer(name).state()[key], value)
    for name in back.names:  # and what the state is for
        assert back.range(name, 8) == original.range(name, 8)


def test_calibration_at_the_size_bounds_loads(net, tmp_path):
    images = np.random.default_rng(2).random((4, 1, 28, 28), dtype=np.float32)
    for method, options in (("mse", dict(bins=MAX_BINS, candidates=MAX_CANDIDATES)),
                            ("entropy", dict(bins=64, max_candidates=MAX_KL_CANDIDATES))):
        cal = calibrate(net, images, method=method, samples=4, progress=False, **options)
        cal.save(tmp_path / "c.safetensors")
        back = Calibration.load(tmp_path / "c.safetensors", net)
        assert back.observer("fc2").params() == cal.observer("fc2").params()
        np.testing.assert_array_equal(back.observer("fc2").pos, cal.observer("fc2").pos)


@pytest.mark.parametrize("method", METHODS)
def test_state_layout_table_matches_what_observers_save(calibrations, method):
    for obs in calibrations[method].observers.values():
        layout = observer_state_layout(obs.kind, obs.params())
        assert {k: (v.dtype, v.shape) for k, v in obs.state().items()} == layout


def test_every_calibration_field_is_checked_before_any_observer_is_built(files, net, tmp_path, monkeypatch):
    """A file asking for 10**12 bins never reaches a constructor (which would allocate them)."""
    from microcnn.quant import observers

    built = []
    real = observers.HistogramObserver.__init__
    monkeypatch.setattr(observers.HistogramObserver, "__init__",
                        lambda self, *a, **k: built.append(k) or real(self, *a, **k))
    data = files["calibration-mse"]
    meta = split(data)[0]["__metadata__"]
    path = write(tmp_path, with_metadata(data, **_params(12, bins=10**12)(meta)))
    with pytest.raises(FileFormatError, match=r"observers\[12\].params.bins"):
        Calibration.load(path, net)
    assert built == []


def test_observer_constructor_rules_apply_to_files(files, net, tmp_path):
    """A setting within the loader's bounds that the observer itself refuses (66 bins: not a multiple
    of 4), with a state consistent with it, is still a FileFormatError naming the field."""
    data = files["calibration-percentile"]
    meta = split(data)[0]["__metadata__"]
    src = write(tmp_path, with_metadata(data, **_params(3, bins=66)(meta)), "src66.safetensors")

    def resize(tensors):
        count = int(tensors["pool1.count"][0])
        tensors["pool1.pos"] = np.zeros(66, np.int64)
        tensors["pool1.pos"][0] = count
        tensors["pool1.neg"] = np.zeros(66, np.int64)

    path = rewrite_tensors(tmp_path, src.read_bytes(), resize)
    with pytest.raises(FileFormatError, match=r"calibration field observer pool1 \(expected bins: expected a "
                                              r"multiple of 4 >= 64, found 66"):
        Calibration.load(path, net)


# -- reported settings must be the stages' own bit widths ------------------------------------------------
def _settings(change):
    def apply(meta):
        settings = json.loads(meta["settings"])
        change(settings)
        return {"settings": json.dumps(settings)}
    return apply


@pytest.mark.parametrize("kind, change", [
    ("w4a4", _settings(lambda s: s.update(weight_bits=8))),
    ("w4a4", _settings(lambda s: s.update(act_bits=8))),
    ("int8", _settings(lambda s: s.update(weight_bits=4, act_bits=4))),
    ("int8", _settings(lambda s: s["layer_bits"].update(fc2=4))),
    ("int8", _settings(lambda s: s["layer_bits"].pop("fc2"))),
    ("int8", _settings(lambda s: s.update(weight_bits="8"))),
    ("int8", _settings(lambda s: s.update(act_bits=[8]))),
])
def test_settings_that_misreport_the_precision_are_refused(files, tmp_path, kind, change):
    data = files[kind]
    path = write(tmp_path, with_metadata(data, **change(split(data)[0]["__metadata__"])))
    with pytest.raises(FileFormatError, match="lie.safetensors: (settings report other bit widths than the "
                                              "stages compute with|quantized model does not describe)"):
        microcnn.load(path)


def test_mixed_precision_settings_load_as_saved(net, calibrations, tmp_path):
    qnet = quantize(net, calibrations["minmax"], 8, 4, layer_bits={"conv2": 32, "fc2": 4})
    qnet.save(tmp_path / "mixed.safetensors")
    back = microcnn.load(tmp_path / "mixed.safetensors")
    assert back.settings == qnet.settings and back.settings["layer_bits"]["conv2"] == 32
    np.testing.assert_array_equal(back.predict(X), qnet.predict(X))


def test_the_stored_bytes_bound_admits_the_densest_real_files(tmp_path):
    """One weight per output channel and no bias: each weight brings a float32 scale and an int32 bias
    (9 bytes per parameter), the most any real file stores. Wide enough that the per-layer slack
    cannot hide a bound that is too tight."""
    from microcnn import Conv2d, ReLU, Sequential

    rng = np.random.default_rng(0)
    net = Sequential(Conv2d(1, 4096, 1, bias=False, rng=rng), ReLU(), input_shape=(1, 1, 1))
    x = rng.random((20, 1, 1, 1), dtype=np.float32)
    cal = calibrate(net, x, method="minmax", progress=False)
    for model in (quantize(net, cal, 8, 8), quantize(net, cal, 4, 4), compress(net, "int8")):
        model.save(tmp_path / "dense.safetensors")
        loaded = microcnn.load(tmp_path / "dense.safetensors")
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


# -- calibration fuzzing: whatever a field holds, load fails cleanly or every range is usable -------------
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 3, 4, 63, 64, 66, 100, MAX_BINS, MAX_BINS + 4,
                                     MAX_CANDIDATES + 1]))


def test_mutated_calibration_files_load_cleanly_or_not_at_all(files, net, tmp_path):
    """One to three fields (observer settings, method, seed, state tensor elements) replaced by any JSON
    value or number: ``Calibration.load`` raises FileFormatError naming the file, or gives a calibration
    whose every range is finite and contains 0 (or an InputError saying why there is none), quickly.
    Both outcomes must occur, or the range checks were never exercised."""
    import time

    from microcnn.errors import InputError

    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(METHODS), data=st.data())
    def run(method, data):
        header, body = split(files[f"calibration-{method}"])
        meta = header["__metadata__"]
        observers = json.loads(meta["observers"])
        for _ in range(data.draw(st.integers(1, 3))):
            target = data.draw(st.sampled_from(["param", "field", "state"]))
            if target == "param":
                entry = data.draw(st.sampled_from(observers))
                key = data.draw(st.sampled_from([*entry["params"], "bins", "candidates"]))
                entry["params"][key] = data.draw(NUMBERS | JSON_VALUES)
            elif target == "field":
                key = data.draw(st.sampled_from(["method", "seed"]))
                meta[key] = json.dumps(data.draw(NUMBERS | JSON_VALUES | st.sampled_from(METHODS)))
            else:  # overwrite one 8-byte element of a state tensor
                name = data.draw(st.sampled_from([k for k in header if k not in ("__metadata__", "images")]))
                begin, stop = header[name]["data_offsets"]
                at = begin + 8 * data.draw(st.integers(0, (stop - begin) // 8 - 1))
                value = data.draw(NUMBERS)
                as_float = header[name]["dtype"] == "F64" or isinstance(value, float)
                raw = (struct.pack("<d", float(value)) if as_float
                       else struct.pack("<q", max(-2**63, min(2**63 - 1, int(value)))))
                body = body[:at] + raw + body[at + 8:]
        meta["observers"] = json.dumps(observers)
        path = write(tmp_path, assemble(header, body), "fuzz.safetensors")
        start = time.process_time()  # CPU time: a loaded machine must not fail the test, a huge loop must
        try:
            cal = Calibration.load(path, net)
        except FileFormatError as err:
            assert str(err).startswith(f"{path}: ")
            outcomes["refused"] += 1
            return
        outcomes["loaded"] += 1
        for name in cal.names:
            for bits in (4, 8):
                try:
                    lo, hi = cal.range(name, bits)
                except InputError:  # e.g. every observed value 0: no scale, and the error says so
                    continue
                assert np.isfinite([lo, hi]).all() and lo <= 0 <= hi
        assert time.process_time() - start < 5

    run()
    print(f"\ncalibration fuzzing: {outcomes}")
    assert outcomes["loaded"] >= 5 and outcomes["refused"] >= 50, outcomes
