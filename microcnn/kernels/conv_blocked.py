"""FP32 convolution with output channels in vector lanes: a direct (implicit-GEMM) micro-kernel for
batches, where ``im2col``'s pixel-vectorised GEMM loses time to strides, padding and few channels.

``conv.im2col_images`` vectorises over output pixels: each vector is a run of one output row, so a
stride of 2 first splits the image into its four phases, padding costs a zero-bordered copy plus the
Wp - OW wasted columns of every row, and each 8-channel block re-reads the image. Here a vector holds
``BLOCK`` (16) output channels of one pixel instead: the micro-kernel keeps ``PIXELS`` output pixels
x 16 channels (or ``PAIR_PIXELS`` x 32) in registers for the whole reduction over the taps k = (c, u,
v) and, per tap, loads the weights as vectors and broadcasts each pixel's input value -- any stride
or dilation is only an address, and no column is computed to be dropped. Pixels are numbered along the
whole output image, so a tile may wrap from one output row to the next; the last tile of an image
overlaps the one before (it is recomputed, with the same values).

Same bits as ``im2col_images`` (tested): every output is ``fma(w[K-1], x[K-1], ... fma(w[0], x[0],
bias))`` -- one fused multiply-add per tap in tap order from the bias, zero-padding taps included, as
``gemm.gemm_packed`` computes it -- whatever the vector width; only the grouping of outputs into
registers differs. So which of the two runs a layer (``use_blocked``) is a matter of speed only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit
from numba.extending import register_jitable

from .pool import maxpool_images
from .shapes import conv_output_size
from .simd import LANES, PAIRS, fmuladd, register_loop, splat

if TYPE_CHECKING:
    from llvmlite import ir

BLOCK = 16  # output channels per block: one AVX-512 vector, two AVX2 ones
# Output pixels per micro-kernel call: 12 x 1 accumulators of AVX-512's 32 registers, 6 x 2 of AVX2's 16
# (plus the weight vectors and a broadcast).
PIXELS = 12 if LANES == 16 else 6
# With two blocks or more, AVX-512 calls take two blocks (32 channels) x 10 pixels where ``simd.PAIRS``
# (cores with two 512-bit FMA units): 20 accumulators, and per tap 2 weight loads + 10 broadcasts for 20
# multiply-adds instead of 1 + 12 for 12. On an Intel Xeon the single block is bound by those loads: 32-
# and 64-channel layers ran 19-33 % faster; on AMD Zen 4, which splits each 512-bit FMA, 15-20 % slower.
# 12 x 2 spills; AVX2 has no registers to spare (0: no pairs).
PAIR_PIXELS = 10 if PAIRS else 0
# Taps per output below which the kernel's per-tile transpose outweighs its gain. At 8, a 9-tap stem
# (1 channel, 3x3) and 1x1 convolutions of 8-12 channels ran 15-35 % faster than im2col (Intel, 256 images).
MIN_TAPS = 8


@register_jitable
def use_blocked(o, groups, taps, pixels, strided, dh, dw) -> bool:
    """Whether ``conv.im2col_images`` runs a convolution here: groups of whole channel blocks, enough
    taps per output (C/groups * KH * KW) and output pixels for one tile. Any batch, one image included:
    packing the weights per call is one pass over O x K values against O x K x pixels multiply-adds per
    image (batch-1 latency of the imported BatchNorm and residual CNNs 15-20 % lower than with im2col
    below 4 images). Dilation would work too; it is left to im2col, as is everything untested."""
    return (groups == 1 and o >= BLOCK // 2 and (taps >= MIN_TAPS or strided) and pixels >= PIXELS
            and dh == 1 and dw == 1)


def _transpose(builder: ir.IRBuilder, rows: list) -> list:
    """The LANES x LANES matrix whose rows are the vectors ``rows`` (LANES of them), transposed: log2(LANES)
    rounds of two-vector shuffles, each swapping the off-diagonal sub-blocks of size b (8, 4, 2, 1)."""
    from llvmlite import ir

    rows = list(rows)
    b = LANES // 2
    while b >= 1:
        for i in range(LANES):
            if i & b:
                continue
            j = i + b
            low = [c if not c & b else LANES + c - b for c in range(LANES)]
            high = [c + b if not c & b else LANES + c for c in range(LANES)]
            mask = [ir.Constant(ir.VectorType(ir.IntType(32), LANES), m) for m in (low, high)]
            rows[i], rows[j] = (builder.shuffle_vector(rows[i], rows[j], mask[0]),
                                builder.shuffle_vector(rows[i], rows[j], mask[1]))
        b //= 2
    return rows


def _store_first(builder: ir.IRBuilder, vector: ir.Value, ptr: ir.Value, count: int) -> None:
    """Store lanes 0 .. count-1 of ``vector`` at the float32 pointer ``ptr`` by plain stores of 16, 8, 4, 2,
    1 lanes, nothing past them (no masked store: AVX2 has only the slow ``vmaskmovps``)."""
    from llvmlite import ir

    done = 0
    for size in (16, 8, 4, 2, 1):
        if count - done >= size and size <= vector.type.count:
            lanes = ir.Constant(ir.VectorType(ir.IntType(32), size), list(range(done, done + size)))
            part = builder.shuffle_vector(vector, ir.Constant(vector.type, ir.Undefined), lanes)
            at = builder.gep(ptr, [ir.Constant(ir.IntType(64), done)])
            builder.store(part, builder.bitcast(at, part.type.as_pointer()), align=4)
            done += size


def _make_kernel(pixels: int, nblk: int = 1) -> Any:
    """``kernel(data_addr, off_addr, n_k, pix_addr, w_addr, bias_addr, out_addr, out_stride, channels,
    relu)``: for the ``pixels`` outputs p whose inputs start at ``data[pix[p]]`` and ``nblk`` consecutive
    blocks of BLOCK channels,

        out[f * out_stride + p] = fma(w[n_k-1, f], data[pix[p] + off[n_k-1]], ... fma(w[0, f],
                                      data[pix[p] + off[0]], bias[f]))

    for f < ``channels`` (float32 addresses, int64 element offsets; ``w`` the blocks' packed (nblk, n_k,
    BLOCK) weights, ``bias`` their (nblk, BLOCK) biases), each value v stored as ``v if v > 0 else 0``
    when ``relu`` is not 0 -- im2col's ReLU, which also maps -0 and NaN to 0. The accumulators hold
    channels in lanes; they are transposed in registers and each channel's ``pixels`` values written by
    plain vector stores, straight into the NCHW output (a transposing copy through memory took a sixth of
    the time). Up to 20 accumulators keep every multiply-add one instruction with its broadcast operand;
    24 (two blocks x 12 pixels) made LLVM spill."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    vectors = BLOCK // LANES
    per_k = nblk * vectors
    assert pixels <= LANES  # a pixel per lane of the transposed rows

    @intrinsic
    def kernel(typingctx, data_addr, off_addr, n_k, pix_addr, w_addr, bias_addr, out_addr, out_stride,
               channels, relu):
        sig = types.void(*([types.intp] * 10))

        def codegen(context, builder, signature, args):
            data_addr, off_addr, n_k, pix_addr, w_addr, bias_addr, out_addr, out_stride, channels, relu = args
            f32, i64, i1 = ir.FloatType(), ir.IntType(64), ir.IntType(1)
            vf = ir.VectorType(f32, LANES)
            kinds = [(data_addr, f32), (off_addr, i64), (pix_addr, i64), (w_addr, vf), (bias_addr, vf),
                     (out_addr, f32)]
            data_p, off_p, pix_p, w_p, bias_p, out_p = (builder.inttoptr(a, t.as_pointer()) for a, t in kinds)
            fma = fmuladd(builder, vf)
            starts = [builder.gep(data_p, [builder.load(builder.gep(pix_p, [ir.Constant(i64, p)]))])
                      for p in range(pixels)]
            bias = [builder.load(builder.gep(bias_p, [ir.Constant(i64, v)]), align=4) for v in range(per_k)]
            block_rows = builder.mul(n_k, ir.Constant(i64, vectors))

            def step(k, accs):
                offset = builder.load(builder.gep(off_p, [k]))
                row = builder.mul(k, ir.Constant(i64, vectors))
                weights = []
                for blk in range(nblk):
                    at = builder.add(row, builder.mul(block_rows, ir.Constant(i64, blk)))
                    weights += [builder.load(builder.gep(w_p, [builder.add(at, ir.Constant(i64, v))]),
                                             align=4) for v in range(vectors)]
                new = []
                for p in range(pixels):
                    value = splat(builder, builder.load(builder.gep(starts[p], [offset])), vf)
                    new += [builder.call(fma, [weights[v], value, accs[p * per_k + v]])
                            for v in range(per_k)]
                return new

            finals = register_loop(builder, n_k, bias * pixels, step, "blockedconv")
            zero = ir.Constant(vf, [0.0] * LANES)
            keep_all = splat(builder, builder.icmp_signed("==", relu, ir.Constant(i64, 0)),
                             ir.VectorType(i1, LANES))
            finals = [builder.select(builder.or_(builder.fcmp_ordered(">", v, zero), keep_all), v, zero)
                      for v in finals]
            for v in range(per_k):  # channels v * LANES .. v * LANES + LANES - 1
                rows = _transpose(builder, [finals[p * per_k + v] for p in range(pixels)]
                                  + [zero] * (LANES - pixels))
                for lane in range(LANES):
                    f = ir.Constant(i64, v * LANES + lane)
                    with builder.if_then(builder.icmp_signed("<", f, channels)):
                        ptr = builder.gep(out_p, [builder.mul(out_stride, f)])
                        _store_first(builder, rows[lane], ptr, pixels)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_SMALL = 4  # pixels per call on an image's last 4 or fewer: a whole tile would redo up to 11
