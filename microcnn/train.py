"""Training: mini-batch loop over the autograd path of a Sequential, the CLI command, throughput.

``fit`` runs ``net.logits(Tensor)`` (every layer but a trailing Softmax) and softmax cross-entropy
on the logits, which is the numerically stable pairing. Everything random (initialisation is the
caller's, shuffling and augmentation are fit's) comes from ``seed``, and the kernels sum in a fixed
order whatever the thread count, so a seed reproduces the weights bit for bit.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from . import optim
from .autograd import Tensor, no_grad
from .checks import check_count
from .errors import InputError, MicrocnnError
from .fileutil import StrPath
from .kernels.linalg import matmul
from .losses import cross_entropy

if TYPE_CHECKING:  # annotations only (built inside the functions that need them)
    from .network import Sequential
    from .quant.qat import QATNetwork

    Trainable = Sequential | QATNetwork  # what fit trains: a network, or one with fake quantizers

# An augmentation: a batch (N, C, H, W) and the training run's generator -> a new batch of that shape.
Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# A training loss: the batch's logits, labels and (augmented) images -> a scalar Tensor.
LossFunction = Callable[[Tensor, np.ndarray, np.ndarray], Tensor]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "step", "none")
MODELS = ("lenet", "fashion", "mlp")
DATASETS = ("mnist", "fashion-mnist")


class TrainingDivergedError(MicrocnnError, FloatingPointError):
    """The loss became NaN or Inf; the message names the epoch and step."""


def mlp(*sizes: int, seed: int = 0) -> Sequential:
    """A multi-layer perceptron: Flatten, then Linear+ReLU between consecutive ``sizes``, a last Linear
    and Softmax.

    Args:
        sizes: the layer widths, input first (default 784, 256, 128, 10: 28x28 images, 10 classes).
        seed: seed of the random initialisation.

    Shape:
        input (N, sizes[0]), or (N, 1, s, s) when sizes[0] is a square s * s; output (N, sizes[-1]).

    Example::

        >>> net = mlp(4, 3, 2)
        >>> [type(layer).__name__ for layer in net.layers], net.input_shape
        (['Flatten', 'Linear', 'ReLU', 'Linear', 'Softmax'], (1, 2, 2))
    """
    from .layers import Flatten, Layer, Linear, ReLU, Softmax
    from .network import Sequential

    sizes = sizes or (784, 256, 128, 10)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1
                             for s in sizes):
        raise InputError(f"mlp: expected at least two positive layer sizes, found {sizes}")
    rng = np.random.default_rng(seed)
    layers: list[Layer] = [Flatten()]
    for i, (fin, fout) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(Linear(fin, fout, rng=rng))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    layers.append(Softmax())
    side = math.isqrt(sizes[0])
    shape = (1, side, side) if side * side == sizes[0] else None
    return Sequential(*layers, input_shape=shape)


def build_model(name: str, seed: int = 0) -> Sequential:
    """A freshly initialised model by name: one of ``MODELS`` ("lenet", "fashion", "mlp")."""
    from .lenet import fashion_cnn, lenet

    if name == "lenet":
        return lenet(seed=seed)
    if name == "fashion":
        return fashion_cnn(seed=seed)
    if name == "mlp":
        return mlp(784, 256, 128, 10, seed=seed)
    raise InputError(f"model: expected one of {MODELS}, found {name!r}")


def make_optimizer(name: str, params: Iterable[Tensor], lr: float,
                   weight_decay: float | None = None) -> optim.Optimizer:
    """An optimizer by name (one of ``OPTIMIZERS``): Adam, AdamW (decay 0.01 unless given) or SGD with
    Nesterov momentum 0.9."""
    if name == "adam":
        return optim.Adam(params, lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        return optim.AdamW(params, lr, weight_decay=1e-2 if weight_decay is None else weight_decay)
    if name == "sgd":
        return optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=weight_decay or 0.0)
    raise InputError(f"optimizer: expected one of {OPTIMIZERS}, found {name!r}")


def make_schedule(name: str | None, optimizer: optim.Optimizer, total_steps: int) -> optim.Schedule | None:
    """A per-batch schedule over ``total_steps``; "step" multiplies the rate by 0.3 each quarter."""
    if name in (None, "none"):
        return None
    if name == "onecycle":
        return optim.OneCycleLR(optimizer, optimizer.lr, total_steps)
    if name == "cosine":
        return optim.CosineAnnealingLR(optimizer, total_steps)
    if name == "step":
        return optim.StepLR(optimizer, max(1, total_steps // 4), gamma=0.3)
    raise InputError(f"schedule: expected one of {SCHEDULES}, found {name!r}")


def shift_images(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Each image moved by its own random (dy, dx) in [-max_shift, max_shift], zeros shifted in."""
    n, c, h, w = images.shape
    s = max_shift
    padded = np.pad(images, ((0, 0), (0, 0), (s, s), (s, s)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, n))
    return np.ascontiguousarray(windows[np.arange(n), :, dy, dx])


