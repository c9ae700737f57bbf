"""IDX reading/writing, the real MNIST files, data-folder precedence, loaders, batching, ASCII preview."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from microcnn import datasets
from microcnn.datasets import (
    ASCII_RAMP,
    CHECKSUMS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ascii_digit,
    batches,
    candidate_dirs,
    find_dataset_dir,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    write_idx,
)
from microcnn.errors import DataNotFoundError, FileFormatError, InputError

# Decompressed SHA-256 of the shared files, copied from /work/shared/datasets/README.md.
SHARED_SHA256 = {
    "train-images-idx3-ubyte": "2889698e6bc3614913e76901316712919d1998fc2b44512451bfe65bc1e668b1",
    "train-labels-idx1-ubyte": "651e38e2ac0632f5113ec18f1df4977117f953197819034009971a6675a0df78",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Per-class counts of the official MNIST test set (LeCun et al.).
T10K_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _shared_mnist_dir() -> Path | None:
    for candidate in (os.environ.get("MICROCNN_DATA"),):  # conftest defaults it to ../shared
        if candidate:
            directory = Path(candidate) if Path(candidate).name == "mnist" else Path(candidate) / "mnist"
            if (directory / "t10k-images-idx3-ubyte.gz").is_file():
                return directory
    return None


SHARED = _shared_mnist_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared MNIST files absent (set MICROCNN_DATA)")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_SYSTEM_DIRS = dict(datasets.SYSTEM_DIRS)  # before the autouse fixture empties it


pytestmark = pytest.mark.usefixtures("isolated_datasets")


def _raw_idx(code: int, shape, payload: bytes) -> bytes:
    """Independent IDX encoder: header from the format spec, payload as given."""
    return bytes((0, 0, code, len(shape))) + struct.pack(f">{len(shape)}I", *shape) + payload


def _write_bytes(path: Path, data: bytes, compress: bool) -> Path:
    path = path.with_name(path.name + ".gz") if compress else path
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _make_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz=True) -> None:
    image_base, label_base = datasets.SPLIT_FILES[split]
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{image_base}{suffix}", images)
    write_idx(directory / f"{label_base}{suffix}", labels)


def _tiny(n: int, marker: int, seed: int = 0):
    """n random 28x28 uint8 images; every label equals ``marker`` so tests can tell copies apart."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.full(n, marker, np.uint8)


# ------------------------------------------------------------------------------------- real files


