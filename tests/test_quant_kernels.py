"""Integer kernels, bit-exact against NumPy int64 references of the same arithmetic."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from microcnn.errors import InputError
from microcnn.kernels import integer as ki
from microcnn.kernels.packing import pack_bits, unpack_bits
from microcnn.quant.params import ActQuant, fixed_point_multiplier
from microcnn.quant.qlayers import QLinear

RNG = np.random.default_rng(1234)


# -- NumPy references -------------------------------------------------------------------------------
def requant_ref(acc, m0, shift, zp, lo, hi):
    """y = (acc * m0 + 2**(shift-1)) >> shift (int64, arithmetic shift), + zp, clamped to [lo, hi]."""
    acc, m0, shift = (np.asarray(a, np.int64) for a in (acc, m0, shift))
    y = (acc * m0 + (np.int64(1) << (shift - 1))) >> shift
    return np.clip(y + zp, lo, hi)


def conv_acc_ref(x, zp, w, bias, stride, padding, pool=None):
    """int64 accumulators (N, O, OH, OW) of sum (x - zp) * w + bias, then optional max pooling."""
    (sh, sw), (ph, pw) = stride, padding
    xc = np.pad(x.astype(np.int64) - zp, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    kh, kw = w.shape[2:]
    win = sliding_window_view(xc, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    acc = np.einsum("nchwij,ocij->nohw", win, w.astype(np.int64)) + bias.astype(np.int64)[None, :, None, None]
    if pool is not None:
        (pkh, pkw), (psh, psw) = pool
        acc = sliding_window_view(acc, (pkh, pkw), axis=(2, 3))[:, :, ::psh, ::psw].max(axis=(4, 5))
    return acc


def finish_ref(acc, mode, m0, shift, fmult, zp, lo, hi, axis):
    shape = [1] * acc.ndim
    shape[axis] = -1
    m0, shift, fmult = m0.reshape(shape), shift.reshape(shape), fmult.reshape(shape)
    if mode == ki.MODE_DEQUANT:  # real value of the accumulator clamped to [lo, hi]
        return np.clip(acc, lo, hi).astype(np.float32) * fmult
    if mode == ki.MODE_FIXEDPOINT:
        return requant_ref(acc, m0, shift, zp, lo, hi).astype(np.uint8)
    y = np.rint(acc.astype(np.float32) * fmult).astype(np.int64) + zp  # float32 product, half to even
    return np.clip(y, lo, hi).astype(np.uint8)


def packed(w, bits):
    flat = np.ascontiguousarray(w, np.int8).reshape(-1)
    return pack_bits(flat, 4) if bits == 4 else flat.view(np.uint8)


def multipliers(o, lo=1e-4, hi=1e-2):
    real = RNG.uniform(lo, hi, o)
    m0, shift = fixed_point_multiplier(real)
    return m0, shift, real.astype(np.float32)


# -- requantization ---------------------------------------------------------------------------------
def test_requantize_bit_exact_including_extremes_and_ties():
    acc = np.concatenate([RNG.integers(-2**31, 2**31, 1995), [-2**31, 2**31 - 1, 0, 1, -1, 3, -3]])
    acc = acc.astype(np.int32).reshape(-1, 7)
    m0, shift, _ = multipliers(7, 1e-9, 0.9)
    m0[0], shift[0] = 1 << 30, 31  # M = 0.5: exact ties at odd acc round towards +inf
    for zp, lo, hi in [(0, 0, 255), (17, 17, 255), (128, 0, 255), (3, 0, 15)]:
        out = ki.requantize(acc, m0, shift, zp, lo, hi)
        np.testing.assert_array_equal(out, requant_ref(acc, m0, shift, zp, lo, hi))
    tie = ki.requantize(np.array([[3, -3, 5, -5]], np.int32), np.full(4, 1 << 30, np.int32),
                        np.full(4, 31, np.int32), 100, 0, 255)
    np.testing.assert_array_equal(tie, [[102, 99, 103, 98]])  # 1.5 -> 2, -1.5 -> -1, 2.5 -> 3, -2.5 -> -2


def test_requantize_saturates():
    acc = np.array([[2**31 - 1, -2**31, 1000, -1000]], np.int32)
    m0, shift = fixed_point_multiplier(np.full(4, 0.5))
    np.testing.assert_array_equal(ki.requantize(acc, m0, shift, 10, 10, 255), [[255, 10, 255, 10]])


def test_quantize_u8_matches_numpy():
    scale = np.float32(0.0371)
    # the clamp runs before the zero point is added: -0.0 (rint of -0.4), and x / scale overflowing
    # float32 to +-inf, must still give the codes of clamping the sum
    x = np.concatenate([RNG.normal(0, 2, 5000), [-1e9, 1e9, 0.5, 1.5, 2.5, -0.4 * scale, 3e38, -3e38],
                        np.arange(-300, 300) * scale]).astype(np.float32)
    for zp, qmax in [(0, 255), (100, 255), (7, 15)]:
        with np.errstate(over="ignore"):
            ref = np.clip(np.rint(x / scale) + zp, 0, qmax).astype(np.uint8)
        np.testing.assert_array_equal(ki.quantize_u8(x, float(scale), zp, qmax), ref)
        back = ki.dequantize_u8(ref, float(scale), zp)
        np.testing.assert_array_equal(back, (ref.astype(np.float32) - zp) * scale)


# -- int4 packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 15, 16, 301])
def test_int4_pack_unpack_round_trip(n):
    values = np.resize(np.arange(-8, 8, dtype=np.int8), n)
    RNG.shuffle(values)
    p = pack_bits(values, 4)
    assert p.dtype == np.uint8 and p.size == (n + 1) // 2
    np.testing.assert_array_equal(unpack_bits(p, 4, n, True), values)
    # layout: element 2i in the low nibble of byte i, element 2i+1 in the high nibble (two's complement)
    low = (p & 0xF).astype(np.int8)
    np.testing.assert_array_equal(np.where(low >= 8, low - 16, low), values[0::2])


def test_int4_extremes_and_int8_bytes():
    extremes = np.array([-8, 7, 7, -8, 0, -1], np.int8)
    np.testing.assert_array_equal(pack_bits(extremes, 4), [0x78, 0x87, 0xF0])
    np.testing.assert_array_equal(unpack_bits(pack_bits(extremes, 4), 4, 6, True), extremes)
    full = np.arange(-128, 128, dtype=np.int8)
    np.testing.assert_array_equal(unpack_bits(full.view(np.uint8), 8, 256, True), full)


# -- convolution and dense kernels ------------------------------------------------------------------
CONV_CASES = [
    # N, C, H, W, O, kh, kw, stride, padding, pool, weight bits, activation bits
    (3, 1, 12, 12, 6, 5, 5, (1, 1), (2, 2), ((2, 2), (2, 2)), 8, 8),   # odd C: kernel rows paired
    (2, 6, 9, 9, 16, 5, 5, (1, 1), (0, 0), None, 8, 8),                # even C: channels paired
    (2, 3, 10, 11, 5, 3, 3, (2, 2), (1, 1), None, 4, 8),              # vertical stride: explicit patches
    (2, 4, 9, 10, 3, 3, 2, (1, 2), (1, 0), ((3, 3), (2, 2)), 4, 4),   # horizontal stride, 3x3/2 pooling
    (2, 5, 7, 7, 4, 3, 3, (1, 1), (1, 1), ((2, 2), (1, 1)), 8, 4),    # odd C, overlapping pooling
]


def _conv_inputs(n, c, h, w, o, kh, kw, wbits, abits):
    qmax = 2**abits - 1
    x = RNG.integers(0, qmax + 1, (n, c, h, w)).astype(np.uint8)
    x.flat[:7] = qmax  # extremes
    half = 2 ** (wbits - 1)
    wq = RNG.integers(-half, half, (o, c, kh, kw)).astype(np.int8)
    wq.flat[:3] = [-half, half - 1, -half]
    bias = RNG.integers(-5000, 5000, o).astype(np.int32)
    return x, int(RNG.integers(0, qmax + 1)), wq, bias


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("mode", [ki.MODE_FIXEDPOINT, ki.MODE_FLOAT, ki.MODE_DEQUANT])
def test_qconv2d_bit_exact(case, mode):
    n, c, h, w, o, kh, kw, stride, padding, pool, wbits, abits = case
    x, zp_in, wq, bias = _conv_inputs(n, c, h, w, o, kh, kw, wbits, abits)
    m0, shift, fmult = multipliers(o)
    zp, lo, hi = 3, 3, 2**abits - 1
    if mode == ki.MODE_DEQUANT:  # real output with a fused ReLU: accumulators clamped at 0
        lo, hi = 0, 2**31 - 1
    acc = conv_acc_ref(x, zp_in, wq, bias, stride, padding, pool)
    expected = finish_ref(acc, mode, m0, shift, fmult, zp, lo, hi, axis=1)
    out_q = np.empty(acc.shape, np.uint8) if mode != ki.MODE_DEQUANT else np.empty((0,) * 4, np.uint8)
    out_f = np.empty(acc.shape, np.float32) if mode == ki.MODE_DEQUANT else np.empty((0,) * 4, np.float32)
    flat_pool = (1, 1, 1, 1) if pool is None else (*pool[0], *pool[1])
    ki.qconv2d(x, zp_in, packed(wq, wbits), wbits, (kh, kw), stride, padding, flat_pool, bias, m0, shift,
               fmult, mode, zp, lo, hi, out_q, out_f)
    np.testing.assert_array_equal(out_f if mode == ki.MODE_DEQUANT else out_q, expected)


def test_qconv2d_parallel_path_matches_reference():
    x, zp_in, wq, bias = _conv_inputs(64, 2, 8, 8, 4, 3, 3, 8, 8)
    m0, shift, fmult = multipliers(4)
    acc = conv_acc_ref(x, zp_in, wq, bias, (1, 1), (1, 1))
    out = np.empty(acc.shape, np.uint8)
    ki.qconv2d(x, zp_in, packed(wq, 8), 8, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), bias, m0, shift, fmult,
               ki.MODE_FIXEDPOINT, 0, 0, 255, out, np.empty((0,) * 4, np.float32))
    np.testing.assert_array_equal(out, finish_ref(acc, ki.MODE_FIXEDPOINT, m0, shift, fmult, 0, 0, 255, 1))


@pytest.mark.parametrize("n, f, o, wbits", [(5, 7, 3, 8), (300, 120, 84, 8), (9, 33, 10, 4)])
@pytest.mark.parametrize("mode", [ki.MODE_FIXEDPOINT, ki.MODE_DEQUANT])
def test_qlinear_bit_exact(n, f, o, wbits, mode):
    x = RNG.integers(0, 256, (n, f)).astype(np.uint8)
    half = 2 ** (wbits - 1)
    wq = RNG.integers(-half, half, (o, f)).astype(np.int8)
    bias = RNG.integers(-9000, 9000, o).astype(np.int32)
    m0, shift, fmult = multipliers(o)
    acc = (x.astype(np.int64) - 11) @ wq.T.astype(np.int64) + bias
    lo, hi = (0, 255) if mode != ki.MODE_DEQUANT else (-2**31, 2**31 - 1)  # logits: no clamp
    expected = finish_ref(acc, mode, m0, shift, fmult, 5, lo, hi, axis=1)
    out_q = np.empty((n, o), np.uint8)
    out_f = np.empty((n, o), np.float32)
    ki.qlinear(x, 11, packed(wq, wbits), wbits, bias, m0, shift, fmult, mode, 5, lo, hi, out_q, out_f)
    np.testing.assert_array_equal(out_f if mode == ki.MODE_DEQUANT else out_q, expected)


def test_worst_case_accumulation_does_not_overflow_int32():
    # The largest K the int32 accumulator admits for 8-bit activations and weights: K * 255 * 128 < 2**31.
    k = (2**31 - 1) // (255 * 128)
    x = np.full((2, k), 255, np.uint8)
    for wval, zp_out in [(-128, 255), (127, 0)]:
        wq = np.full((1, k), wval, np.int8)
        bias = np.zeros(1, np.int32)
        m0, shift = fixed_point_multiplier(np.array([2.0**-24]))
        out = np.empty((2, 1), np.uint8)
        ki.qlinear(x, 0, packed(wq, 8), 8, bias, m0, shift, np.ones(1, np.float32), ki.MODE_FIXEDPOINT,
                   zp_out, 0, 255, out, np.empty((0, 0), np.float32))
        exact = k * 255 * wval  # |exact| < 2**31, no wrap-around
        assert abs(exact) < 2**31
        np.testing.assert_array_equal(out, requant_ref(np.full((2, 1), exact), m0, shift, zp_out, 0, 255))
    # the layer check admits that K and refuses one more
    act = ActQuant(0.01, 0, 8)
    QLinear((0,), np.full((1, k), -128, np.int8), 8, np.ones(1), np.zeros(1, np.int32), act, act, False)
    with pytest.raises(InputError, match="exceeds int32"):
        QLinear((0,), np.full((1, k + 1), -128, np.int8), 8, np.ones(1), np.zeros(1, np.int32), act, act,
                False)


_NARROW_SIMD_CHECK = """
import numpy as np
from microcnn.kernels import integer as ki, simd
from tests.test_quant_kernels import CONV_CASES, test_qconv2d_bit_exact, test_qlinear_bit_exact
assert simd.SIMD == {width}, simd.SIMD
test_qconv2d_bit_exact(CONV_CASES[0], ki.MODE_FIXEDPOINT)
test_qconv2d_bit_exact(CONV_CASES[2], ki.MODE_DEQUANT)
test_qlinear_bit_exact(9, 33, 10, 4, ki.MODE_FIXEDPOINT)
from tests.test_gemm import test_register_kernel_equals_gemm_acc_bit_for_bit
test_register_kernel_equals_gemm_acc_bit_for_bit()  # the FP32 micro-kernel at this width too
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("width", [0, 8])
def test_narrower_simd_paths_are_bit_exact(width, tmp_path):
    """The AVX2 and portable micro-kernels, integer and FP32 (this machine would pick AVX-512), against
    the same references."""
    import os
    import subprocess
    import sys

    from microcnn.kernels.simd import SIMD

    if width > SIMD:
        pytest.skip(f"host has no {width}-lane integer SIMD")
    env = {**os.environ, "MICROCNN_SIMD": str(width), "NUMBA_CACHE_DIR": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _NARROW_SIMD_CHECK.format(width=width)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
