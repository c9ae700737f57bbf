"""A whole inference pass in one kernel call: ``run_program`` interprets a table of fused layer ops.

At batch 1 a LeNet-5 forward pass is ~15 us of arithmetic, and every Python-level layer call costs
~1 us more (argument checks, dispatch, allocation). ``Sequential`` therefore compiles a network it
has checked once into a *program* -- an int64 table with one row per op -- which this interpreter
runs in a single Numba call, with the same kernels (and so the same bits) as the layer-by-layer path.

The program holds no copy of any weight: a row carries the addresses of the layer's own weight and
bias arrays, read at every call, so an edit of a parameter in place (pruning, an optimizer step,
``load_state_dict``) is what the next call computes with. Convolution weights are packed for the
register kernel on each call (O x C*KH*KW values, against O x C*KH*KW x OH*OW multiply-adds).
The caller (``Sequential``) keeps the arrays alive and checks, before each call, that the program's
arrays are still the layers' own (see ``network.CompiledProgram.is_current``).

Activations travel as a flat buffer plus (C, H, W); a dense layer sees (C*H*W, 1, 1). Every row has
the fields below (one meaning each, unused ones 0); ``op_row`` writes them, ``run_program`` reads them.

Quantized networks run on the same interpreter: OP_QUANTIZE turns the float32 buffer into uint8 codes,
the integer ops (``kernels.integer``, weights as repacked by the stage at construction) work on those,
and OP_DEQUANTIZE -- or an integer layer with real output (MODE_DEQUANT) -- goes back to float32.
"""

import numpy as np
from numba import carray, njit, types
from numba.core.extending import intrinsic

from .conv import ConvGeometry, im2col_images
from .elementwise import relu, relu_inplace, softmax_rows
from .gemm import PACK_ROWS, linear_forward
from .integer import (
    DENSE_BLOCK,
    MODE_DEQUANT,
    PAIR_WORDS,
    PackedWeights,
    QConvGeometry,
    Requant,
    dequantize_u8,
    packed_channels,
    qconv_images,
    qlinear_rows,
    quantize_u8,
    rescaled_sum,
)
from .pool import PoolGeometry, global_avg_image, maxpool_images
from .shapes import conv_output_size

OP_CONV, OP_LINEAR, OP_RELU, OP_MAXPOOL, OP_SOFTMAX = 1, 2, 3, 4, 5
OP_QUANTIZE, OP_DEQUANTIZE, OP_QCONV, OP_QLINEAR, OP_QMAXPOOL, OP_QRELU = 6, 7, 8, 9, 10, 11
OP_GLOBALAVG = 12  # float32 global average pooling: (C, H, W) -> (C, 1, 1)
# A quantized graph's tensors read by a later step than the next: OP_QSAVE copies the codes into slot
# SLOT, OP_QLOAD makes a copy of a slot the current codes, OP_QADD sums the current codes and a slot's
# (``integer.rescaled_sum``: WEIGHT, M0 and SHIFT the addresses of int64 zero points, multipliers and
# shifts of the two, current first; KH the fraction bits; ZERO_POINT, LO, HI the output's).
OP_QSAVE, OP_QLOAD, OP_QADD = 13, 14, 15
MAX_SLOTS = 4

# Fields of an op row.
CODE = 0
RELU = 1  # 1: ReLU on the op's output (OP_CONV, OP_LINEAR, OP_MAXPOOL)
WEIGHT = 2  # address of the float32 C-contiguous weights: OP_CONV (O, C, KH, KW), OP_LINEAR (out, in)
BIAS = 3  # address of the float32 bias, OUT values
OUT = 4  # output channels (OP_CONV) or features (OP_LINEAR)
KH, KW, SH, SW = 5, 6, 7, 8  # OP_CONV: kernel and stride; OP_MAXPOOL: window and stride
PH, PW = 9, 10  # OP_CONV: zero padding
POOL = 11  # OP_CONV: POOL..POOL+3 = a fused MaxPool2d's window and stride (kh, kw, sh, sw); kh 0: none
# Integer ops. OP_QCONV / OP_QLINEAR: WEIGHT = the uint32 quads of an ``integer.PackedWeights``, BIAS its
# int32 corrected bias, OUT, KH.. PH, PW and POOL as above (here (1, 1, 1, 1): none); the rest below.
# OP_QUANTIZE / OP_DEQUANTIZE: SCALE, ZERO_POINT (and QMAX for OP_QUANTIZE). OP_QRELU: ZERO_POINT.
# OP_QMAXPOOL: KH, KW, SH, SW.
M0, SHIFT, SCALE = 15, 16, 17  # addresses: int32 m0 and shift, float32 multipliers (or one scale)
MODE, ZERO_POINT, LO, HI = 18, 19, 20, 21  # requantization mode, output zero point, clamp bounds
IN_ZERO_POINT, QMAX, WORDS = 22, 23, 24  # the input's zero point and largest code; quads per channel
LANES_WEIGHT = 25  # address of the PackedWeights' uint32 ``lanes`` (dense layers: the small-batch layout)
FIELDS = 26
SLOT = OUT  # OP_QSAVE / OP_QLOAD / OP_QADD: the slot; an OP_QSAVE row's WORDS: codes per image


