"""From what a user names to what the library runs on: model specs, data directories, test and
calibration images. The command line, the benchmarks and the comparison all resolve through here.

Model specs: ``"bundled"`` or ``"lenet"`` (the trained LeNet-5 shipped in data/), ``"fashion"`` (the
bundled Fashion-MNIST CNN), a ``.raw`` LeNet-5 weight file, an ``.onnx`` file (``onnx_io.load_onnx``), or
any self-describing model file (FP32, quantized or storage-compressed).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

DATA_ENV = "MICROCNN_DATA"
DATASET_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}  # as messages name them


def load_model_spec(spec: str):
    """The model ``spec`` names (see the module docstring).

    Example::

        >>> net = load_model_spec("bundled"); qnet = load_model_spec("lenet-int8.safetensors")
    """
    from .lenet import fashion_cnn, lenet

    if spec in ("bundled", "lenet"):
        return lenet(weights="bundled")
    if spec == "fashion":
        return fashion_cnn(weights="bundled")
    if Path(spec).suffix == ".raw":
        return lenet(weights=spec)
    if Path(spec).suffix == ".onnx":
        from .onnx_io import load_onnx

        return load_onnx(spec)
    from .quant.loading import load_model  # only here: a LeNet-5 needs no quantization package

    return load_model(spec)


def dataset_of(spec: str) -> str:
    """The dataset a model spec is scored on: Fashion-MNIST for ``fashion``, else MNIST."""
    return "fashion-mnist" if spec == "fashion" else "mnist"


def data_dir(data: str | None = None) -> str | None:
    """The dataset directory asked for: ``data`` if given, else ``$MICROCNN_DATA``, else None (the
    dataset loaders then look in ./data and the user cache)."""
    return data or os.environ.get(DATA_ENV)


def first(images, labels, n: int | None, split: str, what: str = "samples"):
    """The first ``n`` images and labels (all when None); refused when the split has fewer than asked
    for, so every figure reported is over the number of images requested. ``what`` names the request
    in the error (``--samples`` on the command line)."""
    if n is not None and n > len(images):
        raise InputError(f"{what}: expected at most {len(images)} (the {split} split's size), found {n}")
    return (images, labels) if n is None else (images[:n], labels[:n])


def load_test_images(n: int | None = None, data: str | None = None, what: str = "samples",
                     dataset: str = "mnist"):
    """The first ``n`` test images and labels of ``dataset`` (all when None), from ``data_dir(data)``."""
    from .datasets import load_dataset

    images, labels = load_dataset(dataset, "test", data_dir=data_dir(data), samples=n)
    return first(images, labels, n, f"{DATASET_TITLES.get(dataset, dataset)} test", what)


def load_calibration_images(n: int, data: str | None = None, what: str = "calibration",
                            dataset: str = "mnist"):
    """``n`` calibration images of ``dataset``. They come from the training split, never from the test
    images being scored."""
    from .datasets import load_dataset

    images, labels = load_dataset(dataset, "train", data_dir=data_dir(data), samples=n)
    return first(images, labels, n, f"{DATASET_TITLES.get(dataset, dataset)} training", what)[0]
