"""FP32 2-D convolution (cross-correlation, as in PyTorch) by four algorithms.

All entry points take x (N, C, H, W) float32, w (O, C, KH, KW) float32, b (O,) float32, C-contiguous,
and return y (N, O, OH, OW) float32 with OH = (H + 2*ph - KH) // sh + 1 (likewise OW). ``naive`` and
``im2col`` also take a dilation and groups (a ``ConvGeometry``): w is then (O, C / groups, KH, KW) and
OH = (H + 2*ph - dh*(KH - 1) - 1) // sh + 1; Winograd and FFT are for dilation 1 and one group.

naive     ``conv2d_naive``: seven nested loops, one multiply-add at a time, float32 accumulation.
          The reference every other algorithm is measured against.
im2col    ``conv2d_im2col`` / ``im2col_runner``: ``y (O, pixels) = w.reshape(O, K) @ cols (K, pixels)``
          one image at a time, with the register micro-kernel ``gemm.gemm_packed``. For stride 1
          the patch matrix is implicit: GEMM column j = r*Wp + q (Wp the padded width) reads tap
          (c, u, v) at element c*Hp*Wp + u*Wp + v + j of the (padded) image, so every patch row is a
          window of the image itself -- no copy beyond the zero border, at the price of computing
          and dropping the Wp - OW columns past each output row. Other strides split the padded
          image into its stride phases, in which every tap is again a window (``im2col_images``).
          Max pooling (with a fused ReLU) can run on the GEMM's output before it is
          stored. A 1x1 output whose kernel covers the whole unpadded input (LeNet's conv3) is a
          dense layer: dot products on ``x.reshape(N, K)`` itself. ``im2col`` (any dtype) is the
          public, explicit patch matrix for other kernels.
winograd  ``winograd_weights`` + ``conv2d_winograd``: F(m x m, r x r) minimal filtering, stride 1.
fft       ``fft_weights`` + ``conv2d_fft``: pointwise products of 2-D real FFTs (numpy.fft).

Winograd and FFT prepare the weights once (the caller caches them); see their docstrings for the
accuracy and cost trade-offs. The ``*_runner`` functions fix everything that depends only on the
input shape, so repeated calls (batch-1 latency) cost one kernel dispatch. The ``*_parallel``
drivers split the batch over threads with ``prange``; they are used (and compiled) only when Numba
has more than one thread and the batch is large enough (``_use_parallel``).
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from ..errors import InputError
from .conv_blocked import blocked_images, use_blocked
from .elementwise import relu_inplace
from .gemm import PACK_ROWS, gemm_acc, gemm_packed, linear_forward, pack_rows
from .pool import NO_POOL, maxpool2d, maxpool_images, pool_geometry, pool_output_size, pooled_shape
from .shapes import conv_output_size
from .simd import LANES

# -- geometry ----------------------------------------------------------------------------------


class ConvGeometry(NamedTuple):
    """Kernel (kh, kw), stride, zero padding, dilation and groups of a convolution: the kernels take it
    as one argument (Numba passes a named tuple of ints). Weights are (O, C // groups, kh, kw); output
    channel f reads the C // groups input channels of its group f // (O // groups)."""

    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    ph: int = 0
    pw: int = 0
    dh: int = 1
    dw: int = 1
    groups: int = 1


def conv_geometry(w_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1) -> ConvGeometry:
    """The ConvGeometry of weights of shape ``w_shape`` with these settings (Python ints)."""
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    return ConvGeometry(int(w_shape[2]), int(w_shape[3]), sh, sw, ph, pw, dh, dw, int(groups))


def conv_output_shape(h, wd, geom) -> tuple[int, int]:
    """(OH, OW) of the convolution ``geom`` on an h x wd input."""
    return (conv_output_size(h, geom.kh, geom.sh, geom.ph, geom.dh),
            conv_output_size(wd, geom.kw, geom.sw, geom.pw, geom.dw))


# -- naive -------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _naive(x, w, b, geom):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // geom.groups
    oh = conv_output_size(h, kh, geom.sh, geom.ph, geom.dh)
    ow = conv_output_size(wd, kw, geom.sw, geom.pw, geom.dw)
    y = np.empty((n, o, oh, ow), np.float32)
    for i in range(n):
        for f in range(o):
            c0 = (f // og) * cg  # first input channel of f's group
            for r in range(oh):
                for q in range(ow):
                    acc = b[f]
                    for ch in range(cg):
                        for u in range(kh):
                            iy = r * geom.sh + u * geom.dh - geom.ph
                            if iy < 0 or iy >= h:
                                continue
                            for v in range(kw):
                                ix = q * geom.sw + v * geom.dw - geom.pw
                                if 0 <= ix < wd:
                                    acc += w[f, ch, u, v] * x[i, c0 + ch, iy, ix]
                    y[i, f, r, q] = acc
    return y


def conv2d_naive(x, w, b, sh=1, sw=1, ph=0, pw=0, dilation=(1, 1), groups=1):
    """Direct convolution: the textbook loops, any stride, zero padding, dilation and groups.
    The reference."""
    return _naive(x, w, b, conv_geometry(w.shape, (sh, sw), (ph, pw), dilation, groups))


# -- im2col ------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def pad_into(x, i, ph, pw, buf):
    """Copy image i of x into the interior of buf (C, H + 2ph, W + 2pw); the border is left as is."""
    c, h, wd = x.shape[1], x.shape[2], x.shape[3]
    for ch in range(c):
        for r in range(h):
            d = buf[ch, r + ph, pw : pw + wd]
            s = x[i, ch, r]
            for q in range(wd):
                d[q] = s[q]


@njit(cache=True, nogil=True)
def _im2col_fill(src, geom, oh, ow, dst, col0, rstride):
    """dst[(c*kh + u)*kw + v, col0 + r*rstride + q] = src[c, r*sh + u*dh, q*sw + v*dw] for one (padded)
    image src (C, Hp, Wp), r < oh, q < ow. Any dtype; dst must have src's dtype."""
    c = src.shape[0]
    kh, kw, sh, sw, dh, dw = geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw
    for ch in range(c):
        for u in range(kh):
            for v in range(kw):
                row = dst[(ch * kh + u) * kw + v]
                for r in range(oh):
                    d = row[col0 + r * rstride : col0 + r * rstride + ow]
                    if sw == 1:
                        s = src[ch, r * sh + u * dh, v * dw : v * dw + ow]
                        for q in range(ow):
                            d[q] = s[q]
                    else:
                        s_row = src[ch, r * sh + u * dh]
                        for q in range(ow):
                            d[q] = s_row[q * sw + v * dw]


@njit(cache=True, nogil=True)
def im2col(x, kh, kw, sh, sw, ph, pw, pad_value=0):
    """Patch matrix of a batch, for any dtype (float32, int8, uint8, ...).

    Layout: ``cols`` has shape (C*KH*KW, N*OH*OW) and ``x.dtype``;
    ``cols[(c*KH + u)*KW + v, (n*OH + r)*OW + q] = xpad[n, c, r*sh + u, q*sw + v]``, where xpad is x
    padded by ``pad_value`` (0 for float; a quantized input passes its zero point). Rows follow
    ``w.reshape(O, C*KH*KW)``, so ``(w.reshape(O, -1) @ cols).reshape(O, N, OH, OW)`` transposed to
    (N, O, OH, OW) is the convolution.
    """
    n, c, h, wd = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(wd, kw, sw, pw)
    cols = np.empty((c * kh * kw, n * oh * ow), x.dtype)
    buf = np.full((c, h + 2 * ph, wd + 2 * pw), pad_value, x.dtype)
    geom = ConvGeometry(kh, kw, sh, sw, ph, pw, 1, 1, 1)
    for i in range(n):
        pad_into(x, i, ph, pw, buf)
        _im2col_fill(buf, geom, oh, ow, cols, i * oh * ow, ow)
    return cols


def pack_group_rows(w2, groups) -> np.ndarray:
    """``gemm.pack_rows`` of each group's rows of w2 (O, K), the groups' blocks one after the other:
    (groups * ceil(O / groups / PACK_ROWS), K, PACK_ROWS). One reshape for all groups, no loop."""
    if groups == 1:
        return pack_rows(w2)
    o, k = w2.shape
    og = o // groups
    blocks = -(-og // PACK_ROWS)
    padded = np.zeros((groups, blocks * PACK_ROWS, k), np.float32)
    padded[:, :og] = w2.reshape(groups, og, k)
    return np.ascontiguousarray(padded.reshape(groups * blocks, PACK_ROWS, k).transpose(0, 2, 1))


@register_jitable
def use_packed(o, groups) -> bool:
    """Whether im2col's GEMM runs on packed register blocks (``gemm_packed``): not for groups of fewer
    output channels than a block has rows (depthwise), which ``gemm_acc`` computes row by row with the
    same arithmetic (one fused multiply-add per tap, in tap order, from the bias) instead of padding
    every group to a whole block."""
    return groups == 1 or o // groups >= PACK_ROWS


@njit(cache=True, nogil=True)
def _phases_into(x, i, ph, pw, sh, sw, buf):
    """Image i of x, zero-padded by (ph, pw), as its sh*sw phases: buf[(a*sw + e)*C + c, r, q] =
    padded[c, r*sh + a, q*sw + e], 0 outside the padded image (every cell is written)."""
    c, h, wd = x.shape[1], x.shape[2], x.shape[3]
    hq, wq = buf.shape[1], buf.shape[2]
    for a in range(sh):
        for e in range(sw):
            # Phase columns q read input column q*sw + e - pw: inside the image for q0 <= q < q1.
            q0 = min(wq, max(0, -(-(pw - e) // sw)))
            q1 = max(q0, min(wq, -(-(wd + pw - e) // sw)))
            for ch in range(c):
                d = buf[(a * sw + e) * c + ch]
                for r in range(hq):
                    y = r * sh + a - ph
                    dr = d[r]
                    if y < 0 or y >= h:
                        dr[:] = 0.0
                        continue
                    s = x[i, ch, y]
                    dr[:q0] = 0.0
                    dr[q1:] = 0.0
                    for q in range(q0, q1):  # no branch: LLVM vectorises the copy (a gather for sw > 1)
                        dr[q] = s[q * sw + e - pw]


@njit(cache=True, nogil=True)
def im2col_images(x, w2, packed, b, geom, pool, relu, y, n0, n1):
    """y[n] = conv(x[n]) + b for n0 <= n < n1, one GEMM per image and group, then ReLU when ``relu``,
    then max pooling when ``pool`` (a ``pool.PoolGeometry``) has a window (kh > 0) -- both on the GEMM's
    output as it is stored. ``w2``: the weights as (O, K) = w.reshape(O, C/groups*KH*KW); ``packed``:
    ``pack_group_rows(w2, groups)`` when ``use_packed`` (else unused).

    No patch matrix is written: with GEMM columns j = r*Wq + q, tap (c, u, v) of column j is element
    j + offs[t] of the image (stride 1, Wq = the padded width Wp), so each patch row is a window of the
    image itself and the GEMM reads it (or its zero-bordered copy) in place. A stride (sh, sw) is
    made stride 1 by splitting the padded image into its sh*sw phases (rows = phase_row mod sh,
    columns mod sw; each C x Hq x Wq, Hq = ceil(Hp / sh)): tap (c, u, v) reads phase
    ((u*dh) % sh, (v*dw) % sw) shifted by ((u*dh) // sh, (v*dw) // sw), again a window. The copy costs
    one pass over the input instead of KH*KW/(sh*sw) for a patch matrix, and the GEMM's windows
    overlap in cache. The columns q >= OW of each row are computed and dropped -- (Wq - OW)/Wq extra
    work. The taps are summed in the same order whatever the layout: same bits. Convolutions that
    ``conv_blocked.use_blocked`` accepts run ``conv_blocked.blocked_images`` instead: output channels in
    vector lanes, faster on strides and many channels, the same bits again (``gemm_images`` is the
    GEMM path alone).
    """
    h, wd = x.shape[2], x.shape[3]
    hp, wp = h + 2 * geom.ph, wd + 2 * geom.pw
    oh = conv_output_size(hp, geom.kh, geom.sh, 0, geom.dh)
    ow = conv_output_size(wp, geom.kw, geom.sw, 0, geom.dw)
    if use_blocked(b.shape[0], geom.groups, w2.shape[1], oh * ow, geom.sh * geom.sw > 1, geom.dh, geom.dw):
        blocked_images(x, w2, b, geom, pool, relu, y, n0, n1)
    else:
        gemm_images(x, w2, packed, b, geom, pool, relu, y, n0, n1)


@njit(cache=True, nogil=True)
def gemm_images(x, w2, packed, b, geom, pool, relu, y, n0, n1):
    """``im2col_images`` by its GEMM path, whatever ``use_blocked`` says (the blocked kernel's reference)."""
    c, h, wd = x.shape[1], x.shape[2], x.shape[3]
    o = b.shape[0]
    groups = geom.groups
    cg, og = c // groups, o // groups
    ph, pw, sh, sw = geom.ph, geom.pw, geom.sh, geom.sw
    hp, wp = h + 2 * ph, wd + 2 * pw
    oh = conv_output_size(hp, geom.kh, sh, 0, geom.dh)
    ow = conv_output_size(wp, geom.kw, sw, 0, geom.dw)
    hq, wq = -(-hp // sh), -(-wp // sw)  # one phase's size
    plane = hq * wq
    k = cg * geom.kh * geom.kw
    row = wq  # GEMM columns per output row
    ncol = (oh - 1) * row + ow
    ncol_run = max(ncol, LANES)  # the GEMM works on whole vectors; extra columns read zeros
    offs = np.empty(k, np.int64)
    for ch in range(cg):
        for u in range(geom.kh):
            for v in range(geom.kw):
                t = (ch * geom.kh + u) * geom.kw + v
                du, dv = u * geom.dh, v * geom.dw
                phase = (du % sh) * sw + dv % sw
                offs[t] = (phase * c + ch) * plane + (du // sh) * wq + dv // sw
    in_place = sh == 1 and sw == 1 and ph == 0 and pw == 0 and ncol >= LANES
    phases = np.zeros(0 if in_place else sh * sw * c * plane + LANES, np.float32)
    # Output rows of the GEMM, row stride ``row``; the pooling and the copy read only q < OW.
    acc = np.empty((1, o, max(oh, -(-ncol_run // row)), row), np.float32)
    out = acc.reshape(o, -1)
    packed_ok = use_packed(o, groups)
    blocks = packed.shape[0] // groups if packed_ok else 0
    zero_rows = np.zeros(k, np.int64)  # gemm_acc's row index into the 1-row view of the data
    pooled = pool.kh > 0
    floor = np.float32(0.0) if relu else np.float32(-np.inf)
    flat = x.reshape(-1)
    for i in range(n0, n1):
        if in_place:
            data, base = flat, i * c * h * wd
        else:
            _phases_into(x, i, ph, pw, sh, sw, phases[:sh * sw * c * plane].reshape(sh * sw * c, hq, wq))
            data, base = phases, 0
        for g in range(groups):
            gbase = base + g * cg * plane
            rows = out[g * og:(g + 1) * og]
            if packed_ok:
                gemm_packed(packed[g * blocks:(g + 1) * blocks], b[g * og:(g + 1) * og], data, gbase, offs,
                            rows, ncol_run)
            else:
                for f in range(og):
                    rows[f, :ncol_run] = b[g * og + f]
                gemm_acc(w2[g * og:(g + 1) * og], data.reshape(1, -1), zero_rows, offs, gbase, rows, 0,
                         ncol_run, 0, k)
        if pooled:  # max and relu commute: a ReLU is a floor of 0 on the maxima
            maxpool_images(acc[:, :, :oh, :ow], y[i:i + 1], pool, floor, 0, 1)
        else:
            for f in range(o):
                for r in range(oh):
                    src, dst = acc[0, f, r], y[i, f, r]
                    if relu:
                        for q in range(ow):
                            dst[q] = src[q] if src[q] > 0 else np.float32(0.0)
                    else:
                        for q in range(ow):
                            dst[q] = src[q]


@njit(cache=True, nogil=True)
def _im2col_batch(x, w2, packed, b, geom, pool, relu):
    """``im2col_images`` over the whole batch into a new array (allocated here: one dispatch less)."""
    n, h, wd = x.shape[0], x.shape[2], x.shape[3]
    oh = conv_output_size(h, geom.kh, geom.sh, geom.ph, geom.dh)
    ow = conv_output_size(wd, geom.kw, geom.sw, geom.pw, geom.dw)
    if pool.kh > 0:
        oh = pool_output_size(oh, pool.kh, pool.sh, pool.ph, pool.ceil)
        ow = pool_output_size(ow, pool.kw, pool.sw, pool.pw, pool.ceil)
    y = np.empty((n, b.shape[0], oh, ow), np.float32)
    im2col_images(x, w2, packed, b, geom, pool, relu, y, 0, n)
    return y


@njit(cache=True, nogil=True, parallel=True)
def _im2col_parallel(x, w2, packed, b, geom, pool, relu, y, nchunks):
    n = x.shape[0]
    for t in prange(nchunks):
        im2col_images(x, w2, packed, b, geom, pool, relu, y, t * n // nchunks, (t + 1) * n // nchunks)


def _use_parallel(n: int, group: int) -> bool:
    # Only batches with at least two groups per thread are split; get_num_threads costs ~1 us.
    return n >= 4 * group and numba.get_num_threads() > 1


_PARALLEL_IMAGES = 8  # a batch is split over threads from 4 x this many images


def with_pool(run):
    """``run(x, b)`` extended to the runner signature ``(x, b, pool=None, relu=False)`` by separate
    passes, for the algorithms that do not apply ReLU and pooling in their own epilogue."""

    def run_then_pool(x, b, pool=None, relu=False, out=None):  # ``out`` is only a hint (see im2col_runner)
        y = run(x, b)
        if pool is not None:
            return maxpool2d(y, *pool_geometry(pool), floor=0 if relu else None)
        return relu_inplace(y.reshape(-1)).reshape(y.shape) if relu else y

    return run_then_pool


def im2col_runner(x_shape, w, sh=1, sw=1, ph=0, pw=0, dilation=(1, 1), groups=1):
    """A function ``run(x, b, pool=None, relu=False, out=None) -> y`` for inputs of shape (any N, C, H, W)
    = x_shape[1:], with the weight layout decided once, so a repeated call costs one kernel dispatch.
    ``relu`` and ``pool`` (a ``PoolGeometry`` or (kh, kw, sh, sw[, ph, pw, ceil])) apply ReLU and max
    pooling to the result in the same pass. ``out``: a C-contiguous float32 array that y may be written
    into when it has y's shape (a model's reused buffer, see ``network.Workspace``); y is returned
    either way, and the runners that cannot use it ignore it."""
    _, c, h, wd = x_shape
    o = w.shape[0]
    geom = conv_geometry(w.shape, (sh, sw), (ph, pw), dilation, groups)
    oh, ow = conv_output_shape(h, wd, geom)
    k = w.shape[1] * geom.kh * geom.kw
    w2 = np.ascontiguousarray(w.reshape(o, k))
    if (oh == 1 and ow == 1 and geom.kh == h and geom.kw == wd and ph == 0 and pw == 0 and groups == 1
            and geom.dh == 1 and geom.dw == 1):
        # The patch matrix is x itself: a dense layer.
        def run_dense(x, b, pool=None, relu=False, out=None):
            y = linear_forward(x.reshape(x.shape[0], k), w2, b, relu).reshape(x.shape[0], o, 1, 1)
            return y if pool is None else maxpool2d(y, *pool_geometry(pool))

        return run_dense
    packed = pack_group_rows(w2, groups) if use_packed(o, groups) else np.zeros((0, k, PACK_ROWS), np.float32)

    def run(x, b, pool=None, relu=False, out=None):
        pool = NO_POOL if pool is None else pool_geometry(pool)
        n = x.shape[0]
        parallel = _use_parallel(n, _PARALLEL_IMAGES)
        if out is None and not parallel:
            return _im2col_batch(x, w2, packed, b, geom, pool, relu)
        oh, ow = conv_output_shape(x.shape[2], x.shape[3], geom)
        shape = (n, o, *(pooled_shape(oh, ow, pool) if pool.kh > 0 else (oh, ow)))
        usable = out is not None and out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
        y = out if usable else np.empty(shape, np.float32)
        if parallel:
            _im2col_parallel(x, w2, packed, b, geom, pool, relu, y, numba.get_num_threads())
        else:
            im2col_images(x, w2, packed, b, geom, pool, relu, y, 0, n)
        return y

    return run


def conv2d_im2col(x, w, b, sh=1, sw=1, ph=0, pw=0, dilation=(1, 1), groups=1):
    """Convolution as GEMMs with our blocked kernel (see the module docstring for the layouts)."""
    return im2col_runner(x.shape, w, sh, sw, ph, pw, dilation, groups)(x, b)


def conv2d(x, w, b, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """The default FP32 convolution (im2col + our GEMM), any stride, padding, dilation and groups."""
    return conv2d_im2col(x, w, b, stride[0], stride[1], padding[0], padding[1], dilation, groups)


# -- Winograd ----------------------------------------------------------------------------------

# Interpolation points (plus the point at infinity) for each tile size alpha = m + r - 1.
_WINOGRAD_POINTS = {
    4: (0.0, 1.0, -1.0),
    6: (0.0, 1.0, -1.0, 2.0, -2.0),
    8: (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5),
}
WINOGRAD_VARIANTS = ((2, 3), (4, 3), (2, 5), (4, 5))  # (m, r): F(m x m, r x r)


def winograd_matrices(m: int, r: int):
    """Toom-Cook matrices (AT (m, a), G (a, r), BT (a, a)) in float64 for F(m, r), a = m + r - 1.

    With V the Vandermonde matrix of the points (row of infinity = leading coefficient), the 1-D
    correlation y_i = sum_k g_k d_{i+k} equals AT @ ((G @ g) * (BT @ d)) with AT = V_m^T, G = V_r,
    BT = V^-T (transpose of linear convolution computed by evaluate-multiply-interpolate).
    """
    if (m, r) not in WINOGRAD_VARIANTS:
        raise InputError(f"Winograd F({m}x{m},{r}x{r}) is not provided; choose from {WINOGRAD_VARIANTS}")
    a = m + r - 1
    pts = [Fraction(p) for p in _WINOGRAD_POINTS[a]]

    def vander(cols):
        v = [[p ** i for i in range(cols)] for p in pts] + [[Fraction(0)] * cols]
        v[a - 1][cols - 1] = Fraction(1)  # the point at infinity picks the leading coefficient
        return v

    # Exact rational arithmetic (the points are small dyadic numbers): the matrices are the same bits
    # everywhere, where np.linalg.inv's LAPACK kernels vary with the CPU.
    bt = _transpose(_inverse(vander(a)))
    # Rescale each row of BT so its smallest non-zero entry is +-1 (the entries become small
    # integers or halves, exact in float32) and move the factor into G, which is applied in float64.
    scale = [min(abs(x) for x in row if x != 0) for row in bt]
    g = [[x * scale[i] for x in row] for i, row in enumerate(vander(r))]
    bt = [[x / scale[i] for x in row] for i, row in enumerate(bt)]
    return tuple(np.array(mat, dtype=np.float64) for mat in (_transpose(vander(m)), g, bt))


def _transpose(mat):
    return [list(col) for col in zip(*mat, strict=True)]


def _inverse(mat):
    """Inverse of a square matrix of Fractions by Gauss-Jordan elimination (exact)."""
    n = len(mat)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for col in range(n):
        pivot = next(i for i in range(col, n) if rows[i][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        lead = rows[col][col]
        rows[col] = [x / lead for x in rows[col]]
        for i in range(n):
            if i != col and rows[i][col] != 0:
                f = rows[i][col]
                rows[i] = [x - f * y for x, y in zip(rows[i], rows[col], strict=True)]
    return [row[n:] for row in rows]


def winograd_weights(w, m: int) -> np.ndarray:
    """U (a*a, O, C) float32 = G g G^T for every (o, c) filter g; computed once per layer.

    The transform runs in float64 and is rounded once, so U adds no error beyond float32 storage.
    """
    o, c, kh, kw = w.shape
    if kh != kw:
        raise InputError(f"Winograd needs a square kernel, found {kh}x{kw}")
    _, g, _ = winograd_matrices(m, kh)
    a = m + kh - 1
    u = np.einsum("ai,ocij,bj->aboc", g, np.asarray(w, np.float64), g)
    return np.ascontiguousarray(u.reshape(a * a, o, c), dtype=np.float32)


# Floats of transform buffers per Winograd group: ~1 MiB, so a group's working set stays in L2.
_WINOGRAD_BUDGET = 1 << 18


def winograd_group_size(c, o, h, wd, ph, pw, m, r) -> int:
    a = m + r - 1
    tiles = -(-(h + 2 * ph - r + 1) // m) * -(-(wd + 2 * pw - r + 1) // m)
    per_column = a * a * (2 * c + o) + m * a * o
    return int(max(1, _WINOGRAD_BUDGET // (per_column * tiles)))


@njit(cache=True, nogil=True)
def _axpy(dst, coef, src):
    for t in range(dst.size):
        dst[t] += coef * src[t]


@njit(cache=True, nogil=True)
def _winograd_images(x, u, b, ph, pw, m, at, bt, y, n0, n1, group):
    """y[n0:n1] by F(m x m, r x r), ``group`` images at a time.

    Every tile of every image in a group is one column (image-major, then tile row, tile column),
    so each step of the transforms is an axpy over all C (or O) x columns values:
      D[i, j] (C, cols)  = the (zero-padded) input pixel at tile offset (i, j)
      V[e, f]            = sum_ij BT[e, i] BT[f, j] D[i, j]      (two passes, zeros of BT skipped)
      M[e, f] (O, cols)  = U[e, f] @ V[e, f]                       (our GEMM kernel)
      y[.., i, j]        = sum_ef AT[i, e] AT[j, f] M[e, f] + b    (two passes, then scattered)
    """
    c = x.shape[1]
    o = u.shape[1]
    a = bt.shape[0]
    oh, ow = y.shape[2], y.shape[3]
    th, tw = (oh + m - 1) // m, (ow + m - 1) // m
    ntile = th * tw
    g_max = min(group, n1 - n0)
    ncol = g_max * ntile
    d = np.zeros((a, a, c, ncol), np.float32)
    tmp = np.empty((a, a, c, ncol), np.float32)
    mm = np.empty((a * a, o, ncol), np.float32)
    z = np.empty((m, a, o, ncol), np.float32)
    out = np.empty((o, ncol), np.float32)
    v = d.reshape(a * a, c, ncol)  # V overwrites D, which is dead after the first pass
    hq, wq = th * m + a - m, tw * m + a - m  # the padded input the tiles cover
    buf = np.zeros((c, hq, wq), np.float32)
    tile_start = np.empty(ntile, np.int64)  # flat offset of each tile's top-left pixel in buf[c]
    for ty in range(th):
        for tx in range(tw):
            tile_start[ty * tw + tx] = ty * m * wq + tx * m
    rows = np.arange(c)
    offs = np.zeros(c, np.int64)
    for g0 in range(n0, n1, g_max):
        gn = min(g_max, n1 - g0)
        for g in range(gn):
            pad_into(x, g0 + g, ph, pw, buf)
            for ch in range(c):
                plane = buf[ch].reshape(hq * wq)
                for i in range(a):
                    for j in range(a):
                        src = plane[i * wq + j :]
                        dst = d[i, j, ch, g * ntile : (g + 1) * ntile]
                        for t in range(ntile):
                            dst[t] = src[tile_start[t]]
        for e in range(a):
            for j in range(a):
                acc = tmp[e, j].reshape(c * ncol)
                acc[:] = 0.0
                for i in range(a):
                    if bt[e, i] != 0.0:
                        _axpy(acc, bt[e, i], d[i, j].reshape(c * ncol))
        for e in range(a):
            for f in range(a):
                acc = v[e * a + f].reshape(c * ncol)
                acc[:] = 0.0
                for j in range(a):
                    if bt[f, j] != 0.0:
                        _axpy(acc, bt[f, j], tmp[e, j].reshape(c * ncol))
        mm[:] = 0.0
        for e in range(a * a):
            gemm_acc(u[e], v[e], rows, offs, 0, mm[e], 0, ncol, 0, c)
        for i in range(m):
            for f in range(a):
                acc = z[i, f].reshape(o * ncol)
                acc[:] = 0.0
                for e in range(a):
                    if at[i, e] != 0.0:
                        _axpy(acc, at[i, e], mm[e * a + f].reshape(o * ncol))
        for i in range(m):
            for j in range(m):
                for ch in range(o):
                    out[ch, :] = b[ch]
                for f in range(a):
                    if at[j, f] != 0.0:
                        _axpy(out.reshape(o * ncol), at[j, f], z[i, f].reshape(o * ncol))
                n_tx = min(tw, (ow - 1 - j) // m + 1)  # tiles whose column j is inside y
                n_ty = min(th, (oh - 1 - i) // m + 1)
                for g in range(gn):
                    for ch in range(o):
                        for ty in range(n_ty):
                            seg = out[ch, (g * th + ty) * tw : (g * th + ty) * tw + tw]
                            dst_row = y[g0 + g, ch, ty * m + i]
                            for tx in range(n_tx):
                                dst_row[j + tx * m] = seg[tx]


@njit(cache=True, nogil=True, parallel=True)
def _winograd_parallel(x, u, b, ph, pw, m, at, bt, y, group, nchunks):
    n = x.shape[0]
    for t in prange(nchunks):
        _winograd_images(x, u, b, ph, pw, m, at, bt, y, t * n // nchunks, (t + 1) * n // nchunks, group)


# (m, r) -> the float32 (A^T, B^T) transform matrices, built once per tile shape.
_WINOGRAD_F32: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def winograd_runner(x_shape, u, ph, pw, m, r):
    """``run(x, b) -> y`` for Winograd F(m x m, r x r) on inputs shaped like x_shape (any N), with
    weights ``u`` from ``winograd_weights``."""
    mats = _WINOGRAD_F32.get((m, r))
    if mats is None:
        at64, _, bt64 = winograd_matrices(m, r)
        mats = _WINOGRAD_F32[(m, r)] = (at64.astype(np.float32), bt64.astype(np.float32))
    at, bt = mats
    _, c, h, wd = x_shape
    a = m + r - 1
    if u.ndim != 3 or u.shape[0] != a * a or u.shape[2] != c:
        raise InputError(f"Winograd weights of shape {u.shape} do not fit F({m}x{m},{r}x{r}) on {c} channels")
    o = u.shape[1]
    oh, ow = h + 2 * ph - r + 1, wd + 2 * pw - r + 1
    group = winograd_group_size(c, o, h, wd, ph, pw, m, r)

    def run(x, b):
        n = x.shape[0]
        y = np.empty((n, o, oh, ow), np.float32)
        if _use_parallel(n, group):
            _winograd_parallel(x, u, b, ph, pw, m, at, bt, y, group, numba.get_num_threads())
        else:
            _winograd_images(x, u, b, ph, pw, m, at, bt, y, 0, n, group)
        return y

    return run


def conv2d_winograd(x, u, b, ph, pw, m, r):
    """Stride-1 convolution by Winograd F(m x m, r x r) with weights prepared by ``winograd_weights``.

    Variants: F(2x2,3x3) and F(4x4,3x3) for 3x3 kernels, F(2x2,5x5) and F(4x4,5x5) for 5x5 kernels.
    Multiplications per output and input channel: r*r direct vs (m+r-1)^2/m^2 here (3x3: 9 -> 4 or
    2.25; 5x5: 25 -> 9 or 4), paid for with the input/output transforms, which only amortise over
    many channels -- LeNet's 1 and 6 input channels leave most of that gain in the transforms.

    Accuracy (float32 data, float64 weight transform, BT rescaled to small exact integers), as
    max |error| / max |y| against a float64 direct convolution on random data: F(2x2,3x3) ~1e-7,
    F(2x2,5x5) and F(4x4,3x3) ~1e-6, F(4x4,5x5) ~5e-6 to 1e-5. F(4x4,5x5) needs the points +-1/2 in
    its 8x8 tiles; its input transform has entries up to 10 and the output transform sums 64 terms,
    so rounding is amplified most there. It uses 6.25x fewer multiplies than direct for 5x5 kernels
    but is the least accurate choice: prefer F(2x2,5x5) when exactness matters (quantization
    studies, argmax agreement). Tests hold F(2x2,*) to 1e-5 and F(4x4,*) to 5e-5 relative.
    """
    return winograd_runner(x.shape, u, ph, pw, m, r)(x, b)


# -- FFT ---------------------------------------------------------------------------------------


def fft_weights(w, shape) -> np.ndarray:
    """conj(rfft2(w)) on the padded-input grid ``shape`` (Hp, Wp), as (O, C, Hp*(Wp//2 + 1))
    complex64; computed once per layer and input size."""
    o, c = w.shape[:2]
    wf = np.conj(np.fft.rfft2(np.asarray(w, np.float32), s=shape))  # (O, C, Hp, Wp//2 + 1)
    return np.ascontiguousarray(wf.reshape(o, c, -1), dtype=np.complex64)


@njit(cache=True, nogil=True)
def _spectral_products(xf, wf, yf):
    """yf[n, o, :] = sum_c xf[n, c, :] * wf[o, c, :] (complex64; frequencies innermost).

    No fused multiply-adds: a complex product offers LLVM a choice of which real product to fuse,
    and its vectorised loop and scalar remainder (split where the target's vector width says) could
    choose differently; separately rounded operations give the same bits on every target.

    A Numba loop rather than a batched BLAS matmul: the matmul is faster on one idle core but
    OpenBLAS's own threads ignore ``numba.set_num_threads`` and stall badly on a busy machine."""
    n, c, nf = xf.shape
    o = wf.shape[0]
    for i in range(n):
        for f in range(o):
            acc = yf[i, f]
            for t in range(nf):
                acc[t] = 0
            for ch in range(c):
                xr = xf[i, ch]
                wr = wf[f, ch]
                for t in range(nf):
                    acc[t] += xr[t] * wr[t]


def fft_runner(x_shape, wf, kh, kw, sh=1, sw=1, ph=0, pw=0):
    """``run(x, b) -> y`` by FFT for inputs shaped like x_shape (any N); see ``conv2d_fft``."""
    _, c, h, wd = x_shape
    hp, wp = h + 2 * ph, wd + 2 * pw
    nf = hp * (wp // 2 + 1)
    o = wf.shape[0]
    if wf.shape != (o, c, nf):
        raise InputError(f"FFT weights of shape {wf.shape} do not fit input {tuple(x_shape)}; "
                         f"expected {(o, c, nf)}")
    oh, ow = conv_output_size(hp, kh, sh), conv_output_size(wp, kw, sw)

    def run(x, b):
        n = x.shape[0]
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        xf = np.fft.rfft2(x).reshape(n, c, nf)  # complex64: numpy.fft keeps single precision
        yf = np.empty((n, o, nf), np.complex64)
        _spectral_products(xf, wf, yf)
        full = np.fft.irfft2(yf.reshape(n, o, hp, wp // 2 + 1), s=(hp, wp))  # (N, O, Hp, Wp)
        y = full[:, :, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw] + b.reshape(1, o, 1, 1)
        return np.ascontiguousarray(y, dtype=np.float32)

    return run


def conv2d_fft(x, wf, b, kh, kw, sh=1, sw=1, ph=0, pw=0):
    """Convolution through the convolution theorem, using weights from ``fft_weights``.

    Steps: zero-pad x to (Hp, Wp) = (H + 2ph, W + 2pw); X = rfft2(x) per (n, c) plane;
    Y[n, o, f] = sum_c X[n, c, f] * conj(W[o, c, f]) (``_spectral_products``); y = irfft2(Y).
    Correlation on the periodic Hp x Wp grid equals the plain one for output positions
    0..Hp-KH, so no extra padding is needed. Stride > 1: the stride-1 result is
    subsampled, which wastes sh*sw - 1 of every sh*sw outputs (correct, documented, not fast).

    Cost: per image, C forward and O inverse transforms of Hp*Wp points (~2.5 Hp*Wp*log2(Hp*Wp)
    flops each, whatever the kernel size) plus 4*Hp*(Wp/2+1) real multiply-adds per (c, o) pair,
    against KH*KW*OH*OW per pair for direct convolution. The FFT pays off only when KH*KW is large
    compared with log2(Hp*Wp) and C, O are large enough to amortise the transforms. For LeNet:
    conv1 (32x32 grid) 2176 vs 19600 multiply-adds per pair, but 7 transforms of 1024 points per
    image for 6 pairs; conv2 (14x14 grid) 448 vs 2500 per pair plus 22 transforms; conv3 (5x5
    grid, 1x1 output) 60 vs 25 per pair plus 136 transforms. numpy's FFT also costs a few
    microseconds per small plane (call overhead dominates at 14x14 and 5x5: the 16000 or 120000
    inverse transforms per 1000 images take ~50-70 ms), so FFT is by far the slowest algorithm
    here -- slower than naive on conv2 and conv3.

    Accuracy: float32 FFTs give errors ~ eps * log2(Hp*Wp) * sum|x||w|, i.e. max |error| within
    ~1e-5 of max |y| on LeNet-size inputs (measured ~1e-6).
    """
    return fft_runner(x.shape, wf, kh, kw, sh, sw, ph, pw)(x, b)
