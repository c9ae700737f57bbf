"""Packing of b-bit integer codes (b = 2..8) into bytes: the one storage layout of quantized weights.

Layout: a little-endian bit stream. Code ``e`` of the flattened tensor occupies stream bits
``e*b .. e*b + b - 1`` (least significant bit first); stream bit ``k`` is bit ``k & 7`` of byte ``k >> 3``.
So 8-bit codes are plain bytes, 4-bit codes two per byte (low nibble first), 2-bit codes four per byte
(lowest pair first), and 3-, 5-, 6-, 7-bit codes straddle byte boundaries. ``n`` codes take
``ceil(n * b / 8)`` bytes; the unused high bits of the last byte are 0 (``unpack_bits`` refuses
nothing: files are checked by ``packed_size`` and ``padding_is_zero``). Signed codes are stored as
b-bit two's complement (-2**(b-1) .. 2**(b-1)-1), unsigned ones as 0 .. 2**b-1.
"""

import numpy as np
from numba import njit


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits."""
    return (int(n) * int(bits) + 7) // 8


@njit(cache=True, nogil=True)
def pack_bits(values, bits):
    """Flat int8 (signed) or uint8 (unsigned) codes -> the packed bytes (the low ``bits`` of each)."""
    n = values.size
    out = np.zeros((n * bits + 7) // 8, np.uint8)
    mask = (1 << bits) - 1
    for e in range(n):
        v = np.int32(values[e]) & mask
        pos = e * bits
        byte, off = pos >> 3, pos & 7
        out[byte] |= np.uint8((v << off) & 0xFF)
        if off + bits > 8:  # the code straddles into the next byte
            out[byte + 1] |= np.uint8(v >> (8 - off))
    return out


def unpack_bits(packed, bits: int, n: int, signed: bool) -> np.ndarray:
    """The first ``n`` codes of a packed stream, as int8 (signed: sign-extended from ``bits``) or uint8."""
    out = np.empty(int(n), np.int8 if signed else np.uint8)
    _unpack_into(packed, int(bits), bool(signed), out)
    return out


@njit(cache=True, nogil=True)
def _unpack_into(packed, bits, signed, out):
    n = out.size
    mask = (1 << bits) - 1
    half = 1 << (bits - 1)
    for e in range(n):
        pos = e * bits
        byte, off = pos >> 3, pos & 7
        v = np.int32(packed[byte]) >> off
        if off + bits > 8:
            v |= np.int32(packed[byte + 1]) << (8 - off)
        v &= mask
        if signed and v >= half:
            v -= 1 << bits
        out[e] = v


def padding_is_zero(packed: np.ndarray, n: int, bits: int) -> bool:
    """Whether the stream bits after the ``n`` codes are 0 (a file written by ``pack_bits`` has them 0;
    anything else is not a stream of ``n`` codes)."""
    used = int(n) * int(bits)
    if used % 8 == 0 or len(packed) == 0:
        return True
    return int(packed[-1]) >> (used % 8) == 0
