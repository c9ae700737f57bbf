"""FP32 engine: layers, kernels and Sequential against the plain-NumPy references in reference.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import microcnn
from microcnn import InputError, layers
from microcnn.kernels import elementwise, pool
from microcnn.network import Sequential

from . import reference as ref

# float32 kernels vs float64 references: a few ulps of accumulated rounding on O(1) values.
ATOL = 1e-5


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9),
       k=st.integers(1, 3), s=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pooling_matches_reference(n, c, h, w, k, s, seed):
    k = min(k, h, w)
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    np.testing.assert_array_equal(pool.maxpool2d(x, k, k, s, s), ref.max_pool2d(x, (k, k), (s, s)))
    np.testing.assert_allclose(pool.avgpool2d(x, k, k, s, s), ref.avg_pool2d(x, (k, k), (s, s)), atol=ATOL)


def test_max_pool_works_on_integers_for_the_quantized_path():
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 6, 6)).astype(np.int8)
    np.testing.assert_array_equal(pool.maxpool2d(x, 2, 2, 2, 2), ref.max_pool2d(x, (2, 2), (2, 2)))


def test_activations_match_reference():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 30
    np.testing.assert_array_equal(elementwise.relu(x), np.maximum(x, 0))
    np.testing.assert_allclose(elementwise.sigmoid(x), 1 / (1 + np.exp(-x.astype(np.float64))), atol=1e-7)
    z = x.reshape(100, 10)
    np.testing.assert_allclose(elementwise.softmax_rows(z), ref.softmax(z), atol=1e-6)
    np.testing.assert_allclose(elementwise.log_softmax_rows(z), np.log(ref.softmax(z)), atol=1e-4)


def test_softmax_is_stable_for_huge_scores():
    z = np.array([[1e30, 0.0, -1e30], [88.0, 89.0, 90.0]], np.float32)
    p = elementwise.softmax_rows(z)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    assert p[0, 0] == 1.0


@pytest.fixture(scope="module")
def net():
    return microcnn.lenet(seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).random((40, 1, 28, 28), dtype=np.float32)


def test_lenet_matches_float64_reference(net, images):
    assert net.num_parameters == 61_706
    assert net.nbytes == 61_706 * 4
    np.testing.assert_allclose(net.predict(images), ref.lenet_forward(net.state_dict(), images), atol=ATOL)


def test_predict_batches_equal_one_pass(net, images):
    np.testing.assert_allclose(net.predict(images, batch_size=7), net.forward(images), atol=1e-6)
    assert net.predict_classes(images).shape == (40,)


def test_predict_input_forms(net, images):
    one = net.predict(images[:1])
    np.testing.assert_array_equal(net.predict(images[0]), one)          # (C, H, W)
    np.testing.assert_array_equal(net.predict(images[0, 0]), one)       # (H, W)
    fortran = np.asfortranarray(images)
    np.testing.assert_allclose(net.predict(fortran), net.predict(images), atol=1e-7)
    strided = np.repeat(images, 2, axis=0)[::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_allclose(net.predict(strided), net.predict(images), atol=1e-7)
    pixels = np.round(images * 255).astype(np.uint8)
    np.testing.assert_allclose(net.predict(pixels), net.predict(pixels / np.float32(255)), atol=1e-7)
    np.testing.assert_allclose(net.predict(images.astype(np.float64)), net.predict(images), atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 28, 28, 1), np.float32), r"expected shape \(N, 1, 28, 28\), found \(2, 28, 28, 1\)"),
    (np.zeros((2, 1, 32, 32), np.float32), r"found \(2, 1, 32, 32\)"),
    (np.zeros((0, 1, 28, 28), np.float32), "empty batch"),
    (np.zeros((2, 1, 28, 28), np.int64), "found dtype int64"),
    (np.zeros((2, 1, 28, 28), bool), "found dtype bool"),
    (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN/Inf"),
])
def test_predict_rejects_bad_input(net, bad, message):
    with pytest.raises(InputError, match=message):
        net.predict(bad)


def test_nan_error_names_the_image(net, images):
    x = images.copy()
    x[13, 0, 3, 4] = np.inf
    with pytest.raises(InputError, match="first in image 13"):
        net.predict(x)


def test_trace_records_every_layer(net, images):
    records = net.trace(images[:5])
    assert [r.name for r in records] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3",
                                         "relu3", "flatten", "fc1", "relu4", "fc2", "softmax"]
    assert [r.output.shape[1:] for r in records][:3] == [(6, 28, 28), (6, 28, 28), (6, 14, 14)]
    assert all(r.seconds >= 0 for r in records)
    np.testing.assert_array_equal(records[-1].output, net.predict(images[:5]))
    np.testing.assert_allclose(net.logits(images[:5]), records[-2].output)


def test_state_dict_round_trip_and_all_or_nothing_loading(images):
    a, b = microcnn.lenet(seed=1), microcnn.lenet(seed=2)
    before = b.state_dict()
    bad = a.state_dict()
    bad["11.bias"] = np.zeros(11, np.float32)
    with pytest.raises(InputError, match=r"11.bias expected shape \(10,\), found \(11,\)"):
        b.load_state_dict(bad)
    for k, v in b.state_dict().items():  # nothing was copied before the error
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(InputError, match="missing"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "0.weight"})
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.predict(images), a.predict(images))


def test_load_state_dict_bumps_weight_versions():
    net = microcnn.lenet(seed=1)
    versions = [p.version for p in net.parameters()]
    net.load_state_dict(net.state_dict())
    assert [p.version for p in net.parameters()] == [v + 1 for v in versions]


def test_config_round_trip(net, images):
    clone = Sequential.from_config(net.config())
    clone.load_state_dict(net.state_dict())
    np.testing.assert_array_equal(clone.predict(images), net.predict(images))
    with pytest.raises(InputError, match="unknown layer type 'Upsample'"):
        Sequential.from_config({"layers": [{"type": "Upsample"}]})
    with pytest.raises(InputError, match="bad arguments for Linear"):
        Sequential.from_config({"layers": [{"type": "Linear", "inputs": 3}]})


def test_summary_table(net):
    table = net.summary()
    assert list(table.columns) == ["Layer", "Type", "Output Shape", "Parameters"]
    assert table["Parameters"].sum() == 61_706
    assert table.iloc[6]["Output Shape"] == (120, 1, 1)


def test_layer_argument_errors():
    with pytest.raises(InputError, match="stride"):
        layers.Conv2d(1, 2, 3, stride=0)
    with pytest.raises(InputError, match="kernel_size"):
        layers.MaxPool2d((2, 2, 2))
    with pytest.raises(InputError, match=r"expected input \(N, 3, H, W\), found \(1, 2, 8, 8\)"):
        layers.Conv2d(3, 4, 3).forward(np.zeros((1, 2, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"expected input \(N, 120\)"):
        layers.Linear(120, 84).forward(np.zeros((1, 100), np.float32))
    with pytest.raises(InputError, match="expected Layer objects"):
        Sequential(layers.ReLU(), "relu")


@settings(max_examples=15, deadline=None)
@given(c=st.integers(1, 4), o=st.integers(1, 5), k=st.integers(1, 4), s=st.integers(1, 2),
       p=st.integers(0, 2), hw=st.integers(4, 10), bias=st.booleans(), seed=st.integers(0, 999))
def test_conv_layer_matches_reference(c, o, k, s, p, hw, bias, seed):
    rng = np.random.default_rng(seed)
    layer = layers.Conv2d(c, o, k, stride=s, padding=p, bias=bias, rng=rng)
    x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
    b = layer.bias.data if bias else None
    expected = ref.conv2d(x, layer.weight.data, b, (s, s), (p, p))
    got = layer.forward(x)
    assert got.shape == expected.shape == (2, o, *layer.output_shape((c, hw, hw))[1:])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_linear_and_sigmoid_and_avgpool_layers():
    rng = np.random.default_rng(0)
    lin = layers.Linear(7, 3, rng=rng)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_allclose(lin.forward(x), ref.linear(x, lin.weight.data, lin.bias.data), atol=ATOL)
    img = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(layers.Sigmoid().forward(img), 1 / (1 + np.exp(-img.astype(float))), atol=1e-6)
    np.testing.assert_allclose(layers.AvgPool2d(3, 2).forward(img), ref.avg_pool2d(img, (3, 3), (2, 2)),
                               atol=ATOL)


def _layer_by_layer(net, x):
    for layer in net.layers:  # the unfused path: every layer checks and computes on its own
        x = layer.forward(x)
    return x


def test_small_batches_run_as_one_program_with_the_same_bits(images):
    from microcnn.network import PROGRAM_MAX_BATCH

    net = microcnn.lenet(seed=11)
    for n in (1, 3, PROGRAM_MAX_BATCH - 1):
        first = net.forward(images[:n])  # checked, fused path; compiles the program for (1, 28, 28)
        assert net._program is not None and net._program.sample_shape == (1, 28, 28)
        again = net.forward(images[:n])  # the program
        assert np.array_equal(again, first)
        assert np.array_equal(again, _layer_by_layer(net, images[:n]))


def test_program_follows_weight_layer_and_algorithm_changes(images):
    net = microcnn.lenet(seed=12)
    x = images[:1]
    net.forward(x), net.forward(x)
    other = microcnn.lenet(seed=13)
    net.load_state_dict(other.state_dict())  # in place, versions bumped
    np.testing.assert_array_equal(net.forward(x), _layer_by_layer(other, x))
    net.forward(x)
    np.testing.assert_array_equal(net.forward(x), _layer_by_layer(other, x))
    net.layers[0].weight.data = net.layers[0].weight.data * 2  # a new array, no version bump
    np.testing.assert_array_equal(net.forward(x), _layer_by_layer(net, x))
    net.layers[-1] = layers.Sigmoid()  # the layer list changed: no program has a Sigmoid op
    np.testing.assert_array_equal(net.forward(x), _layer_by_layer(net, x))
    assert net._program is None
    net.layers[-1] = layers.Softmax()
    net.set_conv_algorithm("winograd")  # an algorithm the program does not run
    np.testing.assert_allclose(net.forward(x), _layer_by_layer(net, x), atol=1e-6)
    assert net._program is None


def test_program_is_only_used_for_what_it_was_built_for(images):
    net = microcnn.lenet(seed=14)
    net.forward(images[:2])
    ref = _layer_by_layer(net, images[:2])
    np.testing.assert_allclose(net.forward(images[:2].astype(np.float64)), ref, atol=1e-6)
    np.testing.assert_array_equal(net.forward(np.asfortranarray(images[:2])), ref)
    with pytest.raises(InputError, match="smaller than the kernel"):
        net.forward(np.ascontiguousarray(images[:2, :, :20, :20]))  # another shape: checked again