def _smoothing_matrix(size: int, sigma: float) -> np.ndarray:
    # math.exp (the C library's), not np.exp: NumPy's float64 exp differs in the last bits on AVX-512 CPUs
    return np.array([[math.exp(-0.5 * ((i - j) / sigma) ** 2) for j in range(size)] for i in range(size)])


def random_affine(images: np.ndarray, rng: np.random.Generator, degrees: float = 10.0,
                  scale: float = 0.1, max_shift: float = 2.0, elastic: float = 0.0,
                  elastic_sigma: float = 4.0) -> np.ndarray:
    """Each image rotated by U(-degrees, degrees), scaled by U(1-scale, 1+scale) about its centre and
    moved by U(-max_shift, max_shift) pixels per axis (torchvision's RandomAffine), then optionally
    warped by a smooth random displacement field with ``elastic`` pixels standard deviation and
    correlation length ``elastic_sigma`` (Simard et al.'s elastic distortion); bilinear resampling
    with zeros outside, vectorised over the batch."""
    n, c, h, w = images.shape
    angle = np.deg2rad(rng.uniform(-degrees, degrees, n))[:, None]
    zoom = rng.uniform(1 - scale, 1 + scale, (n,))[:, None]  # size as a shape: typed as an array
    ty, tx = rng.uniform(-max_shift, max_shift, (2, n, 1))
    cy, cx = (h - 1) / 2, (w - 1) / 2
    oy, ox = (g.reshape(1, -1) for g in np.mgrid[0:h, 0:w].astype(np.float64))
    # Inverse map: where in the source does each output pixel come from?
    py, px = oy - cy - ty, ox - cx - tx
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    sy, sx = -sin * px + cos * py + cy, cos * px + sin * py + cx
    if elastic > 0:
        gy, gx = _smoothing_matrix(h, elastic_sigma), _smoothing_matrix(w, elastic_sigma)
        noise = rng.standard_normal((2, n, h, w))
        # gy @ noise @ gx.T by a fixed-order product: BLAS's (OpenBLAS picks kernels by CPU) is not portable
        gxt = np.ascontiguousarray(gx.T)
        field = np.stack([matmul(matmul(gy, plane), gxt) for plane in noise.reshape(2 * n, h, w)])
        field = field.reshape(2, n, h, w)
        field *= elastic / field.reshape(2, n, -1).std(axis=2)[:, :, None, None]
        sy, sx = sy + field[0].reshape(n, -1), sx + field[1].reshape(n, -1)
    return _bilinear(images, sy, sx)


