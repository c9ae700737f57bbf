"""Model files: .raw layout and size checks, safetensors round trips and refusals, atomic saves."""

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import microcnn
from microcnn import FileFormatError, io
from microcnn.errors import InputError


@pytest.fixture()
def net():
    return microcnn.lenet(seed=5)


def test_raw_layout_is_pytorch_order_little_endian(net, tmp_path):
    path = tmp_path / "m.raw"
    net.save(path)
    assert path.stat().st_size == 61_706 * 4
    raw = np.frombuffer(path.read_bytes(), dtype="<f4")
    w1 = net[0].weight.data
    np.testing.assert_array_equal(raw[:150], w1.reshape(-1))            # conv1 weight [6][1][5][5]
    np.testing.assert_array_equal(raw[150:156], net[0].bias.data)       # then its bias
    np.testing.assert_array_equal(raw[-10:], net[11].bias.data)         # fc2 bias last


def test_raw_round_trip(net, tmp_path):
    path = tmp_path / "m.raw"
    net.save(path)
    other = microcnn.lenet(seed=9).load(path)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)


@pytest.mark.parametrize("delta", [-4, -1, 1, 4, -246_824])
def test_raw_wrong_size_names_both_numbers(net, tmp_path, delta):
    good = tmp_path / "good.raw"
    net.save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.raw"
    bad.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    target = microcnn.lenet(seed=1)
    before = target.state_dict()
    with pytest.raises(FileFormatError, match=r"bad.raw.*expected 246824 bytes .*found "
                       rf"{246_824 + delta} bytes"):
        target.load(bad)
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_raw_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.raw"):
        microcnn.lenet(weights=tmp_path / "nothere.raw")


def test_raw_nan_weights_are_refused(net, tmp_path):
    path = tmp_path / "nan.raw"
    net.save(path)
    data = bytearray(path.read_bytes())
    data[4 * 200:4 * 201] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match=r"nan.raw: tensor 3.weight holds 1 NaN/Inf"):
        microcnn.lenet().load(path)


def test_safetensors_round_trip_rebuilds_architecture(net, tmp_path):
    path = tmp_path / "m.safetensors"
    io.save_model(net, path, metadata={"trained_on": "unit test"})
    loaded = microcnn.load(path)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    assert loaded.input_shape == (1, 28, 28)
    tensors, meta = io.read_safetensors(path)
    assert meta["trained_on"] == "unit test" and meta["kind"] == "fp32"
    assert set(tensors) == set(net.state_dict())


def test_safetensors_layout_is_the_public_format(net, tmp_path):
    # Parse the file by hand, as the safetensors spec describes, to make sure we write that format.
    path = tmp_path / "m.safetensors"
    net.save(path)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    entry = header["11.bias"]
    assert entry["dtype"] == "F32" and entry["shape"] == [10]
    begin, end = entry["data_offsets"]
    np.testing.assert_array_equal(np.frombuffer(blob[8 + n + begin:8 + n + end], "<f4"), net[11].bias.data)


def _write_raw_safetensors(path, header: dict, data: bytes = b""):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the data section"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "does not fit its bytes"),
    ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
    ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0", "bad shape"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
      "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3, "does not follow"),
    ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 5, "data section size"),
    ({"a": {"dtype": "U8", "shape": [2**39, 2**39], "data_offsets": [0, 1]}}, b"\0", "bad shape|fit"),
    ({"__metadata__": {"x": 1}}, b"", "strings to strings"),
])
def test_safetensors_lies_are_refused(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write_raw_safetensors(path, header, data)
    with pytest.raises(FileFormatError, match=message):
        io.read_safetensors(path)


def test_safetensors_huge_header_length_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FileFormatError, match="header length exceeds the file"):
        io.read_safetensors(path)


@pytest.mark.parametrize("payload, kind", [
    (pickle.dumps({"0.weight": [1.0]}), "pickle"),
    (b"PK\x03\x04" + b"\0" * 40, "zip archive"),
    (b"\x1f\x8b\x08" + b"\0" * 20, "gzip"),
])
def test_pickles_and_archives_are_never_opened(tmp_path, payload, kind):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(payload)
    with pytest.raises(FileFormatError, match=f"this is (a )?{kind}.*never unpickles"):
        microcnn.load(path)


def test_load_into_different_architecture_is_refused(net, tmp_path):
    from microcnn.layers import Flatten, Linear, Softmax
    from microcnn.network import Sequential

    path = tmp_path / "m.safetensors"
    net.save(path)
    mlp = Sequential(Flatten(), Linear(784, 10), Softmax())
    with pytest.raises(FileFormatError, match="architecture differs"):
        mlp.load(path)


def test_load_model_rejects_raw_with_advice(net, tmp_path):
    path = tmp_path / "m.raw"
    net.save(path)
    with pytest.raises(FileFormatError, match="no architecture"):
        microcnn.load(path)


def test_failed_save_keeps_the_old_file(net, tmp_path, monkeypatch):
    path = tmp_path / "m.raw"
    net.save(path)
    good = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        microcnn.lenet(seed=99).save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.raw"]  # no temporary file left behind


