"""Training loop: learning, determinism (also across thread counts), divergence errors,
augmentation, the MLP builder, the CLI command, and the accuracy of the shipped LeNet-5 weights."""

import numba
import numpy as np
import pytest

from microcnn import optim
from microcnn.errors import InputError
from microcnn.lenet import BUNDLED_RAW, lenet
from microcnn.train import (
    TrainingDivergedError,
    fit,
    mlp,
    random_affine,
    shift_images,
)


@pytest.fixture(scope="module")
def subset(mnist_train):
    images, labels = mnist_train
    return images[:1024], labels[:1024], images[-1000:], labels[-1000:]


def short_run(images, labels, threads=1, **kw):
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        net = lenet(seed=3)
        history = fit(net, images, labels, epochs=2, batch_size=64, optimizer="adam", lr=2e-3,
                      schedule=None, seed=3, progress=False, **kw)
    finally:
        numba.set_num_threads(before)
    return net, history


def test_short_training_learns_and_is_deterministic(subset):
    x, y, xv, yv = subset
    net_a, hist = short_run(x, y, augment=True, eval_data=(xv, yv))
    assert list(hist.columns) == ["epoch", "loss", "train_acc", "test_acc", "lr", "seconds"]
    assert hist.loss[1] < hist.loss[0] < np.log(10) + 0.1
    assert hist.test_acc.iloc[-1] > 0.5  # chance is 0.1; 2 epochs on 1024 images reach ~0.85
    net_b, _ = short_run(x, y, augment=True, eval_data=(xv, yv))
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        assert np.array_equal(a, b), f"{name} differs between two runs with the same seed"


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_weights_do_not_depend_on_the_thread_count(subset):
    x, y, _, _ = subset
    net_1, _ = short_run(x[:256], y[:256], threads=1)
    net_2, _ = short_run(x[:256], y[:256], threads=2)
    for a, b in zip(net_1.state_dict().values(), net_2.state_dict().values(), strict=True):
        assert np.array_equal(a, b)


def test_mlp_trains_above_chance(subset):
    x, y, xv, yv = subset
    net = mlp(784, 256, 128, 10, seed=0)
    assert [layer.type for layer in net] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear",
                                             "Softmax"]
    assert net.num_parameters == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    hist = fit(net, x, y, epochs=2, lr=2e-3, seed=0, progress=False, eval_data=(xv, yv))
    assert hist.test_acc.iloc[-1] > 0.7


