"""Quantization parameters: range -> (scale, zero point), fake quantization, fixed-point multipliers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microcnn.errors import InputError
from microcnn.quant.params import (
    ActQuant,
    check_bits,
    fake_quantize,
    fixed_point_multiplier,
    qparams_from_range,
    qrange,
)

finite = st.floats(1e-3, 1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(lo=finite, hi=finite, bits=st.integers(2, 8))
def test_asymmetric_unsigned_grid_covers_range_and_zero(lo, hi, bits):
    lo = -lo  # lo <= 0 <= hi
    scale, zp = qparams_from_range(lo, hi, bits, symmetric=False, signed=False)
    qmax = 2**bits - 1
    assert scale == pytest.approx((hi - lo) / qmax, rel=1e-6)
    assert 0 <= zp <= qmax
    # real 0 is exactly a grid point, so ReLU clamps and zero padding are exact
    assert fake_quantize(np.array([0.0]), scale, zp, bits, signed=False)[0] == 0.0
    # every value of [lo, hi] is within half a step (plus the zero-point rounding) of its quantized value
    x = np.linspace(lo, hi, 101)
    err = np.abs(fake_quantize(x, scale, zp, bits, signed=False) - x)
    assert err.max() <= scale * 1.0 + 1e-9


@settings(max_examples=60, deadline=None)
@given(a=finite, b=finite, bits=st.integers(2, 8))
def test_symmetric_signed_scale_is_absmax_over_qmax(a, b, bits):
    scale, zp = qparams_from_range(-a, b, bits, symmetric=True, signed=True)
    assert zp == 0
    assert scale == pytest.approx(max(a, b) / (2 ** (bits - 1) - 1), rel=1e-6)
    x = np.linspace(-a, b, 57)
    assert np.abs(fake_quantize(x, scale, 0, bits, signed=True) - x).max() <= scale / 2 * (1 + 1e-6)


def test_per_channel_arrays_and_ranges_widened_to_zero():
    scale, zp = qparams_from_range(np.array([0.5, -2.0]), np.array([1.0, -1.0]), 8, symmetric=False,
                                   signed=False)
    # [0.5, 1] is widened to [0, 1]; [-2, -1] to [-2, 0]
    np.testing.assert_allclose(scale, [1 / 255, 2 / 255], rtol=1e-6)
    np.testing.assert_array_equal(zp, [0, 255])
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15)


@pytest.mark.parametrize("lo, hi", [(0.0, 0.0), (1.0, 0.5), (np.nan, 1.0), (0.0, np.inf)])
def test_bad_ranges_are_refused(lo, hi):
    with pytest.raises(InputError):
        qparams_from_range(lo, hi, 8, symmetric=False, signed=False)


def test_zero_range_channel_is_named():
    with pytest.raises(InputError, match="channel 1"):
        qparams_from_range(np.array([-1.0, 0.0]), np.array([1.0, 0.0]), 8, symmetric=True, signed=True)


@pytest.mark.parametrize("bits", [1, 9, 16, 3.0, True, "8"])
def test_bit_widths_outside_2_to_8_are_refused(bits):
    with pytest.raises(InputError):
        check_bits(bits)


@pytest.mark.parametrize("bits", [3, 16])
def test_kernel_bit_widths_are_4_or_8(bits):
    with pytest.raises(InputError, match="4, 8"):
        check_bits(bits, "weight_bits", (4, 8))


@settings(max_examples=100, deadline=None)
@given(m=st.floats(1e-12, 1e6, allow_nan=False))
def test_fixed_point_multiplier_represents_m(m):
    m0, shift = fixed_point_multiplier(m)
    m0, shift = int(m0[0]), int(shift[0])
    assert 1 <= shift <= 62
    if shift < 62:  # not capped: full 31-bit mantissa
        assert 2**30 <= m0 < 2**31
        assert abs(m0 * 2.0**-shift - m) <= m * 2.0**-30
    else:
        assert abs(m0 * 2.0**-shift - m) <= 2.0**-62


def test_fixed_point_multiplier_refuses_nonsense():
    for bad in (0.0, -1.0, np.nan, 2.0**31):
        with pytest.raises(InputError):
            fixed_point_multiplier(bad)


def test_act_quant_from_relu_range_has_zero_point_zero():
    q = ActQuant.from_range(0.0, 2.55, 8)
    assert q.zero_point == 0 and q.scale == pytest.approx(0.01) and q.qmax == 255