def test_state_dict_with_integer_arrays_is_refused(net):
    state = net.state_dict()
    state["0.bias"] = np.zeros(6, np.int32)
    with pytest.raises(InputError, match="expected a float array"):
        net.load_state_dict(state)


# -- the safetensors package as an independent reference ----------------------------------------------
# microcnn keeps its own reader and writer (docs/dependencies.md says why: the package's writer orders
# __metadata__ differently in every process, its header parser accepts duplicate keys, and safe_open maps
# the file, doubling peak memory and dying of SIGBUS if the file shrinks). The package still judges
# whether what we write is the public format, and whether what it writes loads here.
SHIPPED = Path(microcnn.__file__).resolve().parent.parent / "data" / "lenet.safetensors"


def test_writer_reproduces_the_shipped_model_byte_for_byte_in_any_process(tmp_path):
    ours = tmp_path / "here.safetensors"
    microcnn.load(SHIPPED).save(ours)
    assert ours.read_bytes() == SHIPPED.read_bytes()
    # Another process with another hash seed: nothing in the header may follow set or hash order.
    other = tmp_path / "there.safetensors"
    code = "import sys, microcnn; microcnn.load(sys.argv[1]).save(sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(SHIPPED), str(other)], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.read_bytes() == SHIPPED.read_bytes()


@pytest.fixture(scope="module")
def every_kind():
    """One model of each kind microcnn saves: FP32, W8A8, W4A4 (packed int4), fp16-compressed, calibration."""
    from microcnn.quant import calibrate, compress, quantize

    net = microcnn.lenet(seed=5)
    cal = calibrate(net, np.random.default_rng(1).random((16, 1, 28, 28), dtype=np.float32), method="minmax",
                    samples=16, progress=False)
    return {"fp32": net, "int8": quantize(net, cal, 8, 8), "w4a4": quantize(net, cal, 4, 4),
            "compressed": compress(net, "fp16"), "calibration": cal}


@pytest.mark.parametrize("kind", ["fp32", "int8", "w4a4", "compressed", "calibration"])
def test_the_safetensors_package_reads_our_files_as_we_do(every_kind, tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    every_kind[kind].save(path)
    tensors, metadata = io.read_safetensors(path)
    # The data starts 8-byte aligned, as the package's own writer places it (mmap readers rely on it).
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == metadata and metadata["format"] == "microcnn"
        assert sorted(f.keys()) == sorted(tensors)
        for name, ours in tensors.items():
            theirs = f.get_tensor(name)
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, name
            np.testing.assert_array_equal(theirs, ours, err_msg=name)
    if kind in ("int8", "w4a4", "calibration"):  # mixed widths: the package checks our alignment too
        assert len({t.dtype for t in tensors.values()}) > 1


@pytest.mark.parametrize("kind", ["fp32", "int8", "w4a4", "compressed"])
def test_files_the_safetensors_package_writes_load_here(every_kind, tmp_path, kind):
    # The package orders tensors by dtype width then name and pads the header its own way: the reader
    # must follow the header, not our writer's habits.
    ours = tmp_path / "ours.safetensors"
    every_kind[kind].save(ours)
    tensors, metadata = io.read_safetensors(ours)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(tensors, theirs, metadata=metadata)
    assert theirs.read_bytes() != ours.read_bytes()  # really another layout
    x = np.random.default_rng(2).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(microcnn.load(theirs).predict(x), microcnn.load(ours).predict(x))


@pytest.mark.parametrize("change", ["shrinks", "grows"])
def test_a_file_changed_after_its_header_was_checked_is_an_error_not_a_crash(net, tmp_path, change):
    # A reader that maps the file (safe_open) is killed by SIGBUS when the file shrinks under it.
    path = tmp_path / "m.safetensors"
    net.save(path)
    size = path.stat().st_size
    with io.SafetensorsFile(path) as st:
        if change == "shrinks":
            os.truncate(path, size - 1000)
        else:
            with open(path, "ab") as f:
                f.write(b"\0" * 8)
        with pytest.raises(FileFormatError, match=r"m.safetensors: file changed while reading"):
            st.read()


def test_writer_stores_any_layout_and_byte_order_as_little_endian_c_order(tmp_path):
    tensors = {"scalar": np.float32(3.5), "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
               "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T,
               "empty": np.zeros((0, 3), np.int8), "flags": np.array([True, False, True])}
    path = tmp_path / "layouts.safetensors"
    io.write_safetensors(path, tensors)
    theirs = safetensors.numpy.load_file(path)  # the reference reader, not ours
    for name, arr in tensors.items():
        assert theirs[name].shape == np.shape(arr) and theirs[name].dtype.byteorder in "<|=", name
        np.testing.assert_array_equal(theirs[name], arr, err_msg=name)


def test_saving_does_not_copy_the_tensors(tmp_path):
    import tracemalloc

    big = {"w": np.random.default_rng(0).random((2048, 2048), dtype=np.float32)}  # 16 MB
    tracemalloc.start()
    try:
        io.write_safetensors(tmp_path / "big.safetensors", big, {"k": "v"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated to save 16 MB"
    assert (tmp_path / "big.safetensors").stat().st_size > big["w"].nbytes
