"""Empirical bias correction (``quant/quantize.py``) recomputed independently: for each weighted layer,
the corrected bias is the FP32 bias plus the per-channel mean gap between the FP32 layer's output on
FP32 inputs and the uncorrected integer accumulators (NumPy int64, ``tests/test_quant_kernels``) on the
quantized network's own inputs (the NumPy simulation of the stages before it). A tiny non-square
network: a padded (2, 3) convolution fused with ReLU and a (2, 1) pool, a Linear without bias, a last
Linear with float logits."""

import numpy as np
import pytest

from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU
from microcnn.network import Sequential
from microcnn.quant import calibrate, quantize
from microcnn.quant.qlayers import QConv2d, QLinear
from tests.test_quant_kernels import conv_acc_ref
from tests.test_quant_network import simulate


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(4)
    net = Sequential(Conv2d(2, 3, (2, 3), padding=(1, 0), rng=rng), ReLU(), MaxPool2d((2, 1)), Flatten(),
                     Linear(36, 5, bias=False, rng=rng), ReLU(), Linear(5, 4, rng=rng), input_shape=(2, 5, 6))
    images = rng.random((60, 2, 5, 6), dtype=np.float32)
    cal = calibrate(net, images, method="minmax", samples=40, progress=False, seed=2)
    return net, cal


def expected_biases(net, cal, qnet, plain):
    """Corrected int32 biases of every weighted stage of ``qnet`` (``plain``: the same quantization
    without bias correction, whose biases are the uncorrected ones)."""
    x = cal.images
    out = []
    for k, (stage, before) in enumerate(zip(qnet.stages, plain.stages, strict=True)):
        if not isinstance(stage, QConv2d | QLinear):
            continue
        first = stage.layers[0]
        x_float = x
        for layer in net.layers[:first]:
            x_float = layer.forward(x_float)
        reference = net.layers[first].forward(x_float).astype(np.float64)
        x_quant = simulate(qnet.stages[:k], x)
        if isinstance(stage, QConv2d):
            acc = conv_acc_ref(x_quant, stage.in_act.zero_point, stage.weight_values, before.bias_q, stage.stride,
                               stage.padding)
            scale, axes = stage.acc_scale[None, :, None, None], (0, 2, 3)
        else:
            acc = (x_quant.astype(np.int64) - stage.in_act.zero_point) @ stage.weight_values.T.astype(np.int64)
            acc += before.bias_q
            scale, axes = stage.acc_scale[None, :], (0,)
        preactivation = acc.astype(np.float32) * scale  # the real value of each accumulator
        bias = net.layers[first].bias
        bias = bias.data.astype(np.float64) if bias is not None else np.zeros(len(stage.bias_q))
        corrected = bias + (reference - preactivation).mean(axis=axes)
        weight_scale = np.broadcast_to(stage.weight_scale, stage.bias_q.shape).astype(np.float64)
        out.append(np.rint(corrected / (np.float64(stage.in_act.scale) * weight_scale)).astype(np.int32))
    return out


@pytest.mark.parametrize("bits, per_channel", [((4, 4), True), ((8, 8), True), ((4, 8), False)])
def test_corrected_biases_match_the_independent_recomputation(setup, bits, per_channel):
    net, cal = setup
    plain = quantize(net, cal, *bits, per_channel=per_channel, bias_correction=False)
    qnet = quantize(net, cal, *bits, per_channel=per_channel, bias_correction=True)
    assert qnet.settings["bias_correction"] is True and plain.settings["bias_correction"] is False
    weighted = [s for s in qnet.stages if isinstance(s, QConv2d | QLinear)]
    assert [s.layers for s in weighted] == [(0, 1, 2), (4, 5), (6,)]
    expected = expected_biases(net, cal, qnet, plain)
    for stage, want in zip(weighted, expected, strict=True):
        np.testing.assert_array_equal(stage.bias_q, want)
    # only the biases move: weights, scales and requantization are those of the uncorrected network
    for a, b in zip(qnet.stages, plain.stages, strict=True):
        assert a.kind == b.kind and a.layers == b.layers
        if isinstance(a, QConv2d | QLinear):
            np.testing.assert_array_equal(a.weight_values, b.weight_values)
            np.testing.assert_array_equal(a.weight_scale, b.weight_scale)
            assert a.in_act == b.in_act and a.out_act == b.out_act
    assert any((a.bias_q != b.bias_q).any() for a, b in zip(weighted, plain.stages[1:], strict=False))

