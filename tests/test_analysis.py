"""microcnn.analysis tables against independent references: a counting loop for confusion matrices,
the calibration's own per-tensor ranges, quantized accuracies recomputed call by call, and operation
counts worked out by hand for LeNet-5 (the per-pair figures also appear in kernels/conv.py)."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import microcnn
from microcnn import analysis as A
from microcnn.errors import InputError
from microcnn.quant import calibrate, quantize


@pytest.fixture(scope="module")
def small_net():
    return microcnn.lenet(seed=1)


# ------------------------------------------------------------------------------ confusion matrix
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), max_size=60))))
def test_confusion_matrix_counts_every_pair(case):
    k, pairs = case
    labels = np.array([t for t, _ in pairs], np.int64)
    predicted = np.array([p for _, p in pairs], np.int32)
    expected = np.zeros((k, k), np.int64)
    for t, p in pairs:
        expected[t, p] += 1
    table = A.confusion_matrix(labels, predicted, num_classes=k)
    np.testing.assert_array_equal(table.to_numpy(), expected)
    assert table.index.name == "True" and table.columns.name == "Predicted"
    assert list(table.index) == list(range(k)) == list(table.columns)


def test_confusion_matrix_of_a_network_matches_its_accuracy(bundled, mnist_test):
    images, labels = mnist_test[0][:500], mnist_test[1][:500]
    table = A.confusion_matrix(labels, bundled.predict_classes(images))
    assert table.to_numpy().sum() == 500
    assert np.trace(table.to_numpy()) / 500 == pytest.approx(bundled.accuracy(images, labels), abs=0)
    np.testing.assert_array_equal(table.sum(axis=1).to_numpy(), np.bincount(labels, minlength=10))


@pytest.mark.parametrize("labels, predicted", [
    ([0, 1], [0]),                     # lengths differ
    ([0, 10], [0, 1]),                 # label out of range
    ([0, 1], [0, -1]),                 # prediction out of range
    ([0.0, 1.0], [0, 1]),              # not integers
])
def test_confusion_matrix_refuses_bad_input(labels, predicted):
    with pytest.raises(InputError, match="confusion_matrix"):
        A.confusion_matrix(np.array(labels), np.array(predicted))


# ------------------------------------------------------------------------------ calibration ranges
@pytest.fixture(scope="module")
def calibrations(small_net, mnist_train):
    return A.calibrate_methods(small_net, mnist_train[0][:300], methods=("minmax", "percentile", "mse"),
                               samples=40, seed=3)


def test_calibrate_methods_is_calibrate_per_method(small_net, mnist_train, calibrations):
    assert list(calibrations) == ["minmax", "percentile", "mse"]
    direct = calibrate(small_net, mnist_train[0][:300], method="mse", samples=40, seed=3, progress=False)
    for method, cal in calibrations.items():
        assert cal.method == method and cal.samples == 40
        np.testing.assert_array_equal(cal.images, direct.images)  # every method sees the same images
    assert calibrations["mse"].range("pool2", 4) == direct.range("pool2", 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_calibration_ranges_are_each_calibrations_ranges(calibrations, bits):
    tensors = ["input", "pool1", "relu4"]
    table = A.calibration_ranges(calibrations, bits, tensors)
    assert list(table.columns[:2]) == ["Tensor", "Method"]
    assert list(table["Tensor"]) == [t for t in tensors for _ in calibrations]
    assert list(table["Method"]) == list(calibrations) * len(tensors)
    for row in table.to_dict("records"):
        obs = calibrations[row["Method"]].observer(row["Tensor"])
        assert (row["Range Lo"], row["Range Hi"]) == obs.range(bits)
        assert row["Min"] == obs.min_val and row["Max"] == obs.max_val
    full = A.calibration_ranges(calibrations, bits)
    assert list(dict.fromkeys(full["Tensor"])) == next(iter(calibrations.values())).names


def test_calibration_ranges_refuses_unknown_tensors(calibrations):
    with pytest.raises(InputError, match="conv9"):
        A.calibration_ranges(calibrations, 8, ["conv9"])
    with pytest.raises(InputError, match="non-empty dict"):
        A.calibration_ranges({}, 8)
    with pytest.raises(InputError, match="methods"):
        A.calibrate_methods(None, None, methods=("median",))


# ------------------------------------------------------------------------------ calibration sweep
def test_calibration_sweep_accuracies(bundled, mnist_train, mnist_test):
    train = mnist_train[0][:200]
    images, labels = mnist_test[0][:300], mnist_test[1][:300]
    sweep = A.calibration_sweep(bundled, train, images, labels, sizes=(10, 20),
                                methods=("minmax", "percentile"), precisions=("int8", "int4"), seed=5)
    assert list(sweep.columns) == A.SWEEP_COLUMNS
    assert len(sweep) == 2 * 2 * 2
    bits = {"INT8": (8, 8), "INT4": (4, 4)}
    for row in sweep.to_dict("records"):
        cal = calibrate(bundled, train, method=row["Method"], samples=row["Calibration Images"], seed=5,
                        progress=False)
        q = quantize(bundled, cal, *bits[row["Precision"]])
        expected = 100 * np.mean(q.forward(images).argmax(axis=1) == labels)
        assert row["Accuracy (%)"] == pytest.approx(expected, abs=1e-9)
    wide = A.sweep_pivot(sweep)
    assert list(wide.index) == ["minmax", "percentile"]
    assert list(wide.columns) == [("INT8", 10), ("INT4", 10), ("INT8", 20), ("INT4", 20)]
    for row in sweep.to_dict("records"):
        assert wide.loc[row["Method"], (row["Precision"], row["Calibration Images"])] == row["Accuracy (%)"]


@pytest.mark.parametrize("kwargs, match", [
    ({"sizes": (10, 500)}, "exceeds"),
    ({"sizes": (0,)}, "sizes"),
    ({"sizes": (10,), "precisions": ("fp32",)}, "precisions"),
    ({"methods": ("avg",)}, "methods"),
])
def test_calibration_sweep_refuses_bad_settings(small_net, mnist_train, kwargs, match):
    with pytest.raises(InputError, match=match):
        A.calibration_sweep(small_net, mnist_train[0][:100], mnist_train[0][:10], mnist_train[1][:10],
                            **kwargs)


# ------------------------------------------------------------------------------ conv cost
def test_conv_cost_table_for_lenet():
    table = A.conv_cost_table(microcnn.lenet())
    assert list(table["Layer"]) == ["conv1", "conv2", "conv3"]
    assert list(table["Input"]) == ["1x28x28", "6x14x14", "16x5x5"]
    assert list(table["Output"]) == ["6x28x28", "16x10x10", "120x1x1"]
    # Direct: O*C*25*OH*OW.  conv1: 6*1*25*784; conv2: 16*6*25*100; conv3: 120*16*25*1.
    assert list(table["Direct (MACs)"]) == [117600, 240000, 48000]
    # Winograd F(2x2, 5x5): 36 products per 2x2 tile and channel pair: 14*14, 5*5 and 1*1 tiles.
    assert list(table["Winograd (mults)"]) == [6 * 196 * 36, 96 * 25 * 36, 1920 * 36]
    # FFT products per channel pair (kernels/conv.py docstring): 2176, 448, 60 on 32x32, 14x14, 5x5 grids.
    assert list(table["FFT Grid"]) == ["32x32", "14x14", "5x5"]
    assert list(table["FFT Products (MACs)"]) == [6 * 2176, 96 * 448, 1920 * 60]
    transforms = [7 * 2.5 * 1024 * 10, 22 * 2.5 * 196 * math.log2(196), 136 * 2.5 * 25 * math.log2(25)]
    np.testing.assert_allclose(table["FFT Transforms (flops)"], transforms, rtol=1e-12)
    np.testing.assert_allclose(table["FFT / Direct"],
                               (table["FFT Products (MACs)"] + np.array(transforms) / 2) /
                               table["Direct (MACs)"], rtol=1e-12)


def test_conv_cost_table_strided_and_refusals():
    net = microcnn.Sequential(microcnn.Conv2d(3, 4, 3, stride=2, padding=1), microcnn.ReLU(),
                              input_shape=(3, 9, 9))
    row = A.conv_cost_table(net).iloc[0]
    assert row["Output"] == "4x5x5" and row["Direct (MACs)"] == 4 * 3 * 9 * 25
    assert math.isnan(row["Winograd (mults)"])  # stride 2: Winograd cannot run it
    assert row["FFT Grid"] == "11x11" and row["FFT Products (MACs)"] == 4 * 4 * 3 * 11 * 6
    with pytest.raises(InputError, match="input_shape"):
        A.conv_cost_table(microcnn.Sequential(microcnn.Conv2d(1, 1, 3)))
    with pytest.raises(InputError, match="no Conv2d"):
        A.conv_cost_table(microcnn.Sequential(microcnn.Flatten(), microcnn.Linear(4, 2),
                                              input_shape=(1, 2, 2)))
    assert isinstance(A.conv_cost_table(microcnn.lenet()), pd.DataFrame)


def test_conv_precision_table_compares_the_same_fused_group():
    per_layer = pd.DataFrame({
        "Layer": ["conv1", "relu1", "pool1", "conv3", "relu3", "flatten", "fc1"],
        "Type": ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Flatten", "Linear"],
        "FP32 Time (ms)": [4.0, 1.0, 1.0, 2.0, 0.5, 0.1, 0.3],
        "INT8 Time (ms)": [3.0, 0.0, 0.0, 1.0, 0.0, 0.1, 0.2],
    })
    table = A.conv_precision_table(per_layer)
    assert table["Layer"].tolist() == ["conv1", "conv3"]
    assert table["FP32 im2col (ms)"].tolist() == [6.0, 2.5]   # conv + relu + pool, conv + relu
    assert table["INT8 im2col (ms)"].tolist() == [3.0, 1.0]
    assert table["Speedup"].tolist() == [2.0, 2.5]
