"""Integer inference kernels: quantize/dequantize, weight repacking, im2col into
unsigned byte quads, the u8 x s8 GEMM (``qdot``), requantization, and the quantized convolution /
dense layers built from them.

Number formats (see ``microcnn.quant`` for how the parameters are chosen):

* activations: unsigned integers in a uint8 container, ``real = scale * (q - zero_point)``, with
  ``0 <= q <= qmax = 2**bits - 1``; the kernels clamp codes to the stage's ``qmax`` as they read them;
* weights: signed, per output channel, as int8 codes (any width 2..8; an asymmetric weight's zero point
  is subtracted before they get here). Files store them packed at their width (``kernels.packing``);
  the kernels never read the stored bytes: ``pack_conv`` / ``pack_linear`` repack the int8 codes once
  into the micro-kernel's word order (``PackedWeights``);
* accumulators: int32, ``bias + sum (q_x - zero_point_x) * q_w``, computed as
  ``(bias - zero_point_x * sum q_w) + sum q_x * q_w``: the zero point is folded into a per-output-channel
  correction of the bias (computed at packing), so the products are u8 x s8 (``qdot``). Padding is the
  code ``zero_point_x`` (a real 0). Int32 adds wrap, and wrapping is associative: the result is exact
  whenever the true accumulator fits int32, |acc| <= |bias| + K * qmax * 2**(bits_w - 1) (the layers
  refuse shapes where it could not), whatever the corrected bias or the partial sums are.

im2col: a uint32 word holds four activation codes of one output position, multiplied by a quad of
weights. For vertical stride 1 the patch matrix is implicit, as in ``kernels.conv``: a word packs G
channels x R = 4 / G consecutive input rows (G = 4, 2 or 1 as the channel count allows), one row of
words per (channel group, kx), and tap rows ky..ky+R-1 are a window of it at offset ky*OW. Kernel rows
that would fill a word only partly (the fifth row of a 5x5 kernel on one channel) go into horizontal words
(G channels x R consecutive columns) when that takes fewer words. Vertical stride > 1 builds explicit patch
words of four consecutive taps (``conv_taps``).

Requantization (fixed point, the one rounding rule used everywhere and mirrored by the tests):

    y = (acc * m0 + (1 << (shift - 1))) >> shift      # int64 product, arithmetic shift
    q = clamp(y + zero_point_out, lo, hi)

i.e. the real multiplier ``M = m0 * 2**-shift`` (``2**30 <= m0 < 2**31``) is applied with one rounding,
half-way cases rounding towards +infinity (TFLite's single-rounding ``MultiplyByQuantizedMultiplier``).
A fused ReLU is only a larger ``lo`` (the zero point of real 0). The float mode computes
``rint(acc * multiplier)`` in float32 (half to even) instead.

Kernel arguments travel in three named tuples (``PackedWeights``, ``QConvGeometry``, ``Requant``); the
Python wrappers (``conv2d_packed``, ``linear_packed``) check dtypes, contiguity and sizes before
any njit code reads raw addresses.
"""

from collections import namedtuple

import numpy as np
from numba import njit

from ..errors import InputError
from .packing import unpack_bits
from .qdot import (
    DENSE_VECTORS,
    PAIR_WORDS,
    REQUANT_VALUES,
    STRIP,
    clamped_move8,
    clamped_move16,
    dense_kernel,
    dequant_row,
    microkernel1,
    microkernel2,
    microkernel4,
    microkernel6,
    microkernel8,
    pack_words16,
    phase_words16,
    requant_row,
    requant_row_pool2,
    requant_rows_pool2,
)
from .shapes import conv_output_size
from .simd import LANES
from .threads import in_threads

MODE_FIXEDPOINT = 0  # uint8 output, integer multiplier and shift
MODE_FLOAT = 1  # uint8 output, float32 multiplier
MODE_DEQUANT = 2  # float32 output: clamp(acc, lo, hi) * scale (logits, or a fused ReLU's real output)
LINEAR_ROWS = 256  # batch rows per tile of the linear kernel (its words stay in L2)

# Weights in the micro-kernel's order: ``quads`` uint32 (see ``pack_quads``), ``bias`` int32 with the
# input zero point folded in, ``n_words`` quads per output channel, the input's ``zero_point`` and the
# largest code ``qmax`` (inputs are clamped to it); dense layers also ``lanes`` (``pack_lanes``: the
# small-batch layout), empty for convolutions.
PackedWeights = namedtuple("PackedWeights", ["quads", "bias", "n_words", "zero_point", "qmax", "lanes"])
DENSE_BLOCK = DENSE_VECTORS * LANES  # channels per dense-kernel call
SMALL_ROWS = 4  # dense layers with fewer rows than this run the channels-in-lanes kernel
# Convolution kernel, stride, padding, and a fused max pooling's window and stride (1s: none).
QConvGeometry = namedtuple("QConvGeometry", ["kh", "kw", "sh", "sw", "ph", "pw", "pkh", "pkw", "psh", "psw"])
# The epilogue: per-channel multipliers, MODE_*, output zero point and clamp bounds.
Requant = namedtuple("Requant", ["m0", "shift", "fmult", "mode", "zero_point", "lo", "hi"])


@njit(cache=True, nogil=True)
def quantize_u8(x, scale, zero_point, qmax):
    """float32 -> uint8: clamp(rint(x / scale) + zero_point, 0, qmax); x is a flat float32 array.

    The clamp runs on rint(x / scale) against [-zero_point, qmax - zero_point] in float32 -- integers
    there, so the same codes as clamping the sum -- which keeps the loop in float32 vectors."""
    out = np.empty(x.size, np.uint8)
    s = np.float32(scale)
    lo, hi, zp = np.float32(-zero_point), np.float32(qmax - zero_point), np.int32(zero_point)
    for i in range(x.size):
        out[i] = np.uint8(np.int32(min(max(np.rint(x[i] / s), lo), hi)) + zp)
    return out


@njit(cache=True, nogil=True)
def dequantize_u8(q, scale, zero_point):
    """uint8 -> float32: (q - zero_point) * scale; q is flat."""
    out = np.empty(q.size, np.float32)
    s = np.float32(scale)
    for i in range(q.size):
        out[i] = np.float32(np.int32(q[i]) - zero_point) * s
    return out


@njit(cache=True, nogil=True)
def requantize_one(acc, m0, shift, zero_point, lo, hi):
    """Fixed-point requantization of one int32 accumulator (the rule in the module docstring)."""
    y = (np.int64(acc) * np.int64(m0) + (np.int64(1) << (shift - 1))) >> shift
    y += zero_point
    if y < lo:
        y = lo
    elif y > hi:
        y = hi
    return y


@njit(cache=True, nogil=True)
def requantize_float_one(acc, multiplier, zero_point, lo, hi):
    y = np.int64(np.rint(np.float32(acc) * np.float32(multiplier))) + zero_point
    if y < lo:
        y = lo
    elif y > hi:
        y = hi
    return y


