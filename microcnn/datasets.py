"""Datasets: IDX files, locating / downloading / verifying MNIST and Fashion-MNIST, batching, ASCII preview.

IDX format (big-endian): magic ``00 00 <dtype code> <ndim>``, then ``ndim`` unsigned 32-bit dimensions,
then the data in C order. Codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64. Files may be gzip-compressed; the reader recognises gzip by its magic bytes, not by the name.

Where data is looked for (first hit wins), for dataset ``name`` ("mnist" or "fashion-mnist"):
``data_dir`` argument, ``$MICROCNN_DATA``, ``./data``, the user cache (``$XDG_CACHE_HOME/microcnn`` or
``~/.cache/microcnn``) and, for Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist``
(``apt-get install dataset-fashion-mnist``). In each root the files live in ``root/<name>/``, or in
``root`` itself when its folder is named ``<name>``. Missing files are downloaded into the first of
``data_dir``, ``$MICROCNN_DATA``, the user cache, and verified by the SHA-256 of their decompressed
bytes (so recompressed mirrors are accepted). Files already on disk are not checksummed: the project's
shared training file is a 10,000-image prefix of the official one and must load as it is.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .errors import DataNotFoundError, DownloadError, FileFormatError, InputError
from .fileutil import StrPath, atomic_open, regular_file_size

__all__ = [
    "ASCII_RAMP",
    "CHECKSUMS",
    "DATASETS",
    "DEFAULT_MAX_IDX_BYTES",
    "DEFAULT_TIMEOUT",
    "FASHION_MNIST_CLASSES",
    "MAX_DATASET_BYTES",
    "MAX_IDX_NDIM",
    "MIRRORS",
    "MNIST_CLASSES",
    "SPLIT_FILES",
    "SYSTEM_DIRS",
    "FileChecksum",
    "ascii_digit",
    "batches",
    "candidate_dirs",
    "clear_cache",
    "download_dir",
    "fetch",
    "find_dataset_dir",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "user_cache_dir",
    "write_idx",
]

# ----------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[np.dtype, int] = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
# The format allows 255 dimensions; anything past a handful is a corrupt header, not a tensor.
MAX_IDX_NDIM = 16
# Refuse headers declaring more than this before reading a byte (MNIST train images are 47 MB).
DEFAULT_MAX_IDX_BYTES = 1 << 31
_CHUNK = 1 << 20


def _read_upto(stream: gzip.GzipFile | io.BufferedReader, n: int) -> bytearray:
    """Read at most ``n`` bytes. Memory grows only with bytes that really arrive, never with ``n``."""
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


# Deflate expands at most 1032:1 (258-byte matches coded in 2 bits): a gzip stream cannot hold more.
_MAX_GZIP_RATIO = 1032


class _IdxReader:
    """An open IDX file (raw or gzip) whose header has been read and checked, and no data yet: its
    ``dtype`` and ``shape`` let a caller compare files with each other and with a request before
    ``read(items)`` decompresses only the first ``items`` entries along axis 0."""

    def __init__(self, path: StrPath, max_bytes: int = DEFAULT_MAX_IDX_BYTES,
                 limit_name: str = "read_idx max_bytes"):
        self.path = path = Path(path)
        file_size = regular_file_size(path, "IDX file")
        self._raw = open(path, "rb")  # noqa: SIM115 -- closed by close() / __exit__
        try:
            self.compressed = self._raw.read(2) == _GZIP_MAGIC
            self._raw.seek(0)
            self._stream: gzip.GzipFile | io.BufferedReader = (
                gzip.GzipFile(fileobj=self._raw, mode="rb") if self.compressed else self._raw)
            with self._gzip_errors():
                self._read_header(file_size, max_bytes, limit_name)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _IdxReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._raw.close()

    @contextlib.contextmanager
    def _gzip_errors(self) -> Iterator[None]:
        try:
            yield
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise FileFormatError(self.path, "corrupt or truncated gzip data", "a complete gzip stream",
                                  f"{type(err).__name__}: {err}") from err

    def _read_header(self, file_size: int, max_bytes: int, limit_name: str) -> None:
        path, stream = self.path, self._stream
        magic = _read_upto(stream, 4)
        if len(magic) < 4:
            raise FileFormatError(path, "too short for an IDX magic number", "4 bytes", f"{len(magic)} bytes")
        if magic[0] or magic[1]:
            raise FileFormatError(path, "not an IDX file: the magic number must start with two zero bytes",
                                  "0x0000", f"0x{magic[:2].hex()}")
        code, ndim = magic[2], magic[3]
        if code not in _IDX_DTYPES:
            raise FileFormatError(path, "unknown IDX data type code", "one of 0x08 0x09 0x0B 0x0C 0x0D 0x0E",
                                  f"0x{code:02X}")
        if not 1 <= ndim <= MAX_IDX_NDIM:
            raise FileFormatError(path, "IDX number of dimensions out of range", f"1..{MAX_IDX_NDIM}", ndim)
        header_len = 4 + 4 * ndim
        dim_bytes = _read_upto(stream, 4 * ndim)
        if len(dim_bytes) < 4 * ndim:
            raise FileFormatError(path, f"IDX header truncated ({ndim} dimensions declared)",
                                  f"{header_len} header bytes", f"{4 + len(dim_bytes)} bytes")
        self.shape = shape = struct.unpack(f">{ndim}I", dim_bytes)
        self.dtype = dtype = _IDX_DTYPES[code]
        self.nbytes = nbytes = math.prod(shape) * dtype.itemsize
        # Zero-length axes make nbytes 0 while the other axes can still overflow NumPy's index type.
        span = math.prod(max(d, 1) for d in shape) * dtype.itemsize
        if span > max_bytes:
            raise FileFormatError(path, f"IDX header declares shape {shape} of {dtype.name}, larger than "
                                  "the allowed maximum", f"at most {max_bytes} bytes ({limit_name})",
                                  f"{span} bytes")
        # Compare with what the file can hold before reading anything: its size (raw), or the most a
        # gzip stream of that size can expand to.
        available = file_size - header_len if not self.compressed else _MAX_GZIP_RATIO * file_size
        if available < nbytes:
            why = f"; a {file_size}-byte gzip file expands to at most {_MAX_GZIP_RATIO} times that"
            raise FileFormatError(path, f"data shorter than the IDX header declares (shape {shape}, "
                                  f"{dtype.name}){why if self.compressed else ''}", f"{nbytes} data bytes",
                                  f"{'at most ' * self.compressed}{available} bytes")
        if not self.compressed and available > nbytes:
            raise FileFormatError(path, f"trailing bytes after the data the IDX header declares (shape "
                                  f"{shape})", f"{nbytes} data bytes", f"{available} bytes")

    def read(self, items: int | None = None) -> np.ndarray:
        """The first ``items`` entries along axis 0 (all by default) as a writable native-endian array.
        Reading everything also checks that nothing follows the data (and, for gzip, the CRC); a
        partial read decompresses nothing past the entries it returns."""
        shape = self.shape if items is None else (min(items, self.shape[0]), *self.shape[1:])
        nbytes = math.prod(shape) * self.dtype.itemsize
        with self._gzip_errors():
            data = _read_upto(self._stream, nbytes)
            if len(data) < nbytes:
                raise FileFormatError(self.path, f"data shorter than the IDX header declares (shape "
                                      f"{self.shape}, {self.dtype.name})", f"{self.nbytes} data bytes",
                                      f"{len(data)} bytes")
            if shape == self.shape:  # for gzip this read reaches the end of the stream: the CRC check
                extra = self._stream.read(_CHUNK)
                if extra:
                    raise FileFormatError(self.path, f"trailing bytes after the data the IDX header declares "
                                          f"(shape {self.shape})", f"{nbytes} data bytes",
                                          f"at least {nbytes + len(extra)} bytes")
        array = np.frombuffer(data, dtype=self.dtype).reshape(shape)
        return array.astype(self.dtype.newbyteorder("="), copy=False)


def read_idx(path: StrPath, *, max_bytes: int = DEFAULT_MAX_IDX_BYTES,
             items: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip, told apart by its first bytes) into a writable, native-endian,
    C-contiguous array whose shape and dtype come from the header.

    Declared sizes are checked against the bytes that can exist (the file size for raw files, 1032
    times it for gzip, deflate's limit) before memory for them is used, and bytes are kept only as
    they really decompress.

    Args:
        path: the file.
        max_bytes: headers declaring more data than this are refused before anything is read.
        items: read only the first ``items`` entries along axis 0 (at most); None reads them all.

    Raises:
        FileFormatError: malformed, truncated or oversized file, naming the file, the expectation and
            the finding.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
        >>> write_idx(path, np.array([7, 2, 1], np.uint8))
        >>> read_idx(path)
        array([7, 2, 1], dtype=uint8)
        >>> read_idx(path, items=2)
        array([7, 2], dtype=uint8)
    """
    if items is not None:
        _check_items(items)
    with _IdxReader(path, max_bytes) as reader:
        return reader.read(items)


