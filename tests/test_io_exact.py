"""The safetensors reader and writer of ``io.py`` at each check's exact boundary, with the specific error
each bad header gets (a different error from a later check means the first check is missing). Headers
are written by hand here (``put``), so every field can lie on its own."""

import json
import struct

import numpy as np
import pytest

from microcnn import io
from microcnn.errors import FileFormatError


def put(path, header, data: bytes = b""):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_writer_takes_array_likes_and_refuses_non_numeric_dtypes(tmp_path):
    path = tmp_path / "t.safetensors"
    io.write_safetensors(path, {"ints": [[1, 2, 3], [4, 5, 6]], "scalar": np.float32(2.5)}, {"k": 7})
    tensors, metadata = io.read_safetensors(path)
    np.testing.assert_array_equal(tensors["ints"], np.array([[1, 2, 3], [4, 5, 6]]))
    assert tensors["scalar"].shape == () and tensors["scalar"] == np.float32(2.5)
    assert metadata == {"k": "7"}
    for bad in (np.array(["text"]), np.zeros(2, np.complex64)):
        with pytest.raises(FileFormatError, match="cannot store tensor bad"):
            io.write_safetensors(tmp_path / "bad.safetensors", {"bad": bad})
    assert not (tmp_path / "bad.safetensors").exists()


def test_the_file_is_closed_after_reading(tmp_path):
    path = tmp_path / "t.safetensors"
    io.write_safetensors(path, {"a": np.arange(3, dtype=np.float32)})
    with io.SafetensorsFile(path) as st:
        handle = st._file
        assert not handle.closed
    assert handle.closed
    st = io.SafetensorsFile(path)
    st.close()
    assert st._file.closed


