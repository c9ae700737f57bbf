"""The channel-blocked FP32 convolution (``kernels.conv_blocked``) on rows wide enough for its vector copy
into the zero border (16 or more input columns), with different vertical and horizontal paddings, exactly
against an int64 NumPy reference: the inputs are small integers, so every float32 sum is exact.

Written against a planted one-line bug (``tools/kernel_mutants.py``, cblk-05: the vector copy's left
border taken from the vertical padding) that the suite let through: its blocked cases with rows of 16 or
more all have equal paddings.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from microcnn.kernels import conv_blocked as CB
from microcnn.kernels.conv import conv_geometry
from microcnn.kernels.pool import NO_POOL


def _conv_ref(x, w, b, stride, padding):
    """int64 convolution (N, O, OH, OW) of integer-valued arrays."""
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))[:, :, ::sh, ::sw]
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.int64)) + b.astype(np.int64)[None, :, None, None]


# (n, c, h, w, o, kh, kw, stride, padding): rows of 16 or more input columns (the vector copy), the two
# paddings different, a partial channel block
BLOCKED = [
    (4, 3, 7, 20, 16, 3, 3, (1, 1), (1, 2)),
    (4, 2, 9, 17, 24, 3, 5, (2, 1), (2, 0)),
]


@pytest.mark.parametrize("shape", BLOCKED)
@pytest.mark.parametrize("relu", [False, True])
def test_blocked_conv_with_unequal_paddings_on_wide_rows(shape, relu):
    n, c, h, w, o, kh, kw, stride, padding = shape
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, (n, c, h, w)).astype(np.float32)
    wt = rng.integers(-4, 5, (o, c, kh, kw)).astype(np.float32)
    b = rng.integers(-20, 21, o).astype(np.float32)
    geom = conv_geometry(wt.shape, stride, padding)
    expected = _conv_ref(x, wt, b, stride, padding)
    if relu:
        expected = np.maximum(expected, 0)
    npix = expected.shape[2] * expected.shape[3]
    assert CB.use_blocked(o, 1, wt[0].size, npix, stride[0] * stride[1] > 1, 1, 1)
    y = np.full(expected.shape, np.nan, np.float32)
    CB.blocked_images(x, np.ascontiguousarray(wt.reshape(o, -1)), b, geom, NO_POOL, relu, y, 0, n)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
