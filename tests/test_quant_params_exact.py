"""Quantization parameters on the edges the mutation run found unchecked (docs/mutation-python.md):
per-channel axes of non-square tensors, the mantissa carry of fixed-point multipliers, every grid width,
and the refusals of shapes and scales that cannot be built. References are plain integer arithmetic."""

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.quant.params import (
    KERNEL_BITS,
    ActQuant,
    check_bits,
    fake_quantize,
    fixed_point_multiplier,
    qparams_from_range,
    qrange,
    quantize_values,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_is_the_twos_complement_and_unsigned_grid(bits):
    # independent reference: every integer representable in `bits` bits, enumerated
    unsigned = range(2**bits)
    signed = [v - 2**bits if v >= 2 ** (bits - 1) else v for v in unsigned]
    assert qrange(bits, signed=True) == (min(signed), max(signed))
    assert qrange(bits, signed=False) == (min(unsigned), max(unsigned))


@pytest.mark.parametrize("bits", [1, 9, 2.0])
def test_qrange_refuses_widths_outside_2_to_8(bits):
    with pytest.raises(InputError, match="bits"):
        qrange(bits, signed=True)


def test_kernel_widths_accept_exactly_2_to_8():
    accepted = []
    for bits in range(1, 17):
        try:
            accepted.append(check_bits(bits, "weight_bits", KERNEL_BITS))
        except InputError:
            pass
    assert accepted == [2, 3, 4, 5, 6, 7, 8]


def test_lo_and_hi_of_different_shapes_are_refused():
    with pytest.raises(InputError, match=r"shapes differ \(\(2,\) vs \(3,\)\)"):
        qparams_from_range(-np.ones(2), np.ones(3), 8, symmetric=False, signed=False)


def test_range_below_float32_is_refused_not_turned_into_a_zero_scale():
    with pytest.raises(InputError, match="float32"):
        qparams_from_range(0.0, 1e-300, 8, symmetric=False, signed=False)
    with pytest.raises(InputError, match="float32"):
        qparams_from_range(np.array([-1.0, -1e-300]), np.array([1.0, 1e-300]), 8, symmetric=True, signed=True)


def _reference_fake_quantize(x, scale, zero_point, bits, signed):
    qmin, qmax = qrange(bits, signed)
    q = np.clip(np.rint(x / scale) + zero_point, qmin, qmax)
    return q, (q - zero_point) * scale


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel_fake_quantize_along_each_axis_of_a_non_square_tensor(axis):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 2, size=(3, 5, 2, 4))
    n = x.shape[axis]
    scale = rng.uniform(0.01, 0.2, n)
    zero_point = rng.integers(0, 16, n)
    got = fake_quantize(x, scale, zero_point, 4, signed=False, axis=axis)
    got_q = quantize_values(x, scale, zero_point, 4, signed=False, axis=axis)
    for c in range(n):  # one channel at a time, with its own scalar parameters
        index = [slice(None)] * x.ndim
        index[axis] = c
        q, real = _reference_fake_quantize(x[tuple(index)], scale[c], zero_point[c], 4, signed=False)
        np.testing.assert_array_equal(got_q[tuple(index)], q)
        np.testing.assert_allclose(got[tuple(index)], real, rtol=0, atol=1e-15)


def test_one_element_parameter_arrays_without_axis_are_per_tensor():
    # quantize_weight(per_channel=False) produces scale arrays of shape (1,)
    x = np.linspace(-1.3, 2.1, 35).reshape(5, 7)
    q, real = _reference_fake_quantize(x, 0.05, 3, 8, signed=True)
    np.testing.assert_array_equal(quantize_values(x, np.array([0.05]), np.array([3]), 8, True), q)
    np.testing.assert_allclose(fake_quantize(x, np.array([0.05]), np.array([3]), 8, True), real, atol=1e-15)


def _nearest_m0(m: float) -> tuple[int, int]:
    """Exact reference: the shift with 2**30 <= m * 2**shift < 2**31, then m0 = round(m * 2**shift)
    (half up; no float reaches a tie here); a result of 2**31 becomes 2**30 with one shift less."""
    exact = Fraction(m)
    shift = 0
    while exact * 2**shift < 2**30:
        shift += 1
    while exact * 2**shift >= 2**31:
        shift -= 1
    m0 = int(exact * 2**shift + Fraction(1, 2))
    if m0 == 2**31:
        m0, shift = 2**30, shift - 1
    return m0, shift


@pytest.mark.parametrize("m", [1 - 2.0**-40, (1 - 2.0**-40) * 2.0**-7, (1 - 2.0**-33) * 2.0**-20,
                               (1 - 2.0**-35) * 2.0**5])