@pytest.mark.parametrize("size", [0, 1, 7])
def test_a_file_shorter_than_the_length_field_is_a_format_error(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(FileFormatError, match="file too short for a safetensors header") as info:
        io.read_safetensors(path)
    assert info.value.found == f"{size} bytes"


@pytest.mark.parametrize("header", [[1, 2], "text", 3])
def test_a_header_that_is_not_an_object_is_refused(tmp_path, header):
    with pytest.raises(FileFormatError, match="header is not a JSON object"):
        io.read_safetensors(put(tmp_path / "h.safetensors", header))


@pytest.mark.parametrize("bad", [["F32", [1], [0, 4]], {"dtype": "F32", "shape": [1]},
                                 {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}])
def test_an_entry_without_exactly_the_three_fields_is_refused(tmp_path, bad):
    with pytest.raises(FileFormatError, match="tensor t: entry must have dtype, shape, data_offsets"):
        io.read_safetensors(put(tmp_path / "e.safetensors", {"t": bad}, b"\0" * 4))


def test_element_count_limit_is_exact_and_ignores_zero_axes(tmp_path):
    limit = io.MAX_FILE_BYTES
    # exactly at the limit: passes the shape check, then fails on its (missing) bytes
    with pytest.raises(FileFormatError, match="does not fit its bytes"):
        io.read_safetensors(put(tmp_path / "a.safetensors", {"t": entry("U8", [limit], 0, 0)}))
    for shape in ([limit + 1], [0, limit + 1], [2, limit // 2 + 1]):
        with pytest.raises(FileFormatError, match="tensor t: bad shape"):
            io.read_safetensors(put(tmp_path / "b.safetensors", {"t": entry("U8", shape, 0, 0)}))
    tensors, _ = io.read_safetensors(put(tmp_path / "c.safetensors", {"t": entry("F32", [0, 5], 0, 0)}))
    assert tensors["t"].shape == (0, 5)


def test_a_refused_header_leaves_no_file_open(tmp_path):
    """The handle opened for the header is closed when the header is refused (no ResourceWarning when the
    failed object is collected)."""
    import gc
    import warnings

    path = put(tmp_path / "h.safetensors", [1, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            io.SafetensorsFile(path)
        except FileFormatError:
            pass
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.parametrize(("lead", "kind"), [(b"\x80" + b"\0" * 7, "a pickle,"),
                                            (b"PK" + b"\0" * 6, r"a zip archive \(torch.save/npz\),"),
                                            (b"\x1f\x8b" + b"\0" * 6, "gzip data,")])
def test_a_foreign_file_whose_first_bytes_fit_as_a_header_length_is_named(tmp_path, lead, kind):
    """The leading bytes read as a length that fits in the file: the header fails as JSON, then the file
    is named for what it is."""
    n = struct.unpack("<Q", lead)[0]
    path = tmp_path / "foreign.bin"
    path.write_bytes(lead + b"x" * (n + 16))
    with pytest.raises(FileFormatError, match=f"this is {kind} not a safetensors model"):
        io.read_safetensors(path)


def test_a_header_that_is_not_json_is_a_format_error(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"abcd")
    with pytest.raises(FileFormatError, match="safetensors header is not valid JSON"):
        io.read_safetensors(path)


def test_dimension_count_limit_is_inclusive(tmp_path):
    limit = io.MAX_TENSOR_NDIM
    tensors, _ = io.read_safetensors(put(tmp_path / "a.safetensors", {"t": entry("F32", [1] * limit, 0, 4)},
                                         b"\0" * 4))
    assert tensors["t"].shape == (1,) * limit
    with pytest.raises(FileFormatError, match="tensor t: bad shape"):
        io.read_safetensors(put(tmp_path / "b.safetensors", {"t": entry("F32", [1] * (limit + 1), 0, 4)},
                                b"\0" * 4))


def test_offsets_may_touch_both_ends_and_be_empty(tmp_path):
    """begin == end (an empty tensor, here at the very end) and end == the data size are both valid."""
    header = {"a": entry("U8", [3], 0, 3), "empty": entry("F32", [0], 3, 3)}
    tensors, _ = io.read_safetensors(put(tmp_path / "a.safetensors", header, b"xyz"))
    assert bytes(tensors["a"]) == b"xyz" and tensors["empty"].shape == (0,)
    with pytest.raises(FileFormatError, match="data_offsets outside the data section"):
        io.read_safetensors(put(tmp_path / "b.safetensors", {"a": entry("U8", [3], 1, 4)}, b"xyz"))
    with pytest.raises(FileFormatError, match="data_offsets outside the data section"):
        io.read_safetensors(put(tmp_path / "c.safetensors", {"a": entry("U8", [0], 2, 1)}, b"xyz"))


@pytest.mark.parametrize("shape", [[2, -1], [2, 1.5], [True, 2], [2**40]])
def test_every_dimension_must_be_a_small_non_negative_int(tmp_path, shape):
    with pytest.raises(FileFormatError, match="tensor t: bad shape") as info:
        io.read_safetensors(put(tmp_path / "s.safetensors", {"t": entry("U8", shape, 0, 2)}, b"\0\0"))
    assert info.value.expected.startswith("list of at most")  # refused by the per-dimension rule itself


@pytest.mark.parametrize("offsets", [[0, 4.0], [0.0, 4], [0, "4"], [0], [0, 4, 4]])
def test_offsets_must_be_two_ints(tmp_path, offsets):
    header = {"t": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    with pytest.raises(FileFormatError, match="data_offsets outside the data section"):
        io.read_safetensors(put(tmp_path / "o.safetensors", header, b"\0" * 4))


def test_header_length_limit_is_the_file_size(tmp_path):
    head = b'{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"ab")
    assert bytes(io.read_safetensors(path)[0]["t"]) == b"ab"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")  # a header filling the whole file: no tensors
    assert io.read_safetensors(path) == ({}, {})
    path.write_bytes(struct.pack("<Q", 3) + b"{}")  # one byte longer than the file
    with pytest.raises(FileFormatError, match="header length exceeds the file") as info:
        io.read_safetensors(path)
    assert (info.value.expected, info.value.found) == ("<= 2 bytes", "3 bytes")


def test_a_broken_header_whose_length_starts_like_a_pickle_is_not_called_one(tmp_path):
    """A header length of 128 + 256k begins with the pickle opcode 0x80; a JSON header opens with "{",
    so a broken one is reported as broken JSON, not as a pickle."""
    head = b"{" + b" " * 126 + b"x"  # 128 bytes, invalid JSON
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(FileFormatError, match="safetensors header is not valid JSON"):
        io.read_safetensors(path)


def test_a_truncated_file_whose_header_length_starts_like_a_pickle_is_not_called_one(tmp_path):
    head = b"{" + b" " * 126 + b"}"  # 128 bytes: the length field's first byte is 0x80
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head[:100])  # cut inside the header
    with pytest.raises(FileFormatError, match="header length exceeds the file"):
        io.read_safetensors(path)
