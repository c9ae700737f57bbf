"""Kernel behaviours the mutation run of the rewritten kernels (issue 19, third kernel round) found
unchecked: each test names the behaviour, not the code that has it, so a rewrite keeps them valid.
References are independent NumPy computations or PyTorch's documented rules; results are exact
(integer codes, selected maxima, refusals)."""

import numpy as np
import pytest

from microcnn import InputError
from microcnn.layers import MaxPool2d


@pytest.mark.parametrize(("kernel", "padding", "ok"), [
    ((4, 2), (0, 2), False),  # horizontal padding beyond half the (narrow) kernel width
    ((2, 4), (0, 2), True),  # exactly half the width: allowed although 2 * 2 > kernel height
    ((2, 4), (2, 0), False),  # vertical padding beyond half the kernel height
    ((4, 2), (2, 0), True),
    ((4, 2), (2, 1), True),
])
def test_pool_padding_is_checked_against_its_own_kernel_side(kernel, padding, ok):
    """PyTorch's rule per direction: padding at most half the kernel size along the same axis."""
    if ok:
        layer = MaxPool2d(kernel, 1, padding)
        x = np.arange(2 * 6 * 7, dtype=np.float32).reshape(1, 2, 6, 7)
        kh, kw = kernel
        ph, pw = padding
        assert layer.forward(x).shape == (1, 2, 6 + 2 * ph - kh + 1, 7 + 2 * pw - kw + 1)
    else:
        with pytest.raises(InputError, match="at most half the kernel"):
            MaxPool2d(kernel, 1, padding)


def _max_pool_reference(x, kh, kw, sh, sw):
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.empty((n, c, oh, ow), x.dtype)
    for oy in range(oh):
        for ox in range(ow):
            out[:, :, oy, ox] = x[:, :, oy * sh:oy * sh + kh, ox * sw:ox * sw + kw].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("stride", [(2, 3), (3, 2), (2, 1), (1, 2), (3, 3)])
def test_two_by_two_max_pool_with_any_other_stride_matches_the_reference(stride):
    """A 2x2 window whose stride is not (2, 2) in both directions: LeNet's special case must not apply."""
    from microcnn.kernels.pool import maxpool2d

    x = np.random.default_rng(7).standard_normal((2, 3, 9, 11)).astype(np.float32)
    want = _max_pool_reference(x, 2, 2, *stride)
    np.testing.assert_array_equal(maxpool2d(x, 2, 2, *stride), want)
    np.testing.assert_array_equal(maxpool2d(x, 2, 2, *stride, floor=0), np.maximum(want, 0))
