"""Quantization parameters: the one place where a real range becomes (scale, zero_point), plus the
NumPy fake-quantization and fixed-point multiplier helpers every other module uses.

Conventions: ``real = scale * (q - zero_point)``. Signed grids use [-2**(b-1), 2**(b-1)-1], unsigned
grids [0, 2**b - 1]. Symmetric parameters have zero_point 0 and scale = max(|lo|, |hi|) / (2**(b-1)-1)
(signed) or hi / (2**b - 1) (unsigned); asymmetric ones stretch [min(lo, 0), max(hi, 0)] over the whole
grid so that real 0 is exactly representable (ReLU clamps and zero padding need that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

MIN_BITS, MAX_BITS = 2, 8  # the integer widths weights and activations may have

KERNEL_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))  # what the integer stages run: every width 2..8


def check_bits(bits, name: str = "bits", allowed=None) -> int:
    """``bits`` as an int, or InputError naming the argument. Default allowed range: 2..8."""
    ok = isinstance(bits, int | np.integer) and not isinstance(bits, bool)
    if allowed is None:
        ok = ok and MIN_BITS <= bits <= MAX_BITS
        expected = f"an integer in {MIN_BITS}..{MAX_BITS} (bits outside {MIN_BITS}..{MAX_BITS} are not run)"
    else:
        ok = ok and bits in allowed
        expected = f"one of {tuple(allowed)}"
    if not ok:
        raise InputError(f"{name}: expected {expected}, found {bits!r}")
    return int(bits)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest integer of a ``bits``-wide grid."""
    bits = check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def qparams_from_range(lo, hi, bits: int, symmetric: bool, signed: bool, name: str = "range"):
    """(scale float32, zero_point int32) for the real range [lo, hi], per tensor (scalars) or per channel
    (arrays). A zero range, lo > hi or a non-finite bound is refused: there is no scale to give it."""
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    if lo.shape != hi.shape:
        raise InputError(f"{name}: lo and hi shapes differ ({lo.shape} vs {hi.shape})")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise InputError(f"{name}: expected a finite range, found lo={lo}, hi={hi}")
    if (lo > hi).any():
        raise InputError(f"{name}: expected lo <= hi, found lo={lo}, hi={hi}")
    qmin, qmax = qrange(bits, signed)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        if not signed and (lo < 0).any():
            raise InputError(f"{name}: an unsigned symmetric grid cannot hold negative values (lo={lo})")
        scale = np.maximum(-lo, hi) / qmax  # signed: [-qmax, qmax] is used, qmin only after clipping
        zero_point = np.zeros(scale.shape, np.int64)
    else:
        with np.errstate(over="ignore"):  # hi - lo beyond float64: refused below
            scale = (hi - lo) / (qmax - qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
        zero_point = np.where(scale > 0, zero_point, 0).astype(np.int64)
    if (scale <= 0).any():
        bad = np.flatnonzero(np.atleast_1d(scale <= 0))
        raise InputError(f"{name}: zero range (lo = hi = {float(np.atleast_1d(lo)[bad[0]]):g}"
                         + (f" in channel {int(bad[0])}" if scale.ndim else "")
                         + "): no scale can represent it; calibrate on varied data")
    with np.errstate(over="ignore"):
        scale32 = scale.astype(np.float32)
    if not np.isfinite(scale32).all():  # beyond float32's range
        raise InputError(f"{name}: range too wide for a float32 scale (lo={lo}, hi={hi})")
    if (scale32 == 0).any():  # below float32's range
        raise InputError(f"{name}: range too small for a float32 scale (span {float(np.min(hi - lo)):g})")
    return (scale32 if scale.ndim else np.float32(scale32)), (
        zero_point.astype(np.int32) if zero_point.ndim else np.int32(zero_point))


def fake_quantize(x, scale, zero_point, bits: int, signed: bool, axis: int | None = None) -> np.ndarray:
    """Quantize then dequantize in float64 (round half to even), per tensor or along ``axis``."""
    q = quantize_values(x, scale, zero_point, bits, signed, axis)
    s, z = _broadcast(scale, zero_point, np.ndim(x), axis)
    return (q - z) * s


def quantize_values(x, scale, zero_point, bits: int, signed: bool, axis: int | None = None) -> np.ndarray:
    """The integer grid values (as float64) of ``x``: clip(rint(x / scale) + zero_point, qmin, qmax)."""
    qmin, qmax = qrange(bits, signed)
    s, z = _broadcast(scale, zero_point, np.ndim(x), axis)
    return np.clip(np.rint(np.asarray(x, np.float64) / s) + z, qmin, qmax)


def _broadcast(scale, zero_point, ndim: int, axis):
    s = np.asarray(scale, np.float64)
    z = np.asarray(zero_point, np.float64)
    if axis is not None and s.ndim:
        shape = [1] * ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


@dataclass(frozen=True)
class ActQuant:
    """Quantization of one activation tensor: unsigned ``bits``-wide grid in a uint8 container."""

    scale: float
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @classmethod
    def from_range(cls, lo: float, hi: float, bits: int, name: str = "activation") -> ActQuant:
        scale, zp = qparams_from_range(lo, hi, bits, symmetric=False, signed=False, name=name)
        return cls(float(scale), int(zp), int(bits))


def fixed_point_multiplier(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """Represent positive real multipliers M as m0 * 2**-shift with 2**30 <= m0 < 2**31 (int32 m0).

    ``shift`` is the total right shift applied to the int64 product acc * m0 (1..62). Multipliers too
    small for a 62-bit shift lose low bits of m0 (the result is 0 for any int32 accumulator anyway);
    multipliers >= 2**30 are refused: no sensible pair of scales produces them.
    """
    m = np.atleast_1d(np.asarray(multiplier, np.float64))
    if not (np.isfinite(m).all() and (m > 0).all()):
        raise InputError(f"requantization multiplier: expected positive finite values, found {m}")
    _, exp = np.frexp(m)  # m = mant * 2**exp, 0.5 <= mant < 1
    shift = np.minimum(31 - exp, 62)
    # m * 2**shift is exact (a power-of-two scaling), so m0 is rounded once, to the nearest integer --
    # also when the capped shift leaves fewer than 31 bits (rounding to 31 bits first, then dropping
    # bits, would round twice and can miss the nearest value).
    m0 = np.round(np.ldexp(m, shift)).astype(np.int64)
    carry = m0 == (1 << 31)  # mant rounded up to 1: one bit less of shift
    m0[carry] >>= 1
    shift = shift - carry
    if (shift < 1).any():
        raise InputError(f"requantization multiplier too large: {m.max():g} (expected < 2**30)")
    return m0.astype(np.int32), shift.astype(np.int32)