def _bilinear(images: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """out[i, :, p] = images[i, :] sampled at (sy[i, p], sx[i, p]), zero outside the image."""
    n, c, h, w = images.shape
    y0, x0 = np.floor(sy), np.floor(sx)
    wy, wx = (sy - y0).astype(np.float32)[:, None, :], (sx - x0).astype(np.float32)[:, None, :]
    # One pixel of zero padding; taps further out are clipped onto it, so they read zero.
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1))).reshape(n, c, -1)
    yi, yj = (np.clip(v, -1, h).astype(np.int64) + 1 for v in (y0, y0 + 1))
    xi, xj = (np.clip(v, -1, w).astype(np.int64) + 1 for v in (x0, x0 + 1))

    def tap(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return np.take_along_axis(padded, (yy * (w + 2) + xx)[:, None, :], axis=2)

    out = ((1 - wy) * ((1 - wx) * tap(yi, xi) + wx * tap(yi, xj))
           + wy * ((1 - wx) * tap(yj, xi) + wx * tap(yj, xj)))
    return np.ascontiguousarray(out.reshape(n, c, h, w), dtype=np.float32)


def affine_elastic(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``random_affine`` plus a 1-pixel elastic distortion: the recipe of the bundled LeNet-5."""
    return random_affine(images, rng, elastic=1.0)


def flip_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy with a random half of the images mirrored left-right (clothes stay clothes when mirrored,
    digits do not): the recipe of the bundled Fashion-MNIST CNN."""
    images = np.array(images)
    flip = rng.random(len(images)) < 0.5
    images[flip] = images[flip][..., ::-1]
    return images


def shift_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``shift_images`` then ``flip_images``."""
    return flip_images(shift_images(images, rng), rng)


AUGMENTATIONS: dict[str, Augmentation] = {
    "shift": shift_images, "affine": random_affine, "elastic": affine_elastic, "flip": flip_images,
    "shift-flip": shift_flip,
}


def _check_training_data(net: Trainable, images: ArrayLike, labels: ArrayLike,
                         name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Validated (images, int64 labels). Every label is checked against the network's class count
    before any training step, so a bad label late in the data never leaves a half-trained network."""
    from .checks import as_image_batch

    images = as_image_batch(images, net.input_shape, name="images")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name}: expected {len(images)} integer class indices (shape ({len(images)},)), "
                         f"found shape {labels.shape} dtype {labels.dtype}")
    classes = net.logits(images[:1]).shape[1]
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{name}: expected every class index in 0..{classes - 1}, found {int(labels[i])} "
                         f"at index {i}")
    return images, labels.astype(np.int64)