def _check_items(items: object) -> None:
    if isinstance(items, bool) or not isinstance(items, int | np.integer) or items < 1:
        raise InputError(f"samples: expected a positive integer (or None for all), found {items!r}")


def write_idx(path: StrPath, array: ArrayLike) -> None:
    """Write ``array`` as an IDX file, atomically (``fileutil.atomic_open``); gzip-compressed when the
    name ends in ``.gz``, with no time stamp, so the same array always gives the same bytes.

    Args:
        path: the file to write (replaced if it exists).
        array: uint8, int8, int16, int32, float32 or float64 (any byte order), 1 to ``MAX_IDX_NDIM``
            dimensions, each below 2**32.

    Raises:
        InputError: for another dtype or shape.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "x-idx2-float"
        >>> write_idx(path, np.eye(2, dtype=np.float32))
        >>> path.read_bytes()[:4].hex(), path.stat().st_size  # magic: float32 (0x0D), 2 dimensions
        ('00000d02', 28)
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder in "<>" else array.dtype
    code = _IDX_CODES.get(native)
    if code is None:
        raise InputError(
            f"write_idx({path}): dtype {array.dtype} has no IDX code; expected one of "
            "uint8, int8, int16, int32, float32, float64"
        )
    if not 1 <= array.ndim <= MAX_IDX_NDIM:
        raise InputError(f"write_idx({path}): expected 1..{MAX_IDX_NDIM} dimensions, found {array.ndim}")
    if any(d >= 1 << 32 for d in array.shape):
        raise InputError(f"write_idx({path}): IDX dimensions must be below 2**32, found shape {array.shape}")
    header = bytes((0, 0, code, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).reshape(-1).view(np.uint8)
    with atomic_open(path, "wb") as f:
        if str(path).endswith(".gz"):
            # mtime=0 and no embedded name: the same array always gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=6, mtime=0) as gz:
                gz.write(header)
                gz.write(body.data)  # the array's buffer (a memoryview), not a copy
        else:
            f.write(header)
            f.write(body)


# ------------------------------------------------------------------------------------ dataset tables

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CLASSES = {"mnist": MNIST_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES}
DATASETS = tuple(CLASSES)

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_SIZE = (28, 28)


class FileChecksum(NamedTuple):
    """SHA-256 and length of a file's DECOMPRESSED bytes (mirrors may recompress the .gz)."""

    sha256: str
    nbytes: int


