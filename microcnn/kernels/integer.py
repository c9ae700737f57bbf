"""Integer inference kernels: quantize/dequantize, im2col into int16 pairs, an integer
GEMM micro-kernel, requantization, and the quantized convolution / dense layers built from them.

Number formats (see ``microcnn.quant`` for how the parameters are chosen):

* activations: unsigned integers in a uint8 container, ``real = scale * (q - zero_point)``, with
  ``0 <= q <= 2**bits - 1`` (8-bit: 0..255, 4-bit: 0..15);
* weights: signed, symmetric (zero point 0), per output channel. 8-bit weights are int8 bytes,
  4-bit weights are packed two per byte, element ``e`` of the flattened (O, K) matrix in byte ``e >> 1``,
  low nibble first, as two's-complement nibbles -8..7. Kernels widen one block of output channels at a
  time, never the whole tensor;
* accumulators: int32, ``bias + sum (q_x - zero_point_x) * q_w``. Activations are centred while the
  im2col words are built, so padding is an exact 0 and no zero-point correction term is needed, and
  |acc| <= K * 255 * 128 + |bias| (the layers refuse shapes where that could pass 2**31 - 1).

im2col: every uint32 "word" holds two centred int16 taps of one output position; the micro-kernel
multiplies it with a pair of weights by pmaddwd (vpdpwssd on VNNI hardware), keeping 8 output channels x
16 positions of accumulators in registers. For stride 1 the patch matrix is implicit, as in
``kernels.conv``: one row of words per (channel pair, kx) -- or (channel, kx) with kernel rows ky, ky+1
paired when the channel count is odd -- and tap row ky is a window of it at offset ky*OW. That pairing,
the widening to int16 and the centring are why ``kernels.conv.im2col`` (one value per entry, in the
input dtype) is not reused here.

Requantization (fixed point, the one rounding rule used everywhere and mirrored by the tests):

    y = (acc * m0 + (1 << (shift - 1))) >> shift      # int64 product, arithmetic shift
    q = clamp(y + zero_point_out, lo, hi)

i.e. the real multiplier ``M = m0 * 2**-shift`` (``2**30 <= m0 < 2**31``) is applied with one rounding,
half-way cases rounding towards +infinity (TFLite's single-rounding ``MultiplyByQuantizedMultiplier``).
A fused ReLU is only a larger ``lo`` (the zero point of real 0). The float mode computes
``rint(acc * multiplier)`` in float32 (half to even) instead.
"""

import numba
import numpy as np
from numba import njit

from .shapes import conv_output_size
from .simd import LANES, SIMD, register_loop, splat

MODE_FIXEDPOINT = 0  # uint8 output, integer multiplier and shift
MODE_FLOAT = 1  # uint8 output, float32 multiplier
MODE_DEQUANT = 2  # float32 output: clamp(acc, lo, hi) * scale (logits, or a fused ReLU's real output)
LINEAR_ROWS = 256  # batch rows per tile of the linear kernel (its words stay in L2)
IMAGE_GROUP = 16  # images whose im2col words are built before the convolution's channel loop


@njit(cache=True)
def quantize_u8(x, scale, zero_point, qmax):
    """float32 -> uint8: clamp(rint(x / scale) + zero_point, 0, qmax); x is a flat float32 array."""
    out = np.empty(x.size, np.uint8)
    s = np.float32(scale)
    for i in range(x.size):
        v = np.rint(x[i] / s) + zero_point
        if v < 0:
            v = 0
        elif v > qmax:
            v = qmax
        out[i] = np.uint8(v)
    return out


@njit(cache=True)
def dequantize_u8(q, scale, zero_point):
    """uint8 -> float32: (q - zero_point) * scale; q is flat."""
    out = np.empty(q.size, np.float32)
    s = np.float32(scale)
    for i in range(q.size):
        out[i] = np.float32(np.int32(q[i]) - zero_point) * s
    return out


@njit(cache=True)
def _weight_at(wbytes, e, bits):
    """Signed weight number ``e`` of the flattened matrix, from int8 bytes or packed nibbles."""
    if bits == 4:
        b = np.int32(wbytes[e >> 1])
        v = (b >> 4) if (e & 1) else (b & 0xF)
        return v - 16 if v >= 8 else v
    b = np.int32(wbytes[e])
    return b - 256 if b >= 128 else b