_tile, _tile_small = _make_kernel(PIXELS), _make_kernel(_SMALL)
_pair, _pair_small = _make_kernel(max(PAIR_PIXELS, 1), 2), _make_kernel(_SMALL, 2)  # (unused on AVX2)


def _make_move() -> Any:
    """``move(dst_addr, src_addr)``: copy LANES float32 values by one vector load and store (rows of the
    padded image in a few instructions; a Numba loop indexing with a possibly negative offset is not
    vectorised, and took a fifth of a stride-2 convolution)."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def move(typingctx, dst_addr, src_addr):
        def codegen(context, builder, signature, args):
            vf = ir.VectorType(ir.FloatType(), LANES).as_pointer()
            value = builder.load(builder.inttoptr(args[1], vf), align=4)
            builder.store(value, builder.inttoptr(args[0], vf), align=4)
            return context.get_dummy_value()

        return types.void(types.intp, types.intp), codegen

    return move


_move = _make_move()


@njit(cache=True, nogil=True)
def pack_blocks(w2, bias, multiple=1):
    """Weights (O, K) and bias (O,) as ceil(O / BLOCK) blocks of BLOCK channels, rounded up to a
    ``multiple`` (the blocks per micro-kernel call), k-major: (blocks, K, BLOCK) and (blocks, BLOCK),
    channels past O zero. The layout the micro-kernel reads."""
    o, k = w2.shape
    blocks = -(-o // (BLOCK * multiple)) * multiple
    packed = np.zeros((blocks, k, BLOCK), np.float32)
    padded = np.zeros((blocks, BLOCK), np.float32)
    for f in range(o):
        blk, lane = f // BLOCK, f % BLOCK
        padded[blk, lane] = bias[f]
        for t in range(k):
            packed[blk, t, lane] = w2[f, t]
    return packed, padded


@njit(cache=True, nogil=True)
def blocked_images(x, w2, b, geom, pool, relu, y, n0, n1):
    """y[n] = conv(x[n]) + b for n0 <= n < n1 (``geom`` a ``conv.ConvGeometry`` that ``use_blocked``
    accepts), then ReLU when ``relu``, then max pooling when ``pool`` (a ``pool.PoolGeometry``) has a
    window -- ``conv.im2col_images``'s contract and bits. ``w2``: the weights as (O, C*KH*KW)."""
    c, h, wd = x.shape[1], x.shape[2], x.shape[3]
    o, k = w2.shape
    step = 2 if PAIR_PIXELS > 0 and w2.shape[0] > BLOCK else 1  # blocks per micro-kernel call
    tile = PAIR_PIXELS if step == 2 else PIXELS
    packed, bias = pack_blocks(w2, b, step)
    ph, pw = geom.ph, geom.pw
    hp, wp = h + 2 * ph, wd + 2 * pw
    oh = conv_output_size(hp, geom.kh, geom.sh, 0, geom.dh)
    ow = conv_output_size(wp, geom.kw, geom.sw, 0, geom.dw)
    npix = oh * ow
    offs = np.empty(k, np.int64)  # tap (ch, u, v) -> its offset from an output pixel's first input
    for ch in range(c):
        for u in range(geom.kh):
            for v in range(geom.kw):
                offs[(ch * geom.kh + u) * geom.kw + v] = (ch * hp + u * geom.dh) * wp + v * geom.dw
    pix = np.empty(npix, np.int64)  # output pixel -> its first input in the padded image
    for j in range(npix):
        pix[j] = (j // ow) * geom.sh * wp + (j % ow) * geom.sw
    padded = ph > 0 or pw > 0
    image = np.zeros((c, hp, wp) if padded else (0, 0, 0), np.float32)  # the border stays zero
    blocks = packed.shape[0]
    pooled = pool.kh > 0
    relu_now = 1 if relu and not pooled else 0  # a ReLU before pooling becomes the pooling's floor
    acc = np.empty((1, o, oh, ow) if pooled else (0, 0, 0, 0), np.float32)
    floor = np.float32(0.0) if relu else np.float32(-np.inf)
    for i in range(n0, n1):
        if padded:
            data, src = image.ctypes.data, x[i].ctypes.data
            for ch in range(c):
                for r in range(h):
                    if wd >= LANES:  # whole vectors, the last one overlapping the one before
                        row, to = src + 4 * (ch * h + r) * wd, data + 4 * ((ch * hp + ph + r) * wp + pw)
                        for q in range(0, wd, LANES):
                            q = min(q, wd - LANES)
                            _move(to + 4 * q, row + 4 * q)
                    else:
                        for q in range(wd):
                            image[ch, ph + r, pw + q] = x[i, ch, r, q]
        else:
            data = x[i].ctypes.data
        dest = acc.ctypes.data if pooled else y[i].ctypes.data
        # Tiles outside, blocks inside: a tile's inputs stay in L1 while the weights stream past.
        j = 0
        while j < npix:
            # The last pixels: one small tile when it covers them, else a whole tile overlapping the one
            # before (small tiles use the core at half rate or less: three of them for 9 pixels took a
            # third of a 7x7 output's time).
            small = npix - j <= _SMALL
            at = npix - _SMALL if small else min(j, npix - tile)
            for blk in range(0, blocks, step):
                # Addresses are taken here, not before the loop: Numba frees an array after the last
                # statement naming it, and an address alone does not keep it alive.
                args = (data, offs.ctypes.data, k, pix.ctypes.data + 8 * at, packed[blk].ctypes.data,
                        bias[blk].ctypes.data, dest + 4 * (blk * BLOCK * npix + at), npix,
                        min(step * BLOCK, o - blk * BLOCK), relu_now)
                if step == 1:
                    if small:
                        _tile_small(*args)
                    else:
                        _tile(*args)
                elif small:
                    _pair_small(*args)
                else:
                    _pair(*args)
            j = at + (_SMALL if small else tile)
        if pooled:  # max and relu commute: a ReLU is a floor of 0 on the maxima
            maxpool_images(acc, y[i:i + 1], pool, floor, 0, 1)
