"""Calibration (the numeric part; file loading is tested with the serializers) against the activations
computed layer by layer with NumPy's min/max: which images it uses, the batches it feeds, what each
observer saw, and its refusals. Found by mutation testing (docs/mutation-python.md)."""

import numpy as np
import pytest

from microcnn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from microcnn.errors import InputError
from microcnn.quant import calibrate
from microcnn.quant.calibrate import INPUT, Calibration
from microcnn.quant.params import ActQuant

RNG = np.random.default_rng(3)
IMAGES = RNG.uniform(-0.5, 1.5, size=(13, 1, 9, 7)).astype(np.float32)  # non-square images


def tiny_net(seed=1):
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(1, 2, 3, rng=rng), ReLU(), MaxPool2d(2), Flatten(), Linear(12, 3, rng=rng),
                      input_shape=(1, 9, 7))


def activations(net, x):
    """Every layer's output, one layer at a time (the calibration's own order)."""
    out = {INPUT: x}
    for name, layer in zip(net.names, net.layers, strict=True):
        x = layer.forward(x)
        out[name] = x
    return out


def test_minmax_calibration_sees_every_tensor_of_every_image():
    net = tiny_net()
    cal = calibrate(net, IMAGES, method="minmax", samples=50, progress=False, batch_size=4)
    acts = activations(net, IMAGES)
    assert cal.names == list(acts) and cal.samples == 13 and cal.method == "minmax"
    np.testing.assert_array_equal(cal.images, IMAGES)
    for name, a in acts.items():
        obs = cal.observer(name)
        assert (obs.min_val, obs.max_val) == (float(a.min()), float(a.max()))
        assert obs.count == a.size
        lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        assert cal.range(name, 8) == (lo, hi)
        assert cal.act_quant(name, 4) == ActQuant.from_range(lo, hi, 4)


def test_a_seeded_subset_of_distinct_images_in_their_original_order():
    net = tiny_net()
    cal = calibrate(net, IMAGES, method="minmax", samples=5, progress=False, seed=7)
    again = calibrate(net, IMAGES, method="minmax", samples=5, progress=False, seed=7)
    other = calibrate(net, IMAGES, method="minmax", samples=5, progress=False, seed=8)
    rows = [int(np.flatnonzero((IMAGES == img).all(axis=(1, 2, 3)))[0]) for img in cal.images]
    assert len(set(rows)) == 5 and rows == sorted(rows)
    np.testing.assert_array_equal(again.images, cal.images)
    assert not np.array_equal(other.images, cal.images) and other.seed == 8
    assert cal.observer(INPUT).count == cal.images.size


def test_batches_of_batch_size_are_the_moving_averages_unit():
    net = tiny_net()
    cal = calibrate(net, IMAGES, method="ema", samples=13, progress=False, batch_size=5,
                    averaging_constant=0.5)
    acts = activations(net, IMAGES)
    for name in (INPUT, net.names[-1]):
        a = acts[name]
        lo, hi = float(a[:5].min()), float(a[:5].max())
        for s in (5, 10):  # batches [0, 5), [5, 10), [10, 13)
            lo += 0.5 * (float(a[s:s + 5].min()) - lo)
            hi += 0.5 * (float(a[s:s + 5].max()) - hi)
        obs = cal.observer(name)
        assert obs.min_val == pytest.approx(lo, rel=1e-6) and obs.max_val == pytest.approx(hi, rel=1e-6)


def test_observer_options_reach_every_observer():
    cal = calibrate(tiny_net(), IMAGES, method="percentile", progress=False, percentile=99.0, bins=128)
    assert all(cal.observer(n).params() == {"bins": 128, "percentile": 99.0} for n in cal.names)


def test_ranges_are_cached_per_tensor_and_bit_width():
    cal = calibrate(tiny_net(), IMAGES, method="mse", progress=False, bins=64)
    name = cal.names[1]
    r8, r4 = cal.range(name, 8), cal.range(name, 4)
    assert r8 != r4  # MSE clipping depends on the bit width
    cal.observer(name).observe(np.full(10, 1e3, np.float32))  # later data does not change a given range
    assert cal.range(name, 8) == r8 and cal.range(name, 4) == r4


