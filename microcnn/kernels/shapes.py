"""Output sizes of sliding windows: one definition, callable from Python and from Numba kernels alike
(``register_jitable`` compiles it into the kernel that calls it; from Python it is a plain function)."""

from numba.extending import register_jitable


@register_jitable
def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Positions of a ``kernel``-wide window, dilated by ``dilation``, sliding by ``stride`` over ``size``
    values padded by ``padding`` on each side: floor((size + 2p - d(k - 1) - 1) / s) + 1, as in
    PyTorch's Conv2d and MaxPool2d. Pooling is the case ``padding=0``.

    Example::

        >>> conv_output_size(28, 5, padding=2), conv_output_size(28, 2, 2)
        (28, 14)
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