def evaluate(net: Trainable, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Accuracy through the training (autograd) path under no_grad: the math ``fit`` optimises. Sets
    eval mode (BatchNorm's running statistics, no dropout)."""
    correct = 0
    net.eval()
    with no_grad():
        for s in range(0, len(images), batch_size):
            logits = net.logits(Tensor(images[s:s + batch_size])).data
            correct += int((logits.argmax(axis=1) == labels[s:s + batch_size]).sum())
    return correct / len(images)


def fit(net: Trainable, images: ArrayLike, labels: ArrayLike, epochs: int = 10, batch_size: int = 64,
        optimizer: str | optim.Optimizer = "adam", lr: float = 3e-3, weight_decay: float | None = None,
        schedule: str | optim.Schedule | None = "onecycle", seed: int = 0,
        augment: bool | str | Augmentation = False, progress: bool = True,
        eval_data: tuple[ArrayLike, ArrayLike] | None = None, label_smoothing: float = 0.0,
        loss_fn: LossFunction | None = None) -> pd.DataFrame:
    """Train ``net`` in place with mini-batch softmax cross-entropy on its logits; return one row per epoch.

    Everything random (shuffling, augmentation) comes from ``seed``, and the kernels sum in a fixed
    order whatever the thread count, so a seed reproduces the weights bit for bit. All labels are
    checked before the first step. The network is left in eval mode.

    Args:
        net: the network to train (``lenet()``, ``fashion_cnn()``, ``mlp(...)`` or any Sequential).
        images: float32 in [0, 1] (or uint8 pixels), (N, C, H, W) as ``net.input_shape``.
        labels: class indices (N,).
        epochs, batch_size: integers >= 1.
        optimizer: "adam" | "adamw" | "sgd" (built with ``lr`` and ``weight_decay``) or an
            ``optim.Optimizer`` on ``net.parameters()``.
        lr, weight_decay: for an optimizer built by name.
        schedule: "onecycle" | "cosine" | "step" | "none", or an ``optim.Schedule`` stepped once per batch.
        seed: seeds the shuffling and the augmentation.
        augment: False, True or "shift" (random shifts of up to 2 pixels), "affine" (also +-10 degree
            rotations and +-10% scaling), "elastic" (affine plus a 1-pixel elastic distortion), "flip",
            "shift-flip", or a function ``(images, rng) -> images``.
        progress: tqdm bars and a line per epoch.
        eval_data: ``(images, labels)`` scored after each epoch (else test_acc is NaN).
        label_smoothing: passed to ``cross_entropy``.
        loss_fn: ``(logits, labels, images) -> loss`` replacing the cross-entropy (distillation needs the
            batch's images, augmented as the network saw them).

    Returns:
        A DataFrame with columns epoch, loss, train_acc, test_acc, lr, seconds; ``loss`` and
        ``train_acc`` are averages over the epoch's batches, taken while the weights moved.

    Raises:
        InputError: bad arguments or data (before any step).
        TrainingDivergedError: the loss became NaN or Inf (naming the epoch and step).

    Example::

        >>> rng = np.random.default_rng(0)
        >>> images = rng.random((8, 1, 2, 2), dtype=np.float32)
        >>> labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
        >>> net = mlp(4, 3, 2)
        >>> history = fit(net, images, labels, epochs=2, batch_size=4, progress=False)
        >>> list(history.columns), len(history)
        (['epoch', 'loss', 'train_acc', 'test_acc', 'lr', 'seconds'], 2)
        >>> again = mlp(4, 3, 2)
        >>> _ = fit(again, images, labels, epochs=2, batch_size=4, progress=False)
        >>> all(np.array_equal(a.data, b.data) for a, b in zip(net.parameters(), again.parameters()))
        True
    """
    from tqdm.auto import tqdm

    epochs, batch_size = check_count("epochs", epochs), check_count("batch_size", batch_size)
    images, labels = _check_training_data(net, images, labels)
    if eval_data is not None:
        if not (isinstance(eval_data, tuple | list) and len(eval_data) == 2):
            found = type(eval_data).__name__
            if isinstance(eval_data, tuple | list):
                found += f" of length {len(eval_data)}"
            raise InputError(f"eval_data: expected an (images, labels) pair, found {found}")
        eval_images, eval_labels = _check_training_data(net, eval_data[0], eval_data[1],
                                                        name="eval_data labels")
    steps_per_epoch = -(-len(images) // batch_size)
    opt = optimizer if isinstance(optimizer, optim.Optimizer) else make_optimizer(
        optimizer, net.parameters(), lr, weight_decay)
    sched = schedule if isinstance(schedule, optim.Schedule) or schedule is None else make_schedule(
        schedule, opt, epochs * steps_per_epoch)
    if augment is True:
        augment = "shift"
    transform: Augmentation | None
    if callable(augment):
        transform = augment
    elif augment and augment not in AUGMENTATIONS:
        raise InputError(f"augment: expected False, True or one of {sorted(AUGMENTATIONS)}, "
                         f"found {augment!r}")
    else:
        transform = AUGMENTATIONS[augment] if augment else None
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float]] = []
    step = 0
    net.train()
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            order = rng.permutation(len(images))
            loss_sum, correct = 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", unit="batch",
                       disable=not progress, leave=False)
            for b in bar:
                idx = order[b * batch_size:(b + 1) * batch_size]
                x, y = images[idx], labels[idx]
                if transform is not None:
                    x = transform(x, rng)
                logits = net.logits(Tensor(x))
                loss = loss_fn(logits, y, x) if loss_fn is not None else \
                    cross_entropy(logits, y, label_smoothing=label_smoothing)
                value = float(loss.data)
                step += 1
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"loss became {value} at epoch {epoch}, batch {b + 1} (step {step}, learning rate "
                        f"{opt.lr:.3g}); try a lower --lr or check the inputs for NaN/Inf")
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                loss_sum += value * len(y)
                correct += int((logits.data.argmax(axis=1) == y).sum())
                if progress and b % 20 == 0:
                    bar.set_postfix(loss=f"{value:.4f}")
            bar.close()
            train_seconds = time.perf_counter() - t0
            test_acc = evaluate(net, eval_images, eval_labels) if eval_data is not None else math.nan
            net.train()
            rows.append({"epoch": epoch, "loss": loss_sum / len(images), "train_acc": correct / len(images),
                         "test_acc": test_acc, "lr": opt.lr, "seconds": train_seconds})
            if progress:
                r = rows[-1]
                tqdm.write(f"epoch {epoch:3d}  loss {r['loss']:.4f}  train_acc {r['train_acc']:.4f}  "
                           f"test_acc {r['test_acc']:.4f}  lr {r['lr']:.2e}  {r['seconds']:.1f}s")
    finally:
        net.eval()
    return pd.DataFrame(rows, columns=["epoch", "loss", "train_acc", "test_acc", "lr", "seconds"])