@njit(cache=True)
def requantize_one(acc, m0, shift, zero_point, lo, hi):
    """Fixed-point requantization of one int32 accumulator (the rule in the module docstring)."""
    y = (np.int64(acc) * np.int64(m0) + (np.int64(1) << (shift - 1))) >> shift
    y += zero_point
    if y < lo:
        y = lo
    elif y > hi:
        y = hi
    return y


@njit(cache=True)
def requantize_float_one(acc, multiplier, zero_point, lo, hi):
    y = np.int64(np.rint(np.float32(acc) * np.float32(multiplier))) + zero_point
    if y < lo:
        y = lo
    elif y > hi:
        y = hi
    return y


@njit(cache=True)
def requantize(acc, m0, shift, zero_point, lo, hi):
    """Requantize an (N, O) int32 array with per-column multipliers (m0, shift); returns uint8."""
    n, o = acc.shape
    out = np.empty((n, o), np.uint8)
    for i in range(n):
        for j in range(o):
            out[i, j] = requantize_one(acc[i, j], m0[j], shift[j], zero_point, lo, hi)
    return out


@njit(cache=True)
def _pair_word(a, b):
    """Two int16 values in one uint32 word, ``a`` in the low half."""
    return np.uint32(np.uint16(a)) | (np.uint32(np.uint16(b)) << 16)


STRIP = 16  # output positions per micro-kernel call