def test_divergence_names_the_step(subset):
    x, y, _, _ = subset
    net = lenet(seed=0)
    opt = optim.SGD(net.parameters(), lr=1e12)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, batch \d+ \(step \d+"):
        fit(net, x[:512], y[:512], epochs=1, optimizer=opt, schedule=None, progress=False)


def test_fit_refuses_bad_labels(subset):
    x, y, _, _ = subset
    with pytest.raises(InputError, match="labels"):
        fit(lenet(), x[:10], y[:9], epochs=1, progress=False)
    with pytest.raises(InputError, match="class index"):
        fit(lenet(), x[:10], y[:10] + 10, epochs=1, progress=False)
    with pytest.raises(InputError, match="epochs"):
        fit(lenet(), x[:10], y[:10], epochs=0, progress=False)


def test_shift_images_moves_each_image_by_at_most_two_pixels():
    rng = np.random.default_rng(0)
    images = rng.random((20, 1, 6, 7), dtype=np.float32)
    shifted = shift_images(images, np.random.default_rng(1))
    seen = set()
    for img, out in zip(images, shifted, strict=True):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = np.zeros_like(img)  # img moved by (dy, dx), zeros shifted in
                ref[:, max(dy, 0):6 + min(dy, 0), max(dx, 0):7 + min(dx, 0)] = \
                    img[:, max(-dy, 0):6 + min(-dy, 0), max(-dx, 0):7 + min(-dx, 0)]
                if np.array_equal(out, ref):
                    matches.append((dy, dx))
        assert matches, "output is not a shifted copy of its input"
        seen.update(matches)
    assert len(seen) > 5  # the shifts vary from image to image


def bilinear_ref(img, y, x):
    """Sample a 2-D image at (y, x) with bilinear weights, zero outside: one pixel at a time."""
    def px(r, c):
        return img[r, c] if 0 <= r < img.shape[0] and 0 <= c < img.shape[1] else 0.0
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - y0, x - x0
    return ((1 - fy) * ((1 - fx) * px(y0, x0) + fx * px(y0, x0 + 1))
            + fy * ((1 - fx) * px(y0 + 1, x0) + fx * px(y0 + 1, x0 + 1)))


@pytest.mark.parametrize("degrees,scale,shift", [(0, 0, 0), (0, 0, 2.5), (30, 0.2, 2), (180, 0.5, 4)])
def test_random_affine_matches_a_per_pixel_reference(degrees, scale, shift):
    rng = np.random.default_rng(0)
    images = rng.random((3, 2, 7, 9), dtype=np.float32)
    out = random_affine(images, np.random.default_rng(5), degrees, scale, shift)
    if degrees == scale == shift == 0:
        np.testing.assert_array_equal(out, images)
    # The same draws, in the order the function documents: angle, zoom, (ty, tx) per image.
    draws = np.random.default_rng(5)
    angles = np.deg2rad(draws.uniform(-degrees, degrees, 3))
    zooms = draws.uniform(1 - scale, 1 + scale, 3)
    ty, tx = draws.uniform(-shift, shift, (2, 3))
    cy, cx = 3.0, 4.0
    for i in range(3):
        c, s = np.cos(angles[i]), np.sin(angles[i])
        for r in range(7):
            for q in range(9):
                # output pixel = centre + zoom * R(angle) (source - centre) + t, inverted:
                vy, vx = r - cy - ty[i], q - cx - tx[i]
                sy, sx = (c * vy - s * vx) / zooms[i] + cy, (s * vy + c * vx) / zooms[i] + cx
                for ch in range(2):
                    want = bilinear_ref(images[i, ch].astype(np.float64), sy, sx)
                    assert abs(out[i, ch, r, q] - want) < 1e-5, (i, ch, r, q)


def test_elastic_distortion_moves_pixels_by_about_the_requested_amount():
    images = np.zeros((8, 1, 28, 28), np.float32)
    images[:, :, 10:18, 10:18] = 1.0
    plain = random_affine(images, np.random.default_rng(0), 0, 0, 0)
    warped = random_affine(images, np.random.default_rng(0), 0, 0, 0, elastic=1.0)
    np.testing.assert_array_equal(plain, images)
    changed = np.abs(warped - images).sum(axis=(1, 2, 3))
    # A 1-pixel displacement of an 8x8 square's 32 edge pixels changes of the order of 10-40 units.
    assert (changed > 2).all() and (changed < 60).all()
    assert warped.min() >= 0 and warped.max() <= 1  # resampled, never extrapolated


def test_cli_train_one_epoch_writes_both_files(tmp_path, capsys):
    from microcnn.cli import build_parser

    out = tmp_path / "net.raw"
    args = build_parser().parse_args(["train", "--epochs", "1", "--out", str(out), "--no-progress",
                                      "--seed", "1"])
    assert args.model == "lenet" and args.augment is True and args.augmentation == "elastic"
    assert args.func(args) == 0
    assert out.stat().st_size == 61706 * 4
    reloaded = lenet(weights=out.with_suffix(".safetensors"))
    from_raw = lenet(weights=out).state_dict()["0.weight"]
    np.testing.assert_array_equal(reloaded.state_dict()["0.weight"], from_raw)
    text = capsys.readouterr().out
    assert "test accuracy" in text and "epoch" in text


def test_shipped_lenet_reaches_99_2_percent_on_the_official_test_set(mnist_test):
    images, labels = mnist_test
    assert len(labels) == 10_000
    assert BUNDLED_RAW.exists(), f"train the bundled weights first: {BUNDLED_RAW} missing"
    acc = lenet(weights="bundled").accuracy(images, labels)
    assert acc >= 0.992