# -- quantization-aware training (microcnn.quant.qat) ---------------------------------------------

def qat_fit(net, images: np.ndarray, labels: np.ndarray, weight_bits: int, act_bits: int, *, epochs: int = 8,
            batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam", schedule: str = "cosine",
            weight_decay: float | None = None, seed: int = 0, augment: str | bool = False,
            distill: float = 0.0, temperature: float = 4.0, label_smoothing: float = 0.0, init: str = "lsq",
            init_samples: int = 256, eval_data=None, progress: bool = True):
    """Quantization-aware fine-tuning of ``net`` (changed in place) with ``train.fit``.

    ``distill`` > 0 mixes in the KL divergence to a frozen copy of the FP32 ``net`` (weight ``distill``,
    temperature ``temperature``). The activation steps start from the first ``init_samples`` images of a
    seeded permutation. Returns (QATNetwork, per-epoch DataFrame).
    """
    from .checks import as_image_batch
    from .quant.qat import QATNetwork, distillation_loss

    if not 0.0 <= distill <= 1.0:
        raise InputError(f"distill: expected a weight in [0, 1], found {distill}")
    if not temperature > 0:
        raise InputError(f"temperature: expected a number > 0, found {temperature}")
    images = as_image_batch(images, net.input_shape)
    start = images[np.random.default_rng(seed).permutation(len(images))[:init_samples]]
    teacher = copy.deepcopy(net)
    qat = QATNetwork(net, weight_bits, act_bits, start, init=init)

    def hard(logits, y):
        return cross_entropy(logits, y, label_smoothing=label_smoothing)

    loss_fn = None
    if distill > 0:
        def loss_fn(logits, y, x):
            return distillation_loss(logits, teacher.logits(x), y, temperature, distill, hard)

    history = fit(qat, images, labels, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                  weight_decay=weight_decay, schedule=schedule, seed=seed, augment=augment,
                  label_smoothing=label_smoothing, progress=progress, eval_data=eval_data, loss_fn=loss_fn)
    return qat, history


