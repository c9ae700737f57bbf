"""``microcnn.resolve``: what each model spec loads, which dataset it is scored on, where data is read
from, and the first-n rule, on a tiny synthetic dataset (4 test and 6 training images whose pixels
say which image they are), so a swapped split, a missing limit or labels returned as images show."""

import importlib

import numpy as np
import pytest

import microcnn
from microcnn import resolve
from microcnn.datasets import write_idx
from microcnn.errors import InputError
from microcnn.layers import Flatten, Linear
from microcnn.network import Sequential


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """A directory with an MNIST and a Fashion-MNIST of 4 test and 6 training images each: image i of
    a split has every pixel = base + i (test 10.., training 100.., Fashion-MNIST +50), label i % 10."""
    monkeypatch.delenv(resolve.DATA_ENV, raising=False)
    for name, extra in (("mnist", 0), ("fashion-mnist", 50)):
        folder = tmp_path / name
        folder.mkdir()
        for split, base, n in (("t10k", 10, 4), ("train", 100, 6)):
            values = (base + extra + np.arange(n, dtype=np.uint8))[:, None, None]
            write_idx(folder / f"{split}-images-idx3-ubyte", np.ascontiguousarray(np.broadcast_to(values,
                                                                                              (n, 28, 28))))
            write_idx(folder / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return str(tmp_path)


def pixels(images):
    """The first pixel of each image, as the integer it was written as."""
    return [round(v) for v in (images[:, 0, 0, 0] * 255).tolist()]


def test_test_images_are_the_first_n_of_the_test_split(data):
    images, labels = resolve.load_test_images(3, data)
    assert pixels(images) == [10, 11, 12] and labels.tolist() == [0, 1, 2]
    images, labels = resolve.load_test_images(None, data)
    assert pixels(images) == [10, 11, 12, 13] and labels.tolist() == [0, 1, 2, 3]
    images, labels = resolve.load_test_images(4, data, dataset="fashion-mnist")
    assert pixels(images) == [60, 61, 62, 63]


def test_calibration_images_come_from_the_training_split_without_labels(data):
    images = resolve.load_calibration_images(5, data)
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.float32
    assert pixels(images) == [100, 101, 102, 103, 104]
    fashion = resolve.load_calibration_images(6, data, dataset="fashion-mnist")
    assert pixels(fashion) == [150, 151, 152, 153, 154, 155]


def test_asking_for_more_images_than_the_split_holds_is_refused(data):
    with pytest.raises(InputError) as info:
        resolve.load_test_images(5, data, "--samples")
    assert str(info.value) == "--samples: expected at most 4 (the MNIST test split's size), found 5"
    with pytest.raises(InputError) as info:
        resolve.load_calibration_images(7, data, dataset="fashion-mnist")
    assert str(info.value) == ("calibration: expected at most 6 (the Fashion-MNIST training split's size), "
                               "found 7")


def test_first_takes_exactly_n_and_refuses_one_more():
    images, labels = np.arange(5) * 10, np.arange(5)
    assert resolve.first(images, labels, None, "x") == (images, labels)
    got = resolve.first(images, labels, 5, "x")
    assert got[0].tolist() == [0, 10, 20, 30, 40] and got[1].tolist() == [0, 1, 2, 3, 4]
    got = resolve.first(images, labels, 2, "x")
    assert got[0].tolist() == [0, 10] and got[1].tolist() == [0, 1]
    assert [len(a) for a in resolve.first(images, labels, 0, "x")] == [0, 0]
    with pytest.raises(InputError, match=r"^samples: expected at most 5 \(the x split's size\), found 6$"):
        resolve.first(images, labels, 6, "x")


def test_the_data_directory_is_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(resolve.DATA_ENV, raising=False)
    assert resolve.data_dir(None) is None and resolve.data_dir() is None
    assert resolve.data_dir("here") == "here"
    monkeypatch.setenv(resolve.DATA_ENV, "env-dir")
    assert resolve.data_dir(None) == "env-dir"
    assert resolve.data_dir("here") == "here"


def test_each_model_spec_is_scored_on_its_dataset():
    assert [resolve.dataset_of(s) for s in ("fashion", "bundled", "lenet", "fashion.safetensors")] == \
        ["fashion-mnist", "mnist", "mnist", "mnist"]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_each_model_spec_loads_what_it_names(tmp_path):
    bundled = microcnn.lenet(weights="bundled")
    assert same_weights(resolve.load_model_spec("bundled"), bundled)
    assert same_weights(resolve.load_model_spec("lenet"), bundled)
    fashion = importlib.import_module("microcnn.lenet").fashion_cnn(weights="bundled")
    assert same_weights(resolve.load_model_spec("fashion"), fashion)
    other = microcnn.lenet(seed=3)
    other.save(tmp_path / "w.raw")
    assert same_weights(resolve.load_model_spec(str(tmp_path / "w.raw")), other)
    small = Sequential(Flatten(), Linear(784, 3, rng=np.random.default_rng(2)), input_shape=(1, 28, 28))
    small.save(tmp_path / "s.safetensors")
    loaded = resolve.load_model_spec(str(tmp_path / "s.safetensors"))
    assert loaded.config() == small.config() and same_weights(loaded, small)
