"""The default weight range (``weight_clipping="output"``, quant/quantize.py) recomputed independently:
per output channel, of the MSE-searched range and the whole signed grid (``quantize_weight``'s "mse" and
"full"), the one whose layer output on the calibration images -- NumPy int64 accumulators on the
quantized network's own inputs, shifted by the mean gap that bias correction removes, after the fused
ReLU -- is closer to the FP32 layer's output on FP32 inputs. Tiny non-square networks of
tests/test_bias_correction_exact.py."""

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.quant import calibrate, quantize
from microcnn.quant.qlayers import QConv2d, QLinear
from microcnn.quant.quantize import _closer, quantize_bias, quantize_weight
from tests.test_bias_correction_exact import _nets
from tests.test_quant_kernels import conv_acc_ref
from tests.test_quant_network import simulate


def test_the_full_grid_puts_the_largest_weight_half_a_step_beyond_qmax():
    w = np.random.default_rng(1).normal(size=(5, 3, 2, 2))
    top = np.abs(w.reshape(5, -1)).max(axis=1)
    for bits in (2, 3, 4, 8):
        qmax = 2 ** (bits - 1) - 1
        q, scale, zp = quantize_weight(w, bits, per_channel=True, clipping="full")
        np.testing.assert_allclose(scale, top / (qmax + 0.5), rtol=1e-7)  # ONNX Runtime's 4-bit choice
        assert zp is None and q.min() >= -(qmax + 1) and q.max() <= qmax
        _, mse_scale, _ = quantize_weight(w, bits, per_channel=True, clipping="mse")
        assert not np.array_equal(mse_scale, scale)
    # asymmetric grids already span the whole grid: "full" is "minmax" there
    for a, b in zip(quantize_weight(w, 4, True, "full", symmetric=False),
                    quantize_weight(w, 4, True, "minmax", symmetric=False), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"weight_clipping: expected one of \('mse', 'minmax', 'full'\), "
                                         r"found 'output'"):
        quantize_weight(w, 4, clipping="output")  # needs data: quantize() makes that choice


def _accumulators_real(x_quant, in_act, layer, q, scale, bias):
    """Real value of the integer accumulators of ``layer`` with codes ``q`` and per-channel ``scale`` (the
    bias uncorrected), as the stages compute it: float32(acc) * float32(in_scale * scale)."""
    scale = np.broadcast_to(scale, (len(q),)).astype(np.float32)
    bias_q = quantize_bias(bias, in_act.scale, scale)
    acc_scale = (np.float64(in_act.scale) * scale.astype(np.float64)).astype(np.float32)
    if q.ndim == 4:
        acc = conv_acc_ref(x_quant, in_act.zero_point, q, bias_q, layer.stride, layer.padding)
        return acc.astype(np.float32) * acc_scale[None, :, None, None], (0, 2, 3)
    acc = (x_quant.astype(np.int64) - in_act.zero_point) @ q.T.astype(np.int64) + bias_q
    return acc.astype(np.float32) * acc_scale[None, :], (0,)


@pytest.mark.parametrize("bits, per_channel", [((4, 8), True), ((3, 3), True), ((8, 8), True),
                                               ((4, 4), False)])
