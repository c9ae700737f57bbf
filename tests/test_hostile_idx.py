"""Hostile IDX datasets (issue 18): gzip bombs for images and labels, headers that disagree with each
other or with the request, empty files. Headers are checked first, only what is asked for is
decompressed, and declared sizes are capped before anything is read."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microcnn import datasets
from microcnn.datasets import MAX_DATASET_BYTES, load_mnist, read_idx, write_idx
from microcnn.errors import FileFormatError, InputError
from tests.reference import peak_bytes

IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def _header(code: int, shape) -> bytes:
    return bytes((0, 0, code, len(shape))) + struct.pack(f">{len(shape)}I", *shape)


def _gzip_stream(path, header: bytes, zeros: int, corrupt_after_header: bool = False) -> int:
    """A gzip file: ``header`` then ``zeros`` zero bytes (compressed about 1000:1), written in pieces so
    the test never holds them. The header is a gzip member of its own; with ``corrupt_after_header``
    the member after it is junk, so any read past the header fails with 'corrupt gzip data'.
    Returns the file size."""
    with open(path, "wb") as raw:
        raw.write(gzip.compress(header, mtime=0))
        if corrupt_after_header:
            raw.write(b"\x1f\x8b\x08\x00" + b"\xff" * (60 + zeros // 1000))  # as long as the zeros' stream
        else:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
                chunk = bytes(1 << 20)
                while zeros:
                    gz.write(chunk[:min(zeros, len(chunk))])
                    zeros -= min(zeros, len(chunk))
    return path.stat().st_size



@pytest.fixture()
def root(tmp_path, isolated_datasets):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    return folder


def _load(root, **kwargs):
    return load_mnist("test", data_dir=root.parent, download=False, **kwargs)


# -- the cap on declared sizes, images and labels ------------------------------------------------------
@pytest.mark.parametrize("which", ["images", "labels"])
def test_files_declaring_more_than_the_cap_are_refused_before_decompressing(root, which):
    """A bomb: 1 MB of gzip declaring more than MAX_DATASET_BYTES. Refused from the header, naming the
    file, the declared size and the limit; nothing is decompressed (the data after the header is
    corrupt: decompressing it would raise 'corrupt gzip data' instead)."""
    n_images = MAX_DATASET_BYTES // 784 + 1 if which == "images" else 10
    n_labels = MAX_DATASET_BYTES + 1 if which == "labels" else 10
    _gzip_stream(root / IMAGES, _header(8, (n_images, 28, 28)), 10 * 784, corrupt_after_header=True)
    _gzip_stream(root / LABELS, _header(8, (n_labels,)), 10, corrupt_after_header=True)

    def refused():
        with pytest.raises(FileFormatError) as info:
            _load(root, samples=10)
        return info.value

    peak = peak_bytes(refused)
    err = refused()
    bad = root / (IMAGES if which == "images" else LABELS)
    declared = n_images * 784 if which == "images" else n_labels
    assert err.path == str(bad) and "larger than the allowed maximum" in str(err)
    assert err.found == f"{declared} bytes" and str(MAX_DATASET_BYTES) in err.expected
    assert "MAX_DATASET_BYTES" in err.expected
    assert peak < 1_000_000


@pytest.mark.parametrize("which", ["images", "labels"])
def test_gzip_declaring_more_than_deflate_can_expand_to_is_refused_from_the_header(tmp_path, which):
    """Deflate expands at most 1032:1: a 1 KB stream declaring 10 MB cannot hold it, refused before
    decompressing (a raw file's size is compared the same way)."""
    shape = (12_800, 28, 28) if which == "images" else (10_000_000,)
    path = tmp_path / "x.gz"
    size = _gzip_stream(path, _header(8, shape), 100, corrupt_after_header=True)
    with pytest.raises(FileFormatError, match=r"gzip file expands to at most 1032 times") as info:
        read_idx(path)
    assert info.value.found == f"at most {1032 * size} bytes"


def test_mismatched_label_file_is_refused_before_any_image_is_decompressed(root):
    # Images: a valid header then corrupt deflate data; labels: a valid file of another count.
    _gzip_stream(root / IMAGES, _header(8, (50_000, 28, 28)), 50_000 * 784, corrupt_after_header=True)
    write_idx(root / LABELS, np.zeros(10, np.uint8))
    with pytest.raises(FileFormatError, match="label count does not match the image count") as info:
        _load(root)
    assert info.value.expected == "50000 labels" and info.value.found == "10"
    assert str(root / IMAGES) in str(info.value) and str(root / LABELS) in str(info.value)


@pytest.mark.parametrize("images_shape, labels_shape, code, message", [
    ((10, 28, 27), (10,), 8, "not an image file"),
    ((10, 784), (10,), 8, "not an image file"),
    ((10, 28, 28), (10, 1), 8, "not a label file"),
    ((10, 28, 28), (10,), 0x0C, "not a label file"),
])
def test_wrong_kinds_of_file_are_refused_from_their_headers(root, images_shape, labels_shape, code, message):
    _gzip_stream(root / IMAGES, _header(8, images_shape), 0, corrupt_after_header=True)
    _gzip_stream(root / LABELS, _header(code, labels_shape), 0, corrupt_after_header=True)
    with pytest.raises(FileFormatError, match=message):
        _load(root)


def test_samples_decompresses_only_what_is_asked(root):
    """A 1,000x compressed file of 200,000 images (157 MB, under the cap): samples=10 reads 10 images."""
    n = 200_000
    _gzip_stream(root / IMAGES, _header(8, (n, 28, 28)), n * 784)
    _gzip_stream(root / LABELS, _header(8, (n,)), n)
    images, labels = [], []

    def ten():
        x, y = _load(root, samples=10)
        images.append(x)
        labels.append(y)

    peak = peak_bytes(ten)
    assert images[0].shape == (10, 1, 28, 28) and labels[0].shape == (10,)
    # 10 images as uint8 and float32 (39 KB) plus gzip buffers; a full read would need 157 MB + 627 MB.
    assert peak < 2_000_000


def test_zero_image_files_are_named_as_empty(root):
    write_idx(root / IMAGES, np.zeros((0, 28, 28), np.uint8))
    write_idx(root / LABELS, np.zeros(0, np.uint8))
    with pytest.raises(FileFormatError, match=r"declares 0 images \(an empty dataset file\)") as info:
        _load(root)
    assert info.value.path == str(root / IMAGES)


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, "3"])
def test_samples_must_be_a_positive_integer(root, bad):
    write_idx(root / IMAGES, np.zeros((3, 28, 28), np.uint8))
    write_idx(root / LABELS, np.zeros(3, np.uint8))
    with pytest.raises(InputError, match="samples: expected a positive integer"):
        _load(root, samples=bad)
    with pytest.raises(InputError, match="samples"):
        read_idx(root / IMAGES, items=bad)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 30), samples=st.one_of(st.none(), st.integers(1, 40)), gz=st.booleans(),
       full_first=st.booleans())
