"""Quantizing networks with the issue-13 layers: what the integer stages cannot run is refused or kept
in FP32, never run wrongly (the integer max pool takes kernel and stride only; dilation has no integer
kernel). BatchNorm folding and grouped convolutions: tests/test_quant_graph.py."""

import numpy as np
import pytest

from microcnn import Conv2d, Flatten, InputError, Linear, MaxPool2d, ReLU, Sequential
from microcnn.quant import calibrate, quantize


def _images(n=64, hw=12, seed=0):
    return np.random.default_rng(seed).random((n, 1, hw, hw), dtype=np.float32)


def _net(pool: MaxPool2d, conv2: Conv2d | None = None, flat: int = 0) -> Sequential:
    rng = np.random.default_rng(1)
    conv2 = conv2 or Conv2d(4, 4, 3, padding=1, rng=rng)
    x = _images(1)
    body = Sequential(Conv2d(1, 4, 3, rng=rng), ReLU(), pool, conv2, ReLU())
    flat = int(np.prod(body.predict(x).shape[1:])) if not flat else flat
    return Sequential(*body.layers, Flatten(), Linear(flat, 10, rng=rng), input_shape=(1, 12, 12))


@pytest.mark.parametrize("pool", [MaxPool2d(3, 2, padding=1), MaxPool2d(2, 2, ceil_mode=True),
                                  MaxPool2d((2, 3), (2, 1), padding=(1, 1), ceil_mode=True)])
def test_padded_and_ceil_mode_pools_run_in_fp32_between_integer_layers(pool):
    net, x = _net(pool), _images()
    q = quantize(net, calibrate(net, x, progress=False), weight_bits=8, act_bits=8)
    kinds = [s.kind for s in q.stages]
    assert kinds.count("float") == 1 and "qmaxpool2d" not in kinds  # the pool is an FP32 stage
    convs = [s for s in q.stages if s.kind == "qconv2d"]
    assert len(convs) == 2 and all(s.pool is None for s in convs)  # and never fused into a conv
    ref, out = net.logits(x), q.logits(x)
    # INT8 on a random 3-layer net: within 3 % of the logits' range, same class for >= 90 % of images
    assert np.abs(out - ref).max() <= 0.03 * np.ptp(ref)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_plain_pools_stay_integer():
    net, x = _net(MaxPool2d(2)), _images()
    q = quantize(net, calibrate(net, x, progress=False))
    assert [s.pool for s in q.stages if s.kind == "qconv2d"][0] is not None  # conv1+relu+pool fused


@pytest.mark.parametrize("conv2", [Conv2d(4, 4, 3, padding=2, dilation=2),
                                   Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)])
def test_dilated_convs_are_refused_unless_kept_in_fp32(conv2):
    net, x = _net(MaxPool2d(2), conv2), _images()
    cal = calibrate(net, x, progress=False)
    refusal = r"conv2 is a dilated Conv2d .*layer_bits=\{'conv2': 32\}"
    with pytest.raises(InputError, match=refusal):
        quantize(net, cal)
    q = quantize(net, cal, layer_bits={"conv2": 32})
    kept = [s for s in q.stages if s.kind == "float" and s.layers == (3,)]
    assert len(kept) == 1
    ref = net.logits(x)
    assert np.abs(q.logits(x) - ref).max() <= 0.03 * np.ptp(ref)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convs_run_in_integers(groups):
    net, x = _net(MaxPool2d(2), Conv2d(4, 4, 3, padding=1, groups=groups)), _images()
    q = quantize(net, calibrate(net, x, progress=False))
    assert [s.groups for s in q.stages if s.kind == "qconv2d"] == [1, groups]
    ref = net.logits(x)
    assert np.abs(q.logits(x) - ref).max() <= 0.03 * np.ptp(ref)
