"""The compiled quantized program (``kernels.program``'s integer ops) on networks whose stages LeNet does
not have: an unfused ReLU on integer codes (a ReLU after a max pool that the convolution absorbed) and
non-square fused pools. The program must give the stage-by-stage path's bits, and both the NumPy int64
simulation of the stages (``tests.test_quant_network.simulate``); issue 19, third kernel round."""

import numpy as np
import pytest

from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU
from microcnn.network import Sequential
from microcnn.quant import calibrate, quantize
from tests.test_quant_network import simulate


def _check_program(net, x, kinds, bits):
    cal = calibrate(net, x, samples=len(x), progress=False, seed=1)
    q = quantize(net, cal, *bits)
    assert [st.kind for st in q.stages] == kinds
    sample = x[:3].copy()
    layered = q.forward(sample)  # stage by stage; builds the program for this shape
    assert q._program is not None
    compiled = q.forward(sample)
    np.testing.assert_array_equal(compiled.view(np.uint32), layered.view(np.uint32))
    np.testing.assert_allclose(compiled, simulate(q.stages, sample), rtol=1e-6, atol=1e-7)
    return q


def test_integer_ops_quantize_relu_pool_dequantize_by_their_own_parameters():
    """OP_QUANTIZE (to a 4-bit stage: codes <= 15), OP_QRELU (a clamp at the zero point, not at code 0),
    a non-square OP_QMAXPOOL and OP_DEQUANTIZE (minus the zero point), run as one program. (The
    quantizer gives an unfused ReLU codes that are already >= its zero point, so a network cannot show
    a wrong clamp: the ops are checked on their own.)"""
    from microcnn.kernels import program as kp

    rng = np.random.default_rng(191)
    x = (rng.standard_normal((2, 3, 6, 9)) * 3).astype(np.float32)
    scale, zp, qmax = np.array([0.25], np.float32), 6, 15
    ops = np.array([kp.integer_row(kp.OP_QUANTIZE, scale=scale, zero_point=zp, qmax=qmax),
                    kp.integer_row(kp.OP_QRELU, zero_point=zp),
                    kp.op_row(kp.OP_QMAXPOOL, kernel=(2, 3), stride=(1, 2)),
                    kp.integer_row(kp.OP_DEQUANTIZE, scale=scale, zero_point=zp)], np.int64)
    q = np.clip(np.rint(x / scale[0]) + zp, 0, qmax)
    assert (q == qmax).any() and (q < zp).any()  # both clamps have something to do
    q = np.maximum(q, zp)
    pooled = np.lib.stride_tricks.sliding_window_view(q, (2, 3), axis=(2, 3))[:, :, ::1, ::2].max(axis=(4, 5))
    want = ((pooled - zp) * scale[0]).astype(np.float32)
    got = kp.run_program(x, ops)
    np.testing.assert_array_equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("pool", [((2, 3), (1, 2)), ((3, 2), (2, 1))])
def test_non_square_fused_pools_in_the_program(pool):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 2, 11, 12)).astype(np.float32)
    oh = (11 - 3 + 1 - pool[0][0]) // pool[1][0] + 1
    ow = (12 - 2 + 1 - pool[0][1]) // pool[1][1] + 1
    net = Sequential(Conv2d(2, 5, (3, 2), rng=rng), ReLU(), MaxPool2d(*pool), Flatten(),
                     Linear(5 * oh * ow, 4, rng=rng))
    _check_program(net, x, ["quantize", "qconv2d", "flatten", "qlinear"], (8, 8))
