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
arrays are still the layers' own (see ``network._Program.is_current``).

Activations travel as a flat buffer plus (C, H, W); a dense layer sees (C*H*W, 1, 1). Every row has
the fields below (one meaning each, unused ones 0); ``op_row`` writes them, ``run_program`` reads them.
"""

import numpy as np
from numba import carray, njit, types
from numba.core.extending import intrinsic

from .conv import ConvGeometry, im2col_images
from .elementwise import relu, relu_inplace, softmax_rows
from .gemm import PACK_ROWS, linear_forward
from .pool import PoolGeometry, maxpool_images
from .shapes import conv_output_size

OP_CONV, OP_LINEAR, OP_RELU, OP_MAXPOOL, OP_SOFTMAX = 1, 2, 3, 4, 5

# Fields of an op row.
CODE = 0
RELU = 1  # 1: ReLU on the op's output (OP_CONV, OP_LINEAR, OP_MAXPOOL)
WEIGHT = 2  # address of the float32 C-contiguous weights: OP_CONV (O, C, KH, KW), OP_LINEAR (out, in)
BIAS = 3  # address of the float32 bias, OUT values
OUT = 4  # output channels (OP_CONV) or features (OP_LINEAR)
KH, KW, SH, SW = 5, 6, 7, 8  # OP_CONV: kernel and stride; OP_MAXPOOL: window and stride
PH, PW = 9, 10  # OP_CONV: zero padding
POOL = 11  # OP_CONV: POOL..POOL+3 = a fused MaxPool2d's window and stride (kh, kw, sh, sw); kh 0: none
FIELDS = 15


def pointable(values, shape: tuple) -> bool:
    """Whether ``values`` is what a WEIGHT or BIAS field may hold the address of (``values.ctypes.data``)
    for ``run_program``, which reads it as ``shape``: a float32 C-contiguous array of that shape."""
    return (type(values) is np.ndarray and values.dtype == np.float32 and values.flags.c_contiguous
            and values.shape == tuple(shape))


def op_row(code: int, relu_after=False, weight=0, bias=0, out=0, kernel=(0, 0), stride=(0, 0),
           padding=(0, 0), pool=(0, 0, 0, 0)) -> list[int]:
    """One row of the table (``weight``/``bias``: addresses of arrays that are ``pointable``)."""
    row = [0] * FIELDS
    row[CODE], row[RELU], row[WEIGHT], row[BIAS], row[OUT] = code, int(relu_after), weight, bias, out
    row[KH], row[KW], row[SH], row[SW], row[PH], row[PW] = *kernel, *stride, *padding
    row[POOL:POOL + 4] = pool
    return row


@intrinsic
def _float_pointer(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(types.float32)(types.int64), codegen


@njit(cache=True)
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


@njit(cache=True)
def run_program(x, ops):
    """Run ``ops`` on the C-contiguous float32 batch x (N, C, H, W); returns the last op's output as
    a flat array of N * C' * H' * W' values (the caller knows the shape)."""
    n, c, h, w = x.shape
    buf = x.reshape(-1)
    owned = False  # buf is x itself until the first op has made a new array
    for t in range(ops.shape[0]):
        op = ops[t]
        code = op[CODE]
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
        owned = True
    return buf