def pointable(values, shape: tuple) -> bool:
    """Whether ``values`` is what a WEIGHT or BIAS field may hold the address of (``values.ctypes.data``)
    for ``run_program``, which reads it as ``shape``: a float32 C-contiguous array of that shape."""
    return (type(values) is np.ndarray and values.dtype == np.float32 and values.flags.c_contiguous
            and values.shape == tuple(shape))


def op_row(code: int, relu_after=False, weight=0, bias=0, out=0, kernel: tuple[int, int] = (0, 0),
           stride: tuple[int, int] = (0, 0), padding: tuple[int, int] = (0, 0),
           pool=(0, 0, 0, 0)) -> list[int]:
    """One row of the table (``weight``/``bias``: addresses of arrays that are ``pointable``)."""
    row = [0] * FIELDS
    row[CODE], row[RELU], row[WEIGHT], row[BIAS], row[OUT] = code, int(relu_after), weight, bias, out
    row[KH], row[KW], row[SH], row[SW], row[PH], row[PW] = *kernel, *stride, *padding
    row[POOL:POOL + 4] = pool
    return row


def integer_row(code: int, packed=None, requant=None, out=0, kernel=(0, 0), stride=(0, 0), padding=(0, 0),
                pool=(0, 0, 0, 0), scale=None, zero_point=0, qmax=0) -> list[int]:
    """A row of an integer op. ``packed`` (``integer.PackedWeights``), ``requant`` (``integer.Requant``)
    and ``scale`` (a float32 array) must stay alive, and unchanged, while the program runs."""
    row = op_row(code, False, 0, 0, out, kernel, stride, padding, pool)
    if packed is not None:
        row[WEIGHT], row[BIAS] = packed.quads.ctypes.data, packed.bias.ctypes.data
        row[IN_ZERO_POINT], row[QMAX], row[WORDS] = packed.zero_point, packed.qmax, packed.n_words
        row[LANES_WEIGHT] = packed.lanes.ctypes.data
    if requant is not None:
        row[M0], row[SHIFT], row[SCALE] = (a.ctypes.data for a in requant[:3])
        row[MODE], row[ZERO_POINT], row[LO], row[HI] = requant[3:]
    if scale is not None:
        row[SCALE], row[QMAX] = scale.ctypes.data, qmax
    if requant is None:  # OP_QUANTIZE, OP_DEQUANTIZE, OP_QRELU (which has no scale): their zero point
        row[ZERO_POINT] = zero_point
    return row


def _pointer(element_type):
    """An intrinsic turning an int64 address into a pointer to ``element_type`` (for ``carray``)."""
    @intrinsic
    def pointer(typingctx, addr):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return types.CPointer(element_type)(types.int64), codegen

    return pointer


_float_pointer = _pointer(types.float32)
_int_pointer = _pointer(types.int32)
_word_pointer = _pointer(types.uint32)
_long_pointer = _pointer(types.int64)


