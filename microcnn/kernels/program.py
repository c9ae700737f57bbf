"""A whole inference pass in one kernel call: ``run_program`` interprets a list of fused layer ops.

At batch 1 a LeNet-5 forward pass is ~15 us of arithmetic, and every Python-level layer call costs
~1 us more (argument checks, dispatch, allocation). ``Sequential`` therefore compiles a network it
has checked once into a *program* -- an int64 table with one row per op and one float32 arena
holding every prepared weight -- which this interpreter runs in a single Numba call, with the same
kernels (and so the same bits) as the layer-by-layer path.

Activations travel as a flat buffer plus (C, H, W); a dense layer sees (C*H*W, 1, 1). Row layout
of ``ops`` (unused fields 0):

    OP_CONV     kh kw sh sw ph pw  pool_kh pool_kw pool_sh pool_sw  relu  w_off b_off  out_c
    OP_LINEAR   in out relu w_off b_off                   (weights (out, in) at w_off)
    OP_RELU     -
    OP_MAXPOOL  kh kw sh sw relu
    OP_SOFTMAX  -

A conv's weights are ``gemm.pack_rows(w.reshape(O, K))`` at w_off; pool_kh = 0 means no pooling.
"""

import numpy as np
from numba import njit

from .conv import _im2col_images
from .elementwise import relu, relu_inplace, softmax_rows
from .gemm import PACK_ROWS, linear_forward
from .pool import _maxpool_images

OP_CONV, OP_LINEAR, OP_RELU, OP_MAXPOOL, OP_SOFTMAX = 1, 2, 3, 4, 5
OP_FIELDS = 16


@njit(cache=True)
def run_program(x, ops, arena):
    """Run ``ops`` on the C-contiguous float32 batch x (N, C, H, W); returns the last op's output as
    a flat array of N * C' * H' * W' values (the caller knows the shape)."""
    n, c, h, w = x.shape
    buf = x.reshape(-1)
    owned = False  # buf is x itself until the first op has made a new array
    for t in range(ops.shape[0]):
        op = ops[t]
        code = op[0]
        if code == OP_CONV:
            kh, kw, sh, sw, ph, pw = op[1], op[2], op[3], op[4], op[5], op[6]
            pool = (op[7], op[8], op[9], op[10])
            o = op[14]
            k = c * kh * kw
            blocks = (o + PACK_ROWS - 1) // PACK_ROWS
            packed = arena[op[12]:op[12] + blocks * k * PACK_ROWS].reshape(blocks, k, PACK_ROWS)
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            if pool[0] > 0:
                oh, ow = (oh - pool[0]) // pool[2] + 1, (ow - pool[1]) // pool[3] + 1
            y = np.empty((n, o, oh, ow), np.float32)
            _im2col_images(buf.reshape(n, c, h, w), packed, arena[op[13]:op[13] + o], kh, kw, sh, sw, ph, pw,
                           pool, op[11] != 0, y, 0, n)
            buf, c, h, w = y.reshape(-1), o, oh, ow
        elif code == OP_LINEAR:
            fin, fout = op[1], op[2]
            weight = arena[op[4]:op[4] + fout * fin].reshape(fout, fin)
            y2 = linear_forward(buf.reshape(n, fin), weight, arena[op[5]:op[5] + fout], op[3] != 0)
            buf, c, h, w = y2.reshape(-1), fout, 1, 1
        elif code == OP_RELU:
            buf = relu_inplace(buf) if owned else relu(buf)
        elif code == OP_MAXPOOL:
            oh, ow = (h - op[1]) // op[3] + 1, (w - op[2]) // op[4] + 1
            y = np.empty((n, c, oh, ow), np.float32)
            floor = np.float32(0.0) if op[5] != 0 else np.float32(-np.inf)
            _maxpool_images(buf.reshape(n, c, h, w), y, op[1], op[2], op[3], op[4], floor, 0, n)
            buf, h, w = y.reshape(-1), oh, ow
        elif code == OP_SOFTMAX:
            buf = softmax_rows(buf.reshape(n, c * h * w)).reshape(-1)
        owned = True
    return buf
