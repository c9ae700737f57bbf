"""From what a user names to what the library runs on: model specs, data directories, test and
calibration images. The command line, the benchmarks and the comparison all resolve through here.

Model specs: ``"bundled"`` or ``"lenet"`` (the trained LeNet-5 shipped in data/), ``"fashion"`` (the
bundled Fashion-MNIST CNN), a ``.raw`` LeNet-5 weight file, an ``.onnx`` file (``onnx_io.load_onnx``), or
any self-describing model file (FP32 Sequential or Graph, quantized or storage-compressed).

Datasets: ``"mnist"``, ``"fashion-mnist"`` (test split for scoring, training split for calibration), or
a ``.npz`` file with ``images`` (N, C, H, W) uint8 or float32 and ``labels`` (N,) integers: one set of
images, used for scoring and, when a command calibrates, for calibration too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import FileFormatError, InputError, MicrocnnError

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
    from .quant.loading import load_model  # only here: a LeNet-5 needs no quantization package (.onnx too)

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


MAX_NPZ_BYTES = 1 << 32  # per array of an .npz dataset: far beyond any test set, refused before reading
MAX_LABEL = 2**31 - 1


def is_npz(dataset: str) -> bool:
    """Whether a ``--dataset`` value names an .npz file rather than a known dataset."""
    return str(dataset).lower().endswith(".npz")


def _npz_headers(path) -> dict:
    """Member name (without .npy) -> (shape, dtype) from the .npy headers alone, each checked against
    ``MAX_NPZ_BYTES`` and the member's size before NumPy allocates anything for it."""
    import zipfile

    from numpy.lib import format as npy

    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = read(f)
                need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if need > min(MAX_NPZ_BYTES, info.file_size):
                    raise FileFormatError(path, f"array {info.filename[:-4]} declares more data than it "
                                          "holds",
                                          f"<= {min(MAX_NPZ_BYTES, info.file_size)} bytes", f"{need} bytes")
                out[info.filename[:-4]] = (tuple(shape), dtype)
    except FileFormatError:  # a ValueError too: ours already names the array, not to be wrapped again
        raise
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise FileFormatError(path, f"not a readable .npz file ({exc})") from None
    return out


def load_npz(path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of an .npz dataset, validated: ``images`` (N, C, H, W), C 1 or 3, uint8 (scaled
    by 1/255 as MNIST pixels) or finite float32 (as stored); ``labels`` (N,) non-negative integers.
    Read with ``allow_pickle=False``: nothing from the file is executed.

    Returns:
        (images float32 (N, C, H, W), labels int64 (N,)).

    Raises:
        FileFormatError: naming the file, what was expected and what was found.
    """
    from .fileutil import regular_file_size

    regular_file_size(path, "dataset file")
    headers = _npz_headers(path)
    missing = [k for k in ("images", "labels") if k not in headers]
    if missing:
        raise FileFormatError(path, f"no {' and no '.join(missing)} array", "arrays 'images' and 'labels'",
                              sorted(headers))
    (shape, dtype), (lshape, ldtype) = headers["images"], headers["labels"]
    if len(shape) != 4 or shape[1] not in (1, 3) or 0 in shape:
        raise FileFormatError(path, "images must be a non-empty (N, C, H, W) array with 1 or 3 channels",
                              "(N, 1 or 3, H, W)", shape)
    if dtype not in (np.dtype(np.uint8), np.dtype("<f4")):
        raise FileFormatError(path, "images have an unsupported dtype", "uint8 or float32", dtype)
    if lshape != shape[:1] or ldtype.kind not in "iu":
        raise FileFormatError(path, "labels must be integers, one per image", f"shape ({shape[0]},) integers",
                              f"shape {lshape} {ldtype}")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (ValueError, OSError) as exc:
        raise FileFormatError(path, f"arrays could not be read ({exc})") from None
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABEL):
        raise FileFormatError(path, "labels out of range", f"0..{MAX_LABEL}",
                              f"{int(labels.min())}..{int(labels.max())}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(255)
    elif not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).sum())
        raise FileFormatError(path, f"images hold {bad} NaN/Inf values", "finite float32",
                              f"{bad} non-finite")
    return np.ascontiguousarray(images, np.float32), labels.astype(np.int64)


def check_data_fits(model, images, labels, source: str) -> None:
    """Refuse data the model cannot score, naming ``source``: images of another (C, H, W) than the model
    records, or labels beyond its classes (its output size, known from its input shape)."""
    shape = model.input_shape
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise MicrocnnError(f"{source}: images are {tuple(images.shape[1:])} (C, H, W), the model expects "
                            f"{tuple(shape)}")
    if shape is not None and len(labels):
        out = model.layer_table()["Output Shape"].iloc[-1]
        if len(out) == 1 and int(labels.max()) >= out[0]:
            raise MicrocnnError(f"{source}: labels reach {int(labels.max())}, the model has {out[0]} classes "
                                f"(expected labels 0..{out[0] - 1})")


def load_test_images(n: int | None = None, data: str | None = None, what: str = "samples",
                     dataset: str = "mnist"):
    """The first ``n`` test images and labels of ``dataset`` (all when None), from ``data_dir(data)``;
    a ``.npz`` dataset's own images (``load_npz``)."""
    from .datasets import load_dataset

    if is_npz(dataset):
        images, labels = load_npz(dataset)
        return first(images, labels, n, dataset, what)

    images, labels = load_dataset(dataset, "test", data_dir=data_dir(data), samples=n)
    return first(images, labels, n, f"{DATASET_TITLES.get(dataset, dataset)} test", what)


def load_calibration_images(n: int, data: str | None = None, what: str = "calibration",
                            dataset: str = "mnist"):
    """``n`` calibration images of ``dataset``. They come from the training split, never from the test
    images being scored; an .npz dataset has one set of images, its first ``n`` calibrate."""
    from .datasets import load_dataset

    if is_npz(dataset):
        images, labels = load_npz(dataset)
        return first(images, labels, n, dataset, what)[0]

    images, labels = load_dataset(dataset, "train", data_dir=data_dir(data), samples=n)
    return first(images, labels, n, f"{DATASET_TITLES.get(dataset, dataset)} training", what)[0]