@needs_shared
@pytest.mark.parametrize("base", sorted(SHARED_SHA256))
def test_shared_files_read_like_an_independent_parser(base):
    path = SHARED / f"{base}.gz"
    raw = gzip.decompress(path.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == SHARED_SHA256[base]
    array = read_idx(path)
    if "images" in base:
        assert raw[:4] == b"\x00\x00\x08\x03"
        reference = np.frombuffer(raw[16:], np.uint8).reshape(10000, 28, 28)
    else:
        assert raw[:4] == b"\x00\x00\x08\x01"
        reference = np.frombuffer(raw[8:], np.uint8)
    assert array.dtype == np.uint8 and array.flags.c_contiguous and array.flags.writeable
    np.testing.assert_array_equal(array, reference)


@needs_shared
def test_load_mnist_test_split_from_shared_files():
    images, labels = load_mnist("test", data_dir=SHARED.parent, download=False)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32 and images.flags.c_contiguous
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(labels, minlength=10).tolist() == T10K_CLASS_COUNTS
    raw = np.frombuffer(gzip.decompress((SHARED / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    reference = (raw.astype(np.float64) / 255.0).reshape(10000, 1, 28, 28)
    # float32(u/255) is the correctly rounded quotient: within half an ulp of the float64 value.
    np.testing.assert_allclose(images, reference, rtol=2**-24, atol=0)
    assert images.min() == 0.0 and images.max() == 1.0


@needs_shared
def test_load_mnist_train_split_uses_header_count(monkeypatch):
    # CI points MICROCNN_DATA at the shared folder itself, whose name is the dataset name.
    monkeypatch.setenv("MICROCNN_DATA", str(SHARED))
    images, labels = load_mnist("train", download=False)
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    reference = read_idx(SHARED / "train-labels-idx1-ubyte.gz").astype(np.int64)
    np.testing.assert_array_equal(labels, reference)


@needs_shared
def test_mnist_table_agrees_with_the_official_test_files():
    for base in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        raw = gzip.decompress((SHARED / f"{base}.gz").read_bytes())
        assert CHECKSUMS["mnist"][base] == (hashlib.sha256(raw).hexdigest(), len(raw))


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (DEBIAN_FASHION,)})
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split, download=False)
        assert images.shape == (count, 1, 28, 28) and images.dtype == np.float32
        # Fashion-MNIST is exactly balanced: 6,000 / 1,000 items per class.
        assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10
        assert 0.0 <= images.min() and images.max() <= 1.0
    # The download table's checksums are those of the files Debian ships (60000 / 10000 items).
    for base, expected in CHECKSUMS["fashion-mnist"].items():
        raw = gzip.decompress((DEBIAN_FASHION / f"{base}.gz").read_bytes())
        assert (hashlib.sha256(raw).hexdigest(), len(raw)) == expected


# --------------------------------------------------------------------------------------- IDX round trip

_IDX_CODE = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(sorted(_IDX_CODE)),
    order=st.sampled_from("<>="),
    compress=st.booleans(),
    data=st.data(),
)
def test_idx_round_trip_every_dtype(tmp_path_factory, kind, order, compress, data):
    dtype = np.dtype(order + kind)
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    array = data.draw(hnp.arrays(dtype, shape))
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array)
    stored = path.read_bytes()
    assert stored[:2] == b"\x1f\x8b" if compress else stored[:2] == b"\x00\x00"
    content = gzip.decompress(stored) if compress else stored
    assert content == _raw_idx(_IDX_CODE[kind], shape, array.astype(">" + kind).tobytes())
    back = read_idx(path)
    assert back.shape == shape and back.dtype == dtype.newbyteorder("=")
    assert back.dtype.isnative and back.flags.c_contiguous and back.flags.writeable
    # Bitwise comparison: NaN payloads and signed zeros must survive too.
    assert back.tobytes() == array.astype(back.dtype).tobytes()


def test_write_idx_gz_is_deterministic(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


@pytest.mark.parametrize(
    "array",
    [np.zeros(3, np.int64), np.zeros(3, bool), np.zeros(3, np.complex64), np.zeros(3, np.float16)]
    + [np.float32(1)],
)
def test_write_idx_refuses_arrays_idx_cannot_hold(tmp_path, array):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="write_idx"):
        write_idx(out / "x.idx", array)
    assert not out.exists()


def test_write_idx_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out" / "keep.idx.gz"
    write_idx(target, np.arange(5, dtype=np.uint8))
    before = target.read_bytes()

    class FailingGzip(gzip.GzipFile):
        def write(self, data):
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(datasets.gzip, "GzipFile", FailingGzip)
    with pytest.raises(OSError, match="disk full"):
        write_idx(target, np.arange(7, dtype=np.uint8))
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["keep.idx.gz"]


# ------------------------------------------------------------------------------------------ bad input

_IMAGES_10 = np.arange(10 * 28 * 28, dtype=np.uint32).astype(np.uint8).tobytes()