def test_mantissa_that_rounds_up_to_2_31_carries_into_the_shift(m):
    m0, shift = fixed_point_multiplier(m)
    assert (int(m0[0]), int(shift[0])) == _nearest_m0(m)
    assert int(m0[0]) == 2**30  # m is within half a unit of a power of two: it is represented as one


def test_carry_and_plain_multipliers_mixed_in_one_array():
    ms = np.array([1 - 2.0**-40, 0.3, 2.0**-12 * (1 - 2.0**-36), 7.25])
    m0, shift = fixed_point_multiplier(ms)
    assert m0.dtype == np.int32 and shift.dtype == np.int32
    assert [(int(a), int(b)) for a, b in zip(m0, shift, strict=True)] == [_nearest_m0(m) for m in ms]


def test_signed_asymmetric_grid_stretches_the_range_over_all_256_codes():
    scale, zp = qparams_from_range(-1.0, 3.0, 8, symmetric=False, signed=True)
    assert scale == np.float32(4 / 255)
    assert zp == -64  # -128 - (-1) / (4/255) = -64.25
    assert scale.dtype == np.float32 and zp.dtype == np.int32


def test_unsigned_symmetric_grids_refuse_negative_values_and_one_bad_channel_is_enough():
    with pytest.raises(InputError, match="unsigned symmetric"):
        qparams_from_range(-0.1, 1.0, 8, symmetric=True, signed=False)
    scale, zp = qparams_from_range(0.0, 2.55, 8, symmetric=True, signed=False)
    assert scale == np.float32(0.01) and zp == 0
    with pytest.raises(InputError, match="lo <= hi"):
        qparams_from_range(np.array([0.0, 2.0]), np.array([1.0, 1.0]), 8, symmetric=False, signed=False)


def test_largest_accepted_multiplier_is_just_below_2_30():
    m = 2.0**30 * (1 - 2.0**-20)
    m0, shift = fixed_point_multiplier(m)
    assert int(shift[0]) == 1 and int(m0[0]) * 2.0**-1 == m
    with pytest.raises(InputError, match="too large"):
        fixed_point_multiplier(np.array([0.5, 2.0**30]))  # one bad value refuses the array


def test_act_quant_is_immutable_and_hashable():
    q = ActQuant.from_range(0.0, 2.55, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.scale = 1.0
    assert {q: 1}[ActQuant.from_range(0.0, 2.55, 8)] == 1


def test_one_non_finite_or_non_positive_element_refuses_the_whole_array():
    for lo, hi in [([-1.0, -np.inf], [1.0, 1.0]), ([-1.0, -1.0], [1.0, np.nan])]:
        with pytest.raises(InputError, match="finite range"):
            qparams_from_range(np.array(lo), np.array(hi), 8, symmetric=False, signed=False)
    for bad in ([0.5, -1.0], [0.5, 0.0], [0.5, np.inf]):
        with pytest.raises(InputError, match="positive finite"):
            fixed_point_multiplier(np.array(bad))


def test_tiny_multipliers_round_the_bits_dropped_to_keep_the_shift_at_62():
    # m = (2**30 + 5) * 2**-65: m0 would need shift 65; at shift 62, m * 2**62 = 2**27 + 0.625 -> 2**27 + 1
    m = (2**30 + 5) * 2.0**-65
    m0, shift = fixed_point_multiplier(m)
    assert (int(m0[0]), int(shift[0])) == (2**27 + 1, 62)
    m = (2**30 + 3) * 2.0**-65  # 2**27 + 0.375 -> 2**27
    assert int(fixed_point_multiplier(m)[0][0]) == 2**27


@pytest.mark.parametrize("lo, hi", [(-1e308, 1e308), (-1e300, 1e300), (np.array([-1.0, -1e300]),
                                                                         np.array([1.0, 1.0]))])
def test_range_beyond_float32_is_refused_by_name_not_turned_into_an_infinite_scale(lo, hi):
    # found by mutation testing: the first raised IndexError, the others returned an infinite scale
    for symmetric, signed in [(False, False), (False, True), (True, True)]:
        with pytest.raises(InputError, match="too wide for a float32 scale"):
            qparams_from_range(lo, hi, 8, symmetric=symmetric, signed=signed)


def test_act_quant_of_a_signed_range_is_asymmetric_and_unsigned():
    q = ActQuant.from_range(-1.0, 3.0, 8)
    assert (q.scale, q.zero_point, q.bits, q.qmax) == (np.float32(4 / 255), 64, 8, 255)
    assert ActQuant.from_range(-1.0, 3.0, 4).qmax == 15


def test_one_negative_channel_refuses_an_unsigned_symmetric_grid():
    with pytest.raises(InputError, match="unsigned symmetric"):
        qparams_from_range(np.array([0.0, -0.5]), np.array([1.0, 1.0]), 8, symmetric=True, signed=False)
