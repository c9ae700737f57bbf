"""Accuracy and memory targets on the bundled LeNet-5: official 10k MNIST test set, 100 calibration
images drawn from the training split (never the test images)."""

import numpy as np
import pytest

from microcnn.quant import calibrate, quantize

# (weight bits, activation bits) -> allowed accuracy loss in percentage points
TARGETS = {(8, 8): 0.05, (4, 8): 0.1, (4, 4): 1.0}


@pytest.fixture(scope="module")
def evaluated(bundled, mnist_test, mnist_train):
    images, labels = mnist_test
    calibration = calibrate(bundled, mnist_train[0], method="mse", samples=100, progress=False, seed=0)
    assert calibration.samples == 100
    assert not any(np.array_equal(c, images[0]) for c in calibration.images)
    fp32 = bundled.accuracy(images, labels)
    models = {bits: quantize(bundled, calibration, *bits) for bits in TARGETS}
    return fp32, {bits: (m, m.accuracy(images, labels)) for bits, m in models.items()}, calibration


@pytest.mark.parametrize("bits", list(TARGETS))
def test_accuracy_targets(evaluated, bits):
    fp32, results, _ = evaluated
    assert fp32 > 0.95  # a trained LeNet-5
    accuracy = results[bits][1]
    message = f"W{bits[0]}A{bits[1]}: {accuracy:.4f} vs FP32 {fp32:.4f}"
    assert 100 * (fp32 - accuracy) <= TARGETS[bits], message


def test_memory_targets(bundled, evaluated):
    _, results, _ = evaluated
    assert bundled.nbytes == 246_824
    assert results[(8, 8)][0].nbytes <= 0.26 * bundled.nbytes
    assert results[(4, 8)][0].nbytes <= 0.14 * bundled.nbytes
    assert results[(4, 4)][0].nbytes <= 0.14 * bundled.nbytes


def test_mixed_precision_layers_keep_accuracy(bundled, evaluated, mnist_test):
    """FP32 layers between integer ones (dequantize / requantize around them) lose nothing either."""
    images, labels = mnist_test
    fp32, _, calibration = evaluated
    qnet = quantize(bundled, calibration, 4, 8, layer_bits={"conv2": 32, "fc1": 8})
    assert qnet.layer_precisions() == {"conv1": "W4A8", "conv2": "FP32", "conv3": "W4A8", "fc1": "W8A8",
                                       "fc2": "W4A8"}
    assert 100 * (fp32 - qnet.accuracy(images, labels)) <= 0.1