def run_qat(net, precision: str, out, *, dataset: str = "mnist", data_dir=None, force: bool = False,
            train_images: int | None = None, threads: int = 1, progress: bool = True, **options) -> int:
    """``microcnn train --qat wXaY --init MODEL``: fine-tune ``net`` with fake quantization on the training
    split of ``dataset`` (its first ``train_images`` images, default all), convert, check that the integer
    model scores what the fake-quantized one does, and save it to ``out`` (a .safetensors model that
    ``microcnn eval`` runs at its own precision). ``options`` go to ``qat_fit``. ``out`` is checked before
    any work and again before writing; an existing file is replaced only with ``force``."""
    import numba

    from .datasets import load_dataset
    from .fileutil import check_destination
    from .network import Sequential
    from .quant.params import check_bits
    from .quant.precision import parse_precision

    if not isinstance(net, Sequential):
        raise InputError(f"--init: expected an FP32 model (bundled, lenet, fashion, a .raw or FP32 "
                         f".safetensors file), found a {type(net).__name__}")
    p = parse_precision(precision)
    if p.is_float:
        raise InputError(f"--qat: expected a quantized precision wXaY (X, Y in 2..8), found {precision!r}")
    check_bits(p.weight_bits, "--qat weight bits")
    check_bits(p.act_bits, "--qat activation bits")
    check_destination(out, overwrite=force)
    numba.set_num_threads(threads)
    images, labels = load_dataset(dataset, "train", data_dir=data_dir)
    test = load_dataset(dataset, "test", data_dir=data_dir)
    if train_images is not None:
        images, labels = images[:train_images], labels[:train_images]
    fp32 = net.accuracy(*test)
    print(f"QAT {p.label} of a {fp32 * 100:.2f}% FP32 model on {len(images)} {dataset} images for "
          f"{options.get('epochs', 8)} epoch(s); output: {out}", flush=True)
    t0 = time.perf_counter()
    qat, history = qat_fit(net, images, labels, p.weight_bits, p.act_bits, eval_data=test, progress=progress,
                           **options)
    seconds = time.perf_counter() - t0
    fake = evaluate(qat, *test)
    qnet = qat.quantized()
    integer = qnet.accuracy(*test)
    check_destination(out, overwrite=force)
    qnet.save(out)
    if not progress:
        print(history.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"QAT {p.label} in {seconds:.1f} s: fake-quant test accuracy {fake * 100:.2f}%, integer model "
          f"{integer * 100:.2f}% (FP32 {fp32 * 100:.2f}%); saved {out} ({qnet.nbytes} bytes)")
    return 0


