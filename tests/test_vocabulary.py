"""The shared vocabulary: precisions (quant.precision), model/data resolution (resolve) and the one
output-size helper (kernels.shapes), each checked against an independent reference."""

import itertools

import numpy as np
import pytest
from numba import njit

from microcnn import resolve
from microcnn.errors import InputError
from microcnn.kernels.shapes import conv_output_size
from microcnn.quant import calibrate
from microcnn.quant.precision import (
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    build_precision,
    parse_precision,
    precision_of,
    precision_of_bits,
    stored_precision,
)


# -- precisions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, name, bits, label", [
    ("fp32", "fp32", (32, 32), "FP32"), ("FP32", "fp32", (32, 32), "FP32"),
    ("int8", "int8", (8, 8), "INT8"), ("w8a8", "int8", (8, 8), "INT8"), (" W8A8 ", "int8", (8, 8), "INT8"),
    ("w4a8", "w4a8", (4, 8), "W4A8"),
    ("int4", "int4", (4, 4), "W4A4"), ("W4A4", "int4", (4, 4), "W4A4"),
    ("w8a4", "w8a4", (8, 4), "W8A4"), ("w2a8", "w2a8", (2, 8), "W2A8"), ("W3A3", "w3a3", (3, 3), "W3A3"),
])
def test_parse_precision_names_aliases_and_wxay(text, name, bits, label):
    p = parse_precision(text)
    assert (p.name, (p.weight_bits, p.act_bits), p.label) == (name, bits, label)
    assert p.is_float == (name == "fp32")


@pytest.mark.parametrize("text", ["int3", "w4", "a8", "w4a8x", "fp16", "", "w1000a8"])
def test_parse_precision_refuses_anything_else(text):
    with pytest.raises(InputError, match="precision: expected one of fp32, int8, w4a8, int4 or wXaY"):
        parse_precision(text)


def test_named_precisions_are_one_per_bit_pair_and_in_table_order():
    assert list(PRECISIONS) == ["fp32", "int8", "w4a8", "int4"]
    assert QUANTIZED_PRECISIONS == ("int8", "w4a8", "int4")
    for p in PRECISIONS.values():
        assert precision_of_bits(p.weight_bits, p.act_bits) is p
    assert precision_of_bits(8, 4).name == "w8a4"


class _Settings:
    def __init__(self, settings):
        self.settings = settings


def test_precision_is_read_from_the_model_itself(bundled):
    assert stored_precision(bundled) is None and precision_of(bundled).name == "fp32"
    assert precision_of(_Settings({"weight_bits": 4, "act_bits": 4})).name == "int4"
    assert precision_of(_Settings({"weight_bits": 8, "act_bits": 4})).name == "w8a4"
    assert precision_of(_Settings({})).name == "fp32"  # storage-compressed: computes in FP32


def test_build_precision_quantizes_at_the_named_bit_widths(bundled, mnist_train):
    cal = calibrate(bundled, mnist_train[0][:32], method="minmax", samples=32, progress=False)
    assert build_precision(bundled, "fp32", cal) is bundled
    for name in QUANTIZED_PRECISIONS:
        q = build_precision(bundled, name, cal)
        p = PRECISIONS[name]
        assert (q.settings["weight_bits"], q.settings["act_bits"]) == (p.weight_bits, p.act_bits)
        assert precision_of(q) is p
    w8a4 = build_precision(bundled, parse_precision("w8a4"), cal)
    assert precision_of(w8a4).name == "w8a4"
    assert precision_of(build_precision(bundled, "w4a4", cal)).name == "int4"  # any spelling
    assert precision_of(build_precision(bundled, "w3a5", cal)).name == "w3a5"
    for text, what in (("w2a16", "activation"), ("w9a8", "weight"), ("w1a4", "weight")):
        with pytest.raises(InputError, match=f"{what} bits outside 2..8"):
            parse_precision(text)


# -- output sizes ------------------------------------------------------------------------------------
def _positions(size, kernel, stride, padding, dilation):
    """Count the window placements by sliding one: the reference the formula must agree with."""
    span = dilation * (kernel - 1) + 1
    return sum(1 for start in range(0, size + 2 * padding - span + 1, stride))


@njit(cache=False)
def _jitted(size, kernel, stride, padding, dilation):
    return conv_output_size(size, kernel, stride, padding, dilation)


def test_conv_output_size_counts_window_positions_in_python_and_numba():
    for size, kernel, stride, padding, dilation in itertools.product(
            (1, 2, 5, 7, 28), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2)):
        expected = _positions(size, kernel, stride, padding, dilation)
        if expected == 0:  # the window does not fit: callers refuse such inputs before asking
            continue
        assert conv_output_size(size, kernel, stride, padding, dilation) == expected
        assert _jitted(size, kernel, stride, padding, dilation) == expected
    assert conv_output_size(28, 5, padding=2) == 28 and conv_output_size(28, 2, 2) == 14


# -- model and data resolution ------------------------------------------------------------------------
def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_model_specs(tmp_path, bundled, mnist_train):
    assert _same_weights(resolve.load_model_spec("bundled"), bundled)
    assert _same_weights(resolve.load_model_spec("lenet"), bundled)
    assert not _same_weights(resolve.load_model_spec("fashion"), bundled)
    assert resolve.dataset_of("fashion") == "fashion-mnist" and resolve.dataset_of("bundled") == "mnist"
    raw, st = tmp_path / "w.raw", tmp_path / "w.safetensors"
    bundled.save(raw)
    bundled.save(st)
    assert _same_weights(resolve.load_model_spec(str(raw)), bundled)
    assert _same_weights(resolve.load_model_spec(str(st)), bundled)
    cal = calibrate(bundled, mnist_train[0][:16], method="minmax", samples=16, progress=False)
    q = build_precision(bundled, "w4a8", cal)
    q.save(tmp_path / "q.safetensors")
    loaded = resolve.load_model_spec(str(tmp_path / "q.safetensors"))
    assert precision_of(loaded).name == "w4a8"
    x = mnist_train[0][:8]
    np.testing.assert_array_equal(loaded.predict(x), q.predict(x))


def test_data_dir_prefers_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("MICROCNN_DATA", "/from/env")
    assert resolve.data_dir("/given") == "/given"
    assert resolve.data_dir(None) == "/from/env"
    monkeypatch.delenv("MICROCNN_DATA")
    assert resolve.data_dir(None) is None


def test_images_come_from_the_right_split_and_are_bounded(mnist_train, mnist_test):
    images, labels = resolve.load_test_images(7)
    np.testing.assert_array_equal(images, mnist_test[0][:7])
    np.testing.assert_array_equal(labels, mnist_test[1][:7])
    assert len(resolve.load_test_images()[0]) == len(mnist_test[0])
    cal = resolve.load_calibration_images(5)
    np.testing.assert_array_equal(cal, mnist_train[0][:5])
    with pytest.raises(InputError, match=r"--samples: expected at most 10000 \(the MNIST test split's "
                                         r"size\), found 10001"):
        resolve.load_test_images(10001, what="--samples")
    with pytest.raises(InputError, match="calibration: expected at most 3"):
        resolve.first(cal[:3], np.zeros(3), 4, "tiny", "calibration")
