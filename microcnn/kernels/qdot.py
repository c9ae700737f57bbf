"""The integer micro-kernel: unsigned 8-bit activations x signed 8-bit weights, four products per
32-bit lane, accumulated in int32 vector registers across a whole reduction (LLVM IR, like the FP32
register kernel of ``gemm``; the loop is ``simd.register_loop``).

A *word* is a uint32 holding four activation codes (bytes 0..3, unsigned 0..255) of one output
position; a *weight quad* holds the four matching signed weights of one output channel. Per word and
channel every lane adds ``sum_b u8(word byte b) * s8(quad byte b)``. The instruction depends on the
hardware, never the result:

* VNNI (``simd.VNNI``): one ``vpdpbusd`` per vector -- the four products and their sum into the
  32-bit lane are exact (at most 4 * 255 * 128 per step), and its add wraps like every int32 add here;
* AVX-512BW / AVX2 without VNNI: ``vpmaddubsw`` would saturate its int16 pair sums (255 * -128 * 2 <
  -32768), so it is not used. The word is split into its even and odd bytes as int16 lanes (0..255)
  and each half goes through ``pmaddwd`` with a pair of int16 weights: products and pair sums are
  exact in int32. Weight quads are then stored as two pair words (``PAIR_WORDS`` = 2);
* portable IR (no SIMD, or a NUMBA_CPU_NAME target): the four bytes are widened by shifts and
  multiplied lane by lane in plain vector IR.

Every path adds the same int32 values in two's-complement arithmetic, which is associative: the
result is the exact sum whenever that sum fits int32 (the layers refuse weights and shapes where it
could not), however the partial sums wrap on the way.
"""

from .simd import LANES, SIMD, VNNI, register_loop, splat

STRIP = 16  # output positions per micro-kernel call (one AVX-512 vector, two AVX2 / portable ones)
PAIR_WORDS = 2 if (SIMD and not VNNI) else 1  # uint32 words per (word, channel) in a packed weight block


def _instructions(builder, vi, vh):
    """(const, dot, pmadd): a splat constant maker and the x86 instructions of this build -- vpdpbusd
    on VNNI, pmaddwd on other SIMD (None where not used)."""
    from llvmlite import ir
    from numba.core import cgutils

    def const(value):
        return ir.Constant(vi, [value] * vi.count)

    dot = pmadd = None
    if VNNI:
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vi, vi, vi]),
                                             f"llvm.x86.avx512.vpdpbusd.{32 * vi.count}")
    elif SIMD:
        name = "llvm.x86.avx512.pmaddw.d.512" if vi.count == 16 else "llvm.x86.avx2.pmadd.wd"
        pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vh, vh]), name)
    return const, dot, pmadd