# -- throughput ----------------------------------------------------------------------------------
def train_throughput(net_builder: Callable[[], Sequential], images: ArrayLike, labels: ArrayLike,
                     batch_size: int = 64, batches: int = 30,
                     threads: int | None = 1, repeats: int = 3) -> float:
    """Training images per second (forward, backward, Adam step) at ``batch_size``: the best of
    ``repeats`` timed runs of ``batches`` steps, after two untimed steps that compile the kernels."""
    from .timing import pinned_threads

    net = net_builder()
    images, labels = _check_training_data(net, images, labels)
    opt = optim.Adam(net.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(images), batch_size) for _ in range(batches)]

    def run(idx_list: list[np.ndarray]) -> None:
        for idx in idx_list:
            loss = cross_entropy(net.logits(Tensor(images[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    with pinned_threads(threads):
        run(picks[:2])
        best = math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            run(picks)
            best = min(best, time.perf_counter() - t0)
    return batches * batch_size / best


def throughput_table(threads: int = 1, data_dir: StrPath | None = None, compare: bool = False,
                     batches: int = 30) -> pd.DataFrame:
    """System, Dataset, Images/s at batch 64 for LeNet-5 and the MLP on the MNIST training split and on
    full Fashion-MNIST (60,000 images, when installed), plus PyTorch's LeNet-5 with ``compare``."""
    from .datasets import load_fashion_mnist, load_mnist
    from .errors import DataNotFoundError
    from .lenet import lenet

    rows = []
    sources = (("MNIST train", load_mnist, data_dir), ("Fashion-MNIST train", load_fashion_mnist, None))
    for dataset, loader, where in sources:
        try:
            images, labels = loader("train", data_dir=where, download=False, progress=False)
        except DataNotFoundError:
            continue
        dataset = f"{dataset} ({len(images):,})"
        rows.append({"System": "microcnn LeNet-5", "Dataset": dataset,
                     "Images/s": train_throughput(lenet, images, labels, batches=batches, threads=threads)})
        rows.append({"System": "microcnn MLP 784-256-128-10", "Dataset": dataset,
                     "Images/s": train_throughput(mlp, images, labels, batches=batches, threads=threads)})
        if compare:
            from .compare import torch_train_throughput

            rows.append({"System": "PyTorch LeNet-5", "Dataset": dataset,
                         "Images/s": torch_train_throughput(images, labels, threads=threads,
                                                            optimizer="adam", lr=1e-3)})
    if not rows:
        raise DataNotFoundError("no training data found for the throughput benchmark (set MICROCNN_DATA)")
    return pd.DataFrame(rows)


# -- command line ----------------------------------------------------------------------------------
def output_paths(out: StrPath) -> list[Path]:
    """Files ``microcnn train --out out`` writes: a .raw file and its self-describing twin, or one file.

    Example::

        >>> [str(p) for p in output_paths("lenet.raw")]
        ['lenet.raw', 'lenet.safetensors']
    """
    path = Path(out)
    return [path, path.with_suffix(".safetensors")] if path.suffix == ".raw" else [path]


def run_train(model: str = "lenet", dataset: str = "mnist", *, epochs: int = 240, batch_size: int = 64,
              lr: float = 3e-3, weight_decay: float | None = None, optimizer: str = "adamw",
              schedule: str = "onecycle", label_smoothing: float = 0.1, seed: int = 0,
              augment: str | bool = "elastic", holdout: int = 0, threads: int = 1, out: StrPath | None = None,
              progress: bool = True, data: str | None = None, force: bool = False) -> int:
    """``microcnn train``: load the training split, fit, print per-epoch figures, save the weights to
    ``out`` (default ``<model>-<dataset>.raw``; a .raw file gets a .safetensors twin). The defaults are
    the recipe of the bundled data/lenet.raw. ``augment``: a name of ``AUGMENTATIONS`` or False;
    ``holdout``: score the last N training images after each epoch (and train on the rest).

    Every output path is checked before the data is loaded, and again just before writing (existing
    files are replaced only with ``force``); the files are written all or nothing
    (``fileutil.all_or_nothing``)."""
    import numba

    from .datasets import load_dataset
    from .fileutil import all_or_nothing, check_destination
    from .resolve import data_dir

    paths = output_paths(out or f"{model}-{dataset}.raw")
    for path in paths:
        check_destination(path, overwrite=force)
    numba.set_num_threads(threads)
    images, labels = load_dataset(dataset, "train", data_dir=data_dir(data))
    test = load_dataset(dataset, "test", data_dir=data_dir(data))
    if holdout >= len(images):
        raise InputError(f"--holdout: expected fewer than the {len(images)} training images, found {holdout}")
    if holdout:
        # The recipe is judged on images the network never trained on, not on the test split.
        monitor = images[-holdout:], labels[-holdout:]
        images, labels = images[:-holdout], labels[:-holdout]
    else:
        monitor = test
    net = build_model(model, seed=seed)
    print(f"training {model} on {len(images)} {dataset} images for {epochs} epoch(s); "
          f"output: {' and '.join(map(str, paths))}", flush=True)
    t0 = time.perf_counter()
    history = fit(net, images, labels, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                  weight_decay=weight_decay, schedule=schedule, seed=seed, augment=augment,
                  label_smoothing=label_smoothing, progress=progress, eval_data=monitor)
    seconds = time.perf_counter() - t0
    if holdout:
        history = history.rename(columns={"test_acc": "holdout_acc"})
        test_acc = evaluate(net, *test)
    else:
        test_acc = history.iloc[-1]["test_acc"]
    for path in paths:
        check_destination(path, overwrite=force)
    with all_or_nothing():
        for path in paths:
            net.save(path)
    if not progress:
        print(history.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    scored = f"holdout accuracy {history.iloc[-1]['holdout_acc'] * 100:.2f}%, " if holdout else ""
    print(f"trained {model} on {len(images)} {dataset} images in {seconds:.1f} s: "
          f"{scored}test accuracy {test_acc * 100:.2f}%; saved {' and '.join(map(str, paths))}")
    return 0