@njit(cache=True, nogil=True)
def requantize(acc, m0, shift, zero_point, lo, hi):
    """Requantize an (N, O) int32 array with per-column multipliers (m0, shift); returns uint8."""
    n, o = acc.shape
    out = np.empty((n, o), np.uint8)
    for i in range(n):
        for j in range(o):
            out[i, j] = requantize_one(acc[i, j], m0[j], shift[j], zero_point, lo, hi)
    return out


@njit(cache=True, nogil=True)
def rescaled_sum(xs, zero_points, m0, shift, frac_bits, zero_point, lo, hi, out):
    """out[i] = clamp(((sum_k r_k(xs[k][i]) + 2**(frac_bits-1)) >> frac_bits) + zero_point, lo, hi), with
    r_k(q) = ((q - zero_points[k]) * m0[k] + 2**(shift[k]-1)) >> shift[k] in int64: each input rescaled to
    the output grid with frac_bits extra fractional bits, rounded half up, summed, rounded once more
    (no final rounding when frac_bits is 0). xs: a tuple of flat uint8 arrays of out's size."""
    rounding = np.empty(len(xs), np.int64)
    for k in range(len(xs)):
        rounding[k] = np.int64(1) << (shift[k] - 1)
    half = (np.int64(1) << (frac_bits - 1)) if frac_bits > 0 else np.int64(0)
    for i in range(out.size):
        total = np.int64(0)
        for k in range(len(xs)):
            total += ((np.int64(xs[k][i]) - zero_points[k]) * m0[k] + rounding[k]) >> shift[k]
        out[i] = min(max(((total + half) >> frac_bits) + zero_point, lo), hi)


# -- weight repacking ---------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _conv_group(c):
    """Channels per word in the implicit im2col (4, 2 or 1); R = 4 // G input rows complete the word."""
    return 4 if c % 4 == 0 else (2 if c % 2 == 0 else 1)


