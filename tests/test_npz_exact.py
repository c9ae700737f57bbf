"""``.npz`` datasets (``resolve.load_npz``) and the check that a model can score data
(``resolve.check_data_fits``), each rule at its boundary: pixel scaling, the label range, non-finite
pixels, members that are not arrays, headers that declare more data than their member holds, and
arrays that cannot be read."""

import io as bytes_io
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy

from microcnn import resolve
from microcnn.errors import FileFormatError, MicrocnnError
from microcnn.lenet import lenet


def _save(path, images, labels):
    np.savez(path, images=images, labels=labels)
    return path


def _member(array_header: dict, data: bytes) -> bytes:
    """An .npy member with the given header and raw data (which may disagree with it)."""
    buf = bytes_io.BytesIO()
    npy.write_array_header_1_0(buf, array_header)
    return buf.getvalue() + data


def _zip(path, members: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return path


def _labels_member(n):
    header = {"descr": "<i8", "fortran_order": False, "shape": (n,)}
    return _member(header, np.arange(n, dtype="<i8").tobytes())


def test_the_documented_limits():
    assert resolve.MAX_NPZ_BYTES == 2**32 and resolve.MAX_LABEL == 2**31 - 1


def test_uint8_pixels_are_scaled_by_one_255th_and_float32_kept_as_stored(tmp_path):
    pixels = np.array([0, 1, 128, 254, 255, 7], np.uint8).reshape(1, 1, 2, 3)
    images, labels = resolve.load_npz(_save(tmp_path / "u.npz", pixels, np.array([3], np.uint8)))
    assert images.dtype == np.float32 and labels.dtype == np.int64 and labels.tolist() == [3]
    np.testing.assert_array_equal(images, pixels.astype(np.float32) / np.float32(255))
    assert images.max() == 1.0
    floats = np.array([-2.5, 0.0, 300.0, 1e-3, 7.0, 1.0], np.float32).reshape(1, 1, 3, 2)
    images, _ = resolve.load_npz(_save(tmp_path / "f.npz", floats, np.array([0])))
    np.testing.assert_array_equal(images, floats)


def test_labels_up_to_max_label_load_and_one_more_is_refused(tmp_path):
    images = np.zeros((2, 1, 2, 2), np.uint8)
    top = resolve.MAX_LABEL
    _, labels = resolve.load_npz(_save(tmp_path / "ok.npz", images, np.array([5, top], np.int64)))
    assert labels.tolist() == [5, top]
    for bad, found in (([5, top + 1], f"5..{top + 1}"), ([top + 1, 5], f"5..{top + 1}"), ([-1, 3], "-1..3")):
        with pytest.raises(FileFormatError) as info:
            resolve.load_npz(_save(tmp_path / "bad.npz", images, np.array(bad, np.int64)))
        assert (info.value.what, info.value.expected, info.value.found) == (
            "labels out of range", f"0..{top}", found)


@pytest.mark.parametrize("bad, count", [((np.nan,), 1), ((np.inf, -np.inf, np.nan), 3)])
def test_non_finite_float_pixels_are_refused_with_their_count(tmp_path, bad, count):
    images = np.ones((2, 1, 3, 4), np.float32)
    images.flat[5:5 + len(bad)] = bad
    with pytest.raises(FileFormatError) as info:
        resolve.load_npz(_save(tmp_path / "nan.npz", images, np.array([0, 1])))
    assert info.value.what == f"images hold {count} NaN/Inf values"
    assert info.value.found == f"{count} non-finite"


def test_members_that_are_not_arrays_are_ignored(tmp_path):
    images = np.full((1, 1, 2, 2), 51, np.uint8)
    path = _zip(tmp_path / "extra.npz", {
        "README.txt": b"not an array",
        "images.npy": _member({"descr": "|u1", "fortran_order": False, "shape": (1, 1, 2, 2)},
                              images.tobytes()),
        "labels.npy": _labels_member(1)})
    got, labels = resolve.load_npz(path)
    np.testing.assert_array_equal(got, np.full((1, 1, 2, 2), np.float32(51) / np.float32(255)))


@pytest.mark.parametrize("descr", ["<f4", "|u1"])
def test_a_header_declaring_more_than_its_member_holds_is_refused_before_reading(tmp_path, descr):
    # 40,000 declared pixels, 16 stored: refused from the header (the member is ~150 bytes)
    header = {"descr": descr, "fortran_order": False, "shape": (1, 1, 200, 200)}
    path = _zip(tmp_path / "lying.npz", {"images.npy": _member(header, bytes(16)),
                                         "labels.npy": _labels_member(1)})
    with pytest.raises(FileFormatError) as info:
        resolve.load_npz(path)
    need = 40_000 * np.dtype(descr).itemsize
    assert info.value.what == "array images declares more data than it holds"  # not wrapped twice
    assert info.value.found == f"{need} bytes" and info.value.path == str(path)


def test_an_array_shorter_than_its_header_within_the_member_size_is_refused_when_read(tmp_path):
    # 100 declared bytes, 20 stored: fits the member's size (header included), fails when read
    header = {"descr": "|u1", "fortran_order": False, "shape": (1, 1, 10, 10)}
    path = _zip(tmp_path / "short.npz", {"images.npy": _member(header, bytes(20)),
                                         "labels.npy": _labels_member(1)})
    with pytest.raises(FileFormatError) as info:
        resolve.load_npz(path)
    assert info.value.what.startswith("arrays could not be read")


def test_a_directory_is_not_a_dataset_file(tmp_path):
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(FileFormatError) as info:
        resolve.load_npz(tmp_path / "dir.npz")
    assert info.value.what == "dataset file is not a regular file"


def test_data_fits_up_to_the_models_last_class():
    net, images = lenet(), np.zeros((2, 1, 28, 28), np.float32)
    resolve.check_data_fits(net, images, np.array([0, 9]), "--dataset x.npz")  # 10 classes: 0..9
    with pytest.raises(MicrocnnError, match=r"^--dataset x\.npz: labels reach 10, the model has 10 classes "
                                            r"\(expected labels 0\.\.9\)$"):
        resolve.check_data_fits(net, images, np.array([10, 0]), "--dataset x.npz")
