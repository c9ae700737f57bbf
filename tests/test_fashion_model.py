"""The bundled Fashion-MNIST CNN (accuracy of the shipped file on the official test set, the `fashion`
model spec of the command line) and the training options it was made with (--holdout, shift-flip)."""

import json
import os

import numpy as np
import pytest

from microcnn.datasets import find_dataset_dir
from microcnn.lenet import BUNDLED_FASHION, fashion_cnn
from microcnn.train import evaluate, flip_images, mlp, run_train, shift_flip

needs_fashion = pytest.mark.skipif(
    find_dataset_dir("fashion-mnist", split="test") is None and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; CI installs it)")


@pytest.fixture(scope="module")
def fashion_test():
    from microcnn.datasets import load_fashion_mnist

    return load_fashion_mnist("test", download=False, progress=False)


def test_fashion_cnn_shape_and_parameter_count():
    net = fashion_cnn(seed=1)
    assert sum(p.data.size for p in net.parameters()) == 464_522
    assert net.predict(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)
    assert not np.array_equal(net.parameters()[0].data, fashion_cnn(seed=2).parameters()[0].data)


@pytest.mark.slow
@pytest.mark.data
@needs_fashion
def test_shipped_fashion_cnn_reaches_92_5_percent_on_the_official_test_set(fashion_test):
    images, labels = fashion_test
    assert len(labels) == 10_000
    assert BUNDLED_FASHION.exists(), f"train the bundled weights first: {BUNDLED_FASHION} missing"
    net = fashion_cnn(weights="bundled")
    acc = net.accuracy(images, labels)
    assert acc >= 0.925
    assert evaluate(net, images, labels) == pytest.approx(acc, abs=1e-4)  # training path agrees


@pytest.mark.slow
@pytest.mark.data
@needs_fashion
def test_cli_fashion_spec_scores_on_fashion_mnist(capsys, fashion_test):
    from microcnn.cli import main

    assert main(["eval", "--model", "fashion", "--samples", "500", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    images, labels = fashion_test
    assert result["samples"] == 500 and result["precision"] == "fp32"
    # The Fashion test images, not MNIST's: the same figure as scoring them directly.
    assert result["accuracy"] == fashion_cnn(weights="bundled").accuracy(images[:500], labels[:500])


def _is_shift_of(out, image, max_shift=2) -> bool:
    padded = np.pad(image, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    h, w = image.shape[1:]
    return any(np.array_equal(out, padded[:, dy:dy + h, dx:dx + w])
               for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1))


def test_shift_flip_shifts_every_image_and_mirrors_about_half():
    rng = np.random.default_rng(0)
    images = rng.random((200, 1, 28, 28)).astype(np.float32)  # no image is its own mirror
    out = shift_flip(images.copy(), np.random.default_rng(7))
    assert out.shape == images.shape and out.dtype == np.float32
    mirrored = [not _is_shift_of(o, x) for o, x in zip(out, images, strict=True)]
    for o, x, m in zip(out, images, mirrored, strict=True):
        assert _is_shift_of(o, x[..., ::-1] if m else x)
    assert 70 <= sum(mirrored) <= 130
    np.testing.assert_array_equal(out, shift_flip(images.copy(), np.random.default_rng(7)))  # seeded


def test_flip_images_mirrors_about_half_and_leaves_the_input_alone():
    images = np.random.default_rng(1).random((300, 1, 5, 7)).astype(np.float32)  # non-square
    before = images.copy()
    out = flip_images(images, np.random.default_rng(3))
    np.testing.assert_array_equal(images, before)
    mirrored = np.array([np.array_equal(o, x[..., ::-1]) for o, x in zip(out, images, strict=True)])
    kept = np.array([np.array_equal(o, x) for o, x in zip(out, images, strict=True)])
    assert (mirrored ^ kept).all() and 110 <= mirrored.sum() <= 190


@pytest.mark.slow
def test_holdout_trains_on_the_rest_and_scores_the_test_split_once(tmp_path, capsys, mnist_train,
                                                                   mnist_test):
    from microcnn.cli import build_parser

    out = tmp_path / "mlp.safetensors"
    n = len(mnist_train[0])
    args = build_parser().parse_args(["train", "--model", "mlp", "--epochs", "1", "--holdout", str(n - 1000),
                                      "--no-augment", "--no-progress", "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "training mlp on 1000 mnist images" in text and "holdout_acc" in text
    net = mlp(784, 256, 128, 10).load(out)
    test_acc = evaluate(net, *mnist_test)
    assert f"test accuracy {test_acc * 100:.2f}%" in text
    # the whole split: nothing left to train on
    with pytest.raises(ValueError, match=f"expected fewer than the {n} training images, found {n}"):
        run_train("mlp", holdout=n, out=tmp_path / "x.raw")
