"""Quantized inference that pays off (issue 15): the compiled small-batch program against the NumPy
simulation of the integer pipeline, the u8 x s8 kernels at their extremes (zero points 0 and 255,
the largest admissible reduction, codes above the stage's range), every word layout and the
small-batch dense layout against NumPy int64 references, the wrappers' precondition checks, every
SIMD path in its own process, and the bench's thread table."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

import microcnn
from microcnn import bench
from microcnn.errors import InputError
from microcnn.kernels import integer as ki
from microcnn.quant import calibrate, quantize
from tests.test_quant_kernels import conv_acc_ref, finish_ref, multipliers, requant_ref
from tests.test_quant_network import simulate

RNG = np.random.default_rng(15)
NO_CLAMP = (-2**31, 2**31 - 1)


@pytest.fixture(scope="module")
def lenet_cal(mnist_train):
    images, _ = mnist_train
    net = microcnn.lenet(seed=5)
    return net, calibrate(net, images[:300], samples=100, progress=False, seed=2), images[1000:1040]


# -- the compiled program ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(weight_bits=8, act_bits=8), dict(weight_bits=4, act_bits=8),
                                    dict(weight_bits=4, act_bits=4, requant="float")])
def test_program_matches_stage_path_bit_for_bit_and_numpy_simulation(lenet_cal, config):
    net, cal, images = lenet_cal
    qnet = quantize(net, cal, **config)
    for n in (1, 3, 31):
        x = images[:n].copy()
        layered = qnet.forward(x)  # stage by stage; builds the program for this sample shape
        assert qnet._program is not None
        compiled = qnet.forward(x)
        assert compiled.shape == layered.shape == (n, 10)
        np.testing.assert_array_equal(compiled.view(np.uint32), layered.view(np.uint32))
        np.testing.assert_allclose(compiled, simulate(qnet.stages, x), rtol=1e-6, atol=1e-7)
    assert qnet.predict(images[:1]).shape == (1, 10)


def test_program_runs_global_average_pooling_between_integer_layers(mnist_train):
    """An imported CNN's tail (conv, BatchNorm, ReLU, global average pooling, linear) compiles too: the
    pooling runs in float32 on the last convolution's real output, with the float stage's kernel."""
    from microcnn.kernels import program
    from microcnn.layers import BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, ReLU

    images = mnist_train[0][:140, :, 3:24, 5:27]  # non-square 21 x 22
    bn = BatchNorm2d(8)
    bn.running_mean[...] = RNG.normal(0, 0.2, 8)
    net = microcnn.Sequential(Conv2d(1, 8, 3, stride=2, padding=1, rng=np.random.default_rng(3)), bn, ReLU(),
                              GlobalAvgPool2d(), Flatten(), Linear(8, 10, rng=np.random.default_rng(4)),
                              input_shape=(1, 21, 22))
    qnet = quantize(net, calibrate(net, images[:100], progress=False), 8, 8)
    x = np.ascontiguousarray(images[100:140])
    layered = qnet.forward(x)  # 40 images: stage by stage
    small = np.concatenate([qnet.forward(x[i:i + 8]) for i in range(0, 40, 8)])
    assert qnet._program is not None
    assert program.OP_GLOBALAVG in qnet._program[3][:, program.CODE]
    np.testing.assert_array_equal(small.view(np.uint32), layered.view(np.uint32))
    np.testing.assert_allclose(small, simulate(qnet.stages, x), rtol=1e-6, atol=1e-6)


def test_program_is_rebuilt_when_stages_change_and_skipped_for_fp32_layers(lenet_cal):
    net, cal, images = lenet_cal
    qnet = quantize(net, cal, 8, 8)
    x = images[:2].copy()
    qnet.forward(x)
    first = qnet._program
    qnet.stages = list(qnet.stages)  # the same stages in a new list: the same program
    qnet.forward(x)
    assert qnet._program is first
    qnet.stages[-1] = copy.copy(qnet.stages[-1])  # another stage object: the program is rebuilt
    qnet.forward(x)
    assert qnet._program is not first and qnet._program[0] == qnet.stages
    mixed = quantize(net, cal, 8, 8, layer_bits={"conv2": 32})  # an FP32 layer: no program
    np.testing.assert_allclose(mixed.forward(x), simulate(mixed.stages, x), rtol=1e-6, atol=1e-7)
    assert mixed._program is None
    with pytest.raises(InputError, match="NaN"):
        bad = x.copy()
        bad[0, 0, 3, 3] = np.nan
        qnet.forward(bad)  # the program path refuses non-finite input as the stages do


# -- kernels at their extremes -----------------------------------------------------------------------
def _dense(x, zp, w, bias, mode, m0, shift, fmult, zp_out, lo, hi, qmax=255):
    n, o = len(x), len(w)
    out_q = np.empty((n, o) if mode != ki.MODE_DEQUANT else (0, 0), np.uint8)
    out_f = np.empty((n, o) if mode == ki.MODE_DEQUANT else (0, 0), np.float32)
    ki.linear_packed(x, ki.pack_linear(w, bias, zp, qmax),
                     ki.requant_params(m0, shift, fmult, mode, zp_out, lo, hi), out_q, out_f)
    return out_f if mode == ki.MODE_DEQUANT else out_q


@pytest.mark.parametrize("n", [1, 2, 3, 4, 40])  # < 4 rows: channels in lanes; else rows in lanes
@pytest.mark.parametrize("zp", [0, 255])
@pytest.mark.parametrize("wbits", [8, 4, 2])
def test_dense_bit_exact_at_extreme_zero_points(n, zp, wbits):
    f, o = 131, 70  # K not a multiple of 4, channels not a multiple of a vector
    half = 1 << (wbits - 1)
    x = RNG.choice([0, 1, 254, 255], (n, f)).astype(np.uint8)
    w = RNG.integers(-half, half, (o, f)).astype(np.int8)
    w[0], w[1] = -half, half - 1
    bias = RNG.integers(-2**20, 2**20, o).astype(np.int32)
    acc = (x.astype(np.int64) - zp) @ w.T.astype(np.int64) + bias
    m0, shift, fmult = multipliers(o)
    for mode, zp_out, lo, hi in [(ki.MODE_DEQUANT, 0, *NO_CLAMP), (ki.MODE_FIXEDPOINT, 255, 0, 255),
                                 (ki.MODE_FLOAT, 0, 0, 255)]:
        got = _dense(x, zp, w, bias, mode, m0, shift, fmult, zp_out, lo, hi)
        expected = finish_ref(acc, mode, m0, shift, fmult, zp_out, lo, hi, axis=1)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n", [1, 300])
def test_dense_worst_case_accumulation_is_exact_in_both_layouts(n):
    k = (2**31 - 1) // (255 * 128)  # the largest K the layers admit for W8A8
    for xval, zp, wval in [(255, 0, -128), (0, 255, -128), (255, 0, 127)]:
        x = np.full((n, k), xval, np.uint8)
        w = np.full((2, k), wval, np.int8)
        exact = (xval - zp) * wval * k
        bias = np.array([0, -np.sign(exact) * (2**31 - 1 - abs(exact))], np.int32)  # channel 1 at the edge
        got = _dense(x, zp, w, bias, ki.MODE_DEQUANT, np.zeros(2, np.int32), np.ones(2, np.int32),
                     np.ones(2, np.float32), 0, *NO_CLAMP)
        expected = np.tile([exact, exact + int(bias[1])], (n, 1))
        assert abs(expected).max() <= 2**31 - 1
        # float32(acc): a wrap-around (off by 2**32) shows; the edge value itself rounds in float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))


# C, H, W, kernel, stride, padding, pool: groups G = 4, 2, 1 of the wide layout, the strided layouts;
# horizontal words for the rows left over (kh % R) in the wide layout (G = 2 and, LeNet's first layer
# with 17 pooled columns -- two vector epilogue calls per row -- G = 1) and in the strided one (G = 1, 2)
GEOMETRIES = [(8, 9, 9, (3, 3), (1, 1), (1, 1), ((2, 2), (2, 2))),
              (2, 7, 10, (5, 2), (1, 1), (2, 0), None),
              (3, 11, 8, (4, 4), (1, 1), (0, 3), ((3, 2), (1, 2))),
              (4, 10, 11, (3, 3), (1, 2), (1, 1), ((2, 2), (2, 2))),
              (5, 12, 12, (5, 5), (2, 1), (2, 2), None),
              (1, 30, 34, (5, 5), (1, 1), (2, 2), ((2, 2), (2, 2))),
              (3, 9, 13, (5, 5), (1, 2), (1, 2), ((2, 2), (2, 2))),
              (6, 8, 9, (3, 3), (1, 2), (0, 1), None)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("zp", [0, 255])
def test_conv_every_layout_bit_exact_at_extreme_zero_points(geometry, zp):
    c, h, w_, kernel, stride, padding, pool = geometry
    o = 11  # one full block of 8 and a padded one
    x = RNG.choice([0, 255, 17], (3, c, h, w_)).astype(np.uint8)
    w = RNG.choice([-128, 127, 0, 5], (o, c, *kernel)).astype(np.int8)
    bias = RNG.integers(-2**16, 2**16, o).astype(np.int32)
    acc = conv_acc_ref(x, zp, w, bias, stride, padding, pool)
    flat_pool = (1, 1, 1, 1) if pool is None else (*pool[0], *pool[1])
    geo = ki.QConvGeometry(*kernel, *stride, *padding, *flat_pool)
    pk = ki.pack_conv(w, bias, stride[0], zp)
    out_f = np.empty(acc.shape, np.float32)
    ki.conv2d_packed(x, pk, geo, ki.requant_params(np.zeros(o), np.ones(o), np.ones(o), ki.MODE_DEQUANT, 0,
                                                   *NO_CLAMP), np.empty((0,) * 4, np.uint8), out_f)
    np.testing.assert_array_equal(out_f.astype(np.int64), acc)  # |acc| < 2**24: float32 is exact
    m0, shift, fmult = multipliers(o)
    out_q = np.empty(acc.shape, np.uint8)
    ki.conv2d_packed(x, pk, geo, ki.requant_params(m0, shift, fmult, ki.MODE_FIXEDPOINT, 128, 0, 255), out_q,
                     np.empty((0,) * 4, np.float32))
    np.testing.assert_array_equal(out_q, requant_ref(acc, m0[None, :, None, None], shift[None, :, None, None],
                                                     128, 0, 255))


def test_codes_above_the_stage_range_are_clamped_to_it():
    """A 4-bit stage reads codes 0..15; anything above is clamped (so the int32 bound holds)."""
    x = RNG.integers(0, 256, (ki.SMALL_ROWS + 1, 3, 6, 6)).astype(np.uint8)
    w = RNG.integers(-8, 8, (4, 3, 3, 3)).astype(np.int8)
    bias = np.zeros(4, np.int32)
    acc = conv_acc_ref(np.minimum(x, 15), 7, w, bias, (1, 1), (1, 1))
    out_f = np.empty(acc.shape, np.float32)
    ki.conv2d_packed(x, ki.pack_conv(w, bias, 1, 7, qmax=15), ki.QConvGeometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1),
                     ki.requant_params(np.zeros(4), np.ones(4), np.ones(4), ki.MODE_DEQUANT, 0, *NO_CLAMP),
                     np.empty((0,) * 4, np.uint8), out_f)
    np.testing.assert_array_equal(out_f.astype(np.int64), acc)
    flat = x.reshape(len(x), -1)
    wl = RNG.integers(-8, 8, (5, flat.shape[1])).astype(np.int8)
    for n in (1, ki.SMALL_ROWS + 1):  # both dense layouts: one row at a time, and rows along the lanes
        got = _dense(flat[:n], 7, wl, np.zeros(5, np.int32), ki.MODE_DEQUANT, np.zeros(5), np.ones(5),
                     np.ones(5), 0, *NO_CLAMP, qmax=15)
        np.testing.assert_array_equal(got.astype(np.int64),
                                      (np.minimum(flat[:n], 15).astype(np.int64) - 7) @ wl.T.astype(np.int64))


def test_wrappers_check_what_the_kernels_assume():
    w = np.ones((2, 3, 3, 3), np.int8)
    pk = ki.pack_conv(w, np.zeros(2, np.int32), 1, 0)
    geo = ki.QConvGeometry(3, 3, 1, 1, 0, 0, 1, 1, 1, 1)
    rq = ki.requant_params(np.ones(2), np.ones(2), np.ones(2), ki.MODE_FIXEDPOINT, 0, 0, 255)
    x = np.zeros((1, 3, 5, 5), np.uint8)
    none_f = np.empty((0,) * 4, np.float32)
    with pytest.raises(InputError, match="uint8"):
        ki.conv2d_packed(x.astype(np.float32), pk, geo, rq, np.empty((1, 2, 3, 3), np.uint8), none_f)
    with pytest.raises(InputError, match="C-contiguous"):
        ki.conv2d_packed(np.zeros((1, 3, 5, 10), np.uint8)[..., ::2], pk, geo, rq,
                         np.empty((1, 2, 3, 3), np.uint8), none_f)
    with pytest.raises(InputError, match="out_q"):
        ki.conv2d_packed(x, pk, geo, rq, np.empty((1, 2, 3, 4), np.uint8), none_f)
    with pytest.raises(InputError, match="words per channel"):  # packed for another vertical stride
        ki.conv2d_packed(x, ki.pack_conv(w, np.zeros(2, np.int32), 2, 0), geo, rq,
                         np.empty((1, 2, 3, 3), np.uint8), none_f)
    with pytest.raises(InputError, match="m0"):
        ki.conv2d_packed(x, pk, geo, rq._replace(m0=np.ones(3, np.int32)), np.empty((1, 2, 3, 3), np.uint8),
                         none_f)
    with pytest.raises(InputError, match="weights"):
        ki.pack_linear(np.full((2, 3), 300), np.zeros(2, np.int32), 0)
    with pytest.raises(InputError, match="zero point"):
        ki.pack_linear(np.ones((2, 3), np.int8), np.zeros(2, np.int32), 20, qmax=15)


# -- every SIMD path ---------------------------------------------------------------------------------
_PATH_CHECK = """
from microcnn.kernels import integer as ki, simd
import tests.test_qprogram as t
from tests.test_quant_kernels import CONV_CASES, test_qconv2d_bit_exact
assert (simd.SIMD, simd.VNNI) == ({width}, {vnni}), (simd.SIMD, simd.VNNI)
for case in CONV_CASES:
    test_qconv2d_bit_exact(case, ki.MODE_FIXEDPOINT)
