"""Issue 13's accuracy targets on the trained networks shipped in data/ (``tools/train_imported.py``):
a Conv+BatchNorm+ReLU CNN with stride-2 convolutions and global average pooling (Fashion-MNIST), an MLP
(MNIST), a residual CNN (Fashion-MNIST), each exported by ``torch.onnx.export`` with BatchNorm nodes.

Measured with ``tools/bench_onnx.imported_accuracy`` (the benchmark's own function): FP32 accuracy
within 0.05 pt of ONNX Runtime's on the same file, probabilities within 1e-4, INT8 losing at most 0.3 pt
and W4A8 at most 1.0 pt, on the first 2,000 test images (calibration: 100 training images). The CLI
quantizes and evaluates the same files. Needs onnx and onnxruntime (the ``compare`` extra)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from microcnn import Graph, Sequential, cli
from microcnn.quant import QuantizedGraph, load_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # tools/bench_onnx builds its networks with it
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_onnx import IMPORTED, imported_accuracy, ort_predictor, softmax  # noqa: E402

from microcnn.datasets import load_dataset  # noqa: E402
from microcnn.onnx_io import load_onnx  # noqa: E402

DATA = ROOT / "data"


@pytest.mark.parametrize("name", list(IMPORTED))
def test_shipped_files_are_small_and_have_the_layers_the_targets_name(name):
    path = DATA / f"{name}.onnx"
    assert path.stat().st_size < 300_000
    net = load_onnx(path)
    types = [layer.type for layer in net.layers]
    if name == "fmnist-bn-cnn":
        assert isinstance(net, Sequential) and types.count("BatchNorm2d") == 4
        assert sum(layer.stride == (2, 2) for layer in net.layers if layer.type == "Conv2d") == 2
        assert "GlobalAvgPool2d" in types
    elif name == "mnist-mlp":
        assert isinstance(net, Sequential) and types == ["Flatten", "Linear", "ReLU", "Linear"]
    else:
        assert isinstance(net, Graph) and types.count("Add") == 2 and types.count("BatchNorm2d") == 6


@pytest.mark.parametrize("name", list(IMPORTED))
def test_fp32_probabilities_match_onnx_runtime(name):
    x, _ = load_dataset(IMPORTED[name], "test", samples=500, progress=False)
    path = str(DATA / f"{name}.onnx")
    ours, theirs = load_onnx(path).predict(x), ort_predictor(path)(x)
    assert np.abs(softmax(ours) - softmax(theirs)).max() <= 1e-4


@pytest.mark.slow
def test_accuracy_targets_on_2000_test_images():
    table = imported_accuracy(samples=2000).set_index("Model")
    assert (table["Test images"] == 2000).all() and (table["Calibration images"] == 100).all()
    assert (table["|FP32 - ORT| pt"] <= 0.05).all(), table
    assert (table["max |dp|"] <= 1e-4).all(), table
    assert (table["INT8 drop pt"] <= 0.3).all(), table
    assert (table["W4A8 drop pt"] <= 1.0).all(), table
    assert (table["FP32 %"] > [85, 90, 85]).all(), table  # trained: far above chance (10 %)


def _cli(capsys, *argv):
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_cli_quantizes_and_evaluates_the_imported_files(capsys, tmp_path):
    common = ("--dataset", "fashion-mnist", "--samples", "500", "--json")
    for name in ("fmnist-bn-cnn", "fmnist-resnet"):
        model = str(DATA / f"{name}.onnx")
        fp32 = json.loads(_cli(capsys, "eval", "--model", model, *common))
        int8 = json.loads(_cli(capsys, "eval", "--precision", "int8", "--model", model, *common))
        assert int8["precision"] == "int8" and int8["calibration_samples"] == 100
        assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.01  # 5 of 500 images
        out = tmp_path / f"{name}-int8.safetensors"
        _cli(capsys, "quantize", "--model", model, "--dataset", "fashion-mnist", "--out", str(out))
        stored = json.loads(_cli(capsys, "eval", "--model", str(out), *common))
        assert stored["accuracy"] == int8["accuracy"] and stored["precision"] == "int8"
        assert isinstance(load_model(out), QuantizedGraph) == (name == "fmnist-resnet")
    assert os.path.exists(tmp_path / "fmnist-resnet-int8.safetensors")