# MNIST: t10k values equal the project's shared copies (official byte for byte); train values are
# the official 60,000-item files as pinned by several independent public projects. Fashion-MNIST:
# computed from Debian's dataset-fashion-mnist files (headers 60000 / 10000), matching independent
# public pins. Tests override these tables to serve generated files.
CHECKSUMS: dict[str, dict[str, FileChecksum]] = {
    "mnist": {
        "train-images-idx3-ubyte": FileChecksum(
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016
        ),
        "train-labels-idx1-ubyte": FileChecksum(
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008
        ),
        "t10k-images-idx3-ubyte": FileChecksum(
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016
        ),
        "t10k-labels-idx1-ubyte": FileChecksum(
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": FileChecksum(
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016
        ),
        "train-labels-idx1-ubyte": FileChecksum(
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008
        ),
        "t10k-images-idx3-ubyte": FileChecksum(
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016
        ),
        "t10k-labels-idx1-ubyte": FileChecksum(
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008
        ),
    },
}

# Base URLs; a file is fetched from ``<mirror>/<file name>.gz``. Tried in order.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# System-wide read-only copies, searched last.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "mnist": (),
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

DEFAULT_TIMEOUT = 20.0
_ENV_VAR = "MICROCNN_DATA"


def _check_name(name: str) -> None:
    if name not in CLASSES:
        raise InputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _check_split(split: str) -> None:
    if split not in SPLIT_FILES:
        raise InputError(f"unknown split {split!r}; expected 'train' or 'test'")