for g in t.GEOMETRIES:
    t.test_conv_every_layout_bit_exact_at_extreme_zero_points(g, 255)
for n in (1, 40):
    t.test_dense_bit_exact_at_extreme_zero_points(n, 0, 8)
    t.test_dense_worst_case_accumulation_is_exact_in_both_layouts(n)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("width, vnni", [(16, False), (8, False), (8, True), (0, False)])
def test_every_simd_path_is_bit_exact(width, vnni, tmp_path):
    """AVX-512BW and AVX2 without VNNI (pmaddwd on even/odd bytes), VNNI at 8 lanes, portable IR; the
    default path (VNNI at 16 lanes on such hosts) runs in the tests above."""
    from microcnn.kernels.simd import SIMD, host_vnni

    if width > SIMD or (vnni and not host_vnni(width)):
        pytest.skip(f"host has no {width}-lane integer SIMD{' with VNNI' * vnni}")
    env = {**os.environ, "MICROCNN_SIMD": str(width), "MICROCNN_VNNI": "1" if vnni else "0",
           "NUMBA_CACHE_DIR": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _PATH_CHECK.format(width=width, vnni=vnni)
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# -- bench ------------------------------------------------------------------------------------------
def test_threads_table_times_every_precision_at_every_count():
    net = microcnn.lenet(seed=1)
    images = bench.random_images(16)
    table = bench.threads_table({"fp32": net, "again": net}, images, [1], repeats=1)
    assert list(table.columns) == ["Precision", "Threads", "Time (ms)", "Scaling", "Machine"]
    assert list(table["Precision"]) == ["FP32", "AGAIN"] and (table["Scaling"] == 1.0).all()
    assert (table["Machine"] == 1.0).all()
    assert (table["Time (ms)"] > 0).all()


def test_machine_loop_steps_every_row_once_per_step_whatever_the_thread_count(monkeypatch):
    import microcnn.timing as timing
    from microcnn.kernels.threads import pinned_threads

    start = np.linspace(-2, 2, 16 * 128, dtype=np.float32).reshape(16, 128)
    expected = start.copy()
    for _ in range(3):
        expected = expected * np.float32(0.999) + np.float32(0.001)
    monkeypatch.setattr(timing, "_LOOP_ROWS", start)
    for threads in (1, 2):
        with pinned_threads(threads):
            rows = timing.machine_loop(steps=3)
        np.testing.assert_array_equal(rows, expected)  # the same float32 operations in the same order
    assert timing._LOOP_ROWS is start and start[0, 0] == -2  # its input is left as it was
