"""argparse types shared by every ``microcnn`` command: values are checked while the command line is
parsed, so a bad value ends in one line naming the flag (``argument --samples: ...``), before any
data is loaded or any work is done."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# Bounds for counts where a huge value is not wrong, only endless; far beyond any real use.
MAX_REPEATS = 1000
MAX_EPOCHS = 100_000
MAX_IMAGES = 10_000_000  # images per request; the real limit (the split's size) is checked on load
MAX_SEED = 2**63 - 1


def int_in(low: int, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``low..high`` (``high`` None: no upper bound).

    Example::

        >>> int_in(1, 10, "a digit")("7")
        7
        >>> int_in(1, 10, "a digit")("11")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a digit in 1..10, found 11
    """

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected {what} in {bound}, found {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def thread_count(text: str) -> int:
    """1..NUMBA_NUM_THREADS: more threads than Numba was started with cannot run, and a benchmark
    labelled with a thread count it did not use would be a wrong answer."""
    import numba

    return int_in(1, numba.config.NUMBA_NUM_THREADS, "a thread count (NUMBA_NUM_THREADS limits it)")(text)


def thread_counts(text: str) -> list[int]:
    """A comma-separated list of distinct ``thread_count`` values (``bench --threads 1,2``)."""
    parts = [p.strip() for p in text.split(",")]
    counts = [thread_count(p) for p in parts]
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct thread counts, found {text!r}")
    return counts


image_count = int_in(1, MAX_IMAGES, "a number of images")
repeat_count = int_in(1, MAX_REPEATS, "a number of repeats")
epoch_count = int_in(1, MAX_EPOCHS, "a number of epochs")
seed_value = int_in(0, MAX_SEED, "a seed")
index_value = int_in(0, MAX_IMAGES, "an image index")


def float_in(low: float, high: float | None = None, what: str = "a number", low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite floats between ``low`` and ``high`` (open ends as given)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            bound = ("(" if low_open else "[") + f"{low:g}, " + (f"{high:g}" if high is not None else "inf") \
                + (")" if high_open or high is None else "]")
            raise argparse.ArgumentTypeError(f"expected {what} in {bound}, found {text}")
        return value

    parse.__name__ = "number"
    return parse


def dataset_spec(text: str) -> str:
    """``--dataset``: a dataset name (mnist, fashion-mnist) or the path of an .npz file."""
    names = ("mnist", "fashion-mnist")
    if text in names or text.lower().endswith(".npz"):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)} or a .npz file, found {text!r}")