def test_table_reports_each_tensor():
    net = tiny_net()
    cal = calibrate(net, IMAGES, method="minmax", progress=False)
    table = cal.table(4)
    assert list(table["Tensor"]) == cal.names and set(table["Observer"]) == {"minmax"}
    for row in table.to_dict("records"):
        name, q = row["Tensor"], cal.act_quant(row["Tensor"], 4)
        assert (row["Range Lo"], row["Range Hi"]) == cal.range(name, 4)
        assert (row["Scale"], row["Zero Point"]) == (q.scale, q.zero_point)
        assert (row["Min"], row["Max"]) == (cal.observer(name).min_val, cal.observer(name).max_val)
    assert repr(cal) == f"Calibration(method='minmax', samples=13, tensors={len(cal.names)})"


def test_a_calibration_only_fits_its_architecture():
    cal = calibrate(tiny_net(), IMAGES, method="minmax", progress=False)
    cal.check_network(tiny_net(seed=9))  # other weights, same architecture
    other = Sequential(Conv2d(1, 3, 3), ReLU(), Flatten(), Linear(105, 3), input_shape=(1, 9, 7))
    message = (r"another architecture \(\['Conv2d', 'ReLU', 'MaxPool2d', 'Flatten', 'Linear'\]\) "
               r"than the network \(\['Conv2d', 'ReLU', 'Flatten', 'Linear'\]\)")
    with pytest.raises(InputError, match=message):
        cal.check_network(other)
    with pytest.raises(InputError, match="no tensor 'conv9'"):
        cal.observer("conv9")


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "kmeans"}, "method"),
    ({"samples": 0}, "samples"),
    ({"samples": 2.5}, "samples"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 1.5}, "batch_size"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        calibrate(tiny_net(), IMAGES, progress=False, **kwargs)


def test_constant_images_and_foreign_networks_are_refused():
    with pytest.raises(InputError, match="constant"):
        calibrate(tiny_net(), np.full((3, 1, 9, 7), 0.5, np.float32), progress=False)
    with pytest.raises(InputError, match="Sequential"):
        calibrate(object(), IMAGES, progress=False)
    calibrate(tiny_net(), IMAGES[:1], method="minmax", samples=1, batch_size=1, progress=False)
    assert isinstance(calibrate(tiny_net(), IMAGES, progress=False, samples=1), Calibration)


def test_defaults_mse_100_samples_seed_0_batches_of_10_with_a_progress_bar(capsys):
    images = np.random.default_rng(4).uniform(0, 1, size=(130, 1, 9, 7)).astype(np.float32)
    net = tiny_net()
    cal = calibrate(net, images)
    assert "calibrate (mse)" in capsys.readouterr().err
    assert cal.method == "mse" and cal.samples == 100 and cal.seed == 0
    np.testing.assert_array_equal(cal.images, calibrate(net, images, seed=0, progress=False).images)
    ema = calibrate(net, images[:25], method="ema", progress=False, averaging_constant=0.5)
    lo = float(images[:10].min())
    for s in (10, 20):  # batches [0, 10), [10, 20), [20, 25)
        lo += 0.5 * (float(images[s:s + 10].min()) - lo)
    assert ema.observer(INPUT).min_val == pytest.approx(lo, rel=1e-6)


def test_default_bit_width_is_8_and_default_seed_0():
    cal = calibrate(tiny_net(), IMAGES, method="mse", progress=False, bins=64)
    name = cal.names[-1]
    assert cal.range(name) == cal.range(name, 8) != cal.range(name, 4)
    assert cal.act_quant(name) == cal.act_quant(name, 8) and cal.act_quant(name).bits == 8
    assert Calibration("minmax", cal.observers, cal.architecture, cal.images).seed == 0
    assert cal.table()["Scale"].tolist() == cal.table(8)["Scale"].tolist() != cal.table(4)["Scale"].tolist()