BAD_IDX = {
    "empty": (b"", "too short"),
    "wrong magic": (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", "two zero bytes"),
    "unknown dtype": (_raw_idx(0x0A, (3,), b"abc"), "data type code"),
    "ndim 0": (b"\x00\x00\x08\x00abc", "dimensions out of range"),
    "ndim absurd": (b"\x00\x00\x08\xc8" + b"\x00\x00\x00\x01" * 200, "dimensions out of range"),
    "header truncated": (b"\x00\x00\x08\x03" + struct.pack(">2I", 10, 28), "header truncated"),
    "dims overflow": (_raw_idx(0x0E, (2**32 - 1,) * 4, b""), "larger than the allowed"),
    "zero dim with huge others": (_raw_idx(0x08, (0, 2**32 - 1, 2**32 - 1), b""), "larger than the allowed"),
    "dims exceed file": (_raw_idx(0x08, (1000, 28, 28), _IMAGES_10), "data shorter"),
    "count larger than data": (_raw_idx(0x08, (10,), bytes(9)), "data shorter"),
    "trailing bytes": (_raw_idx(0x08, (10,), bytes(11)), "trailing bytes"),
    "10^9 images": (_raw_idx(0x08, (10**9, 28, 28), _IMAGES_10), "larger than the allowed"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(BAD_IDX))
def test_bad_idx_raises_file_format_error_naming_the_file(tmp_path, case, compress):
    content, fragment = BAD_IDX[case]
    path = _write_bytes(tmp_path / "bad-idx3-ubyte", content, compress)
    with pytest.raises(FileFormatError, match=fragment) as info:
        read_idx(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert info.value.expected is not None and info.value.found is not None


def _valid_gz(tmp_path) -> bytes:
    return gzip.compress(_raw_idx(0x08, (10, 28, 28), _IMAGES_10), mtime=0)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda gz: gz[: len(gz) - 20], id="truncated"),
        pytest.param(lambda gz: gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:], id="bad crc"),
        pytest.param(lambda gz: gz[:30] + bytes(200) + gz[230:], id="corrupt deflate"),
        pytest.param(lambda gz: gz + b"garbage!", id="garbage after stream"),
        pytest.param(lambda gz: gz[:3] + b"\xff" + gz[4:], id="bad flags"),
    ],
)
def test_corrupt_gzip_raises_file_format_error(tmp_path, mutate):
    path = tmp_path / "images.gz"
    path.write_bytes(mutate(_valid_gz(tmp_path)))
    with pytest.raises(FileFormatError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_huge_declared_size_is_refused_without_allocating_it(tmp_path, compress):
    # 100,000 images (78 MB) is under the size cap, so only the data check stands between the header
    # and an allocation. tracemalloc sees NumPy and bytearray buffers, as the valid read shows.
    valid = _write_bytes(tmp_path / "valid", _raw_idx(0x08, (8000, 28, 28), bytes(8000 * 784)), compress)
    bad = _write_bytes(tmp_path / "bad", _raw_idx(0x08, (100_000, 28, 28), _IMAGES_10), compress)
    tracemalloc.start()
    try:
        read_idx(valid)
        _, peak_valid = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(FileFormatError, match="data shorter"):
            read_idx(bad)
        _, peak_bad = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_valid >= 8000 * 784
    assert peak_bad < 2_000_000


def test_max_bytes_limit_is_configurable(tmp_path):
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros((4, 4), np.float64))
    assert read_idx(path, max_bytes=128).shape == (4, 4)
    with pytest.raises(FileFormatError, match="max_bytes"):
        read_idx(path, max_bytes=127)


# --------------------------------------------------------------------------------- locating the data


def _populate(root: Path, marker: int, split="test", gz=True) -> Path:
    images, labels = _tiny(3, marker, seed=marker)
    _make_split(root, split, images, labels, gz=gz)
    return root


def test_data_dir_precedence_argument_env_cwd_cache(tmp_path, monkeypatch):
    arg = _populate(tmp_path / "arg" / "mnist", 1)
    env = _populate(tmp_path / "env" / "mnist", 2)
    cwd = _populate(tmp_path / "cwd" / "data" / "mnist", 3, gz=False)
    cache = _populate(tmp_path / "xdg" / "microcnn" / "mnist", 4)
    monkeypatch.setenv("MICROCNN_DATA", str(tmp_path / "env"))
    assert candidate_dirs("mnist", tmp_path / "arg") == [arg, env, cwd, cache]

    def marker(**kwargs):
        return int(load_mnist("test", download=False, **kwargs)[1][0])

    assert marker(data_dir=tmp_path / "arg") == 1
    assert marker() == 2
    monkeypatch.delenv("MICROCNN_DATA")
    assert marker() == 3
    for f in cwd.iterdir():
        f.unlink()
    assert marker() == 4
    assert find_dataset_dir("mnist", split="test") == cache
    for f in cache.iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_mnist("test", data_dir=tmp_path / "arg2", download=False)
    message = str(info.value)
    for directory in (tmp_path / "arg2" / "mnist", cwd, cache):
        assert str(directory) in message
    assert "MICROCNN_DATA" in message and "t10k-images-idx3-ubyte" in message
    assert isinstance(info.value, FileNotFoundError)