def _make_microkernel(channels: int):
    """``kernel(words_addr, word_off_addr, n_words, wts_addr, bias_addr, acc_addr, acc_stride)``:
    ``channels`` output channels x STRIP positions.

    words_addr: the uint32 word of position j0 at word offset 0; word w of the reduction starts
    ``word_off[w]`` (int64) words further, the STRIP positions consecutive.
    wts_addr: uint32 weights (n_words, channels, PAIR_WORDS): quads, or (PAIR_WORDS = 2) the int16 pairs
    (byte 0, byte 2) and (byte 1, byte 3) of each quad.
    bias_addr: the ``channels`` int32 initial values, one per channel, broadcast in registers (filling the
    accumulator rows with them first was one more pass over the rows per block: the BatchNorm CNN's
    9-tap stem took 6.2 ms per 1,000 images with it, 5.6 without).
    acc_addr: position j0 of channel 0's int32 accumulator row, rows ``acc_stride`` elements apart;
    receives the sums.
    """
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    lanes = LANES
    vectors = STRIP // lanes

    @intrinsic
    def microkernel(typingctx, words_addr, word_off_addr, n_words, wts_addr, bias_addr, acc_addr, acc_stride):
        sig = types.void(*(types.intp,) * 7)

        def codegen(context, builder, signature, args):
            words_addr, word_off_addr, n_words, wts_addr, bias_addr, acc_addr, acc_stride = args
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
            bias_p = builder.inttoptr(bias_addr, i32.as_pointer())
            init = [splat(builder, builder.load(builder.gep(bias_p, [ir.Constant(i64, c)])), vi)
                    for c in range(channels) for _ in range(vectors)]

            const, dot, pmadd = _instructions(builder, vi, vh)

            def weight(w, c, half):
                idx = builder.add(builder.mul(w, ir.Constant(i64, channels * PAIR_WORDS)),
                                  ir.Constant(i64, c * PAIR_WORDS + half))
                return builder.load(builder.gep(wts_p, [idx]))

            def step(w, accs):
                offset = builder.load(builder.gep(off_p, [w]))
                src = builder.bitcast(builder.gep(words_p, [offset]), vi.as_pointer())
                data = [builder.load(builder.gep(src, [ir.Constant(i64, v)]), align=4)
                        for v in range(vectors)]
                if SIMD and not VNNI:  # even bytes and odd bytes as int16 lanes 0..255
                    data = [(builder.bitcast(builder.and_(d, const(0x00FF00FF)), vh),
                             builder.bitcast(builder.and_(builder.lshr(d, const(8)), const(0x00FF00FF)), vh))
                            for d in data]
                elif not SIMD:  # the four bytes, zero-extended into int32 lanes
                    data = [[builder.and_(builder.lshr(d, const(8 * b)), const(0xFF)) for b in range(4)]
                            for d in data]
                new = []
                for c in range(channels):
                    if VNNI:
                        quad = splat(builder, weight(w, c, 0), vi)
                        new += [builder.call(dot, [accs[c * vectors + v], data[v], quad])
                                for v in range(vectors)]
                    elif SIMD:
                        even = builder.bitcast(splat(builder, weight(w, c, 0), vi), vh)
                        odd = builder.bitcast(splat(builder, weight(w, c, 1), vi), vh)
                        for v in range(vectors):
                            product = builder.add(builder.call(pmadd, [data[v][0], even]),
                                                  builder.call(pmadd, [data[v][1], odd]))
                            new.append(builder.add(accs[c * vectors + v], product))
                    else:
                        quad = weight(w, c, 0)
                        signed = [splat(builder, builder.ashr(builder.shl(quad, ir.Constant(i32, 24 - 8 * b)),
                                                              ir.Constant(i32, 24)), vi) for b in range(4)]
                        for v in range(vectors):
                            total = accs[c * vectors + v]
                            for b in range(4):
                                total = builder.add(total, builder.mul(data[v][b], signed[b]))
                            new.append(total)
                return new

            for ptr, value in zip(ptrs, register_loop(builder, n_words, init, step, "qmk"), strict=True):
                builder.store(value, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return microkernel


microkernel8 = _make_microkernel(8)
microkernel6 = _make_microkernel(6)
microkernel4 = _make_microkernel(4)
microkernel2 = _make_microkernel(2)
microkernel1 = _make_microkernel(1)


DENSE_VECTORS = 4  # channel vectors per dense-kernel call: independent accumulator chains


def _make_dense_kernel():
    """``kernel(x_addr, n_words, w_addr, acc_addr)`` for one activation row, channels in the lanes:
    acc[v * LANES + l] += sum_w dot4(x[w], quad[w, v, l]) for DENSE_VECTORS vectors -- the small-batch
    layout of a dense layer, where one row would fill one lane of the position-major micro-kernel.

    x_addr: n_words uint32 activation words. w_addr: uint32 (n_words, DENSE_VECTORS, PAIR_WORDS, LANES)
    (``integer.pack_lanes``). The same instructions and exactness argument as the micro-kernel, with
    the activation word broadcast instead of the weight quad."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    lanes, vectors = LANES, DENSE_VECTORS

    @intrinsic
    def kernel(typingctx, x_addr, n_words, w_addr, acc_addr):
        sig = types.void(types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            x_addr, n_words, w_addr, acc_addr = args
            i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
            vi, vh = ir.VectorType(i32, lanes), ir.VectorType(i16, 2 * lanes)
            x_p = builder.inttoptr(x_addr, i32.as_pointer())
            w_p = builder.bitcast(builder.inttoptr(w_addr, i32.as_pointer()), vi.as_pointer())
            acc_p = builder.bitcast(builder.inttoptr(acc_addr, i32.as_pointer()), vi.as_pointer())
            ptrs = [builder.gep(acc_p, [ir.Constant(i64, v)]) for v in range(vectors)]
            init = [builder.load(ptr, align=4) for ptr in ptrs]

            const, dot, pmadd = _instructions(builder, vi, vh)

            def wvec(w, v, half):
                idx = builder.add(builder.mul(w, ir.Constant(i64, vectors * PAIR_WORDS)),
                                  ir.Constant(i64, v * PAIR_WORDS + half))
                return builder.load(builder.gep(w_p, [idx]), align=4)

            def step(w, accs):
                xs = splat(builder, builder.load(builder.gep(x_p, [w])), vi)
                new = []
                if VNNI:
                    return [builder.call(dot, [accs[v], xs, wvec(w, v, 0)]) for v in range(vectors)]
                if SIMD:  # even and odd activation bytes as int16 pairs, against the weights' pairs
                    even = builder.bitcast(builder.and_(xs, const(0x00FF00FF)), vh)
                    odd = builder.bitcast(builder.and_(builder.lshr(xs, const(8)), const(0x00FF00FF)), vh)
                    for v in range(vectors):
                        product = builder.add(builder.call(pmadd, [even, builder.bitcast(wvec(w, v, 0), vh)]),
                                              builder.call(pmadd, [odd, builder.bitcast(wvec(w, v, 1), vh)]))
                        new.append(builder.add(accs[v], product))
                    return new
                xb = [builder.and_(builder.lshr(xs, const(8 * b)), const(0xFF)) for b in range(4)]
                for v in range(vectors):
                    quad, total = wvec(w, v, 0), accs[v]
                    for b in range(4):
                        signed = builder.ashr(builder.shl(quad, const(24 - 8 * b)), const(24))
                        total = builder.add(total, builder.mul(xb[b], signed))
                    new.append(total)
                return new

            for ptr, value in zip(ptrs, register_loop(builder, n_words, init, step, "qdense"), strict=True):
                builder.store(value, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


dense_kernel = _make_dense_kernel()


REQUANT_VALUES = 16  # outputs per ``requant_row*`` call (generic LLVM vectors, split as the target needs)


def _make_requant_row(pool: bool, pair: bool = False):
    """``kernel(src_addr, row_stride, m0, shift, zero_point, lo, hi, dst_addr, dst2_addr)``: 16 uint8
    outputs of the fixed-point epilogue (``integer``'s rule: ``clamp(((acc * m0 + 2**(shift-1)) >> shift)
    + zero_point, lo, hi)`` in int64) from int32 accumulators: src[0..15], or with ``pool`` the 2x2 /
    stride 2 maxima of src[0..31] and src[row_stride..row_stride+31]. Stores all 16 bytes at dst_addr
    (the caller gives room); reads all 32 (64) values. With ``pair`` (and ``pool``), two pooled rows of at
    most 8 outputs instead: the maxima of columns 0..15 of rows 0, 1 (8 bytes at dst_addr) and of rows 2,
    3 (8 bytes at dst2_addr, stored second); dst2_addr is ignored otherwise. The same integer operations as
    the scalar rule, lane by lane."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    n = REQUANT_VALUES

    @intrinsic
    def kernel(typingctx, src_addr, row_stride, m0, shift, zero_point, lo, hi, dst_addr, dst2_addr):
        sig = types.void(*(types.int64,) * 9)

        def codegen(context, builder, signature, args):
            src_addr, row_stride, m0, shift, zero_point, lo, hi, dst_addr, dst2_addr = args
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            v32, v64 = ir.VectorType(i32, n), ir.VectorType(i64, n)
            src = builder.inttoptr(src_addr, i32.as_pointer())

            def load(offset):  # 16 int32 from src + offset (elements)
                return builder.load(builder.bitcast(builder.gep(src, [offset]), v32.as_pointer()), align=4)

            def vmax(a, b):
                return builder.select(builder.icmp_signed(">", a, b), a, b)

            def vmin(a, b):
                return builder.select(builder.icmp_signed("<", a, b), a, b)

            if pool:  # column maxima of two rows: columns 0..15 and 16..31, or (pair) of two row pairs
                firsts = ((ir.Constant(i64, 0), builder.mul(row_stride, ir.Constant(i64, 2))) if pair
                          else (ir.Constant(i64, 0), ir.Constant(i64, n)))
                cols = [vmax(load(first), load(builder.add(row_stride, first))) for first in firsts]
                pairs = [builder.shuffle_vector(cols[0], cols[1], ir.Constant(v32, order))
                         for order in ([2 * j for j in range(n)], [2 * j + 1 for j in range(n)])]
                acc = vmax(*pairs)
            else:
                acc = load(ir.Constant(i64, 0))

            def splat64(value):
                return builder.shuffle_vector(builder.insert_element(ir.Constant(v64, ir.Undefined), value,
                                                                     ir.Constant(i32, 0)),
                                              ir.Constant(v64, ir.Undefined), ir.Constant(v32, [0] * n))

            rounding = builder.shl(ir.Constant(i64, 1), builder.sub(shift, ir.Constant(i64, 1)))
            y = builder.mul(builder.sext(acc, v64), splat64(m0))
            y = builder.ashr(builder.add(y, splat64(rounding)), splat64(shift))
            y = builder.add(y, splat64(zero_point))
            y = builder.trunc(vmin(vmax(y, splat64(lo)), splat64(hi)), ir.VectorType(i8, n))

            def store(lanes, addr):  # those lanes of y, as bytes from addr
                value = y if len(lanes) == n else builder.shuffle_vector(
                    y, y, ir.Constant(ir.VectorType(i32, len(lanes)), list(lanes)))
                ptr = builder.inttoptr(addr, ir.VectorType(i8, len(lanes)).as_pointer())
                builder.store(value, ptr, align=1)

            if pair:
                store(range(n // 2), dst_addr)
                store(range(n // 2, n), dst2_addr)
            else:
                store(range(n), dst_addr)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _make_dequant_row():
    """``kernel(src_addr, lo, hi, scale, dst_addr)``: 16 float32 outputs of the dequantizing epilogue
    (``integer.MODE_DEQUANT``: ``float32(clamp(acc, lo, hi)) * scale``, lo and hi within int32) from the
    int32 accumulators src[0..15], all stored at dst_addr (the caller gives room). Integer to float32
    conversion rounds to nearest even, as the scalar conversion does, and the product is one float32
    multiply: the scalar rule's bits."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    n = REQUANT_VALUES

    @intrinsic
    def kernel(typingctx, src_addr, lo, hi, scale, dst_addr):
        sig = types.void(types.int64, types.int64, types.int64, types.float32, types.int64)

        def codegen(context, builder, signature, args):
            src_addr, lo, hi, scale, dst_addr = args
            i32 = ir.IntType(32)
            v32, vf = ir.VectorType(i32, n), ir.VectorType(ir.FloatType(), n)
            acc = builder.load(builder.inttoptr(src_addr, v32.as_pointer()), align=4)
            low, high = (splat(builder, builder.trunc(v, i32), v32) for v in (lo, hi))
            acc = builder.select(builder.icmp_signed("<", acc, low), low, acc)
            acc = builder.select(builder.icmp_signed(">", acc, high), high, acc)
            value = builder.fmul(builder.sitofp(acc, vf), splat(builder, scale, vf))
            builder.store(value, builder.inttoptr(dst_addr, vf.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


requant_row = _make_requant_row(False)
requant_row_pool2 = _make_requant_row(True)
requant_rows_pool2 = _make_requant_row(True, pair=True)
dequant_row = _make_dequant_row()


def _make_clamped_move(width: int):
    """``move(dst_addr, src_addr, qmax)``: dst[t] = min(src[t], qmax) for ``width`` uint8 values, one vector
    load, unsigned min and store (a padded image's rows; a Numba loop over a row of 14 or 28 bytes spends
    most of its time in the scalar remainder)."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def move(typingctx, dst_addr, src_addr, qmax):
        def codegen(context, builder, signature, args):
            vb = ir.VectorType(ir.IntType(8), width)
            value = builder.load(builder.inttoptr(args[1], vb.as_pointer()), align=1)
            q = splat(builder, builder.trunc(args[2], ir.IntType(8)), vb)
            clamped = builder.select(builder.icmp_unsigned("<", value, q), value, q)
            builder.store(clamped, builder.inttoptr(args[0], vb.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.void(types.intp, types.intp, types.intp), codegen

    return move


clamped_move16, clamped_move8 = _make_clamped_move(16), _make_clamped_move(8)


def _make_pack_words(split: bool):
    """``kernel(a_addr, b_addr, e_addr, f_addr, dst_addr, dst2_addr)``: 16 uint32 words, byte 0 of word j
    from the uint8 at a_addr + j, byte 1 from b_addr + j, byte 2 from e_addr + j, byte 3 from f_addr + j:
    stored as 16 words at dst_addr, or with ``split`` by parity of j, words 0, 2, .., 14 at dst_addr and
    1, 3, .., 15 at dst2_addr (8 each; a stride-2 convolution's column phases). The implicit im2col of
    the convolution: a Numba loop over a plane reads its four byte rows through views (an atomic
    reference count each; LeNet's second layer's words took 0.56 us an image that way, 0.23 with this
    kernel) or, by flat index, does not vectorise; copying the words of a plane of all words into the
    phases took 1.75 ns a word on an AMD EPYC (4 ms of 13 in a 32 -> 64 layer at 1,000 images)."""
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic

    @intrinsic
    def kernel(typingctx, a_addr, b_addr, e_addr, f_addr, dst_addr, dst2_addr):
        sig = types.void(*(types.int64,) * 6)

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            vb, v32, half = ir.VectorType(ir.IntType(8), 16), ir.VectorType(i32, 16), ir.VectorType(i32, 8)
            word = None
            for g, at in enumerate(args[:4]):
                part = builder.zext(builder.load(builder.inttoptr(at, vb.as_pointer()), align=1), v32)
                if g:
                    part = builder.shl(part, ir.Constant(v32, [8 * g] * 16))
                word = part if word is None else builder.or_(word, part)
            if not split:
                builder.store(word, builder.inttoptr(args[4], v32.as_pointer()), align=4)
                return context.get_dummy_value()
            for parity, dst in ((0, args[4]), (1, args[5])):
                pick = ir.Constant(half, list(range(parity, 16, 2)))
                value = builder.shuffle_vector(word, ir.Constant(v32, ir.Undefined), pick)
                builder.store(value, builder.inttoptr(dst, half.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


pack_words16, phase_words16 = _make_pack_words(False), _make_pack_words(True)