# ------------------------------------------------------------------------------------------ locating


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/microcnn`` (when set to an absolute path), else ``~/.cache/microcnn``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "microcnn"


def _roots(name: str, data_dir: StrPath | None) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get(_ENV_VAR):
        roots.append(Path(os.environ[_ENV_VAR]).expanduser())
    roots.append(Path.cwd() / "data")
    roots.append(user_cache_dir())
    roots.extend(SYSTEM_DIRS.get(name, ()))
    return roots


def _dataset_dir_in(root: Path, name: str) -> Path:
    return root if root.name == name else root / name


def candidate_dirs(name: str, data_dir: StrPath | None = None) -> list[Path]:
    """Folders searched for dataset ``name``, in order of precedence."""
    _check_name(name)
    dirs: list[Path] = []
    for root in _roots(name, data_dir):
        directory = _dataset_dir_in(root, name)
        if directory not in dirs:
            dirs.append(directory)
    return dirs


def _locate_file(directory: Path, base: str) -> Path | None:
    """The raw file if present (faster to read), else the gzip one."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _split_bases(split: str | None) -> tuple[str, ...]:
    if split is None:
        return SPLIT_FILES["train"] + SPLIT_FILES["test"]
    _check_split(split)
    return SPLIT_FILES[split]


def find_dataset_dir(name: str, data_dir: StrPath | None = None, split: str | None = None) -> Path | None:
    """First candidate folder holding the image and label files of ``split`` (both splits if None)."""
    bases = _split_bases(split)
    for directory in candidate_dirs(name, data_dir):
        if all(_locate_file(directory, base) is not None for base in bases):
            return directory
    return None


def download_dir(name: str, data_dir: StrPath | None = None) -> Path:
    """Where missing files are downloaded: ``data_dir``, else ``$MICROCNN_DATA``, else the user cache."""
    _check_name(name)
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    elif os.environ.get(_ENV_VAR):
        root = Path(os.environ[_ENV_VAR]).expanduser()
    else:
        root = user_cache_dir()
    return _dataset_dir_in(root, name)


def _where_to_put(name: str, data_dir: StrPath | None) -> str:
    return (
        f"Put the files (gzip or raw) in {download_dir(name, data_dir)}, or set {_ENV_VAR} to a folder "
        f"holding a '{name}' subfolder (or to the '{name}' folder itself), or pass data_dir=..."
    )


def _not_found_message(name: str, split: str | None, data_dir: StrPath | None,
                       download_failure: Exception | None) -> str:
    bases = _split_bases(split)
    what = f"{name} {split} split" if split else f"{name} dataset"
    lines = [f"{what} not found: looked for {' and '.join(b + '[.gz]' for b in bases)} in"]
    lines += [f"  {d}" for d in candidate_dirs(name, data_dir)]
    lines.append(_where_to_put(name, data_dir))
    if download_failure is None:
        lines.append("download=False, so nothing was downloaded.")
    else:
        lines.append(f"Downloading failed: {download_failure}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- download

# urllib rather than pooch: checksums of decompressed bytes, a size cap, .gz bytes kept as served even
# when labelled Content-Encoding: gzip, and no new dependencies (docs/dependencies.md).


class _FetchFailure(Exception):
    """One attempt at one URL failed; ``retry`` says whether the same URL is worth a second try."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.retry = retry