@njit(cache=True, nogil=True)
def _integer_args(op, o):
    """The PackedWeights and Requant an OP_QCONV / OP_QLINEAR row points at."""
    n_words = op[WORDS]
    lanes = -(-o // DENSE_BLOCK) * DENSE_BLOCK * n_words * PAIR_WORDS if op[CODE] == OP_QLINEAR else 0
    pk = PackedWeights(carray(_word_pointer(op[WEIGHT]), (packed_channels(o) * n_words * PAIR_WORDS,)),
                       carray(_int_pointer(op[BIAS]), (o,)), n_words, op[IN_ZERO_POINT], op[QMAX],
                       carray(_word_pointer(op[LANES_WEIGHT]), (lanes,)))
    rq = Requant(carray(_int_pointer(op[M0]), (o,)), carray(_int_pointer(op[SHIFT]), (o,)),
                 carray(_float_pointer(op[SCALE]), (o,)), op[MODE], op[ZERO_POINT], op[LO], op[HI])
    return pk, rq


@njit(cache=True, nogil=True)
def pack_weights(w, out):
    """``gemm.pack_rows(w)`` into ``out`` (ceil(O / PACK_ROWS), K, PACK_ROWS) for w (O, K), without
    allocating: the layout the register kernel reads, padding rows zero."""
    o, k = w.shape
    for blk in range(out.shape[0]):
        for r in range(PACK_ROWS):
            i = blk * PACK_ROWS + r
            dst = out[blk]
            if i < o:
                src = w[i]
                for t in range(k):
                    dst[t, r] = src[t]
            else:
                for t in range(k):
                    dst[t, r] = np.float32(0.0)


@njit(cache=True, nogil=True)
def run_program(x, ops):
    """Run ``ops`` on the C-contiguous float32 batch x (N, C, H, W); returns the last op's output as
    a flat array of N * C' * H' * W' values (the caller knows the shape)."""
    n, c, h, w = x.shape
    buf = x.reshape(-1)
    owned = False  # buf is x itself until the first op has made a new array
    qbuf = np.empty(0, np.uint8)  # the activations of integer ops (codes)
    empty_q, empty_f = np.empty((0, 0, 0, 0), np.uint8), np.empty((0, 0, 0, 0), np.float32)
    per_slot = 0
    for t in range(ops.shape[0]):
        if ops[t, CODE] == OP_QSAVE:
            per_slot = max(per_slot, n * ops[t, WORDS])
    slots = np.empty((MAX_SLOTS if per_slot > 0 else 0, per_slot), np.uint8)
    slot_chw = np.zeros((MAX_SLOTS, 3), np.int64)
    for t in range(ops.shape[0]):
        op = ops[t]
        code = op[CODE]
        if code >= OP_QSAVE:  # a quantized graph's slots
            k = op[SLOT]
            if code == OP_QSAVE:
                slots[k, :qbuf.size] = qbuf
                slot_chw[k, 0], slot_chw[k, 1], slot_chw[k, 2] = c, h, w
            elif code == OP_QLOAD:
                c, h, w = slot_chw[k, 0], slot_chw[k, 1], slot_chw[k, 2]
                qbuf = slots[k, :n * c * h * w].copy()
            else:  # OP_QADD
                summed = np.empty(qbuf.size, np.uint8)
                zps, m0 = carray(_long_pointer(op[WEIGHT]), (2,)), carray(_long_pointer(op[M0]), (2,))
                shift = carray(_long_pointer(op[SHIFT]), (2,))
                rescaled_sum((qbuf, slots[k, :qbuf.size].copy()), zps, m0, shift, op[KH], op[ZERO_POINT],
                             op[LO], op[HI], summed)
                qbuf = summed
            owned = True
            continue
        if OP_QUANTIZE <= code <= OP_QRELU:
            if code == OP_QUANTIZE:
                qbuf = quantize_u8(buf, _float_pointer(op[SCALE])[0], op[ZERO_POINT], op[QMAX])
            elif code == OP_DEQUANTIZE:
                buf = dequantize_u8(qbuf, _float_pointer(op[SCALE])[0], op[ZERO_POINT])
            elif code == OP_QRELU:
                zp = np.uint8(op[ZERO_POINT])
                for i in range(qbuf.size):
                    qbuf[i] = max(qbuf[i], zp)
            elif code == OP_QMAXPOOL:
                oh, ow = conv_output_size(h, op[KH], op[SH]), conv_output_size(w, op[KW], op[SW])
                yq = np.empty((n, c, oh, ow), np.uint8)
                qpool = PoolGeometry(op[KH], op[KW], op[SH], op[SW], 0, 0, 0)
                maxpool_images(qbuf.reshape(n, c, h, w), yq, qpool, np.uint8(0), 0, n)
                qbuf, h, w = yq.reshape(-1), oh, ow
            else:  # OP_QCONV, OP_QLINEAR
                o = op[OUT]
                pk, rq = _integer_args(op, o)
                geo = QConvGeometry(op[KH], op[KW], op[SH], op[SW], op[PH], op[PW], op[POOL], op[POOL + 1],
                                   op[POOL + 2], op[POOL + 3])
                oh = ow = 1
                if code == OP_QCONV:
                    oh = conv_output_size(conv_output_size(h, geo.kh, geo.sh, geo.ph), geo.pkh, geo.psh)
                    ow = conv_output_size(conv_output_size(w, geo.kw, geo.sw, geo.pw), geo.pkw, geo.psw)
                real = op[MODE] == MODE_DEQUANT
                yq = np.empty((n, o, oh, ow), np.uint8) if not real else empty_q
                yf = np.empty((n, o, oh, ow), np.float32) if real else empty_f
                if code == OP_QLINEAR:
                    qlinear_rows(qbuf.reshape(n, c * h * w), pk, rq, yq.reshape(-1), yf.reshape(-1), 0, n)
                else:
                    qconv_images(qbuf.reshape(n, c, h, w), pk, geo, rq, yq, yf, 0, n)
                if real:
                    buf = yf.reshape(-1)
                else:
                    qbuf = yq.reshape(-1)
                c, h, w = o, oh, ow
            owned = True
            continue
        if code == OP_CONV:
            kh, kw, sh, sw, ph, pw = op[KH], op[KW], op[SH], op[SW], op[PH], op[PW]
            geom = ConvGeometry(kh, kw, sh, sw, ph, pw, 1, 1, 1)
            pool = PoolGeometry(op[POOL], op[POOL + 1], op[POOL + 2], op[POOL + 3], 0, 0, 0)
            o = op[OUT]
            k = c * kh * kw
            w2 = carray(_float_pointer(op[WEIGHT]), (o, k))
            packed = np.empty(((o + PACK_ROWS - 1) // PACK_ROWS, k, PACK_ROWS), np.float32)
            pack_weights(w2, packed)
            oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
            if pool[0] > 0:
                oh, ow = conv_output_size(oh, pool[0], pool[2]), conv_output_size(ow, pool[1], pool[3])
            y = np.empty((n, o, oh, ow), np.float32)
            im2col_images(buf.reshape(n, c, h, w), w2, packed, carray(_float_pointer(op[BIAS]), (o,)),
                          geom, pool, op[RELU] != 0, y, 0, n)
            buf, c, h, w = y.reshape(-1), o, oh, ow
        elif code == OP_LINEAR:
            fin, fout = c * h * w, op[OUT]
            y2 = linear_forward(buf.reshape(n, fin), carray(_float_pointer(op[WEIGHT]), (fout, fin)),
                                carray(_float_pointer(op[BIAS]), (fout,)), op[RELU] != 0)
            buf, c, h, w = y2.reshape(-1), fout, 1, 1
        elif code == OP_RELU:
            buf = relu_inplace(buf) if owned else relu(buf)
        elif code == OP_MAXPOOL:
            oh, ow = (h - op[KH]) // op[SH] + 1, (w - op[KW]) // op[SW] + 1
            y = np.empty((n, c, oh, ow), np.float32)
            floor = np.float32(0.0) if op[RELU] != 0 else np.float32(-np.inf)
            maxpool_images(buf.reshape(n, c, h, w), y, PoolGeometry(op[KH], op[KW], op[SH], op[SW], 0, 0, 0),
                           floor, 0, n)
            buf, h, w = y.reshape(-1), oh, ow
        elif code == OP_SOFTMAX:
            buf = softmax_rows(buf.reshape(n, c * h * w)).reshape(-1)
        elif code == OP_GLOBALAVG:
            y = np.empty((n, c, 1, 1), np.float32)
            scale = np.float32(1.0 / (h * w))
            for i in range(n):
                global_avg_image(buf.reshape(n, c, h, w), i, y, scale)
            buf, h, w = y.reshape(-1), 1, 1
        owned = True
    return buf