def test_each_channel_takes_the_range_with_the_smaller_output_error(bits, per_channel):
    images = np.random.default_rng(4).random((60, 2, 5, 6), dtype=np.float32) * 2 - np.float32(0.5)
    taken = []
    for net in _nets():
        cal = calibrate(net, images, method="minmax", samples=40, progress=False, seed=2)
        qnet = quantize(net, cal, *bits, per_channel=per_channel)  # the default: "output", bias correction
        assert qnet.settings["weight_clipping"] == "output"
        for k, stage in enumerate(qnet.stages):
            if not isinstance(stage, QConv2d | QLinear):
                continue
            first = stage.layers[0]
            layer = net.layers[first]
            x_float = cal.images
            for prev in net.layers[:first]:
                x_float = prev.forward(x_float)
            reference = layer.forward(x_float).astype(np.float64)
            x_quant = simulate(qnet.stages[:k], cal.images)
            bias = (layer.bias.data.astype(np.float64) if layer.bias is not None
                    else np.zeros(len(stage.bias_q)))
            candidates, errors = [], []
            for clipping in ("mse", "full"):
                q, scale, _ = quantize_weight(layer.weight.data, bits[0], per_channel, clipping)
                out, axes = _accumulators_real(x_quant, stage.in_act, layer, q, scale, bias)
                out = out + (reference - out).mean(axis=axes, keepdims=True)  # what bias correction removes
                if stage.relu:
                    err = (np.maximum(reference, 0) - np.maximum(out, 0)) ** 2
                else:
                    err = (reference - out) ** 2
                candidates.append((q, np.broadcast_to(scale, (len(q),))))
                errors.append(err.mean(axis=axes))
            full = errors[1] < errors[0] if per_channel else np.full(len(errors[0]),
                                                                     errors[1].sum() < errors[0].sum())
            rows = full.reshape((-1,) + (1,) * (candidates[0][0].ndim - 1))
            want_q = np.where(rows, candidates[1][0], candidates[0][0])
            want_scale = np.where(full, candidates[1][1], candidates[0][1])
            np.testing.assert_array_equal(stage.weight_values.reshape(want_q.shape), want_q)
            np.testing.assert_array_equal(np.broadcast_to(stage.weight_scale, want_scale.shape), want_scale)
            taken.extend(full.tolist())
    assert any(taken) and not all(taken)  # both ranges are chosen somewhere: the choice is exercised


def test_gptq_and_other_clippings_keep_their_own_range():
    images = np.random.default_rng(4).random((60, 2, 5, 6), dtype=np.float32) * 2 - np.float32(0.5)
    net = next(_nets())
    cal = calibrate(net, images, method="minmax", samples=40, progress=False, seed=2)
    for options in ({"weight_clipping": "mse"}, {"rounding": "gptq"}):
        qnet = quantize(net, cal, 4, 8, **options)
        stage = next(s for s in qnet.stages if isinstance(s, QConv2d))
        np.testing.assert_array_equal(stage.weight_scale, quantize_weight(net.layers[0].weight.data, 4)[1])
    with pytest.raises(InputError, match=r"weight_clipping: expected one of \('output', 'mse', 'minmax', "
                                         r"'full'\), found 'best'"):
        quantize(net, cal, 4, 8, weight_clipping="best")


def _candidate(fill, zero_points):
    """(codes (3, 2, 1, 2), per-row scale, per-row zero point or None) with recognisable values."""
    zp = None if zero_points is None else np.asarray(zero_points, np.int32)
    return np.full((3, 2, 1, 2), fill, np.int8), np.full(3, fill / 10, np.float32), zp


@pytest.mark.parametrize("asymmetric", [False, True])
def test_closer_takes_each_row_from_the_smaller_error_and_ties_keep_the_first(asymmetric):
    first = _candidate(1, [4, 5, 6] if asymmetric else None)
    second = _candidate(2, [-4, -5, -6] if asymmetric else None)
    errors = [np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])]  # row 1 is a tie
    codes, scale, zp = _closer(first, second, errors, per_channel=True)
    assert codes.dtype == np.int8 and codes.shape == (3, 2, 1, 2)
    np.testing.assert_array_equal(codes[:, 0, 0, 0], [1, 1, 2])
    assert (codes == codes[:, :1, :1, :1]).all()  # whole rows, every position
    np.testing.assert_array_equal(scale, np.float32([0.1, 0.1, 0.2]))
    if asymmetric:
        assert zp.dtype == np.int32
        np.testing.assert_array_equal(zp, [4, 5, -6])
    else:
        assert zp is None


def test_closer_per_tensor_takes_the_whole_quantization_with_the_smaller_sum_ties_keep_the_first():
    first, second = _candidate(1, None), _candidate(2, None)
    tie = [np.array([1.0, 3.0]), np.array([2.0, 2.0])]
    assert _closer(first, second, tie, per_channel=False) is first
    assert _closer(first, second, [np.array([1.0, 3.0]), np.array([2.0, 1.9])], per_channel=False) is second
    assert _closer(first, second, [np.array([1.0, 0.0]), np.array([0.0, 1.5])], per_channel=False) is first