@contextlib.contextmanager
def _network_errors() -> Iterator[None]:
    # Only network calls run inside this; disk errors must propagate, not count as a bad mirror.
    try:
        yield
    except urllib.error.HTTPError as err:
        err.close()
        raise _FetchFailure(f"HTTP {err.code} {err.reason}", retry=err.code >= 500) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise _FetchFailure(f"{type(err).__name__}: {reason}", retry=True) from err


def _stream_download(url: str, out: IO[bytes], limit: int, label: str, progress: bool,
                     timeout: float) -> None:
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "microcnn-datasets (python urllib)"})
    with _network_errors():
        response = urllib.request.urlopen(request, timeout=timeout)
    try:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > limit:
            raise _FetchFailure(
                f"server announces {total} bytes, more than the {limit} expected", retry=False
            )
        received = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False
        ) as bar:
            while True:
                with _network_errors():
                    chunk = response.read(_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    raise _FetchFailure(f"more than the {limit} bytes expected", retry=False)
                out.write(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            # http.client reports a connection closed early as a normal end of data.
            raise _FetchFailure(f"connection closed after {received} of {total} bytes", retry=True)
    finally:
        response.close()


def _verify_download(out: IO[bytes], expected: FileChecksum) -> None:
    """Check the SHA-256 and length of the decompressed content of the downloaded gzip ``out``."""
    out.flush()
    out.seek(0)
    if out.read(2) != _GZIP_MAGIC:
        raise _FetchFailure("response is not gzip data", retry=False)
    out.seek(0)
    digest = hashlib.sha256()
    size = 0
    try:
        with gzip.GzipFile(fileobj=out, mode="rb") as stream:
            # Decompressing one byte past the expected length is enough to detect an oversized payload.
            while size <= expected.nbytes:
                chunk = stream.read(min(_CHUNK, expected.nbytes + 1 - size))
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise _FetchFailure(f"corrupt gzip data ({type(err).__name__}: {err})", retry=True) from err
    if size != expected.nbytes:
        found = f"{size}" if size <= expected.nbytes else f"more than {expected.nbytes}"
        raise _FetchFailure(
            f"decompressed size mismatch (expected {expected.nbytes} bytes, found {found})", retry=False
        )
    found_sha = digest.hexdigest()
    if found_sha != expected.sha256:
        raise _FetchFailure(
            f"SHA-256 mismatch of decompressed bytes (expected {expected.sha256}, found {found_sha})",
            retry=False,
        )


def _download_file(
    name: str, base: str, target: Path, mirrors: Sequence[str], progress: bool, timeout: float
) -> Path:
    """Fetch ``<base>.gz`` into ``target`` from the first mirror that delivers verified bytes.

    The bytes go to a temporary sibling and are renamed into place only after verification, so a
    mismatch or an interruption leaves nothing at the final path, and concurrent fetches of the same
    file each rename a complete, verified copy.
    """
    expected = CHECKSUMS.get(name, {}).get(base)
    if expected is None:
        raise DownloadError(f"no checksum known for {name}/{base}; refusing to download unverified data")
    final = target / f"{base}.gz"
    limit = 2 * expected.nbytes + (1 << 16)  # gzip never needs more than this for these payloads
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{base}.gz"
        for _attempt in range(2):
            try:
                with atomic_open(final, "w+b") as out:
                    _stream_download(url, out, limit, f"{base}.gz", progress, timeout)
                    _verify_download(out, expected)
                return final
            except _FetchFailure as failure:
                failures.append(f"{url}: {failure}")
                if not failure.retry:
                    break
    tried = "\n  ".join(failures) if failures else "(no mirrors given)"
    raise DownloadError(f"could not download {name}/{base}.gz to {target}:\n  {tried}")


def _fetch_files(
    name: str, bases: Sequence[str], data_dir: StrPath | None, progress: bool, mirrors: Sequence[str] | None,
    timeout: float,
) -> Path:
    target = download_dir(name, data_dir)
    mirrors = MIRRORS.get(name, ()) if mirrors is None else tuple(mirrors)
    for base in bases:
        if _locate_file(target, base) is None:
            target.mkdir(parents=True, exist_ok=True)
            _download_file(name, base, target, mirrors, progress, timeout)
    return target


def fetch(
    name: str = "mnist",
    data_dir: StrPath | None = None,
    progress: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Return a folder holding all four files of dataset ``name``, downloading the missing ones.

    If some candidate folder (see ``candidate_dirs``) already holds them all, it is returned unchanged.
    Otherwise the missing files are downloaded into ``download_dir(name, data_dir)`` from ``mirrors``
    (default ``MIRRORS[name]``), each mirror tried twice, and verified against ``CHECKSUMS[name]``.
    Raises ``DownloadError`` (listing every URL tried and why it failed) when a file cannot be fetched.
    """
    _check_name(name)
    found = find_dataset_dir(name, data_dir)
    if found is not None:
        return found
    try:
        return _fetch_files(name, _split_bases(None), data_dir, progress, mirrors, timeout)
    except DownloadError as err:
        raise DownloadError(f"{err}\n{_where_to_put(name, data_dir)}") from err


# ------------------------------------------------------------------------------------------- loading

# Decoded uint8 images and int64 labels, keyed by both files' resolved path, mtime and size.
_CACHE: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
_CACHE_MAX = 6


def clear_cache() -> None:
    """Forget the decoded arrays kept by ``load_dataset``."""
    _CACHE.clear()


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# What the loaders accept per file, declared size (the limit named in the error): MNIST-like training
# images are 47 MB, so this leaves room for 5x larger sets while a forged header cannot make the
# loaders decompress gigabytes (or convert them to 4 times as many bytes of float32).
MAX_DATASET_BYTES = 1 << 28


def _decode_pair(images_path: Path, labels_path: Path, n_classes: int, samples: int | None,
                 max_bytes: int = MAX_DATASET_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Both headers are checked against each other and the request before either file's data is
    read; then only the first ``samples`` images and labels are decompressed."""
    limit = (max_bytes, "microcnn.datasets.MAX_DATASET_BYTES")
    with _IdxReader(images_path, *limit) as images_file, _IdxReader(labels_path, *limit) as labels_file:
        shape = images_file.shape
        if images_file.dtype != np.uint8 or len(shape) != 3 or shape[1:] != _IMAGE_SIZE:
            raise FileFormatError(
                images_path,
                "not an image file",
                f"uint8 images of shape (N, {_IMAGE_SIZE[0]}, {_IMAGE_SIZE[1]})",
                f"{images_file.dtype} array of shape {images_file.shape}",
            )
        if labels_file.dtype != np.uint8 or len(labels_file.shape) != 1:
            raise FileFormatError(
                labels_path,
                "not a label file",
                "uint8 labels of shape (N,)",
                f"{labels_file.dtype} array of shape {labels_file.shape}",
            )
        count = images_file.shape[0]
        if labels_file.shape[0] != count:
            raise FileFormatError(
                labels_path,
                f"label count does not match the image count of {images_path}",
                f"{count} labels",
                f"{labels_file.shape[0]}",
            )
        if count == 0:
            raise FileFormatError(images_path, "the IDX header declares 0 images (an empty dataset file)",
                                  "at least 1 image", "shape (0, 28, 28)")
        images = images_file.read(samples)
        labels = labels_file.read(samples)
    if int(labels.max()) >= n_classes:
        raise FileFormatError(labels_path, "label out of range", f"0..{n_classes - 1}", int(labels.max()))
    images = images.reshape(len(images), 1, *_IMAGE_SIZE)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: StrPath | None = None,
    download: bool = True,
    *,
    samples: int | None = None,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` of dataset ``name`` ("mnist" or "fashion-mnist") as (images, labels).

    Searches ``candidate_dirs(name, data_dir)``; when nothing is found and ``download`` is true the
    files are fetched and verified (see ``fetch``). Both files' headers are checked against each other
    first, and files declaring more than ``MAX_DATASET_BYTES`` are refused before any data is read.
    Every call returns NEW writable arrays owned by the caller; only the decoded uint8 bytes are cached
    in-process (keyed by path, mtime, size and ``samples``), so repeated loads skip the decompression.

    Args:
        name: "mnist" or "fashion-mnist".
        split: "test" or "train".
        data_dir: a folder searched first (and where missing files are downloaded).
        download: fetch missing files (False: raise instead).
        samples: only the first ``samples`` images and labels (all of them when the files hold fewer);
            the files are read and decompressed no further.
        progress: a tqdm bar while downloading.
        mirrors, timeout: where and how long to try downloading (default ``MIRRORS[name]``).

    Returns:
        images float32 (N, 1, 28, 28) in [0, 1] (``uint8 / 255``) and labels int64 (N,).

    Raises:
        DataNotFoundError: listing where it looked and where to put the files.
        FileFormatError: a malformed file, or images and labels that do not match.
    """
    _check_name(name)
    _check_split(split)
    if samples is not None:
        _check_items(samples)
        samples = int(samples)
    directory = find_dataset_dir(name, data_dir, split)
    if directory is None:
        if not download:
            raise DataNotFoundError(_not_found_message(name, split, data_dir, None))
        try:
            directory = _fetch_files(name, SPLIT_FILES[split], data_dir, progress, mirrors, timeout)
        except DownloadError as err:
            raise DataNotFoundError(_not_found_message(name, split, data_dir, err)) from err
    images_path, labels_path = (_locate_file(directory, base) for base in SPLIT_FILES[split])
    if images_path is None or labels_path is None:  # removed since it was found
        raise DataNotFoundError(_not_found_message(name, split, data_dir, None))
    files = (_file_key(images_path), _file_key(labels_path))
    whole = _CACHE.get((files, None))
    if whole is not None:  # a full read serves every request
        images_u8, labels = (a[:samples] for a in whole)
    else:
        key = (files, samples)
        if key not in _CACHE:
            while len(_CACHE) >= _CACHE_MAX:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = _decode_pair(images_path, labels_path, len(CLASSES[name]), samples)
        images_u8, labels = _CACHE[key]
    images = images_u8.astype(np.float32)
    images /= np.float32(255)
    return images, labels.copy()


def load_mnist(
    split: str = "test",
    data_dir: StrPath | None = None,
    download: bool = True,
    *,
    samples: int | None = None,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ("test" or "train") as (images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)).

    Args: as ``load_dataset`` (search order, download, caching, ``samples``).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())  # a data folder holding the test split's two files
        >>> pixels = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
        >>> write_idx(folder / "mnist" / "t10k-images-idx3-ubyte.gz", pixels)
        >>> write_idx(folder / "mnist" / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
        >>> images, labels = load_mnist("test", data_dir=folder, download=False)
        >>> images.shape, images.dtype, labels
        ((5, 1, 28, 28), dtype('float32'), array([0, 1, 2, 3, 4]))
        >>> bool(images.max() <= 1.0), bool((images[0, 0] * 255 == pixels[0]).all())
        (True, True)
    """
    return load_dataset(
        "mnist", split, data_dir, download, samples=samples, progress=progress, mirrors=mirrors,
        timeout=timeout,
    )


def load_fashion_mnist(
    split: str = "test",
    data_dir: StrPath | None = None,
    download: bool = True,
    *,
    samples: int | None = None,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as (images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)); the
    class names are ``FASHION_MNIST_CLASSES``. Also found in Debian's ``/usr/share/datasets/fashion-mnist``
    (``apt-get install dataset-fashion-mnist``).

    Args: as ``load_dataset``.

    Example::

        >>> FASHION_MNIST_CLASSES[:3]
        ('T-shirt/top', 'Trouser', 'Pullover')
        >>> load_fashion_mnist("valid")
        Traceback (most recent call last):
        ...
        microcnn.errors.InputError: unknown split 'valid'; expected 'train' or 'test'
    """
    return load_dataset(
        "fashion-mnist", split, data_dir, download, samples=samples, progress=progress, mirrors=mirrors,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------------ batching


def batches(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(x, y)`` batches along axis 0, the last one partial; ``y`` is None without labels.

    Without ``shuffle`` the batches are views in order (``seed`` is unused). With ``shuffle`` one
    permutation from ``numpy.random.default_rng(seed)`` orders the whole pass: the same seed gives the
    same batches. Arguments are checked at the call, not at the first ``next``.

    Example::

        >>> [y.tolist() for _, y in batches(np.zeros((5, 1)), np.arange(5), batch_size=2)]
        [[0, 1], [2, 3], [4]]
    """
    images = np.asarray(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, found {batch_size!r}")
    if images.ndim < 1:
        raise InputError(f"images must have a leading sample axis, found shape {images.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim < 1 or len(labels) != len(images):
            raise InputError(
                f"labels must match images along axis 0: {len(images)} images, labels of shape {labels.shape}"
            )
    order = np.random.default_rng(seed).permutation(len(images)) if shuffle else None
    return _iterate_batches(images, labels, int(batch_size), order)


def _iterate_batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int,
                     order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    for start in range(0, len(images), batch_size):
        index = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        yield images[index], (None if labels is None else labels[index])


# ---------------------------------------------------------------------------------------------- ascii

ASCII_RAMP = " .:-=+*#%@"


def box_weights(n_out: int, n_in: int) -> np.ndarray:
    """Row-stochastic (n_out, n_in) matrix averaging the input cells each output cell covers."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    cells = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], cells[None, :] + 1) - np.maximum(edges[:-1, None], cells[None, :])
    overlap = np.clip(overlap, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def ascii_digit(image: ArrayLike, width: int = 28) -> str:
    """Render a grey image as text, one ``ASCII_RAMP`` character per cell (dark ' ' to bright '@').

    ``image``: float in [0, 1] or uint8, shape (H, W) optionally with leading axes of length 1, e.g.
    (28, 28), (1, 28, 28) or (1, 1, 28, 28). ``width`` columns; rows keep the aspect ratio (one
    character per pixel at the native width), cells are box-averaged. Lines are joined by newlines.

    Example::

        >>> print(ascii_digit(np.array([[0, 255], [128, 0]], np.uint8), width=2))
         @
        +
    """
    image = np.asarray(image)
    if image.ndim < 2 or any(d != 1 for d in image.shape[:-2]):
        raise InputError(
            f"ascii_digit: expected shape (H, W) with optional leading 1-axes, found {image.shape}"
        )
    if isinstance(width, bool) or not isinstance(width, int | np.integer) or width < 1:
        raise InputError(f"ascii_digit: width must be a positive integer, found {width!r}")
    pixels = image.reshape(image.shape[-2:])
    if pixels.dtype == np.uint8:
        values = pixels.astype(np.float64) / 255.0
    elif np.issubdtype(pixels.dtype, np.floating):
        values = pixels.astype(np.float64)
        if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
            raise InputError(
                f"ascii_digit: float pixels must lie in [0, 1], found range [{values.min()}, {values.max()}]"
            )
    else:
        raise InputError(f"ascii_digit: expected uint8 or float pixels, found {pixels.dtype}")
    rows_in, cols_in = values.shape
    if rows_in == 0 or cols_in == 0:
        raise InputError(f"ascii_digit: empty image of shape {values.shape}")
    rows_out = max(1, round(rows_in * width / cols_in))
    cells = box_weights(rows_out, rows_in) @ values @ box_weights(width, cols_in).T
    levels = np.minimum((cells * len(ASCII_RAMP)).astype(np.int64), len(ASCII_RAMP) - 1)
    return "\n".join("".join(ASCII_RAMP[v] for v in row) for row in levels)
