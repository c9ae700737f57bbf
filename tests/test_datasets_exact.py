"""Exact behaviour of datasets.py's IDX reader/writer, loader cross-checks, download checksum, batching and
box filter, against independent references: IDX bytes built by hand with struct.pack, gzip from the
standard library, expected arrays written out (issue 19, mutation testing of datasets.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import zlib

import numpy as np
import pytest

from microcnn import datasets
from microcnn.datasets import FileChecksum, batches, box_weights, load_dataset, read_idx, write_idx
from microcnn.errors import FileFormatError, InputError

# IDX type code -> big-endian struct letter and NumPy dtype
CODES = {0x08: ("B", np.uint8), 0x09: ("b", np.int8), 0x0B: ("h", np.int16), 0x0C: ("i", np.int32),
         0x0D: ("f", np.float32), 0x0E: ("d", np.float64)}


def idx_bytes(code: int, shape: tuple, values: list) -> bytes:
    return (struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
            + struct.pack(f">{len(values)}{CODES[code][0]}", *values))


def put(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ write_idx

@pytest.mark.parametrize("code", sorted(CODES))
@pytest.mark.parametrize("order", ["<", ">"])
def test_write_idx_writes_the_exact_big_endian_bytes(tmp_path, code, order):
    values = [1, 2, 3, 4, 5, 6] if code not in (0x09, 0x0B, 0x0C) else [-3, 2, -1, 0, 5, -6]
    dtype = np.dtype(CODES[code][1]).newbyteorder(order)
    array = np.array(values, dtype=dtype).reshape(2, 3)
    write_idx(tmp_path / "a.idx", array)
    assert (tmp_path / "a.idx").read_bytes() == idx_bytes(code, (2, 3), values)
    write_idx(tmp_path / "b.idx", array.T)  # non-contiguous, shape (3, 2)
    assert (tmp_path / "b.idx").read_bytes() == idx_bytes(code, (3, 2), list(array.T.reshape(-1)))


def test_write_idx_gzip_is_the_same_bytes_and_reproducible(tmp_path):
    # varied small integers: enough matches that zlib's levels 6 and 7 give different streams
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 4, 1000) * rng.integers(0, 3, 1000)).astype(np.int16).reshape(100, 10) - 2
    write_idx(tmp_path / "a.idx.gz", array)
    first = (tmp_path / "a.idx.gz").read_bytes()
    assert first[:2] == b"\x1f\x8b" and first[3] == 0 and first[4:8] == b"\0\0\0\0"  # no name, mtime 0
    raw = idx_bytes(0x0B, (100, 10), list(array.reshape(-1)))
    assert gzip.decompress(first) == raw
    write_idx(tmp_path / "a.idx.gz", array)
    assert (tmp_path / "a.idx.gz").read_bytes() == first
    # the deflate stream is zlib's at level 6 (a raw stream: gzip header and trailer cut off)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert first[10:-8] == deflate.compress(raw) + deflate.flush()


def test_write_idx_dimension_limits(tmp_path):
    write_idx(tmp_path / "one.idx", np.array([7], np.uint8))
    assert (tmp_path / "one.idx").read_bytes() == idx_bytes(0x08, (1,), [7])
    write_idx(tmp_path / "sixteen.idx", np.full((1,) * 16, 9, np.uint8))
    assert (tmp_path / "sixteen.idx").read_bytes() == idx_bytes(0x08, (1,) * 16, [9])
    with pytest.raises(InputError, match="expected 1..16 dimensions, found 0"):
        write_idx(tmp_path / "zero.idx", np.uint8(3))
    with pytest.raises(InputError, match="expected 1..16 dimensions, found 17"):
        write_idx(tmp_path / "many.idx", np.zeros((1,) * 17, np.uint8))
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(1 << 32,), strides=(0,))
    with pytest.raises(InputError, match="below 2"):
        write_idx(tmp_path / "huge.idx", huge)
    with pytest.raises(InputError, match="below 2"):  # one axis too long is enough
        write_idx(tmp_path / "huge.idx", huge.reshape(1, 1 << 32))
    with pytest.raises(InputError, match="has no IDX code"):
        write_idx(tmp_path / "u16.idx", np.zeros(3, np.uint16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.idx", "sixteen.idx"]


def test_write_idx_takes_array_likes(tmp_path):
    write_idx(tmp_path / "a.idx", [[1.5, -2.0], [0.25, 8.0], [3.0, 4.0]])  # a list: float64, shape (3, 2)
    assert (tmp_path / "a.idx").read_bytes() == idx_bytes(0x0E, (3, 2), [1.5, -2.0, 0.25, 8.0, 3.0, 4.0])


# ------------------------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("code", sorted(CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_decodes_hand_built_files(tmp_path, code, compress):
    values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    if code != 0x08:
        values = [-5, *values[1:10], -1, 12]
    data = idx_bytes(code, (2, 3, 2), values)
    path = put(tmp_path, "a.idx.gz" if compress else "a.idx", gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.dtype == np.dtype(CODES[code][1]) and out.dtype.isnative
    assert out.shape == (2, 3, 2) and out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.array(values).reshape(2, 3, 2))
    part = read_idx(path, items=1)
    np.testing.assert_array_equal(part, np.array(values[:6]).reshape(1, 3, 2))
    np.testing.assert_array_equal(read_idx(path, items=np.int64(5)), out)


@pytest.mark.parametrize("items", [0, -1, True, 1.0, "2"])
def test_read_idx_refuses_bad_items(tmp_path, items):
    path = put(tmp_path, "a.idx", idx_bytes(0x08, (3,), [1, 2, 3]))
    with pytest.raises(InputError, match="samples: expected a positive integer"):
        read_idx(path, items=items)


def _format_error(path, **kw) -> FileFormatError:
    with pytest.raises(FileFormatError) as info:
        read_idx(path, **kw)
    assert info.value.path == str(path)
    return info.value


def test_read_idx_header_checks(tmp_path):
    err = _format_error(put(tmp_path, "short", b"\0\0\x08"))
    assert (err.expected, err.found) == ("4 bytes", "3 bytes")
    assert _format_error(put(tmp_path, "m0", b"\x01\0\x08\x01" + bytes(5))).found == "0x0100"
    assert _format_error(put(tmp_path, "m1", b"\0\x01\x08\x01" + bytes(5))).found == "0x0001"
    assert _format_error(put(tmp_path, "code", b"\0\0\x0a\x01" + bytes(5))).found == "0x0A"
    assert _format_error(put(tmp_path, "nd0", b"\0\0\x08\x00")).found == 0
    assert _format_error(put(tmp_path, "nd17", b"\0\0\x08\x11" + bytes(68) + b"\1")).found == 17
    ok16 = read_idx(put(tmp_path, "nd16", idx_bytes(0x08, (1,) * 16, [4])))
    assert ok16.shape == (1,) * 16 and ok16.reshape(-1)[0] == 4
    err = _format_error(put(tmp_path, "dims", b"\0\0\x08\x02" + struct.pack(">I", 3) + b"\0\0"))
    assert (err.expected, err.found) == ("12 header bytes", "10 bytes")


def test_read_idx_size_checks_are_exact(tmp_path):
    good = idx_bytes(0x0B, (2, 3), [1, 2, 3, 4, 5, 6])
    err = _format_error(put(tmp_path, "shortdata", good[:-1]))
    assert (err.expected, err.found) == ("12 data bytes", "11 bytes")
    err = _format_error(put(tmp_path, "trailing", good + b"\0"))
    assert (err.expected, err.found) == ("12 data bytes", "13 bytes")
    path = put(tmp_path, "good", good)
    assert read_idx(path, max_bytes=12).shape == (2, 3)
    err = _format_error(path, max_bytes=11)
    assert err.found == "12 bytes" and "at most 11 bytes" in err.expected
    # a zero-length axis holds no data, but the other axes still count against the limit
    empty = put(tmp_path, "empty", idx_bytes(0x0D, (0, 4), []))
    assert read_idx(empty, max_bytes=16).shape == (0, 4)
    assert _format_error(empty, max_bytes=15).found == "16 bytes"


def test_read_idx_gzip_checks(tmp_path):
    good = idx_bytes(0x0C, (3, 2), [1, -2, 3, -4, 5, -6])
    short = _format_error(put(tmp_path, "short.gz", gzip.compress(good[:-2])))
    assert short.found == "22 bytes" and short.expected == "24 data bytes"
    trailing = _format_error(put(tmp_path, "trail.gz", gzip.compress(good + b"\0\0")))
    assert trailing.found == "at least 26 bytes"
    broken = bytearray(gzip.compress(good))
    broken[-8] ^= 0xFF  # the CRC
    assert _format_error(put(tmp_path, "crc.gz", bytes(broken))).what == "corrupt or truncated gzip data"
    # items stops before the end: neither trailing bytes nor the CRC are looked at
    np.testing.assert_array_equal(read_idx(tmp_path / "crc.gz", items=2), [[1, -2], [3, -4]])
    np.testing.assert_array_equal(read_idx(tmp_path / "trail.gz", items=2), [[1, -2], [3, -4]])
    # a tiny gzip file cannot expand past 1032 times its size: refused before reading the data
    header = struct.pack(">BBBB", 0, 0, 0x08, 1) + struct.pack(">I", 10 ** 6)
    bomb = put(tmp_path, "bomb.gz", gzip.compress(header))
    size = bomb.stat().st_size
    err = _format_error(bomb)
    assert (err.expected, err.found) == ("1000000 data bytes", f"at most {1032 * size} bytes")


def test_gzip_declared_size_equal_to_the_bound_is_read(tmp_path, monkeypatch):
    # the bound is inclusive: a stream declaring exactly ratio * file size bytes is read
    for n in range(100, 400):
        packed = gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(n), mtime=0)
        if n % len(packed) == 0:
            break
    monkeypatch.setattr(datasets, "_MAX_GZIP_RATIO", n // len(packed))
    path = put(tmp_path, "x.gz", packed)
    np.testing.assert_array_equal(read_idx(path), np.zeros(n, np.uint8))
    monkeypatch.setattr(datasets, "_MAX_GZIP_RATIO", n // len(packed) - 1)
    assert _format_error(path).found == f"at most {n - len(packed)} bytes"


def test_a_refused_header_closes_its_file(tmp_path, monkeypatch):
    opened = []

    def tracking_open(*args, **kwargs):
        opened.append(open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(datasets, "open", tracking_open, raising=False)
    with pytest.raises(FileFormatError):
        read_idx(put(tmp_path, "bad.idx", b"\1\0\x08\x01" + bytes(5)))
    assert len(opened) == 1 and opened[0].closed


def test_idx_reader_closes_its_file(tmp_path):
    path = put(tmp_path, "a.idx", idx_bytes(0x08, (2,), [1, 2]))
    with datasets._IdxReader(path) as reader:
        assert reader.shape == (2,) and not reader._raw.closed
    assert reader._raw.closed
    reader = datasets._IdxReader(path)
    reader.close()
    assert reader._raw.closed


# ----------------------------------------------------------------------------------- _verify_download

def _gz(data: bytes) -> io.BytesIO:
    out = io.BytesIO(gzip.compress(data))
    out.seek(0, io.SEEK_END)
    return out


def test_verify_download_exact(tmp_path):
    data = bytes(range(200)) * 3
    good = FileChecksum(hashlib.sha256(data).hexdigest(), len(data))
    datasets._verify_download(_gz(data), good)
    with pytest.raises(datasets._FetchFailure) as info:
        datasets._verify_download(_gz(data[:-1]), good)
    assert info.value.retry is False and "found 599)" in str(info.value)
    with pytest.raises(datasets._FetchFailure) as info:
        datasets._verify_download(_gz(data + b"x"), good)
    assert info.value.retry is False and "found more than 600)" in str(info.value)
    flipped = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(datasets._FetchFailure, match="SHA-256 mismatch") as info:
        datasets._verify_download(_gz(flipped), good)
    assert info.value.retry is False
    with pytest.raises(datasets._FetchFailure, match="not gzip") as info:
        datasets._verify_download(io.BytesIO(data), good)
    assert info.value.retry is False
    broken = bytearray(gzip.compress(data))
    broken[-8] ^= 0xFF
    with pytest.raises(datasets._FetchFailure, match="corrupt gzip") as info:
        datasets._verify_download(io.BytesIO(bytes(broken)), good)
    assert info.value.retry is True


def test_verify_download_reads_in_chunks(monkeypatch):
    monkeypatch.setattr(datasets, "_CHUNK", 7)
    data = bytes(range(256)) * 2
    datasets._verify_download(_gz(data), FileChecksum(hashlib.sha256(data).hexdigest(), len(data)))
    with pytest.raises(datasets._FetchFailure, match="found more than 511"):
        datasets._verify_download(_gz(data), FileChecksum(hashlib.sha256(data[:-1]).hexdigest(), 511))
    with pytest.raises(datasets._FetchFailure, match="found 512"):
        datasets._verify_download(_gz(data), FileChecksum(hashlib.sha256(data).hexdigest(), 513))


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_verify_download_decompresses_one_byte_past_the_expected_length(monkeypatch, chunk):
    returned = []

    class Recording(gzip.GzipFile):
        def read(self, size=-1):
            data = super().read(size)
            returned.append(len(data))
            return data

    monkeypatch.setattr(datasets, "_CHUNK", chunk)
    monkeypatch.setattr(gzip, "GzipFile", Recording)
    data = bytes(5000)  # a payload far larger than the 10 bytes expected: a bomb is cut off early
    with pytest.raises(datasets._FetchFailure, match="found more than 10"):
        datasets._verify_download(_gz(data), FileChecksum(hashlib.sha256(data[:10]).hexdigest(), 10))
    assert sum(returned) == 11


def test_read_upto_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_CHUNK", 5)
    values = list(range(23))
    path = put(tmp_path, "a.idx.gz", gzip.compress(idx_bytes(0x08, (23,), values)))
    np.testing.assert_array_equal(read_idx(path), values)
    np.testing.assert_array_equal(read_idx(path, items=12), values[:12])


# --------------------------------------------------------------------------------------- load_dataset

@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROCNN_DATA", raising=False)
    datasets.clear_cache()
    yield tmp_path / "mnist"
    datasets.clear_cache()


def _write_pair(directory, images, labels, split="test"):
    directory.mkdir(exist_ok=True)
    image_base, label_base = datasets.SPLIT_FILES[split]
    write_idx(directory / image_base, images)
    write_idx(directory / label_base, labels)


def _images(n):
    return ((np.arange(n * 784) * 37) % 256).astype(np.uint8).reshape(n, 28, 28)


def test_load_dataset_values_samples_and_cache(mnist_dir):
    images, labels = _images(5), np.array([9, 0, 3, 9, 1], np.uint8)
    _write_pair(mnist_dir, images, labels)
    root = mnist_dir.parent
    x, y = load_dataset("mnist", "test", root, download=False)
    assert x.dtype == np.float32 and x.shape == (5, 1, 28, 28) and y.dtype == np.int64
    np.testing.assert_array_equal(x, (images.astype(np.float32) / np.float32(255))[:, None])
    np.testing.assert_array_equal(y, [9, 0, 3, 9, 1])
    x[:] = 0
    y[:] = 0
    x2, y2 = load_dataset("mnist", "test", root, download=False, samples=np.int64(2))
    np.testing.assert_array_equal(x2[:, 0], images[:2] / np.float32(255))
    np.testing.assert_array_equal(y2, [9, 0])
    assert load_dataset("mnist", "test", root, download=False, samples=9)[1].tolist() == [9, 0, 3, 9, 1]
    datasets.clear_cache()
    x3, y3 = load_dataset("mnist", "test", root, download=False, samples=3)
    assert x3.shape == (3, 1, 28, 28) and y3.tolist() == [9, 0, 3]
    y3[0] = 5
    assert load_dataset("mnist", "test", root, download=False, samples=3)[1].tolist() == [9, 0, 3]
    assert load_dataset("mnist", "test", root, download=False)[1].tolist() == [9, 0, 3, 9, 1]
    for bad in (0, -2, True, 2.5):
        with pytest.raises(InputError, match="samples"):
            load_dataset("mnist", "test", root, download=False, samples=bad)


def test_load_dataset_cache_is_bounded_and_keyed_by_samples(mnist_dir):
    _write_pair(mnist_dir, _images(8), np.arange(8, dtype=np.uint8))
    for n in range(1, 9):
        assert load_dataset("mnist", "test", mnist_dir.parent, download=False, samples=n)[1].tolist() == \
            list(range(n))
        assert len(datasets._CACHE) == min(n, datasets._CACHE_MAX)
    assert datasets._CACHE_MAX == 6


def test_load_dataset_sees_a_rewritten_file(mnist_dir):
    _write_pair(mnist_dir, _images(2), np.array([1, 2], np.uint8))
    assert load_dataset("mnist", "test", mnist_dir.parent, download=False)[1].tolist() == [1, 2]
    _write_pair(mnist_dir, _images(3), np.array([4, 5, 6], np.uint8))
    assert load_dataset("mnist", "test", mnist_dir.parent, download=False)[1].tolist() == [4, 5, 6]


@pytest.mark.parametrize("images, labels, bad, found", [
    (np.zeros((2, 28, 27), np.uint8), np.zeros(2, np.uint8), "images", "uint8 array of shape (2, 28, 27)"),
    (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), "images", "uint8 array of shape (2, 27, 28)"),
    (np.zeros((2, 1, 28, 28), np.uint8), np.zeros(2, np.uint8), "images",
     "uint8 array of shape (2, 1, 28, 28)"),
    (np.zeros((2, 28, 28), np.int8), np.zeros(2, np.uint8), "images", "int8 array of shape (2, 28, 28)"),
    (np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1), np.uint8), "labels", "uint8 array of shape (2, 1)"),
    (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int8), "labels", "int8 array of shape (2,)"),
    (np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8), "labels", "3"),
    (np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8), "labels", "2"),
    (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), "images", "shape (0, 28, 28)"),
    (np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8), "labels", 10),
])
def test_load_dataset_cross_checks(mnist_dir, images, labels, bad, found):
    _write_pair(mnist_dir, images, labels)
    with pytest.raises(FileFormatError) as info:
        load_dataset("mnist", "test", mnist_dir.parent, download=False)
    base = datasets.SPLIT_FILES["test"][0 if bad == "images" else 1]
    assert info.value.path == str(mnist_dir / base) and info.value.found == found


def test_decode_pair_limit_is_inclusive(mnist_dir):
    _write_pair(mnist_dir, _images(2), np.array([1, 9], np.uint8))
    names = datasets.SPLIT_FILES["test"]
    with pytest.raises(FileFormatError, match="MAX_DATASET_BYTES"):
        datasets._decode_pair(mnist_dir / names[0], mnist_dir / names[1], 10, None, 2 * 784 - 1)
    x, y = datasets._decode_pair(mnist_dir / names[0], mnist_dir / names[1], 10, None, 2 * 784)
    # the decoded arrays are what load_dataset caches: read-only, so no caller can alter the cache
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [1, 9]
    assert not x.flags.writeable and not y.flags.writeable


def test_load_dataset_downloads_by_default_and_passes_the_options(mnist_dir, monkeypatch):
    _write_pair(mnist_dir, _images(2), np.array([4, 2], np.uint8), split="train")
    calls = []

    def fake_fetch(name, bases, data_dir, progress, mirrors, timeout):
        calls.append((name, bases, data_dir, progress, mirrors, timeout))
        return mnist_dir

    monkeypatch.setattr(datasets, "find_dataset_dir", lambda *args: None)  # nothing on disk
    monkeypatch.setattr(datasets, "_fetch_files", fake_fetch)
    assert load_dataset("mnist", "train", "somewhere")[1].tolist() == [4, 2]
    train = datasets.SPLIT_FILES["train"]
    assert calls == [("mnist", train, "somewhere", True, None, datasets.DEFAULT_TIMEOUT)]
    load_dataset("mnist", "train", None, samples=1, progress=False, mirrors=["m"], timeout=3.5)
    assert calls[1] == ("mnist", train, None, False, ["m"], 3.5)
    with pytest.raises(datasets.DataNotFoundError, match="download=False, so nothing was downloaded"):
        load_dataset("mnist", "train", None, download=False)
    assert len(calls) == 2

    def failing_fetch(*args):
        raise datasets.DownloadError("all mirrors down")

    monkeypatch.setattr(datasets, "_fetch_files", failing_fetch)
    with pytest.raises(datasets.DataNotFoundError, match="Downloading failed: all mirrors down"):
        load_dataset("mnist", "train", None)


def test_load_dataset_reports_the_first_bad_argument(mnist_dir):
    with pytest.raises(InputError, match="unknown dataset 'digits'"):
        load_dataset("digits", "test", mnist_dir.parent, download=False, samples=0)
    with pytest.raises(InputError, match="unknown split 'val'"):
        load_dataset("mnist", "val", mnist_dir.parent, download=False, samples=0)


# -------------------------------------------------------------------------------------------- batches

def test_batches_in_order_with_a_partial_last_batch():
    images = np.arange(7 * 2).reshape(7, 2)
    labels = np.arange(7) * 10
    got = list(batches(images, labels, batch_size=3))
    assert [b[0].tolist() for b in got] == [images[0:3].tolist(), images[3:6].tolist(), images[6:7].tolist()]
    assert [b[1].tolist() for b in got] == [[0, 10, 20], [30, 40, 50], [60]]
    assert [y for _, y in batches(images, batch_size=np.int64(4))] == [None, None]
    assert [x.tolist() for x, _ in batches(images, batch_size=7)] == [images.tolist()]
    assert len(list(batches(images, labels, batch_size=1))) == 7
    assert [len(x) for x, _ in batches(np.zeros(130))] == [64, 64, 2]  # the documented default size
    listed = list(batches([[1, 2], [3, 4], [5, 6]], [7, 8, 9], batch_size=2))  # array-likes
    assert [x.tolist() for x, _ in listed] == [[[1, 2], [3, 4]], [[5, 6]]]
    assert [y.tolist() for _, y in listed] == [[7, 8], [9]]


def test_batches_shuffle_is_one_seeded_permutation():
    images = np.arange(10)
    order = np.random.default_rng(5).permutation(10)
    got = list(batches(images, images * 2, batch_size=4, shuffle=True, seed=5))
    assert [x.tolist() for x, _ in got] == [order[0:4].tolist(), order[4:8].tolist(), order[8:].tolist()]
    assert [y.tolist() for _, y in got] == [(order[0:4] * 2).tolist(), (order[4:8] * 2).tolist(),
                                           (order[8:] * 2).tolist()]
    assert [x.tolist() for x, _ in batches(images, batch_size=10, seed=5)] == [list(range(10))]


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": True}, "batch_size"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"labels": np.arange(4)}, "labels must match"), ({"labels": np.int64(3)}, "labels must match"),
])
def test_batches_checks_at_the_call(kwargs, message):
    with pytest.raises(InputError, match=message):
        batches(np.zeros((3, 2)), **kwargs)
    with pytest.raises(InputError, match="leading sample axis"):
        batches(np.float64(1.0))


# ---------------------------------------------------------------------------------------- box_weights

def test_box_weights_exact():
    np.testing.assert_allclose(box_weights(2, 3), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], atol=1e-15)
    np.testing.assert_allclose(box_weights(3, 2), [[1, 0], [0.5, 0.5], [0, 1]], atol=1e-15)
    np.testing.assert_array_equal(box_weights(4, 4), np.eye(4))
    np.testing.assert_allclose(box_weights(1, 5), np.full((1, 5), 0.2), atol=1e-15)
    np.testing.assert_allclose(box_weights(2, 5), [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]], atol=1e-15)