def test_root_named_like_the_dataset_is_used_directly(tmp_path, monkeypatch):
    _populate(tmp_path / "shared" / "mnist", 7)
    monkeypatch.setenv("MICROCNN_DATA", str(tmp_path / "shared" / "mnist"))
    assert load_mnist("test", download=False)[1][0] == 7
    # The MNIST folder is not mistaken for Fashion-MNIST, and an unrelated folder name is not a match.
    with pytest.raises(DataNotFoundError):
        load_fashion_mnist("test", download=False)
    _populate(tmp_path / "elsewhere", 8)
    monkeypatch.setenv("MICROCNN_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DataNotFoundError):
        load_mnist("test", download=False)


def test_fashion_mnist_system_dir_is_searched_last(tmp_path, monkeypatch):
    system = _populate(tmp_path / "usr" / "fashion-mnist", 5)
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (system,)})
    assert candidate_dirs("fashion-mnist")[-1] == system
    assert load_fashion_mnist("test", download=False)[1][0] == 5
    _populate(tmp_path / "xdg" / "microcnn" / "fashion-mnist", 6)
    assert load_fashion_mnist("test", download=False)[1][0] == 6


def test_default_tables_name_the_debian_folder_and_official_mirrors():
    assert DEFAULT_SYSTEM_DIRS["fashion-mnist"] == (DEBIAN_FASHION,)
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in datasets.MIRRORS["fashion-mnist"]
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in datasets.MIRRORS["mnist"]


def test_split_specific_lookup_and_relative_xdg_ignored(tmp_path, monkeypatch):
    only_test = _populate(tmp_path / "xdg" / "microcnn" / "mnist", 1, split="test")
    assert find_dataset_dir("mnist", split="test") == only_test
    assert find_dataset_dir("mnist", split="train") is None
    assert find_dataset_dir("mnist") is None
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.user_cache_dir() == tmp_path / "home" / ".cache" / "microcnn"


def test_unknown_name_or_split_is_an_input_error():
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("cifar10", "test", download=False)
    with pytest.raises(InputError, match="unknown split"):
        load_mnist("validation", download=False)


# ------------------------------------------------------------------------------------------- loading


def test_loader_validates_counts_labels_and_shapes(tmp_path):
    root = tmp_path / "d" / "mnist"
    images, labels = _tiny(5, 3)
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[:4])
    with pytest.raises(FileFormatError) as info:
        load_mnist("test", data_dir=root.parent, download=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert info.value.expected == "5 labels" and info.value.found == "4"

    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(FileFormatError, match="label out of range"):
        load_mnist("test", data_dir=root.parent, download=False)

    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 27), np.uint8))
    with pytest.raises(FileFormatError, match="not an image file"):
        load_mnist("test", data_dir=root.parent, download=False)
    write_idx(root / "t10k-images-idx3-ubyte.gz", images.astype(np.float32))
    with pytest.raises(FileFormatError, match="not an image file"):
        load_mnist("test", data_dir=root.parent, download=False)


