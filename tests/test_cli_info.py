"""``microcnn info --model`` (the layer table) and ``--dataset PATH.npz`` on the command line: figures
recomputed from the library, .npz files validated with errors naming the file."""

import json

import numpy as np
import pytest

import microcnn
from microcnn import cli
from microcnn.datasets import load_mnist
from microcnn.errors import FileFormatError
from microcnn.resolve import load_npz
from tests.test_graph import block


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_model_prints_the_layer_table(capsys):
    code, out, _ = run(capsys, "info", "--model", "lenet")
    assert code == 0
    assert "lenet: Sequential, input 1x28x28, 246824 bytes" in out
    assert "total: 61,706 parameters, 416,520 MACs per image" in out
    row = next(ln.split() for ln in out.splitlines() if ln.split()[:1] == ["conv2"])
    assert row == ["conv2", "Conv2d", "pool1", "(16,", "10,", "10)", "2416", "240000"]


def test_info_model_json_matches_the_library(capsys, tmp_path):
    g = block()
    path = tmp_path / "block.safetensors"
    g.save(path)
    code, out, _ = run(capsys, "info", "--model", str(path), "--json")
    assert code == 0
    report = json.loads(out)
    table = g.layer_table()
    assert report["input_shape"] == [3, 8, 8] and report["bytes"] == g.nbytes
    assert [r["Layer"] for r in report["layers"]] == list(table["Layer"])
    assert [r["MACs"] for r in report["layers"]] == list(table["MACs"])
    assert report["layers"][3] == {"Layer": "add", "Type": "Add", "Inputs": "conv2, conv1",
                                   "Output Shape": [4, 8, 8], "Parameters": 0, "MACs": 0}
    # conv1 3->4 3x3 on 8x8, conv2 4->4, branch 4->2 1x1, fc 96->5
    assert report["macs"] == 4 * 64 * 27 + 4 * 64 * 36 + 2 * 64 * 4 + 96 * 5


def test_info_without_model_is_unchanged(capsys):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0 and "numba" in json.loads(out)


@pytest.fixture(scope="module")
def mnist_npz(tmp_path_factory):
    images, labels = load_mnist("test")
    path = tmp_path_factory.mktemp("npz") / "mnist200.npz"
    np.savez(path, images=np.rint(images[:200] * 255).astype(np.uint8), labels=labels[:200])
    return path, images[:200], labels[:200]


def test_eval_on_an_npz_dataset_equals_the_library(capsys, mnist_npz):
    path, images, labels = mnist_npz
    code, out, _ = run(capsys, "eval", "--dataset", str(path), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["samples"] == 200
    assert result["accuracy"] == microcnn.lenet(weights="bundled").accuracy(images, labels)


def test_float32_npz_any_shape_and_the_model_check(capsys, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "rgb.npz"
    x = rng.random((6, 3, 8, 8), dtype=np.float32)
    np.savez(path, images=x, labels=np.arange(6) % 5)
    images, labels = load_npz(path)
    assert images.dtype == np.float32 and np.array_equal(images, x) and labels.dtype == np.int64
    model = tmp_path / "block.safetensors"
    block().save(model)
    code, out, _ = run(capsys, "eval", "--model", str(model), "--dataset", str(path), "--json")
    assert code == 0 and json.loads(out)["samples"] == 6
    code, _, err = run(capsys, "eval", "--dataset", str(path))  # LeNet on 3x8x8 images
    assert code == 2 and str(path) in err and "(3, 8, 8)" in err and "expects (1, 28, 28)" in err
    many = tmp_path / "many.npz"
    np.savez(many, images=x, labels=np.array([0, 1, 2, 3, 4, 7]))
    code, _, err = run(capsys, "eval", "--model", str(model), "--dataset", str(many))
    assert code == 2 and "labels reach 7, the model has 5 classes" in err


def test_bench_takes_the_dataset_and_measures_on_it(capsys, tmp_path):
    """A 3x8x8 graph benched on an .npz of 3x8x8 images: the accuracy is the model's on those images."""
    rng = np.random.default_rng(1)
    x = rng.random((9, 3, 8, 8), dtype=np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3])
    path = tmp_path / "rgb9.npz"
    np.savez(path, images=x, labels=labels)
    g = block()
    model = tmp_path / "block.safetensors"
    g.save(model)
    code, out, _ = run(capsys, "bench", "--model", str(model), "--dataset", str(path), "--precisions", "fp32",
                       "--samples", "7", "--repeats", "1", "--no-startup", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["samples"] == 7
    assert report["headline"][0]["accuracy"] == round(g.accuracy(x[:7], labels[:7]), 6)  # as the JSON rounds
    code, _, err = run(capsys, "bench", "--model", str(model), "--precisions", "fp32", "--samples", "7",
                       "--repeats", "1", "--no-startup", "--json")  # the model's own data set is MNIST
    assert code == 2 and "(1, 28, 28)" in err


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 1, 4, 4), np.uint8)}, "no labels array"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)}, r"\(N, C, H, W\)"),
    ({"images": np.zeros((2, 2, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)}, "1 or 3 channels"),
    ({"images": np.zeros((2, 1, 4, 4), np.float64), "labels": np.zeros(2, np.int64)}, "uint8 or float32"),
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "one per image"),
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.zeros(2, np.float32)}, "integers"),
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0, -1])}, "labels out of range"),
    ({"images": np.full((2, 1, 4, 4), np.nan, np.float32), "labels": np.zeros(2, np.int64)}, "NaN"),
    ({"images": np.array([[[[None]]]], object), "labels": np.zeros(1, np.int64)}, "unsupported dtype"),
])
def test_bad_npz_files_are_refused_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(FileFormatError, match=message) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_npz_declaring_more_data_than_it_holds_is_refused_before_reading(tmp_path):
    import zipfile

    from numpy.lib import format as npy

    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("images.npy", "w") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 1, 28, 28)}
            npy.write_array_header_1_0(f, header)
        with zf.open("labels.npy", "w") as f:
            npy.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**9,)})
    with pytest.raises(FileFormatError, match="declares more data than it holds"):
        load_npz(path)
    (tmp_path / "not.npz").write_bytes(b"hello")
    with pytest.raises(FileFormatError, match="not a readable .npz"):
        load_npz(tmp_path / "not.npz")


def test_dataset_flag_is_checked_while_parsing(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--dataset", "cifar"])
    assert "expected one of mnist, fashion-mnist or a .npz file, found 'cifar'" in capsys.readouterr().err


def test_quantize_calibrates_on_an_npz_dataset(capsys, mnist_npz, tmp_path):
    path, images, labels = mnist_npz
    out = tmp_path / "q.safetensors"
    code, text, _ = run(capsys, "quantize", "--dataset", str(path), "--calibration", "50", "--out", str(out))
    assert code == 0 and f"calibrated on 50 images of {path}" in text
    code, text, _ = run(capsys, "eval", "--model", str(out), "--dataset", str(path), "--json")
    assert code == 0 and json.loads(text)["accuracy"] == microcnn.load(out).accuracy(images, labels)
