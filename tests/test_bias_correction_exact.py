"""Empirical bias correction (``quant/quantize.py``) recomputed independently: for each weighted layer,
the corrected bias is the FP32 bias plus the per-channel mean gap between the FP32 layer's output on
FP32 inputs and the uncorrected integer accumulators (NumPy int64, ``tests/test_quant_kernels``) on the
quantized network's own inputs (the NumPy simulation of the stages before it). A tiny non-square
network: a padded (2, 3) convolution fused with ReLU and a (2, 1) pool, a Linear without bias, a last
Linear with float logits."""

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU
from microcnn.network import Sequential
from microcnn.quant import calibrate, quantize
from microcnn.quant.qlayers import ACC_LIMIT, QConv2d, QLinear
from microcnn.quant.quantize import quantize_bias
from microcnn.quant.rounding import gptq_round, input_gram
from tests.test_quant_kernels import conv_acc_ref
from tests.test_quant_network import simulate


def _nets():
    rng = np.random.default_rng(4)
    yield Sequential(Conv2d(2, 3, (2, 3), padding=(1, 0), rng=rng), ReLU(), MaxPool2d((2, 1)), Flatten(),
                     Linear(36, 5, bias=False, rng=rng), ReLU(), Linear(5, 4, rng=rng), input_shape=(2, 5, 6))
    # ends with a convolution and its ReLU: nothing after them to fuse
    yield Sequential(Conv2d(2, 4, (2, 2), padding=(0, 1), rng=rng), ReLU(), Conv2d(4, 3, (3, 1), rng=rng),
                     ReLU(), input_shape=(2, 5, 6))


@pytest.fixture(scope="module")
def setups():
    # values in [-0.5, 1.5): the input's zero point is not 0 (after a ReLU it is)
    images = np.random.default_rng(4).random((60, 2, 5, 6), dtype=np.float32) * 2 - np.float32(0.5)
    return [(net, calibrate(net, images, method="minmax", samples=40, progress=False, seed=2))
            for net in _nets()]


@pytest.fixture(scope="module")
def setup(setups):
    return setups[0]


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
            assert stage.pool is None or stage.pool == ((2, 1), (2, 1))
            acc = conv_acc_ref(x_quant, stage.in_act.zero_point, stage.weight_values, before.bias_q,
                               stage.stride, stage.padding)
            scale, axes = stage.acc_scale[None, :, None, None], (0, 2, 3)
        else:
            centred = x_quant.astype(np.int64) - stage.in_act.zero_point
            acc = centred @ stage.weight_values.T.astype(np.int64)
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
    # One weight range for both ("mse"): the default "output" range is chosen with the bias correction's
    # shift taken out (tests/test_weight_range_choice.py), so its weights may differ from the plain ones.
    plain = quantize(net, cal, *bits, per_channel=per_channel, bias_correction=False, weight_clipping="mse")
    qnet = quantize(net, cal, *bits, per_channel=per_channel, bias_correction=True, weight_clipping="mse")
    assert qnet.settings["bias_correction"] is True and plain.settings["bias_correction"] is False
    weighted = [s for s in qnet.stages if isinstance(s, QConv2d | QLinear)]
    assert [s.layers for s in weighted] == [(0, 1, 2), (4, 5), (6,)]
    assert [s.relu for s in weighted] == [True, True, False] and weighted[0].pool == ((2, 1), (2, 1))
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



def test_a_network_ending_in_a_convolution_is_corrected_too(setups):
    net, cal = setups[1]
    plain = quantize(net, cal, 8, 4, bias_correction=False, weight_clipping="mse")
    qnet = quantize(net, cal, 8, 4, weight_clipping="mse")  # bias correction is the default
    weighted = [s for s in qnet.stages if isinstance(s, QConv2d)]
    assert [(s.layers, s.relu, s.pool) for s in weighted] == [((0, 1), True, None), ((2, 3), True, None)]
    for stage, want in zip(weighted, expected_biases(net, cal, qnet, plain), strict=True):
        np.testing.assert_array_equal(stage.bias_q, want)


def test_gptq_rounds_each_layer_on_the_quantized_networks_own_inputs(setup):
    net, cal = setup
    qnet = quantize(net, cal, 4, 8, rounding="gptq", bias_correction=False)
    assert qnet.stages[1].in_act.zero_point != 0
    for k, stage in enumerate(qnet.stages):
        if not isinstance(stage, QConv2d | QLinear):
            continue
        layer = net.layers[stage.layers[0]]
        x_quant = simulate(qnet.stages[:k], cal.images)
        x_in = (x_quant.astype(np.float32) - stage.in_act.zero_point) * np.float32(stage.in_act.scale)
        want = gptq_round(layer.weight.data, stage.weight_scale, 4, input_gram(layer, x_in))
        np.testing.assert_array_equal(stage.weight_values.reshape(want.shape), want)


def test_quantize_bias_rounds_in_accumulator_units_up_to_half_the_int32_range():
    in_scale, w_scale = 0.5, np.array([0.25, 2.0, 1.0], np.float32)
    b = np.array([0.0625, -1.5, 0.75])  # 0.5, -1.5, 1.5 units: half to even
    q = quantize_bias(b, in_scale, w_scale)
    assert q.dtype == np.int32 and q.tolist() == [0, -2, 2]
    half = ACC_LIMIT // 2  # 2**30 - 1
    ones = np.array([1.0, 1.0], np.float32)
    assert quantize_bias(np.array([half * 0.5, -3.0]), 0.5, ones).tolist() == [half, -6]
    with pytest.raises(InputError, match=r"bias too large for int32 accumulators at these scales "
                                         r"\(max 1.07e\+09\)"):
        quantize_bias(np.array([-(half + 1) * 0.5, 1.0]), 0.5, ones)
    assert quantize_bias(np.zeros(0), 1.0, np.zeros(0, np.float32)).shape == (0,)
