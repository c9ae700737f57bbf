"""The worked example of notebook 03 (``quant.explain.requantization_example``) and the seeded calibration
sweep of notebook 02, against independent references: exact integer and rational arithmetic in plain
Python, NumPy rounding of the FP32 weights, the network's own integer kernel and its FP32 output."""

from fractions import Fraction

import numpy as np
import pytest

from microcnn import analysis as A
from microcnn.bench import build_precision
from microcnn.errors import InputError
from microcnn.quant import calibrate
from microcnn.quant.explain import requantization_example


@pytest.fixture(scope="module")
def int8(bundled, mnist_train):
    return build_precision(bundled, "int8", calibrate(bundled, mnist_train[0][:5000], method="mse",
                                                      samples=100, seed=0, progress=False))


@pytest.mark.parametrize("image, unit", [(0, None), (1, 5), (7, 40)])
def test_requantization_example_numbers(bundled, int8, mnist_test, image, unit):
    x = mnist_test[0][image]
    ex = requantization_example(bundled, int8, x, layer="fc1", unit=unit)
    trace = {r.name: r.output for r in bundled.trace(x[None])}
    if unit is None:  # default: the unit with the largest FP32 output
        assert ex["Unit"] == int(np.argmax(trace["relu4"][0]))
    u = ex["Unit"]
    s_x, z_x, s_w = ex["s_x (input scale)"], ex["z_x (input zero point)"], ex["s_w (weight scale)"]
    # the input grid values, recovered from the quantized network's dequantized trace (independent path)
    q_trace = {r.name: r.output for r in int8.trace(x[None])}
    q_x = np.rint(q_trace["flatten"][0].astype(np.float64) / s_x).astype(np.int64) + z_x
    # the integer weights: nearest rounding of the FP32 weights on the channel's scale
    fc1 = bundled.layers[bundled.names.index("fc1")]
    q_w = np.clip(np.rint(fc1.weight.data[u].astype(np.float64) / s_w), -128, 127).astype(np.int64)
    acc = int(sum(int(a) * int(b) for a, b in zip(q_x - z_x, q_w, strict=True))) + ex["q_b (int32 bias)"]
    assert ex["acc (int32 accumulator)"] == acc and ex["K (inputs)"] == 120
    m, m0, n = ex["M = s_x s_w / s_y"], ex["M0"], ex["n (shift)"]
    assert m == pytest.approx(s_x * s_w / ex["s_y (output scale)"], rel=1e-12)
    assert 2 ** 30 <= m0 < 2 ** 31 and abs(Fraction(m0, 2 ** n) - Fraction(m)) <= Fraction(1, 2 ** (n + 1))
    # round(acc * M0 / 2^n), half-way up, in exact rational arithmetic
    exact = Fraction(acc * m0, 2 ** n)
    assert ex["round(acc * M)"] == int(np.floor(exact + Fraction(1, 2)))
    q_y = min(max(ex["round(acc * M)"] + ex["z_y (output zero point)"], 0), 255)
    assert ex["q_y (clamped)"] == q_y == ex["q_y (network kernel)"]
    # the network's own output, and FP32 within a couple of output steps
    assert ex["y = s_y (q_y - z_y)"] == pytest.approx(float(q_trace["relu4"][0, u]), rel=1e-6)
    assert abs(ex["y = s_y (q_y - z_y)"] - ex["y (FP32 network)"]) < 3 * ex["s_y (output scale)"]
    assert ex["y (FP32 network)"] == pytest.approx(float(trace["relu4"][0, u]))


def test_requantization_example_refuses_other_layers(bundled, int8, mnist_test):
    for layer in ("fc2", "conv1", "nope"):
        with pytest.raises(InputError, match=r"a dense layer with an integer output, one of \['fc1'\]"):
            requantization_example(bundled, int8, mnist_test[0][0], layer=layer)


def test_seeded_sweep_counts_errors_per_seed(bundled, mnist_train, mnist_test):
    train = mnist_train[0][:200]
    images, labels = mnist_test[0][:300], mnist_test[1][:300]
    sweep = A.calibration_sweep(bundled, train, images, labels, sizes=(10,), methods=("minmax",),
                                precisions=("int4",), seeds=(0, 1, 2))
    assert list(sweep["Seed"]) == [0, 1, 2] and (sweep["Test Images"] == 300).all()
    for row in sweep.to_dict("records"):
        cal = calibrate(bundled, train, method="minmax", samples=10, seed=row["Seed"], progress=False)
        wrong = int((build_precision(bundled, "int4", cal).predict_classes(images) != labels).sum())
        assert row["Errors"] == wrong and row["Accuracy (%)"] == pytest.approx(100 * (1 - wrong / 300))
    assert A.sweep_pivot(sweep, "Errors").iloc[0, 0] == np.median(sweep["Errors"])
    with pytest.raises(InputError, match="seeds"):
        A.calibration_sweep(bundled, train, images, labels, sizes=(10,), seeds=())
