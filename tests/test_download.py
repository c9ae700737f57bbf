"""Downloading for real from a local HTTP server: verification, mirrors, retries, atomicity, offline."""

from __future__ import annotations

import functools
import gzip
import hashlib
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from microcnn import datasets
from microcnn.datasets import FileChecksum, fetch, load_mnist, write_idx
from microcnn.errors import DataNotFoundError, DownloadError

BASES = datasets.SPLIT_FILES["train"] + datasets.SPLIT_FILES["test"]


class _Handler(SimpleHTTPRequestHandler):
    """Static files, plus ``/truncate/<file>``: announces the full length, sends half, hangs up; and
    ``/encoded/<file>``: the good file labelled ``Content-Encoding: gzip``, as S3 serves objects stored
    with that metadata; ``/unannounced/<file>``: the file from ``huge/`` with no Content-Length."""

    def __init__(self, *args, requests, **kwargs):
        self.requests = requests
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/truncate/"):
            body = (Path(self.directory) / "good" / self.path.rsplit("/", 1)[1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        if self.path.startswith("/unannounced/"):
            body = (Path(self.directory) / "huge" / self.path.rsplit("/", 1)[1]).read_bytes()
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            self.wfile.write(body)
            self.close_connection = True
            return
        if self.path.startswith("/encoded/"):
            body = (Path(self.directory) / "good" / self.path.rsplit("/", 1)[1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 in a thread; yields (document root, base URL, request log)."""
    root = tmp_path / "srv"
    root.mkdir()
    requests: list[str] = []
    handler = functools.partial(_Handler, directory=str(root), requests=requests)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def dead_url():
    """A URL on a port nobody listens on: connection refused, like a mirror that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


pytestmark = pytest.mark.usefixtures("isolated_datasets")


@pytest.fixture
def served(server, monkeypatch):
    """A tiny MNIST-shaped dataset in <root>/good/, with its checksums installed in the download table."""
    root, url, requests = server
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    table = {}
    for base, array in arrays.items():
        write_idx(root / "good" / f"{base}.gz", array)
        raw = gzip.decompress((root / "good" / f"{base}.gz").read_bytes())
        table[base] = FileChecksum(hashlib.sha256(raw).hexdigest(), len(raw))
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", table)
    (root / "empty").mkdir()
    return root, url, requests, arrays


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_good_files_then_load(served, tmp_path):
    root, url, requests, arrays = served
    images, labels = load_mnist("train", data_dir=tmp_path / "data", mirrors=[f"{url}/good/"], progress=False)
    expected_images = (arrays["train-images-idx3-ubyte"][:, None] / 255.0).astype(np.float32)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"].astype(np.int64))
    target = tmp_path / "data" / "mnist"
    # Only the requested split was fetched; the bytes on disk are the served bytes; no temporaries.
    assert _leftovers(target) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert sorted(requests) == ["/good/train-images-idx3-ubyte.gz", "/good/train-labels-idx1-ubyte.gz"]
    for name in _leftovers(target):
        assert (target / name).read_bytes() == (root / "good" / name).read_bytes()
    assert fetch("mnist", data_dir=tmp_path / "data", progress=False, mirrors=[f"{url}/good/"]) == target
    assert len(_leftovers(target)) == 4 and len(requests) == 4


def test_recompressed_mirror_is_accepted(served, tmp_path):
    root, url, _, arrays = served
    for base in BASES:
        raw = gzip.decompress((root / "good" / f"{base}.gz").read_bytes())
        (root / "other" / f"{base}.gz").parent.mkdir(exist_ok=True)
        (root / "other" / f"{base}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    assert (root / "other" / f"{BASES[0]}.gz").read_bytes() != (root / "good" / f"{BASES[0]}.gz").read_bytes()
    images, _ = load_mnist("test", data_dir=tmp_path / "d", mirrors=[f"{url}/other/"], progress=False)
    np.testing.assert_array_equal(images[:, 0], arrays["t10k-images-idx3-ubyte"] / np.float32(255))


def test_gzip_labelled_as_content_encoding_is_stored_as_served(served, tmp_path):
    # An HTTP client that honours Content-Encoding (requests, hence pooch) would hand over the
    # decompressed bytes, which are not the .gz file: the download must keep the bytes as sent.
    root, url, _, arrays = served
    images, _ = load_mnist("test", data_dir=tmp_path / "d", mirrors=[f"{url}/encoded/"], progress=False)
    np.testing.assert_array_equal(images[:, 0], arrays["t10k-images-idx3-ubyte"] / np.float32(255))
    for name in (f"{base}.gz" for base in datasets.SPLIT_FILES["test"]):
        assert (tmp_path / "d" / "mnist" / name).read_bytes() == (root / "good" / name).read_bytes()


def test_checksum_mismatch_leaves_no_file(served, tmp_path):
    root, url, _, arrays = served
    corrupted = arrays["t10k-images-idx3-ubyte"].copy()
    corrupted[2, 14, 14] ^= 1
    write_idx(root / "bad" / "t10k-images-idx3-ubyte.gz", corrupted)
    target = tmp_path / "data" / "mnist"
    with pytest.raises(DataNotFoundError) as info:
        load_mnist("test", data_dir=tmp_path / "data", mirrors=[f"{url}/bad/"], progress=False)
    assert "SHA-256 mismatch" in str(info.value)
    assert datasets.CHECKSUMS["mnist"]["t10k-images-idx3-ubyte"].sha256 in str(info.value)
    assert isinstance(info.value.__cause__, DownloadError)
    assert _leftovers(target) == []


def test_oversized_or_non_gzip_payload_is_rejected(served, tmp_path):
    root, url, _, arrays = served
    bigger = np.concatenate([arrays["t10k-images-idx3-ubyte"]] * 2)
    write_idx(root / "big" / "t10k-images-idx3-ubyte.gz", bigger)
    write_idx(root / "raw" / "t10k-images-idx3-ubyte.gz.idx", arrays["t10k-images-idx3-ubyte"])
    (root / "raw" / "t10k-images-idx3-ubyte.gz.idx").rename(root / "raw" / "t10k-images-idx3-ubyte.gz")
    target = tmp_path / "d" / "mnist"
    with pytest.raises(DataNotFoundError) as info:
        load_mnist("test", data_dir=tmp_path / "d", progress=False, mirrors=[f"{url}/big/", f"{url}/raw/"])
    message = str(info.value)
    assert "decompressed size mismatch" in message and "not gzip data" in message
    assert _leftovers(target) == []


@pytest.mark.parametrize("where", ["huge", "unannounced"])
def test_payload_larger_than_any_genuine_file_is_cut_off(served, tmp_path, where):
    root, url, requests, _ = served
    base = "t10k-images-idx3-ubyte"
    limit = 2 * datasets.CHECKSUMS["mnist"][base].nbytes + (1 << 16)
    (root / "huge").mkdir()
    (root / "huge" / f"{base}.gz").write_bytes(b"\x1f\x8b" + bytes(4 * limit))
    with pytest.raises(DataNotFoundError) as info:
        load_mnist("test", data_dir=tmp_path / "d", mirrors=[f"{url}/{where}/"], progress=False)
    said = {"huge": f"server announces {4 * limit + 2} bytes, more than the {limit} expected",
            "unannounced": f"more than the {limit} bytes expected"}[where]
    assert said in str(info.value)
    assert requests == [f"/{where}/{base}.gz"]  # not retried
    assert _leftovers(tmp_path / "d" / "mnist") == []


def test_404_is_not_retried_and_the_next_mirror_is_used(served, tmp_path, dead_url):
    root, url, requests, _ = served
    mirrors = [dead_url, f"{url}/empty/", f"{url}/good/"]
    images, labels = load_mnist("test", data_dir=tmp_path / "d", mirrors=mirrors, progress=False)
    assert images.shape == (5, 1, 28, 28) and labels.shape == (5,)
    for base in datasets.SPLIT_FILES["test"]:
        assert requests.count(f"/empty/{base}.gz") == 1
        assert requests.count(f"/good/{base}.gz") == 1


def test_all_mirrors_missing_reports_each_failure(served, tmp_path):
    _, url, requests, _ = served
    with pytest.raises(DownloadError) as info:
        fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[f"{url}/empty/"])
    assert "HTTP 404" in str(info.value) and f"{url}/empty/train-images-idx3-ubyte.gz" in str(info.value)
    assert requests == ["/empty/train-images-idx3-ubyte.gz"]
    assert _leftovers(tmp_path / "d" / "mnist") == []


def test_interrupted_transfer_is_retried_once_and_leaves_nothing(served, tmp_path):
    _, url, requests, _ = served
    with pytest.raises(DownloadError, match="connection closed after") as info:
        fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[f"{url}/truncate/"], timeout=5)
    assert str(info.value).count("connection closed after") == 2
    assert requests == ["/truncate/train-images-idx3-ubyte.gz"] * 2
    assert _leftovers(tmp_path / "d" / "mnist") == []


def test_keyboard_interrupt_during_download_leaves_nothing(served, tmp_path, monkeypatch):
    _, url, _, _ = served

    def interrupted(out, expected):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "_verify_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[f"{url}/good/"])
    assert _leftovers(tmp_path / "d" / "mnist") == []


def test_offline_error_says_where_it_looked_and_what_to_do(tmp_path, dead_url, monkeypatch):
    monkeypatch.setenv("MICROCNN_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        load_mnist("test", mirrors=[dead_url], progress=False, timeout=5)
    message = str(info.value)
    looked = [tmp_path / "env" / "mnist", tmp_path / "cwd" / "data" / "mnist", tmp_path / "xdg" / "microcnn"]
    assert all(str(directory) in message for directory in looked)
    assert "MICROCNN_DATA" in message and "data_dir" in message
    assert f"{dead_url}t10k-images-idx3-ubyte.gz" in message and "Connection refused" in message
    assert _leftovers(tmp_path / "env" / "mnist") == []


def test_fetch_finds_existing_files_without_network(served, tmp_path, dead_url):
    fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[f"{served[1]}/good/"])
    served[2].clear()
    found = fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[dead_url])
    assert found == tmp_path / "d" / "mnist"
    assert served[2] == []


def test_concurrent_fetches_of_the_same_files_do_not_corrupt(served, tmp_path):
    root, url, _, _ = served
    results, errors = [], []

    def worker():
        try:
            results.append(fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[f"{url}/good/"]))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "d" / "mnist"
    assert errors == [] and results == [target] * 4
    assert _leftovers(target) == sorted(f"{b}.gz" for b in BASES)
    for base in BASES:
        assert (target / f"{base}.gz").read_bytes() == (root / "good" / f"{base}.gz").read_bytes()


def test_unknown_checksum_refuses_to_download(served, tmp_path, monkeypatch):
    _, url, requests, _ = served
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", {})
    with pytest.raises(DownloadError, match="no checksum known"):
        fetch("mnist", data_dir=tmp_path / "d", progress=False, mirrors=[f"{url}/good/"])
    assert requests == []


def test_progress_bar_runs(served, tmp_path, capsys):
    _, url, _, _ = served
    fetch("mnist", data_dir=tmp_path / "d", progress=True, mirrors=[f"{url}/good/"])
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err
