"""One model interface (microcnn.model.Model) for FP32 Sequential and Graph, quantized and compressed
models: the same methods answer the same way everywhere, shared behaviour is checked against its
definition, the layer table's MACs against hand counts, and no call site asks a model ``hasattr``."""

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import microcnn
from microcnn.datasets import load_mnist
from microcnn.errors import InputError
from microcnn.layers import Conv2d, Flatten, Linear
from microcnn.model import Model
from microcnn.quant import calibrate, compress, quantize
from tests.test_graph import block

PACKAGE = Path(microcnn.__file__).resolve().parent


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_mnist("test")
    return images[:64], labels[:64]


@pytest.fixture(scope="module")
def models(mnist):
    net = microcnn.lenet(weights="bundled")
    cal = calibrate(net, load_mnist("train")[0][:50], samples=50, progress=False)
    return {"fp32": net, "int8": quantize(net, cal), "w4a8": quantize(net, cal, weight_bits=4, act_bits=8),
            "compressed": compress(net, "int8")}


def test_every_model_kind_answers_the_interface(models, mnist, tmp_path):
    images, labels = mnist
    for kind, model in models.items():
        assert isinstance(model, Model), kind
        assert model.input_shape == (1, 28, 28)
        probs = model.predict(images)
        assert probs.shape == (64, 10)
        # accuracy is defined from predict, once, in the base class
        assert model.accuracy(images, labels) == float((probs.argmax(1) == labels).mean())
        assert np.array_equal(model.predict_classes(images), probs.argmax(1))
        # batching changes nothing: the chunks are the same rows
        assert np.array_equal(model.predict(images, batch_size=5), probs), kind
        names = model.layer_names()
        assert names == [r.name for r in model.trace(images[:2])] == list(model.layer_table()["Layer"])
        assert model.logits(images[:3]).shape == (3, 10)
        assert isinstance(model.nbytes, int) and model.nbytes > 0
        path = tmp_path / f"{kind}.safetensors"
        model.save(path)
        assert np.array_equal(microcnn.load(path).predict(images), probs), kind
        with pytest.raises(InputError, match=r"expected shape \(N, 1, 28, 28\), found \(2, 1, 27, 28\)"):
            model.predict(np.zeros((2, 1, 27, 28), np.float32))
    assert models["int8"].nbytes < models["fp32"].nbytes / 3  # int8 weights vs float32
    assert models["compressed"].nbytes < models["fp32"].nbytes / 3


def test_graph_answers_the_interface_too(tmp_path):
    g = block()
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    assert isinstance(g, Model) and g.input_shape == (3, 8, 8)
    assert np.array_equal(g.predict(x, batch_size=3), g.predict(x))
    assert g.layer_names() == [r.name for r in g.trace(x)]


def test_lenet_layer_table_has_the_known_counts(models):
    table = models["fp32"].layer_table()
    # Hand counts: conv O*H'*W'*C*kh*kw, linear in*out.
    conv1, conv2, conv3 = 6 * 28 * 28 * 1 * 25, 16 * 10 * 10 * 6 * 25, 120 * 1 * 1 * 16 * 25
    assert dict(zip(table["Layer"], table["MACs"], strict=True)) == {
        "conv1": conv1, "relu1": 0, "pool1": 0, "conv2": conv2, "relu2": 0, "pool2": 0, "conv3": conv3,
        "relu3": 0, "flatten": 0, "fc1": 120 * 84, "relu4": 0, "fc2": 84 * 10, "softmax": 0}
    assert int(table["MACs"].sum()) == 416_520
    assert int(table["Parameters"].sum()) == 61_706 == models["fp32"].num_parameters
    assert list(table["Output Shape"])[:3] == [(6, 28, 28), (6, 28, 28), (6, 14, 14)]
    # Quantized and compressed models describe the same FP32 layers.
    for kind in ("int8", "compressed"):
        assert models[kind].layer_table().equals(table)


def test_layer_table_other_input_shapes_and_errors():
    net = microcnn.Sequential(Conv2d(3, 4, 3, stride=2), Flatten(), Linear(4 * 7 * 7, 2))
    assert net.layer_table()["MACs"].isna().all()  # no input shape: no sizes
    table = net.layer_table((3, 15, 15))
    assert list(table["MACs"]) == [4 * 7 * 7 * 3 * 9, 0, 4 * 7 * 7 * 2]
    with pytest.raises(InputError, match="cannot run on it"):
        net.layer_table((3, 9, 9))


def test_grouped_conv_macs():
    if "groups" not in inspect.signature(Conv2d).parameters:
        pytest.skip("Conv2d has no groups yet (issue 13, layers13)")
    net = microcnn.Sequential(Conv2d(4, 8, 3, groups=2), Conv2d(8, 8, 3, padding=1, groups=8),
                              input_shape=(4, 10, 10))
    # Each output channel sees in/groups input channels: 8*8*8 positions x 2 x 9, then depthwise 8*8*8 x 9.
    assert list(net.layer_table()["MACs"]) == [8 * 8 * 8 * 2 * 9, 8 * 8 * 8 * 1 * 9]


def test_no_call_site_asks_a_model_what_it_can_do():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bhasattr\(", line) and "torch tensor" not in line:
                found.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not found, found
