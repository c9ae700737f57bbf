"""The bundled models: LeNet-5 as in DESIGN.md (MNIST) and a wider LeNet-like CNN (Fashion-MNIST),
and where their trained weights live."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np

from .errors import DataNotFoundError
from .layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Softmax
from .network import Sequential


def _bundled_dir() -> Path:
    """Where the shipped weights are: the package data ``microcnn.data`` of an installed copy (a wheel
    maps the repository's top-level data/ folder onto it, see pyproject.toml), else -- running from a
    checkout on PYTHONPATH, or an editable install made before that mapping -- the checkout's data/."""
    try:
        # str(): a Traversable; for a package installed as files (not zipped) it names a real path
        return Path(str(importlib.resources.files("microcnn.data").joinpath("lenet.raw"))).parent
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "data"


DATA_DIR = _bundled_dir()
BUNDLED_RAW = DATA_DIR / "lenet.raw"
BUNDLED_FASHION = DATA_DIR / "fashion.safetensors"


Weights = str | os.PathLike[str] | None


def lenet(weights: Weights = None, algorithm: str = "im2col", seed: int = 0) -> Sequential:
    """LeNet-5 for 28x28 grey images: 61,706 parameters.

    Conv(1→6, 5, pad 2) ReLU MaxPool2 Conv(6→16, 5) ReLU MaxPool2 Conv(16→120, 5) ReLU Flatten
    Linear(120→84) ReLU Linear(84→10) Softmax.

    Args:
        weights: None (seeded random initialisation), ``"bundled"`` (the trained weights shipped in
            data/, 99.30% on the MNIST test split) or the path of a ``.raw`` or ``.safetensors`` file.
        algorithm: the convolutions' algorithm; im2col (the default) is the fastest on LeNet's shapes
            and deterministic. ``"auto"`` picks per layer by timing, so its last-bit rounding (and
            anything calibrated on it) can differ between runs; it is opt-in for that reason.
        seed: seed of the random initialisation.

    Shape:
        input (N, 1, 28, 28) float32 in [0, 1] (or uint8 pixels for ``predict``); output (N, 10)
        class probabilities.

    Raises:
        DataNotFoundError: ``weights="bundled"`` and the shipped file is missing.

    Example::

        >>> import numpy as np
        >>> net = lenet(weights="bundled")
        >>> sum(p.data.size for p in net.parameters())
        61706
        >>> probs = net.predict(np.zeros((2, 1, 28, 28), np.float32))
        >>> probs.shape, bool(np.allclose(probs.sum(axis=1), 1))
        ((2, 10), True)
    """
    rng = np.random.default_rng(seed)
    net = Sequential(
        Conv2d(1, 6, 5, padding=2, algorithm=algorithm, rng=rng), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5, algorithm=algorithm, rng=rng), ReLU(), MaxPool2d(2),
        Conv2d(16, 120, 5, algorithm=algorithm, rng=rng), ReLU(),
        Flatten(),
        Linear(120, 84, rng=rng), ReLU(),
        Linear(84, 10, rng=rng),
        Softmax(),
        input_shape=(1, 28, 28),
    )
    return _load_weights(net, weights, BUNDLED_RAW, "microcnn train --out data/lenet.raw")


def fashion_cnn(weights: Weights = None, algorithm: str = "im2col", seed: int = 0) -> Sequential:
    """The bundled Fashion-MNIST CNN, LeNet's shape made wider: 464,522 parameters.

    Conv(1→32, 5, pad 2) ReLU MaxPool2 Conv(32→64, 5) ReLU MaxPool2 Flatten Linear(1600→256) ReLU
    Linear(256→10) Softmax.

    Args:
        weights: None (seeded random initialisation), ``"bundled"`` (data/fashion.safetensors, trained
            by ``microcnn train --model fashion --dataset fashion-mnist``) or a weights file's path.
        algorithm: the convolutions' algorithm, as in ``lenet``.
        seed: seed of the random initialisation.

    Shape:
        input (N, 1, 28, 28); output (N, 10) probabilities of ``datasets.FASHION_MNIST_CLASSES``.

    Example::

        >>> net = fashion_cnn()  # random weights, seed 0
        >>> sum(p.data.size for p in net.parameters())
        464522
    """
    rng = np.random.default_rng(seed)
    net = Sequential(
        Conv2d(1, 32, 5, padding=2, algorithm=algorithm, rng=rng), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 5, algorithm=algorithm, rng=rng), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(1600, 256, rng=rng), ReLU(),
        Linear(256, 10, rng=rng),
        Softmax(),
        input_shape=(1, 28, 28),
    )
    return _load_weights(net, weights, BUNDLED_FASHION,
                         "microcnn train --model fashion --dataset fashion-mnist")


def _load_weights(net: Sequential, weights: Weights, bundled: Path, how_to_train: str) -> Sequential:
    """``net`` as built (weights None), with the shipped weights (``"bundled"``) or a file's."""
    if weights is None:
        return net
    if isinstance(weights, str) and weights == "bundled":
        if not bundled.exists():
            raise DataNotFoundError(f"bundled weights not found at {bundled}; train them with "
                                    f"`{how_to_train}`")
        weights = bundled
    return net.load(weights)