def test_samples_is_a_prefix_of_the_full_read(root, n, samples, gz, full_first):
    """Whatever the order of partial and full loads (the cache keeps both), ``samples`` gives the first
    min(samples, n) images and labels of the full read, and labels range-checked on what was read."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 28, 28), np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    for name in root.iterdir():
        name.unlink()
    write_idx(root / IMAGES.replace(".gz", suffix), images)
    write_idx(root / LABELS.replace(".gz", suffix), labels)
    datasets.clear_cache()
    loads = [dict(samples=None), dict(samples=samples)]
    results = [_load(root, **kw) for kw in (loads if full_first else loads[::-1])]
    (full_x, full_y), (part_x, part_y) = results if full_first else results[::-1]
    k = n if samples is None else min(samples, n)
    np.testing.assert_array_equal(full_x, images[:, None] / np.float32(255))
    np.testing.assert_array_equal(full_y, labels.astype(np.int64))
    assert part_x.shape == (k, 1, 28, 28) and part_y.shape == (k,)
    np.testing.assert_array_equal(part_x, full_x[:k])
    np.testing.assert_array_equal(part_y, full_y[:k])


def test_a_partial_read_sees_a_bad_label_only_if_it_reads_it(root):
    labels = np.array([1, 2, 3, 10], np.uint8)
    write_idx(root / IMAGES, np.zeros((4, 28, 28), np.uint8))
    write_idx(root / LABELS, labels)
    assert _load(root, samples=3)[1].tolist() == [1, 2, 3]
    with pytest.raises(FileFormatError, match="label out of range"):
        _load(root)


@pytest.mark.parametrize("items", [1, 3, 7, 100])
def test_read_idx_items_reads_a_prefix_of_every_dtype(tmp_path, items):
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        array = (np.arange(7 * 3 * 2) - 20).astype(dtype).reshape(7, 3, 2)
        for suffix in ("", ".gz"):
            write_idx(tmp_path / f"a{suffix}", array)
            got = read_idx(tmp_path / f"a{suffix}", items=items)
            assert got.dtype == array.dtype and got.flags.writeable
            np.testing.assert_array_equal(got, array[:items])