def _make_microkernel(channels: int):
    """An LLVM-level micro-kernel: ``channels`` output channels x STRIP positions of int32 accumulators
    held in vector registers across the whole reduction.

    words_addr: the first of STRIP consecutive uint32 words of position j0 at word offset 0; word w of
    the reduction starts ``word_off[w]`` words further (each word holds two int16 taps, low first).
    wts_addr: int32 (W, channels) weight pairs packed as (w0 & 0xFFFF) | (w1 << 16).
    acc_addr: position j0 of channel 0's int32 accumulator row, rows ``acc_stride`` elements apart; holds
    the initial values (bias) and receives the sums.
    Per channel and vector: acc += pmaddwd(words, splat(pair)) -- on AVX512-VNNI / AVX-VNNI hardware the
    backend fuses it into vpdpwssd. Without AVX2 the same arithmetic is portable vector IR.
    """
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.core.extending import intrinsic

    lanes = LANES
    vectors = STRIP // lanes

    @intrinsic
    def microkernel(typingctx, words_addr, word_off_addr, n_words, wts_addr, acc_addr, acc_stride):
        sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            words_addr, word_off_addr, n_words, wts_addr, acc_addr, acc_stride = args
            i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
            vi, vh = ir.VectorType(i32, lanes), ir.VectorType(i16, 2 * lanes)
            words_p = builder.inttoptr(words_addr, i32.as_pointer())
            off_p = builder.inttoptr(word_off_addr, i64.as_pointer())
            wts_p = builder.inttoptr(wts_addr, i32.as_pointer())
            acc_p = builder.inttoptr(acc_addr, i32.as_pointer())
            ptrs = []
            for c in range(channels):
                for v in range(vectors):
                    idx = builder.add(builder.mul(acc_stride, ir.Constant(i64, c)),
                                      ir.Constant(i64, lanes * v))
                    ptrs.append(builder.bitcast(builder.gep(acc_p, [idx]), vi.as_pointer()))
            init = [builder.load(ptr, align=4) for ptr in ptrs]
            if SIMD:
                name = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
                pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vh, vh]), name)

            def step(w, accs):
                offset = builder.load(builder.gep(off_p, [w]))
                src = builder.bitcast(builder.gep(words_p, [offset]), vi.as_pointer())
                data = [builder.load(builder.gep(src, [ir.Constant(i64, v)]), align=4)
                        for v in range(vectors)]
                if SIMD:
                    data = [builder.bitcast(d, vh) for d in data]
                else:
                    sixteen = ir.Constant(vi, [16] * lanes)
                    data = [(builder.ashr(builder.shl(d, sixteen), sixteen), builder.ashr(d, sixteen))
                            for d in data]
                new = []
                for c in range(channels):
                    idx = builder.add(builder.mul(w, ir.Constant(i64, channels)), ir.Constant(i64, c))
                    pair = builder.load(builder.gep(wts_p, [idx]))
                    if SIMD:
                        pairs = builder.bitcast(splat(builder, pair, vi), vh)
                        for v in range(vectors):
                            product = builder.call(pmadd, [data[v], pairs])
                            new.append(builder.add(accs[c * vectors + v], product))
                    else:
                        s0 = splat(builder, builder.ashr(builder.shl(pair, ir.Constant(i32, 16)),
                                                         ir.Constant(i32, 16)), vi)
                        s1 = splat(builder, builder.ashr(pair, ir.Constant(i32, 16)), vi)
                        for v in range(vectors):
                            lo, hi = data[v]
                            prod = builder.add(builder.mul(lo, s0), builder.mul(hi, s1))
                            new.append(builder.add(accs[c * vectors + v], prod))
                return new

            for ptr, value in zip(ptrs, register_loop(builder, n_words, init, step, "mk"), strict=True):
                builder.store(value, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return microkernel


_microkernel8 = _make_microkernel(8)
_microkernel4 = _make_microkernel(4)
_microkernel2 = _make_microkernel(2)
_microkernel1 = _make_microkernel(1)


@njit(cache=True)
def _block_size(remaining):
    """Micro-kernel width for the next output channels: 8 while they last, then 4, 2, 1."""
    if remaining >= 8:
        return 8
    if remaining >= 4:
        return 4
    return 2 if remaining >= 2 else 1


@njit(cache=True)
def _weight_block(wbytes, bits, o0, channels, k, tap0, tap1, block):
    """Weights of channels o0..o0+channels-1 in word order, as packed int16 pairs:
    block[w, c] = (w[tap0[w]] & 0xFFFF) | (w[tap1[w]] << 16), a missing tap (tap1 < 0) being 0."""
    for c in range(channels):
        base = (o0 + c) * k
        for w in range(tap0.shape[0]):
            w0 = _weight_at(wbytes, base + tap0[w], bits)
            w1 = _weight_at(wbytes, base + tap1[w], bits) if tap1[w] >= 0 else 0
            block[w, c] = (w0 & 0xFFFF) | (w1 << 16)
    block[:, channels:] = 0  # padding channels of a wider micro-kernel


@njit(cache=True)
def _gemm_block(words_flat, start, word_off, block, channels, bias, o0, n, acc):
    """acc[c, :n] = bias[o0 + c] + sum over words for the ``channels`` real output channels of a block
    of width block.shape[1] (8, 4, 2 or 1; extra channels have zero weights); position j's words are
    words_flat[start + word_off[w] + j].

    acc rows must hold n rounded up to STRIP, and words_flat extend STRIP words past the last word
    read: the last strip computes (and drops) a few positions beyond n."""
    w_addr = words_flat.ctypes.data + 4 * start
    o_addr, b_addr = word_off.ctypes.data, block.ctypes.data
    a_addr, stride = acc.ctypes.data, acc.shape[1]
    n_words = word_off.shape[0]
    width = block.shape[1]
    for c in range(width):
        row = acc[c]
        b = bias[o0 + c] if c < channels else 0
        for j in range(stride):
            row[j] = b
    for j0 in range(0, n, STRIP):
        wa, aa = w_addr + 4 * j0, a_addr + 4 * j0
        if width == 8:
            _microkernel8(wa, o_addr, n_words, b_addr, aa, stride)
        elif width == 4:
            _microkernel4(wa, o_addr, n_words, b_addr, aa, stride)
        elif width == 2:
            _microkernel2(wa, o_addr, n_words, b_addr, aa, stride)
        else:
            _microkernel1(wa, o_addr, n_words, b_addr, aa, stride)


@njit(cache=True)
def _finish(values, o, m0, shift, fmult, mode, zero_point, lo, hi, dst_q, dst_f, start, step):
    """Write one output channel: values[j] goes to index start + j*step of dst_q (requantized uint8) or of
    dst_f (real value, MODE_DEQUANT: the accumulator clamped to [lo, hi] -- a fused ReLU is lo = 0 --
    times the scale). One call per channel: array arguments cost reference counting."""
    n = values.shape[0]
    if mode == MODE_DEQUANT:
        s = fmult[o]
        for j in range(n):
            dst_f[start + j * step] = np.float32(min(max(values[j], lo), hi)) * s
    elif mode == MODE_FIXEDPOINT:
        m, sh = np.int64(m0[o]), np.int64(shift[o])
        rounding = np.int64(1) << (sh - 1)
        if step == 1:  # contiguous: a vectorisable loop (the same rule as requantize_one)
            out = dst_q[start:start + n]
            for j in range(n):
                y = ((np.int64(values[j]) * m + rounding) >> sh) + zero_point
                out[j] = np.uint8(min(max(y, lo), hi))
        else:
            for j in range(n):
                dst_q[start + j * step] = requantize_one(values[j], m, sh, zero_point, lo, hi)
    else:
        f = fmult[o]
        for j in range(n):
            dst_q[start + j * step] = requantize_float_one(values[j], f, zero_point, lo, hi)


@njit(cache=True)
def _max_pool_acc(acc, ow, pkh, pkw, psh, psw, qh, qw, pooled):
    """Max pooling of one channel's accumulators (oh x ow, row-major) into pooled (qh * qw)."""
    if pkh == 2 and pkw == 2 and psh == 2 and psw == 2:  # the common case, branch-free
        for qy in range(qh):
            r0 = acc[2 * qy * ow:(2 * qy + 1) * ow]
            r1 = acc[(2 * qy + 1) * ow:(2 * qy + 2) * ow]
            dst = pooled[qy * qw:(qy + 1) * qw]
            for qx in range(qw):
                dst[qx] = max(max(r0[2 * qx], r0[2 * qx + 1]), max(r1[2 * qx], r1[2 * qx + 1]))
        return
    for qy in range(qh):
        for qx in range(qw):
            best = acc[(qy * psh) * ow + qx * psw]
            for dy in range(pkh):
                row = (qy * psh + dy) * ow + qx * psw
                for dx in range(pkw):
                    v = acc[row + dx]
                    if v > best:
                        best = v
            pooled[qy * qw + qx] = best


@njit(cache=True)
def _conv_epilogue(acc, channels, o0, n_pos, ow, pkh, pkw, psh, psw, qh, qw, pooled, m0, shift, fmult, mode,
                   zero_point, lo, hi, dst_q, dst_f):
    """Write ``channels`` accumulator rows of one image (optionally max-pooled) into its output planes.

    Max pooling runs on the accumulators: requantization is monotonic, so pooling first gives the same
    integers and requantizes a quarter as many values."""
    plain = pkh == 1 and pkw == 1 and psh == 1 and psw == 1
    pool2 = pkh == 2 and pkw == 2 and psh == 2 and psw == 2
    for c in range(channels):
        o = o0 + c
        row = acc[c]
        if plain:
            _finish(row[:n_pos], o, m0, shift, fmult, mode, zero_point, lo, hi, dst_q, dst_f, o * n_pos, 1)
        elif pool2 and mode == MODE_FIXEDPOINT:  # the hot path, in one loop nest
            m, sh = np.int64(m0[o]), np.int64(shift[o])
            rounding = np.int64(1) << (sh - 1)
            for qy in range(qh):
                r0 = row[2 * qy * ow:(2 * qy + 1) * ow]
                r1 = row[(2 * qy + 1) * ow:(2 * qy + 2) * ow]
                dst = pooled[qy * qw:(qy + 1) * qw]
                for qx in range(qw):
                    dst[qx] = max(max(r0[2 * qx], r0[2 * qx + 1]), max(r1[2 * qx], r1[2 * qx + 1]))
            out = dst_q[o * qh * qw:(o + 1) * qh * qw]
            for j in range(qh * qw):  # separate loop: this one vectorises
                y = ((np.int64(pooled[j]) * m + rounding) >> sh) + zero_point
                out[j] = np.uint8(min(max(y, lo), hi))
        else:
            _max_pool_acc(row[:n_pos], ow, pkh, pkw, psh, psw, qh, qw, pooled)
            _finish(pooled, o, m0, shift, fmult, mode, zero_point, lo, hi, dst_q, dst_f, o * qh * qw, 1)


@njit(cache=True)
def _consecutive_pairs(k):
    """Word plan pairing taps 2w and 2w+1 (-1 past the end), each word in its own row at offset 0."""
    n = (k + 1) // 2
    rows, offs = np.empty(n, np.int64), np.zeros(n, np.int64)
    tap0, tap1 = np.empty(n, np.int64), np.empty(n, np.int64)
    for w in range(n):
        rows[w], tap0[w] = w, 2 * w
        tap1[w] = 2 * w + 1 if 2 * w + 1 < k else -1
    return rows, offs, tap0, tap1


@njit(cache=True)
def conv_plan(c, kh, kw, sh, ow):
    """How qconv2d pairs the K = c*kh*kw taps into uint32 words, and where each word row lives.

    Returns (layout, rows, offs, tap0, tap1): word w of output position p is
    ``words[rows[w], offs[w] + p]``; it multiplies weight taps tap0[w] and tap1[w] (-1: none).
    layout 0 (stride 1, even c): channels 2i and 2i+1 share a word; 1 (stride 1, odd c): kernel rows
    ky and ky+1 share a word; both use the implicit im2col buffer of ``_fill_words`` (a window
    at offset ky*ow of a row per (channel pair or channel, kx)). Layout 2 (vertical stride > 1):
    explicit patch words, consecutive taps paired.
    """
    k = c * kh * kw
    if sh != 1:
        rows, offs, tap0, tap1 = _consecutive_pairs(k)
        return 2, rows, offs, tap0, tap1
    if c % 2 == 0:
        n = (c // 2) * kh * kw
        rows, offs = np.empty(n, np.int64), np.empty(n, np.int64)
        tap0, tap1 = np.empty(n, np.int64), np.empty(n, np.int64)
        w = 0
        for cp in range(c // 2):
            for ky in range(kh):
                for kx in range(kw):
                    rows[w], offs[w] = cp * kw + kx, ky * ow
                    tap0[w] = ((2 * cp) * kh + ky) * kw + kx
                    tap1[w] = ((2 * cp + 1) * kh + ky) * kw + kx
                    w += 1
        return 0, rows, offs, tap0, tap1
    n = c * ((kh + 1) // 2) * kw
    rows, offs = np.empty(n, np.int64), np.empty(n, np.int64)
    tap0, tap1 = np.empty(n, np.int64), np.empty(n, np.int64)
    w = 0
    for ch in range(c):
        for kp in range((kh + 1) // 2):
            for kx in range(kw):
                rows[w], offs[w] = ch * kw + kx, 2 * kp * ow
                tap0[w] = (ch * kh + 2 * kp) * kw + kx
                tap1[w] = (ch * kh + 2 * kp + 1) * kw + kx if 2 * kp + 1 < kh else -1
                w += 1
    return 1, rows, offs, tap0, tap1


@njit(cache=True)
def _fill_words(layout, padded, kw, sw, ow, words):
    """Implicit im2col rows from the centred, zero-bordered image ``padded`` (C, Hp + 1, Wp).

    layout 0: words[cp*kw + kx, y*ow + ox] = (padded[2cp, y, ox*sw + kx], padded[2cp+1, y, ...]);
    layout 1: words[c*kw + kx, y*ow + ox] = (padded[c, y, ox*sw + kx], padded[c, y+1, ...]) -- the extra
    zero row makes y+1 valid; for an odd kernel height the last high half pairs with a zero weight.
    """
    c, hp1, _ = padded.shape
    hp = hp1 - 1
    groups = c // 2 if layout == 0 else c
    for g in range(groups):
        for kx in range(kw):
            dst = words[g * kw + kx]
            for y in range(hp):
                d = dst[y * ow:(y + 1) * ow]
                if layout == 0:
                    r0, r1 = padded[2 * g, y], padded[2 * g + 1, y]
                else:
                    r0, r1 = padded[g, y], padded[g, y + 1]
                if sw == 1:
                    a, b = r0[kx:kx + ow], r1[kx:kx + ow]
                    for ox in range(ow):
                        d[ox] = _pair_word(a[ox], b[ox])
                else:
                    for ox in range(ow):
                        d[ox] = _pair_word(r0[ox * sw + kx], r1[ox * sw + kx])


@njit(cache=True)
def _fill_patch_words(padded, kh, kw, sh, sw, oh, ow, tap0, tap1, words):
    """Explicit im2col words (layout 2): words[w, oy*ow + ox] pairs taps tap0[w], tap1[w]."""
    taps = kh * kw
    for w in range(tap0.shape[0]):
        t0, t1 = tap0[w], tap1[w]
        c0, ky0, kx0 = t0 // taps, (t0 % taps) // kw, t0 % kw
        for oy in range(oh):
            for ox in range(ow):
                a = padded[c0, oy * sh + ky0, ox * sw + kx0]
                b = np.int16(0)
                if t1 >= 0:
                    b = padded[t1 // taps, oy * sh + (t1 % taps) // kw, ox * sw + t1 % kw]
                words[w, oy * ow + ox] = _pair_word(a, b)


@njit(cache=True, nogil=True)
def _conv_images(x, x_zero_point, wbytes, bits, kh, kw, sh, sw, ph, pw, pkh, pkw, psh, psw, bias, m0,
                 shift, fmult, mode, zero_point, lo, hi, out_q, out_f, n0, n1):
    n, c, h, w = x.shape
    n_out = bias.shape[0]
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    qh, qw = conv_output_size(oh, pkh, psh), conv_output_size(ow, pkw, psw)
    k = c * kh * kw
    layout, rows, offs, tap0, tap1 = conv_plan(c, kh, kw, sh, ow)
    hp = h + 2 * ph
    padded = np.zeros((c, hp + 1, w + 2 * pw), np.int16)
    if layout == 2:
        n_rows, row_len = rows.shape[0], oh * ow
    else:
        n_rows, row_len = (c // 2 if layout == 0 else c) * kw, hp * ow
    # Images go in groups: each group's im2col words are built once, then every block of output
    # channels has its weights widened once per group and runs over all images of the group.
    group = max(1, min(IMAGE_GROUP, n1 - n0))
    stride = n_rows * row_len
    words_flat = np.zeros(group * stride + STRIP, np.uint32)
    word_off = rows * row_len + offs
    block = np.empty((rows.shape[0], 8), np.int32)
    acc = np.empty((8, -(-(oh * ow) // STRIP) * STRIP), np.int32)
    pooled = np.empty(qh * qw, np.int32)
    zp = np.int16(x_zero_point)
    for g0 in range(n0, n1, group):
        g1 = min(n1, g0 + group)
        for i in range(g0, g1):
            for ch in range(c):
                for y in range(h):
                    src = x[i, ch, y]
                    dst = padded[ch, y + ph, pw:pw + w]
                    for xx in range(w):
                        dst[xx] = np.int16(src[xx]) - zp
            words = words_flat[(i - g0) * stride:(i - g0 + 1) * stride].reshape(n_rows, row_len)
            if layout == 2:
                _fill_patch_words(padded, kh, kw, sh, sw, oh, ow, tap0, tap1, words)
            else:
                _fill_words(layout, padded, kw, sw, ow, words)
        o0 = 0
        while o0 < n_out:
            width = _block_size(n_out - o0)
            channels = min(width, n_out - o0)
            blk = block[:, :width].copy()
            _weight_block(wbytes, bits, o0, channels, k, tap0, tap1, blk)
            for i in range(g0, g1):
                dst_q = out_q[i].reshape(-1) if mode != MODE_DEQUANT else out_q.reshape(-1)
                dst_f = out_f[i].reshape(-1) if mode == MODE_DEQUANT else out_f.reshape(-1)
                _gemm_block(words_flat, (i - g0) * stride, word_off, blk, channels, bias, o0, oh * ow, acc)
                _conv_epilogue(acc, channels, o0, oh * ow, ow, pkh, pkw, psh, psw, qh, qw, pooled, m0, shift,
                               fmult, mode, zero_point, lo, hi, dst_q, dst_f)
            o0 += channels


_pools: dict = {}


def _in_threads(kernel, args, n: int, min_per_thread: int) -> None:
    """kernel(*args, start, stop) over [0, n), split across numba.get_num_threads() threads.

    The kernels release the GIL (nogil), so plain Python threads run them in parallel; unlike
    ``parallel=True`` this compiles nothing twice."""
    threads = max(1, min(numba.get_num_threads(), n // min_per_thread))
    if threads == 1:
        kernel(*args, 0, n)
        return
    if threads not in _pools:
        from concurrent.futures import ThreadPoolExecutor

        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="microcnn-int")
    bounds = [t * n // threads for t in range(threads + 1)]
    futures = [_pools[threads].submit(kernel, *args, bounds[t], bounds[t + 1]) for t in range(threads)]
    for f in futures:
        f.result()


def qconv2d(x, x_zero_point, wbytes, bits, kernel, stride, padding, pool, bias, m0, shift, fmult, mode,
            zero_point, lo, hi, out_q, out_f):
    """Quantized convolution (+ optional fused max pooling) of uint8 NCHW ``x``.

    Per image: centre (q - zero point) into a zero-bordered int16 copy, build the int16-pair im2col words
    (``conv_plan``), then per output channel widen the int8 / packed int4 weights into word order,
    accumulate in int32 and write requantized uint8 (MODE_FIXEDPOINT / MODE_FLOAT) to ``out_q`` or real
    values (MODE_DEQUANT) to ``out_f``, shape (N, O, OH', OW') with OH' the pooled size when ``pool`` =
    (kh, kw, sh, sw) is given, else (1, 1, 1, 1). The unused output may be an empty array.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n = x.shape[0]
    _in_threads(_conv_images, (x, x_zero_point, wbytes, bits, kh, kw, sh, sw, ph, pw, *pool, bias, m0, shift,
                               fmult, mode, zero_point, lo, hi, out_q, out_f), n, 16)


@njit(cache=True, nogil=True)
def _linear_rows(x, x_zero_point, wbytes, bits, bias, m0, shift, fmult, mode, zero_point, lo, hi, out_q,
                 out_f, r0, r1):
    """Rows r0..r1 of the quantized dense layer, in tiles of LINEAR_ROWS rows transposed into words
    (features 2i, 2i+1 of a row share a word) so the accumulation runs along the batch."""
    f = x.shape[1]
    n_out = bias.shape[0]
    n_pairs = (f + 1) // 2
    rows, _, tap0, tap1 = _consecutive_pairs(f)
    zp = np.int16(x_zero_point)
    words_flat = np.zeros(n_pairs * LINEAR_ROWS + STRIP, np.uint32)
    words = words_flat[:n_pairs * LINEAR_ROWS].reshape(n_pairs, LINEAR_ROWS)
    word_off = rows * LINEAR_ROWS
    block = np.empty((n_pairs, 8), np.int32)
    acc = np.empty((8, LINEAR_ROWS), np.int32)
    out_block = np.empty((8, LINEAR_ROWS), np.uint8)
    for t0 in range(r0, r1, LINEAR_ROWS):
        m = min(r1, t0 + LINEAR_ROWS) - t0
        for r in range(m):
            src = x[t0 + r]
            for kk in range(f // 2):
                words[kk, r] = _pair_word(np.int16(src[2 * kk]) - zp, np.int16(src[2 * kk + 1]) - zp)
            if f & 1:
                words[n_pairs - 1, r] = _pair_word(np.int16(src[f - 1]) - zp, 0)
        o0 = 0
        while o0 < n_out:
            width = _block_size(n_out - o0)
            channels = min(width, n_out - o0)
            blk = block[:, :width].copy()
            _weight_block(wbytes, bits, o0, channels, f, tap0, tap1, blk)
            _gemm_block(words_flat, 0, word_off, blk, channels, bias, o0, m, acc)
            if mode == MODE_DEQUANT:
                for c_ in range(channels):
                    _finish(acc[c_, :m], o0 + c_, m0, shift, fmult, mode, zero_point, lo, hi, out_q, out_f,
                            t0 * n_out + o0 + c_, n_out)
            else:
                # requantize contiguously per channel, then scatter the small block into the rows
                flat = out_block.reshape(-1)
                for c_ in range(channels):
                    _finish(acc[c_, :m], o0 + c_, m0, shift, fmult, mode, zero_point, lo, hi, flat, out_f,
                            c_ * LINEAR_ROWS, 1)
                for r in range(m):
                    dst = out_q[(t0 + r) * n_out + o0:(t0 + r) * n_out + o0 + channels]
                    for c_ in range(channels):
                        dst[c_] = out_block[c_, r]
            o0 += channels


def qlinear(x, x_zero_point, wbytes, bits, bias, m0, shift, fmult, mode, zero_point, lo, hi, out_q, out_f):
    """Quantized fully connected layer on uint8 (N, F) rows; output (N, O) in ``out_q`` (uint8) or
    ``out_f`` (float32, MODE_DEQUANT), the other may be empty. Same weights and epilogue as qconv2d."""
    n = x.shape[0]
    args = (x, x_zero_point, wbytes, bits, bias, m0, shift, fmult, mode, zero_point, lo, hi,
            out_q.reshape(-1), out_f.reshape(-1))
    _in_threads(_linear_rows, args, n, LINEAR_ROWS)