def test_loader_returns_fresh_copies_and_cache_follows_file_changes(tmp_path, monkeypatch):
    root = tmp_path / "d" / "mnist"
    images, labels = _tiny(4, 2, seed=1)
    _make_split(root, "test", images, labels, gz=False)
    reads = []
    real_read = datasets._IdxReader.read
    monkeypatch.setattr(datasets._IdxReader, "read", lambda self, items=None: reads.append(self.path)
                        or real_read(self, items))

    first_x, first_y = load_mnist("test", data_dir=root.parent, download=False)
    np.testing.assert_array_equal(first_x, (images / 255.0).astype(np.float32)[:, None])
    first_x[:] = -1.0
    first_y[:] = 9
    second_x, second_y = load_mnist("test", data_dir=root.parent, download=False)
    assert len(reads) == 2  # the second load came from the cache
    assert second_x.flags.writeable and second_x.min() >= 0.0 and second_y.tolist() == [2] * 4

    new_images, new_labels = _tiny(6, 1, seed=2)
    _make_split(root, "test", new_images, new_labels, gz=False)
    stat = (root / "t10k-images-idx3-ubyte").stat()
    os.utime(root / "t10k-images-idx3-ubyte", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third_x, third_y = load_mnist("test", data_dir=root.parent, download=False)
    assert third_x.shape == (6, 1, 28, 28) and third_y.tolist() == [1] * 6


# ------------------------------------------------------------------------------------------ batching


def test_batches_in_order_cover_everything_with_partial_last():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    y = np.arange(10) * 2
    got = list(batches(x, y, batch_size=4))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y)
    assert all(b[1] is None for b in batches(x, batch_size=3))


def test_batches_shuffle_is_a_seeded_permutation():
    x = np.arange(23)
    y = x * 2

    def run(seed):
        return [(bx.copy(), by.copy()) for bx, by in batches(x, y, batch_size=5, shuffle=True, seed=seed)]

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    order = np.concatenate([p[0] for p in a])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    assert order.tolist() != np.concatenate([p[0] for p in c]).tolist()
    assert all(np.array_equal(by, bx * 2) for bx, by in a)
    assert [len(p[0]) for p in a] == [5, 5, 5, 5, 3]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_batches_checks_arguments_at_call_time(bad):
    with pytest.raises(InputError, match="batch_size"):
        batches(np.zeros(4), batch_size=bad)
    with pytest.raises(InputError, match="labels"):
        batches(np.zeros(4), np.zeros(3))


# --------------------------------------------------------------------------------------------- ascii


def _ramp_char(value: float) -> str:
    return ASCII_RAMP[min(int(value * len(ASCII_RAMP)), len(ASCII_RAMP) - 1)]


def test_ascii_digit_maps_each_pixel_through_the_ramp():
    rng = np.random.default_rng(3)
    image = rng.random((28, 28)).astype(np.float32)
    image[0, 0], image[0, 1] = 0.0, 1.0
    text = ascii_digit(image)
    lines = text.split("\n")
    assert len(lines) == 28 and all(len(line) == 28 for line in lines)
    expected = ["".join(_ramp_char(float(v)) for v in row.astype(np.float64)) for row in image]
    assert lines == expected
    assert lines[0][:2] == " @"


def test_ascii_digit_shapes_dtypes_and_downsampling():
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    as_float = pixels / 255.0
    text = ascii_digit(pixels)
    assert text == ascii_digit(as_float) == ascii_digit(pixels[None]) == ascii_digit(pixels[None, None])
    half = ascii_digit(as_float, width=14).split("\n")
    block_means = as_float.reshape(14, 2, 14, 2).mean(axis=(1, 3))
    assert len(half) == 14 and all(len(line) == 14 for line in half)
    for line, row in zip(half, block_means, strict=True):
        for char, mean in zip(line, row, strict=True):
            # A mean lying on a ramp boundary may round either way in a different summation order.
            assert char in {_ramp_char(mean - 1e-9), _ramp_char(mean + 1e-9)}
    split_halves = np.zeros((28, 28))
    split_halves[:, 14:] = 1.0
    assert ascii_digit(split_halves).split("\n") == [" " * 14 + "@" * 14] * 28


@pytest.mark.parametrize(
    "image",
    [np.zeros((2, 28, 28)), np.zeros(28), np.full((28, 28), 1.5), np.full((28, 28), np.nan)]
    + [np.zeros((28, 28), int)],
)
def test_ascii_digit_rejects_bad_images(image):
    with pytest.raises(InputError, match="ascii_digit"):
        ascii_digit(image)
    with pytest.raises(InputError, match="width"):
        ascii_digit(np.zeros((28, 28)), width=0)


def test_class_names():
    assert MNIST_CLASSES == tuple("0123456789")
    assert len(FASHION_MNIST_CLASSES) == 10 == len(set(FASHION_MNIST_CLASSES))
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
