"""Validation of image batches handed to the public API (predict, calibrate, train)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .errors import InputError
from .kernels.elementwise import all_finite

_F32 = np.dtype(np.float32)


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (sizes, batch sizes, epochs), or InputError naming it.

    Example::

        >>> check_count("batch_size", np.int64(64))
        64
        >>> check_count("epochs", True)
        Traceback (most recent call last):
        ...
        microcnn.errors.InputError: epochs: expected an integer >= 1, found True
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, found {value!r}")
    return int(value)


def check_array_batch(x: object, name: str = "forward") -> None:
    """Refuse, naming the real problem, what ``Sequential.forward`` (which takes arrays as they are)
    cannot run: anything but a numpy array, and a batch of no images."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name}: expected a numpy array (N, C, H, W), found {type(x).__name__}; predict() "
                         "converts lists and uint8 images, forward() takes float arrays as they are")
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError(f"{name}: expected at least one image, found an empty batch {x.shape}")


def as_image_batch(x: ArrayLike, chw: tuple[int, int, int] | None = None, name: str = "images") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (N, C, H, W) batch, or raise ``InputError``.

    Accepted: float arrays (cast to float32), and uint8 arrays, which are scaled by 1/255 as MNIST
    pixels are. Other integer and boolean dtypes are refused because their scale is ambiguous.
    A single image may be given as (H, W) when C is 1, or as (C, H, W). Non-contiguous and
    Fortran-ordered arrays are copied to C order, so results do not depend on memory layout.

    Example::

        >>> as_image_batch(np.full((28, 28), 255, np.uint8), chw=(1, 28, 28)).shape
        (1, 1, 28, 28)
        >>> as_image_batch(np.zeros((2, 28, 28), np.int32), chw=(1, 28, 28))
        Traceback (most recent call last):
        ...
        microcnn.errors.InputError: images: expected float32 (or uint8 pixels 0..255), found dtype int32
    """
    if (type(x) is np.ndarray and x.dtype == _F32 and x.ndim == 4 and x.shape[0] > 0
            and (chw is None or x.shape[1:] == chw) and x.flags.c_contiguous
            and all_finite(x.reshape(-1))):
        return x  # already what is asked for: the common case, checked without copies
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise InputError(f"{name}: expected an array, found {type(x).__name__} ({exc})") from None
    if x.ndim > 0 and x.shape[0] == 0:  # [] or (0, C, H, W): say so before shape and dtype do
        raise InputError(f"{name}: expected at least one image, found an empty batch {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, refused below
            x = x.astype(np.float32, copy=False)
    else:
        raise InputError(
            f"{name}: expected float32 (or uint8 pixels 0..255), found dtype {x.dtype}"
        )
    if chw is not None:
        c, h, w = chw
        if x.ndim == 2 and c == 1:
            x = x[None, None]
        elif x.ndim == 3 and x.shape == tuple(chw):
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != tuple(chw):
            raise InputError(f"{name}: expected shape (N, {c}, {h}, {w}), found {x.shape}")
    elif x.ndim != 4:
        raise InputError(f"{name}: expected a 4-D (N, C, H, W) array, found shape {x.shape}")
    if x.shape[0] == 0:  # a single (H, W) or (C, H, W) image with a zero-sized axis
        raise InputError(f"{name}: expected at least one image, found an empty batch {x.shape}")
    if np.isfinite(x).all():
        return np.ascontiguousarray(x)
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))[0])
        raise InputError(
            f"{name}: expected finite float32 values, found {int(bad.sum())} NaN/Inf or beyond float32's "
            f"range (first in image {first})"
        )
    return np.ascontiguousarray(x)


def int_pair(v: Any, name: str) -> tuple[int, int]:
    """``v`` (an int, or a pair of ints) as a pair of Python ints: kernel sizes, strides, paddings.

    Example::

        >>> int_pair(3, "kernel_size"), int_pair((1, 2), "stride")
        ((3, 3), (1, 2))
    """
    try:
        pair: tuple = (v, v) if isinstance(v, int | np.integer) else tuple(v)
    except TypeError:  # not iterable: None, a float, ...
        pair = ()
    # The bound keeps values inside the kernels' integer types (a file may say 10**30).
    if len(pair) != 2 or not all(isinstance(p, int | np.integer) and abs(int(p)) < 2**31 for p in pair):
        raise InputError(f"{name}: expected an int or a pair of ints (|value| < 2**31), found {v!r}")
    return int(pair[0]), int(pair[1])