@njit(cache=True, nogil=True)
def _row_split(group, kh, kw):
    """(row groups in vertical words, rows in horizontal words) of a group-G implicit im2col: the last
    kh % R rows (R = 4 // G) fill a vertical word only partly; they go into horizontal words (G channels x
    R consecutive columns of one row, ceil(kw / R) per row) when those are fewer than the kw vertical ones
    (a 5x5 kernel on one channel: 2 words instead of 5 for its fifth row)."""
    r_ = 4 // group
    rem = kh % r_
    if rem and rem * -(-kw // r_) < kw:
        return kh // r_, rem
    return -(-kh // r_), 0


@njit(cache=True, nogil=True)
def _word_taps(word, cg, g_, kh, kw, ky, kx, dy, dx):
    """The taps of one word of channel group cg: byte s*G + g is tap (cg*G + g, ky + s*dy, kx + s*dx) for
    s < R (vertical words step down the rows, horizontal ones along the columns); -1 outside the kernel."""
    for s in range(4 // g_):
        y, x = ky + s * dy, kx + s * dx
        if y < kh and x < kw:
            for g in range(g_):
                word[s * g_ + g] = ((cg * g_ + g) * kh + y) * kw + x


@njit(cache=True, nogil=True)
def conv_taps(c, kh, kw, sh):
    """Which weight taps (of the flattened (C, KH, KW) kernel) each byte of a word multiplies.

    Returns (group, taps), taps int64 (W, 4) with -1 for a byte that meets no weight. group G > 0
    (vertical stride 1), per channel group cg: first the vertical words (row group kq, kx), byte r*G + g
    tap (cg*G + g, kq*R + r, kx); then the horizontal words of the rows ``_row_split`` leaves over (row ky,
    column group j), byte h*G + g tap (cg*G + g, ky, j*R + h). group 0 (vertical stride > 1): explicit
    patches; with C a multiple of 4, word (cg, ky, kx) holds tap (ky, kx) of channels 4cg..4cg+3 (read
    from the phase planes of ``_fill_phase_words``), else word w holds taps 4w..4w+3."""
    k = c * kh * kw
    if sh != 1:
        n = (k + 3) // 4
        taps = np.full((n, 4), -1, np.int64)
        for t in range(k):
            if c % 4 == 0:  # t = (channel, ky, kx) flattened: word (channel // 4, ky, kx), byte channel % 4
                taps[(t // (4 * kh * kw)) * kh * kw + t % (kh * kw), (t // (kh * kw)) % 4] = t
            else:
                taps[t // 4, t % 4] = t
        return 0, taps
    g_ = _conv_group(c)
    r_ = 4 // g_
    nq, hr = _row_split(g_, kh, kw)
    nj = -(-kw // r_)
    taps = np.full(((c // g_) * (nq * kw + hr * nj), 4), -1, np.int64)
    w = 0
    for cg in range(c // g_):
        for kq in range(nq):
            for kx in range(kw):
                _word_taps(taps[w], cg, g_, kh, kw, kq * r_, kx, 1, 0)
                w += 1
        for ky in range(nq * r_, nq * r_ + hr):
            for j in range(nj):
                _word_taps(taps[w], cg, g_, kh, kw, ky, j * r_, 0, 1)
                w += 1
    return g_, taps


@njit(cache=True, nogil=True)
def _block_size(remaining):
    """Micro-kernel width for the next ``remaining`` output channels: 8, 6 (padded with zero-weight channels
    when 7 or 5 remain: one pass over the words beats a 4 + 2 split), 4, 2, 1."""
    if remaining > 6:
        return 8
    if remaining > 4:
        return 6
    if remaining > 2:
        return 4
    return remaining


@njit(cache=True, nogil=True)
def packed_channels(o):
    """Output channels including the zero channels padding the last block (every other block is full)."""
    o0 = 0
    while o - o0 > 8:
        o0 += 8
    return o0 + _block_size(o - o0)


@njit(cache=True, nogil=True)
def pack_quads(w, taps):
    """The (O, K) int8 weights in micro-kernel order: blocks of ``_block_size`` channels, the block of
    channels o0.. at o0 * W * PAIR_WORDS, inside it [word, channel, PAIR_WORDS] (see ``qdot``)."""
    o = w.shape[0]
    n = taps.shape[0]
    out = np.zeros(packed_channels(o) * n * PAIR_WORDS, np.uint32)
    o0 = 0
    while o0 < o:
        width = _block_size(o - o0)
        for c in range(min(width, o - o0)):  # padding channels keep zero weights
            row = w[o0 + c]
            for i in range(n):
                b = np.zeros(4, np.int64)
                for j in range(4):
                    if taps[i, j] >= 0:
                        b[j] = row[taps[i, j]]
                at = o0 * n * PAIR_WORDS + (i * width + c) * PAIR_WORDS
                if PAIR_WORDS == 1:
                    out[at] = np.uint32((b[0] & 0xFF) | ((b[1] & 0xFF) << 8) | ((b[2] & 0xFF) << 16)
                                        | ((b[3] & 0xFF) << 24))
                else:  # int16 pairs (byte 0, byte 2) and (byte 1, byte 3)
                    out[at] = np.uint32((b[0] & 0xFFFF) | ((b[2] & 0xFFFF) << 16))
                    out[at + 1] = np.uint32((b[1] & 0xFFFF) | ((b[3] & 0xFFFF) << 16))
        o0 += width
    return out


@njit(cache=True, nogil=True)
def pack_lanes(w, taps):
    """The (O, K) int8 weights for ``qdot.dense_kernel``: blocks of DENSE_BLOCK channels (the last padded
    with zero channels), each (W, DENSE_VECTORS, PAIR_WORDS, LANES) -- lane l of vector v is channel
    v * LANES + l of the block; quads or int16 pairs as in ``pack_quads``."""
    o = w.shape[0]
    n = taps.shape[0]
    blocks = -(-o // DENSE_BLOCK)
    out = np.zeros(blocks * n * DENSE_BLOCK * PAIR_WORDS, np.uint32)
    for ch in range(o):
        blk, v, lane = ch // DENSE_BLOCK, (ch % DENSE_BLOCK) // LANES, ch % LANES
        for i in range(n):
            b = np.zeros(4, np.int64)
            for j in range(4):
                if taps[i, j] >= 0:
                    b[j] = w[ch, taps[i, j]]
            at = (((blk * n + i) * DENSE_VECTORS + v) * PAIR_WORDS) * LANES + lane
            if PAIR_WORDS == 1:
                out[at] = np.uint32((b[0] & 0xFF) | ((b[1] & 0xFF) << 8) | ((b[2] & 0xFF) << 16)
                                    | ((b[3] & 0xFF) << 24))
            else:
                out[at] = np.uint32((b[0] & 0xFFFF) | ((b[2] & 0xFFFF) << 16))
                out[at + LANES] = np.uint32((b[1] & 0xFFFF) | ((b[3] & 0xFFFF) << 16))
    return out


@njit(cache=True, nogil=True)
def corrected_bias(w, bias, zero_point):
    """bias[o] - zero_point * sum_k w[o, k], wrapped to int32 (exact modulo 2**32; see the docstring)."""
    o, k = w.shape
    out = np.empty(o, np.int32)
    for i in range(o):
        total = np.int64(0)
        for t in range(k):
            total += w[i, t]
        out[i] = np.int32((np.int64(bias[i]) - zero_point * total) & 0xFFFFFFFF)
    return out


def _packed(w2, bias, taps, zero_point: int, qmax: int, dense: bool = False) -> PackedWeights:
    if not (0 <= zero_point <= qmax <= 255):
        raise InputError(f"input zero point and qmax: expected 0 <= zero_point <= qmax <= 255, found "
                         f"{zero_point}, {qmax}")
    bias = np.ascontiguousarray(bias, np.int32)
    if bias.shape != (w2.shape[0],):
        raise InputError(f"bias: expected shape ({w2.shape[0]},), found {bias.shape}")
    lanes = pack_lanes(w2, taps) if dense else np.zeros(0, np.uint32)
    return PackedWeights(pack_quads(w2, taps), corrected_bias(w2, bias, int(zero_point)), int(taps.shape[0]),
                         int(zero_point), int(qmax), lanes)


def _int8_codes(w, ndim: int) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != ndim or w.dtype.kind not in "iu" or (w.size and (w.min() < -128 or w.max() > 127)):
        raise InputError(f"weights: expected {ndim}-D integer codes in -128..127, found {w.dtype} {w.shape}")
    return np.ascontiguousarray(w, np.int8)


def pack_conv(w, bias, stride_h: int, zero_point: int, qmax: int = 255) -> PackedWeights:
    """Convolution weights (O, C, KH, KW) int8 codes for ``conv2d_packed`` at vertical stride ``stride_h``,
    on inputs with that zero point and largest code."""
    w = _int8_codes(w, 4)
    o, c, kh, kw = w.shape
    _, taps = conv_taps(c, kh, kw, int(stride_h))
    return _packed(w.reshape(o, -1), bias, taps, zero_point, qmax)


def pack_linear(w, bias, zero_point: int, qmax: int = 255) -> PackedWeights:
    """Dense weights (O, F) int8 codes for ``linear_packed``: words of four consecutive features."""
    w = _int8_codes(w, 2)
    _, taps = conv_taps(w.shape[1], 1, 1, 2)  # explicit patches of a 1x1 "image": consecutive taps
    return _packed(w, bias, taps, zero_point, qmax, dense=True)


# -- GEMM and epilogues -----------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _gemm_block(words_flat, start, word_off, quads, q0, width, bias, o0, n, acc):
    """acc[c, :n] = bias[o0 + c] + sum over words for the ``width`` channels of the block at quads[q0:]
    (``bias`` ends in 8 zeros: channels past the layer's are padding, start at 0, computed, never read);
    position j's words are words_flat[start + word_off[w] + j].

    acc rows must hold n rounded up to STRIP, and words_flat extend STRIP words past the last word
    read: the last strip computes (and drops) a few positions beyond n."""
    # ctypes.data is unsigned: int64 keeps the sums below integers (uint64 + int64 is float64 in Numba)
    w_addr = np.int64(words_flat.ctypes.data) + 4 * start
    o_addr, b_addr = np.int64(word_off.ctypes.data), np.int64(quads.ctypes.data) + 4 * q0
    a_addr, stride, c_addr = np.int64(acc.ctypes.data), acc.shape[1], np.int64(bias.ctypes.data) + 4 * o0
    n_words = word_off.shape[0]
    for j0 in range(0, n, STRIP):
        wa, aa = w_addr + 4 * j0, a_addr + 4 * j0
        if width == 8:
            microkernel8(wa, o_addr, n_words, b_addr, c_addr, aa, stride)
        elif width == 6:
            microkernel6(wa, o_addr, n_words, b_addr, c_addr, aa, stride)
        elif width == 4:
            microkernel4(wa, o_addr, n_words, b_addr, c_addr, aa, stride)
        elif width == 2:
            microkernel2(wa, o_addr, n_words, b_addr, c_addr, aa, stride)
        else:
            microkernel1(wa, o_addr, n_words, b_addr, c_addr, aa, stride)


@njit(cache=True, nogil=True)
def _finish(values, o, rq, dst_q, dst_f, start):
    """Write one output channel's values from index start of dst_q (requantized uint8) or of dst_f (real
    value, MODE_DEQUANT: the accumulator clamped to [lo, hi] -- a fused ReLU is lo = 0 -- times the
    scale). The fixed-point mode of plain and 2x2-pooled outputs takes the vector path (_requant_rows)."""
    zero_point, lo, hi = rq.zero_point, rq.lo, rq.hi
    m, sh, f = np.int64(rq.m0[o]), np.int64(rq.shift[o]), rq.fmult[o]
    for j in range(values.shape[0]):
        if rq.mode == MODE_DEQUANT:
            dst_f[start + j] = np.float32(min(max(values[j], lo), hi)) * f
        elif rq.mode == MODE_FIXEDPOINT:
            dst_q[start + j] = requantize_one(values[j], m, sh, zero_point, lo, hi)
        else:
            dst_q[start + j] = requantize_float_one(values[j], f, zero_point, lo, hi)


@njit(cache=True, nogil=True)
def _max_pool_acc(acc, rs, geo, qh, qw, pooled):
    """Max pooling of one channel's accumulators (output row oy at oy * rs) into pooled (qh * qw)."""
    pkh, pkw, psh, psw = geo.pkh, geo.pkw, geo.psh, geo.psw
    for qy in range(qh):
        for qx in range(qw):
            best = acc[(qy * psh) * rs + qx * psw]
            for dy in range(pkh):
                row = (qy * psh + dy) * rs + qx * psw
                for dx in range(pkw):
                    v = acc[row + dx]
                    if v > best:
                        best = v
            pooled[qy * qw + qx] = best


@njit(cache=True, nogil=True)
def _requant_rows(acc, channels, o0, qh, qw, rs, pool2, scratch, rq, dst_q):
    """The fixed-point epilogue of ``channels`` accumulator rows (output row qy at qy * rs, or with
    ``pool2`` the 2x2 / stride 2 maxima of rows 2qy, 2qy + 1) into the uint8 planes of one image, 16
    outputs per ``qdot.requant_row*`` call (pooled rows of 8 outputs or fewer: two rows per call, 8 bytes
    each). Those read up to 31 values past a row's last output (acc has a spare row: see
    ``qconv_images``) and store 16 bytes: bytes past an output row are rewritten by the rows after it,
    and a store that would pass the image's end goes through ``scratch`` (16 bytes)."""
    step = 2 if pool2 else 1
    width = acc.shape[1]
    # int64, as in _gemm_block: the sums stay integers
    a_addr, d_addr = np.int64(acc.ctypes.data), np.int64(dst_q.ctypes.data)
    s_addr = np.int64(scratch.ctypes.data)
    zero_point, lo, hi = rq.zero_point, rq.lo, rq.hi
    for c in range(channels):
        o = o0 + c
        m, sh = np.int64(rq.m0[o]), np.int64(rq.shift[o])
        qy = 0
        while qy < qh:
            src = a_addr + 4 * (c * width + step * qy * rs)
            at = (o * qh + qy) * qw
            if pool2 and 2 * qw <= REQUANT_VALUES and qy + 1 < qh and at + qw + 8 <= dst_q.shape[0]:
                requant_rows_pool2(src, rs, m, sh, zero_point, lo, hi, d_addr + at, d_addr + at + qw)
                qy += 2
                continue
            for q0 in range(0, qw, REQUANT_VALUES):
                direct = at + q0 + REQUANT_VALUES <= dst_q.shape[0]
                dst = d_addr + at + q0 if direct else s_addr
                if pool2:
                    requant_row_pool2(src + 8 * q0, rs, m, sh, zero_point, lo, hi, dst, dst)
                else:
                    requant_row(src + 4 * q0, rs, m, sh, zero_point, lo, hi, dst, dst)
                if not direct:
                    for j in range(min(REQUANT_VALUES, qw - q0)):
                        dst_q[at + q0 + j] = scratch[j]
            qy += 1


@njit(cache=True, nogil=True)
def _dequant_rows(acc, channels, o0, oh, ow, rs, scratch, rq, dst_f):
    """MODE_DEQUANT's plain epilogue of ``channels`` accumulator rows (output row oy at oy * rs) into the
    float32 planes of one image, 16 outputs per ``qdot.dequant_row`` call (``_finish``'s bits). Each call
    reads up to 15 values past a row's last output and stores 16: the values past an output row are
    rewritten by the rows after it, and a store that would pass the image's end goes through
    ``scratch`` (16 float32)."""
    width = acc.shape[1]
    a_addr, d_addr = np.int64(acc.ctypes.data), np.int64(dst_f.ctypes.data)
    s_addr = np.int64(scratch.ctypes.data)
    lo, hi = max(rq.lo, -2 ** 31), min(rq.hi, 2 ** 31 - 1)  # the accumulators are int32
    for c in range(channels):
        o = o0 + c
        scale = rq.fmult[o]
        for oy in range(oh):
            src, at = a_addr + 4 * (c * width + oy * rs), (o * oh + oy) * ow
            for q0 in range(0, ow, REQUANT_VALUES):
                direct = at + q0 + REQUANT_VALUES <= dst_f.shape[0]
                dequant_row(src + 4 * q0, lo, hi, scale, d_addr + 4 * (at + q0) if direct else s_addr)
                if not direct:
                    for j in range(min(REQUANT_VALUES, ow - q0)):
                        dst_f[at + q0 + j] = scratch[j]


@njit(cache=True, nogil=True)
def _conv_epilogue(acc, channels, o0, oh, ow, rs, geo, pooled, rq, dst_q, dst_f):
    """Write ``channels`` accumulator rows of one image (optionally max-pooled) into its output planes; output
    row oy of an accumulator row starts at oy * rs (rs >= ow: the wide layout computes extra columns).

    Max pooling runs on the accumulators: requantization is monotonic, so pooling first gives the same
    integers and requantizes a quarter as many values."""
    plain = geo.pkh == 1 and geo.pkw == 1 and geo.psh == 1 and geo.psw == 1
    pool2 = geo.pkh == 2 and geo.pkw == 2 and geo.psh == 2 and geo.psw == 2
    qh, qw = conv_output_size(oh, geo.pkh, geo.psh), conv_output_size(ow, geo.pkw, geo.psw)
    if rq.mode == MODE_FIXEDPOINT and (pool2 or plain):  # the hot path: 16 outputs per vector call
        _requant_rows(acc, channels, o0, qh, qw, rs, pool2, pooled.view(np.uint8), rq, dst_q)
        return
    if rq.mode == MODE_DEQUANT and plain:  # features for a float stage (global average pooling)
        _dequant_rows(acc, channels, o0, oh, ow, rs, pooled.view(np.float32), rq, dst_f)
        return
    for c in range(channels):
        o = o0 + c
        row = acc[c]
        if plain and rs == ow:
            _finish(row[:oh * ow], o, rq, dst_q, dst_f, o * oh * ow)
        elif plain:
            for oy in range(oh):
                _finish(row[oy * rs:oy * rs + ow], o, rq, dst_q, dst_f, (o * oh + oy) * ow)
        else:
            _max_pool_acc(row, rs, geo, qh, qw, pooled)
            _finish(pooled[:qh * qw], o, rq, dst_q, dst_f, o * qh * qw)


# -- convolution ------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _fill_padded(src, qmax, padded, ph, pw):
    """padded[:, ph:ph+h, pw:pw+w] = min(src, qmax) for one image src (C, H, W); padded keeps the zero
    point elsewhere. Copied by whole vectors of 16 (or 8) bytes, the last one overlapping the one before:
    without padding a channel is one run, else row by row (rows as short as 14 would leave a vectorised
    loop nothing but its scalar remainder). Addresses by arithmetic (both C-contiguous): a row slice is a
    view whose reference count Numba updates atomically."""
    c, h, w = src.shape
    q = np.uint8(min(qmax, 255))
    qi, hpad, wp = np.intp(q), padded.shape[1], padded.shape[2]
    runs, run = (1, h * w) if ph == 0 and pw == 0 else (h, w)  # per channel: runs of `run` bytes
    if run < 8:
        for ch in range(c):
            for y in range(h):
                for xx in range(w):
                    padded[ch, y + ph, pw + xx] = min(src[ch, y, xx], q)
        return
    step = 16 if run >= 16 else 8
    for ch in range(c):
        s0 = np.int64(src.ctypes.data) + ch * h * w
        d0 = np.int64(padded.ctypes.data) + (ch * hpad + ph) * wp + pw
        for y in range(runs):
            row, to = s0 + y * run, d0 + y * wp
            for x0 in range(0, run, step):
                at = min(x0, run - step)
                if step == 16:
                    clamped_move16(to + at, row + at, qi)
                else:
                    clamped_move8(to + at, row + at, qi)


@njit(cache=True, nogil=True)
def _pack_run(src, a, b, e, f, dst, d, n):
    """dst[d + t] = src[a + t] | src[b + t] << 8 | src[e + t] << 16 | src[f + t] << 24 for t < n (src flat
    uint8, dst flat uint32): 16 words per ``qdot.pack_words16`` call, the last call overlapping the one
    before; scalar below 16 words."""
    if n >= 16:
        s0, d0 = np.int64(src.ctypes.data), np.int64(dst.ctypes.data) + 4 * d
        for t0 in range(0, n, 16):
            t = min(t0, n - 16)
            pack_words16(s0 + a + t, s0 + b + t, s0 + e + t, s0 + f + t, d0 + 4 * t, 0)
        return
    for t in range(n):
        dst[d + t] = (np.uint32(src[a + t]) | (np.uint32(src[b + t]) << 8) | (np.uint32(src[e + t]) << 16)
                      | (np.uint32(src[f + t]) << 24))


@njit(cache=True, nogil=True)
def _fill_wide(group, padded, hp, words):
    """The wide implicit im2col (stride 1): words[cg, y, xx] byte r*G + g = padded[cg*G + g, y + r, xx]
    for y < hp and every column xx; tap (kq, kx) of output (oy, ox) is word (cg, oy + kq*R, ox + kx), so
    one word per input pixel serves every kx (the outputs are computed with row stride wp). Each channel
    group is one run over its hp * wp pixels (row y + r is wp * r further)."""
    g_ = group
    plane, wp = padded.shape[1] * padded.shape[2], padded.shape[2]
    src, dst = padded.reshape(-1), words.reshape(-1)
    for cg in range(padded.shape[0] // g_):
        c0 = cg * g_  # byte b reads channel c0 + b % G, row y + b // G
        a, b = c0 * plane, (c0 + 1 % g_) * plane + (1 // g_) * wp
        e, f = (c0 + 2 % g_) * plane + (2 // g_) * wp, (c0 + 3 % g_) * plane + (3 // g_) * wp
        _pack_run(src, a, b, e, f, dst, cg * hp * wp, hp * wp)


@njit(cache=True, nogil=True)
def _fill_words(group, padded, kw, sw, ow, hp, words):
    """Implicit im2col: words[cg*kw + kx, y*ow + ox] byte r*G + g = padded[cg*G + g, y + r, ox*sw + kx]
    for y < hp (padded has R - 1 extra rows; they meet zero weights)."""
    g_ = group
    for cg in range(padded.shape[0] // g_):
        c0 = cg * g_  # byte b reads channel c0 + b % G, row y + b // G
        c1, c2, c3 = c0 + 1 % g_, c0 + 2 % g_, c0 + 3 % g_
        y1, y2, y3 = 1 // g_, 2 // g_, 3 // g_
        for kx in range(kw):
            dst = words[cg * kw + kx]
            for y in range(hp):
                d = dst[y * ow:(y + 1) * ow]
                if sw == 1:  # slices indexed from 0: a loop LLVM vectorises
                    a, b = padded[c0, y, kx:kx + ow], padded[c1, y + y1, kx:kx + ow]
                    e, f = padded[c2, y + y2, kx:kx + ow], padded[c3, y + y3, kx:kx + ow]
                    for ox in range(ow):
                        d[ox] = (np.uint32(a[ox]) | (np.uint32(b[ox]) << 8) | (np.uint32(e[ox]) << 16)
                                 | (np.uint32(f[ox]) << 24))
                else:
                    a, b, e, f = padded[c0, y], padded[c1, y + y1], padded[c2, y + y2], padded[c3, y + y3]
                    for ox in range(ow):
                        t = ox * sw + kx
                        d[ox] = (np.uint32(a[t]) | (np.uint32(b[t]) << 8) | (np.uint32(e[t]) << 16)
                                 | (np.uint32(f[t]) << 24))


@njit(cache=True, nogil=True)
def _fill_hwords(group, padded, hp, sw, hwords):
    """Horizontal words: hwords[cg, j, y, ox] byte h*G + g = padded[cg*G + g, y, ox*sw + j*R + h]. The wide
    layout has one plane (j = 0, sw = 1, every column: column group j is an offset of j*R words); the other
    one a plane per j. A column past a row's end reads the next row (padded has 3 spare rows): those
    bytes meet zero weights."""
    g_ = group
    wp = padded.shape[2]
    r_ = 4 // g_
    cols = hwords.shape[3]
    n = hp * cols
    plane = padded.shape[1] * wp
    if sw == 1 and cols == wp:  # the wide layout: its one plane is the padded image, a run per group
        src, dst = padded.reshape(-1), hwords.reshape(-1)
        for cg in range(hwords.shape[0]):
            c0 = cg * g_  # byte b reads channel c0 + b % G, column + b // G
            _pack_run(src, c0 * plane, (c0 + 1 % g_) * plane + 1 // g_, (c0 + 2 % g_) * plane + 2 // g_,
                      (c0 + 3 % g_) * plane + 3 // g_, dst, cg * hwords.shape[1] * n, n)
        return
    for cg in range(hwords.shape[0]):
        c0 = cg * g_  # byte b reads channel c0 + b % G, column + b // G
        a, b = padded[c0].reshape(-1), padded[c0 + 1 % g_].reshape(-1)
        e, f = padded[c0 + 2 % g_].reshape(-1), padded[c0 + 3 % g_].reshape(-1)
        x1, x2, x3 = 1 // g_, 2 // g_, 3 // g_
        for j in range(hwords.shape[1]):
            d = hwords[cg, j].reshape(-1)
            for y in range(hp):
                for ox in range(cols):
                    t = y * wp + ox * sw + j * r_
                    d[y * cols + ox] = (np.uint32(a[t]) | (np.uint32(b[t + x1]) << 8)
                                        | (np.uint32(e[t + x2]) << 16) | (np.uint32(f[t + x3]) << 24))


@njit(cache=True, nogil=True)
def _fill_phase_words(pixels, sh, sw, kh, kw, words):
    """The words of 4 channels (group 0, C a multiple of 4) split into the sh x sw phases of the stride:
    words[(cg*sh + py)*sw + px, r*wq + q] = pixels[cg, r*sh + py, q*sw + px] (``_fill_wide`` with G = 4
    holds channels 4cg..4cg+3 of each padded pixel in one word). Tap (ky, kx) of output (oy, ox) is then
    word (oy + ky // sh)*wq + ox + kx // sw of phase (ky % sh, kx % sw): each pixel word is copied once,
    where explicit patches copied it for every tap that reads it (up to 9). Words past the image (a phase
    one row or column shorter) are left alone: only the dropped columns of the wide rows read them, and so
    are the phases no tap reads (a 1x1 kernel at stride 2 reads one of the four)."""
    hp, wp = pixels.shape[1], pixels.shape[2]
    hq, wq = -(-hp // sh), -(-wp // sw)
    # Plain indexing, no row slices: each slice is a view whose reference count Numba updates atomically,
    # and two per row took three quarters of this copy's time.
    for cg in range(pixels.shape[0]):
        for py in range(min(sh, kh)):
            for px in range(min(sw, kw)):
                plane = (cg * sh + py) * sw + px
                for r in range(hq):
                    y = r * sh + py
                    if y < hp:
                        for q in range(-(-(wp - px) // sw)):
                            words[plane, r * wq + q] = pixels[cg, y, q * sw + px]


@njit(cache=True, nogil=True)
def _fill_phase_pairs(padded, sh, kh, hp, words):
    """``_fill_wide`` (G = 4) then ``_fill_phase_words`` at a horizontal stride of 2, in one pass over the
    padded image (rows of 16 pixels or more): 16 pixels of a row of 4 channels per ``qdot.phase_words16``
    call, the row's last call overlapping the one before from an even column; the last pixel of an odd
    row length, which no call covers, is packed alone. Both column phases are filled (a 1x1 kernel reads
    only the even one)."""
    ch, wp = padded.shape[1], padded.shape[2]
    wq, row_len = -(-wp // 2), words.shape[1]
    last = (wp - 16) - (wp - 16) % 2  # the last call's first column: even, so parities stay in place
    base, w_base, cs = np.int64(padded.ctypes.data), np.int64(words.ctypes.data), ch * wp
    flat, out = padded.reshape(-1), words.reshape(-1)
    for cg in range(padded.shape[0] // 4):
        for y in range(hp):
            py = y % sh
            if py >= kh:  # a phase row no tap reads
                continue
            a = (4 * cg * ch + y) * wp  # channel 4cg's row y
            d = (cg * sh + py) * 2 * row_len + (y // sh) * wq  # its row in the even phase
            for x0 in range(0, wp, 16):
                x = a + min(x0, last)
                phase_words16(base + x, base + x + cs, base + x + 2 * cs, base + x + 3 * cs,
                              w_base + 4 * (d + (x - a) // 2), w_base + 4 * (d + row_len + (x - a) // 2))
            if last + 16 < wp:  # column wp - 1, in the even phase
                x = a + wp - 1
                _pack_run(flat, x, x + cs, x + 2 * cs, x + 3 * cs, out, d + (wp - 1) // 2, 1)


@njit(cache=True, nogil=True)
def _fill_patch_words(padded, kh, kw, sh, sw, oh, ow, taps, words):
    """Explicit im2col words (group 0): words[w, oy*ow + ox] byte b = tap taps[w, b] (0 if none)."""
    per = kh * kw
    for w in range(taps.shape[0]):
        row = words[w]
        for oy in range(oh):
            for ox in range(ow):
                word = np.uint32(0)
                for b in range(4):
                    t = taps[w, b]
                    if t >= 0:
                        v = padded[t // per, oy * sh + (t % per) // kw, ox * sw + t % kw]
                        word |= np.uint32(v) << (8 * b)
                row[oy * ow + ox] = word


@njit(cache=True, nogil=True)
def qconv_images(x, pk, geo, rq, out_q, out_f, n0, n1):
    """Images n0..n1-1 of the quantized convolution (see ``conv2d_packed``, which checks the arguments):
    per image, build the words, then per block of output channels accumulate and run the epilogue."""
    n, c, h, w = x.shape
    n_out = pk.bias.shape[0]
    kh, kw, sh, sw, ph, pw = geo.kh, geo.kw, geo.sh, geo.sw, geo.ph, geo.pw
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    group, taps = conv_taps(c, kh, kw, sh)
    n_words = taps.shape[0]
    hp, wp = h + 2 * ph, w + 2 * pw
    padded = np.full((c, hp + 3, wp), np.uint8(pk.zero_point))
    wide = group > 0 and sw == 1
    phased = group == 0 and c % 4 == 0
    pairs = phased and sw == 2 and wp >= 16  # phase words straight from the padded rows
    pixels = np.zeros((c // 4 if phased and not pairs else 0, hp, wp), np.uint32)  # 4 channels a word
    hq, wq = -(-hp // sh), -(-wp // sw)  # one phase of the stride (``_fill_phase_words``)
    rs = wp if wide else wq if phased else ow  # accumulator row stride
    word_off = np.empty(n_words, np.int64)
    ncg, nj, hr, h_planes = max(c // max(group, 1), 1), 1, 0, 1  # (hr: rows in horizontal words)
    if phased:  # word (cg, ky, kx), as conv_taps orders them, in its phase plane
        n_rows, row_len = (c // 4) * sh * sw, hq * wq
        for cg in range(c // 4):
            for ky in range(kh):
                for kx in range(kw):
                    plane = (cg * sh + ky % sh) * sw + kx % sw
                    word_off[(cg * kh + ky) * kw + kx] = plane * row_len + (ky // sh) * wq + kx // sw
    elif group == 0:
        n_rows, row_len = n_words, oh * ow
        word_off[:] = np.arange(n_words) * row_len
    else:
        n_rows, row_len = (ncg, hp * wp) if wide else (ncg * kw, hp * ow)
        r_ = 4 // group
        nq, hr = _row_split(group, kh, kw)
        nj = -(-kw // r_)
        h_planes = 1 if wide else nj
        hbase = n_rows * row_len  # the horizontal words' planes follow the vertical ones
        i = 0
        for cg in range(ncg):
            for kq in range(nq):
                for kx in range(kw):
                    if wide:
                        word_off[i] = cg * row_len + kq * r_ * wp + kx
                    else:
                        word_off[i] = (cg * kw + kx) * row_len + kq * r_ * ow
                    i += 1
            for ky in range(nq * r_, nq * r_ + hr):
                for j in range(nj):
                    if wide:
                        word_off[i] = hbase + cg * hp * wp + ky * wp + j * r_
                    else:
                        word_off[i] = hbase + (cg * nj + j) * hp * ow + ky * ow
                    i += 1
    h_cols = wp if wide else ow
    n_h = ncg * h_planes * hp * h_cols if hr > 0 else 0
    n_pos = (oh - 1) * rs + ow
    # the last strip reads up to STRIP words past the last position (kw more in the wide layout)
    words_flat = np.zeros(n_rows * row_len + n_h + kw + STRIP, np.uint32)
    words = words_flat[:n_rows * row_len].reshape(n_rows, row_len)
    hwords = words_flat[n_rows * row_len:n_rows * row_len + n_h].reshape(-1, h_planes, hp, h_cols)
    # 8 rows for the micro-kernels and a spare one for the epilogue's vector reads past a row's end
    acc = np.empty((9, max(-(-n_pos // STRIP) * STRIP, 2 * REQUANT_VALUES)), np.int32)
    qh, qw = conv_output_size(oh, geo.pkh, geo.psh), conv_output_size(ow, geo.pkw, geo.psw)
    pooled = np.empty(max(qh * qw, REQUANT_VALUES), np.int32)
    bias = np.concatenate((pk.bias, np.zeros(8, np.int32)))  # a block's padding channels start at 0
    for i in range(n0, n1):
        _fill_padded(x[i], pk.qmax, padded, ph, pw)
        if pairs:
            _fill_phase_pairs(padded, sh, kh, hp, words)
        elif phased:
            _fill_wide(4, padded, hp, pixels)
            _fill_phase_words(pixels, sh, sw, kh, kw, words)
        elif group == 0:
            _fill_patch_words(padded, kh, kw, sh, sw, oh, ow, taps, words)
        elif wide:
            _fill_wide(group, padded, hp, words.reshape(n_rows, hp, wp))
        else:
            _fill_words(group, padded, kw, sw, ow, hp, words)
        if hr > 0:
            _fill_hwords(group, padded, hp, sw, hwords)
        dst_q = out_q[i].reshape(-1) if rq.mode != MODE_DEQUANT else out_q.reshape(-1)
        dst_f = out_f[i].reshape(-1) if rq.mode == MODE_DEQUANT else out_f.reshape(-1)
        o0 = 0
        while o0 < n_out:
            width = _block_size(n_out - o0)
            _gemm_block(words_flat, 0, word_off, pk.quads, o0 * n_words * PAIR_WORDS, width, bias, o0,
                        n_pos, acc)
            _conv_epilogue(acc, min(width, n_out - o0), o0, oh, ow, rs, geo, pooled, rq, dst_q, dst_f)
            o0 += min(width, n_out - o0)


def _check_array(a, name: str, dtype, shape: tuple | None) -> None:
    """a is a C-contiguous array of that dtype and shape (any shape if None)."""
    if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
            and (shape is None or a.shape == shape)):
        raise InputError(f"{name}: expected a C-contiguous {np.dtype(dtype).name} array of shape {shape}, "
                         f"found {type(a).__name__} {getattr(a, 'dtype', '')} {np.shape(a)}")


def _check_call(pk: PackedWeights, n_words: int, rq: Requant, out_shape: tuple, out_q, out_f) -> None:
    """What the njit kernels assume and never check: the weights' and outputs' sizes and types."""
    o = out_shape[1]
    _check_array(pk.bias, "bias", np.int32, (o,))
    if pk.n_words != n_words:
        raise InputError(f"packed weights: built for {pk.n_words} words per channel, this input needs "
                         f"{n_words}")
    _check_array(pk.quads, "packed weights", np.uint32, (packed_channels(o) * n_words * PAIR_WORDS,))
    for name in ("m0", "shift"):
        _check_array(getattr(rq, name), name, np.int32, (o,))
    _check_array(rq.fmult, "fmult", np.float32, (o,))
    if rq.mode not in (MODE_FIXEDPOINT, MODE_FLOAT, MODE_DEQUANT):
        raise InputError(f"requant mode: expected 0, 1 or 2, found {rq.mode}")
    dequant = rq.mode == MODE_DEQUANT
    _check_array(out_q, "out_q", np.uint8, None if dequant else out_shape)  # the unused one: any size
    _check_array(out_f, "out_f", np.float32, out_shape if dequant else None)


def conv2d_packed(x, pk: PackedWeights, geo: QConvGeometry, rq: Requant, out_q, out_f) -> None:
    """Quantized convolution (+ fused max pooling) of uint8 NCHW ``x`` with weights from ``pack_conv``:
    requantized uint8 (MODE_FIXEDPOINT / MODE_FLOAT) into ``out_q`` or real values (MODE_DEQUANT) into
    ``out_f``, shape (N, O, OH', OW') with OH' the pooled size; the unused output is an empty array."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.flags.c_contiguous):
        raise InputError(f"x: expected a C-contiguous uint8 NCHW array, found {type(x).__name__} "
                         f"{getattr(x, 'dtype', '')} {np.shape(x)}")
    n, c, h, w = x.shape
    if min(geo.kh, geo.kw, geo.sh, geo.sw, geo.pkh, geo.pkw, geo.psh, geo.psw) < 1 or min(geo.ph, geo.pw) < 0:
        raise InputError(f"geometry: expected kernel, strides and pool >= 1, padding >= 0, found {geo}")
    oh, ow = conv_output_size(h, geo.kh, geo.sh, geo.ph), conv_output_size(w, geo.kw, geo.sw, geo.pw)
    if oh < geo.pkh or ow < geo.pkw or h + 2 * geo.ph < geo.kh or w + 2 * geo.pw < geo.kw:
        raise InputError(f"x: {x.shape} is smaller than the kernel or pool window of {geo}")
    group, taps = conv_taps(c, geo.kh, geo.kw, geo.sh)
    qh, qw = conv_output_size(oh, geo.pkh, geo.psh), conv_output_size(ow, geo.pkw, geo.psw)
    shape = (n, pk.bias.shape[0], qh, qw)
    _check_call(pk, taps.shape[0], rq, shape, out_q, out_f)
    in_threads(qconv_images, (x, pk, geo, rq, out_q, out_f), n, 4)


# -- dense ------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _linear_epilogue(acc, channels, o0, m, rq, out_q, out_f, base):
    """out[base + r * O + o0 + c] for rows r < m and the block's channels c: requantized into out_q, or
    real values (MODE_DEQUANT) into out_f; one call per block, scalars only inside (a call per channel
    costs more than its work at small batches)."""
    n_out = rq.m0.shape[0]
    zero_point, lo, hi, mode = rq.zero_point, rq.lo, rq.hi, rq.mode
    for c in range(channels):
        o = o0 + c
        m0, sh, f = np.int64(rq.m0[o]), np.int64(rq.shift[o]), rq.fmult[o]
        for r in range(m):
            at = base + r * n_out + o
            if mode == MODE_DEQUANT:
                out_f[at] = np.float32(min(max(acc[c, r], lo), hi)) * f
            elif mode == MODE_FIXEDPOINT:
                out_q[at] = requantize_one(acc[c, r], m0, sh, zero_point, lo, hi)
            else:
                out_q[at] = requantize_float_one(acc[c, r], f, zero_point, lo, hi)


@njit(cache=True, nogil=True)
def _dense_small(x, pk, rq, out_q, out_f, r0, r1):
    """Rows r0..r1 of the dense layer one at a time, the channels in the vector lanes (``pk.lanes``)."""
    f = x.shape[1]
    n_out = pk.bias.shape[0]
    n_words = (f + 3) // 4
    blocks = -(-n_out // DENSE_BLOCK)
    codes = np.zeros(4 * n_words, np.uint8)
    words = codes.view(np.uint32)  # little-endian: byte b of a word is feature 4w + b
    acc = np.zeros(blocks * DENSE_BLOCK, np.int32)
    block_words = n_words * DENSE_BLOCK * PAIR_WORDS
    qmax = np.uint8(pk.qmax)
    for r in range(r0, r1):
        row = x[r]
        for kk in range(f):
            codes[kk] = min(row[kk], qmax)
        acc[:n_out] = pk.bias
        acc[n_out:] = 0
        for blk in range(blocks):
            dense_kernel(words.ctypes.data, n_words, pk.lanes.ctypes.data + 4 * blk * block_words,
                         acc.ctypes.data + 4 * blk * DENSE_BLOCK)
        _linear_epilogue(acc.reshape(-1, 1), n_out, 0, 1, rq, out_q, out_f, r * n_out)


@njit(cache=True, nogil=True)
def qlinear_rows(x, pk, rq, out_q, out_f, r0, r1):
    """Rows r0..r1 of the quantized dense layer (see ``linear_packed``), in tiles of LINEAR_ROWS rows
    transposed into words (features 4i..4i+3 of a row share a word) so the accumulation runs along the
    batch; out_q / out_f are flat (N * O)."""
    f = x.shape[1]
    n_out = pk.bias.shape[0]
    n_words = (f + 3) // 4
    qmax = np.uint8(pk.qmax)
    if r1 - r0 < SMALL_ROWS:
        _dense_small(x, pk, rq, out_q, out_f, r0, r1)
        return
    tile = min(LINEAR_ROWS, -(-(r1 - r0) // STRIP) * STRIP)  # small batches: small buffers to clear
    words_flat = np.zeros(n_words * tile + STRIP, np.uint32)
    words = words_flat[:n_words * tile].reshape(n_words, tile)
    word_off = np.arange(n_words) * tile
    acc = np.empty((8, tile), np.int32)
    bias = np.concatenate((pk.bias, np.zeros(8, np.int32)))  # a block's padding channels start at 0
    codes = np.zeros(4 * n_words, np.uint8)  # one row, clamped, with a zero tail (zero weights)
    code_words = codes.view(np.uint32)  # little-endian: byte b of word w is feature 4w + b
    xf = x.reshape(-1)
    for t0 in range(r0, r1, tile):
        m = min(r1, t0 + tile) - t0
        for r in range(m):
            row = xf[(t0 + r) * f:(t0 + r + 1) * f]  # a slice indexed from 0: the clamp vectorises (3x)
            for kk in range(f):
                codes[kk] = min(row[kk], qmax)
            for kk in range(n_words):
                words[kk, r] = code_words[kk]
        o0 = 0
        while o0 < n_out:
            width = _block_size(n_out - o0)
            _gemm_block(words_flat, 0, word_off, pk.quads, o0 * n_words * PAIR_WORDS, width, bias, o0, m,
                        acc)
            channels = min(width, n_out - o0)
            _linear_epilogue(acc, channels, o0, m, rq, out_q, out_f, t0 * n_out)
            o0 += channels


def linear_packed(x, pk: PackedWeights, rq: Requant, out_q, out_f) -> None:
    """Quantized fully connected layer on uint8 (N, F) rows with weights from ``pack_linear``; output
    (N, O) in ``out_q`` (uint8) or ``out_f`` (float32, MODE_DEQUANT), the other an empty array."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.flags.c_contiguous):
        raise InputError(f"x: expected a C-contiguous uint8 (N, F) array, found {type(x).__name__} "
                         f"{getattr(x, 'dtype', '')} {np.shape(x)}")
    n, f = x.shape
    o = pk.bias.shape[0]
    _check_call(pk, (f + 3) // 4, rq, (n, o), out_q, out_f)
    _check_array(pk.lanes, "packed weights (lanes)", np.uint32,
                 (-(-o // DENSE_BLOCK) * DENSE_BLOCK * ((f + 3) // 4) * PAIR_WORDS,))
    in_threads(qlinear_rows, (x, pk, rq, out_q.reshape(-1), out_f.reshape(-1)), n, LINEAR_ROWS)


# -- the unpacked-weights entry points (tests, one-off calls) -----------------------------------------
def requant_params(m0, shift, fmult, mode, zero_point, lo, hi) -> Requant:
    """A ``Requant`` with the array types the kernels read."""
    return Requant(np.ascontiguousarray(m0, np.int32), np.ascontiguousarray(shift, np.int32),
                   np.ascontiguousarray(fmult, np.float32), int(mode), int(zero_point), int(lo), int(hi))


def qconv2d(x, x_zero_point, wbytes, bits, kernel, stride, padding, pool, bias, m0, shift, fmult, mode,
            zero_point, lo, hi, out_q, out_f):
    """``conv2d_packed`` with the weights as stored (packed at ``bits``, ``kernels.packing``), repacked on
    each call; ``pool`` = (kh, kw, sh, sw) or (1, 1, 1, 1)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    o, c = len(bias), x.shape[1]
    w = unpack_bits(wbytes, bits, o * c * kh * kw, True).reshape(o, c, kh, kw)
    geo = QConvGeometry(*(int(v) for v in (kh, kw, sh, sw, ph, pw, *pool)))
    conv2d_packed(x, pack_conv(w, bias, sh, x_zero_point), geo,
                  requant_params(m0, shift, fmult, mode, zero_point, lo, hi), out_q, out_f)


def qlinear(x, x_zero_point, wbytes, bits, bias, m0, shift, fmult, mode, zero_point, lo, hi, out_q, out_f):
    """``linear_packed`` with the weights as stored (packed at ``bits``, ``kernels.packing``)."""
    o, f = len(bias), x.shape[1]
    w = unpack_bits(wbytes, bits, o * f, True).reshape(o, f)
    rq = requant_params(m0, shift, fmult, mode, zero_point, lo, hi)
    linear_packed(x, pack_linear(w, bias, x_zero_point), rq, out_q, out_f)
