"""Exceptions that say which file or argument was wrong, what was expected and what was found."""

from __future__ import annotations

import os


class MicrocnnError(ValueError):
    """Base class: every error microcnn raises on bad input is one of these (and a ``ValueError``).

    Example::

        >>> issubclass(InputError, MicrocnnError) and issubclass(MicrocnnError, ValueError)
        True
    """


class FileFormatError(MicrocnnError):
    """A model or data file is malformed. The message names the file, the expectation and the finding.

    Args:
        path: the file (kept as ``str`` in ``.path``).
        what: what is wrong with it.
        expected: what a valid file has there (optional).
        found: what this file has instead (optional).

    Example::

        >>> err = FileFormatError("lenet.raw", "truncated weights", "245,736 bytes", "1,024 bytes")
        >>> str(err)
        'lenet.raw: truncated weights (expected 245,736 bytes, found 1,024 bytes)'
        >>> err.path, err.found
        ('lenet.raw', '1,024 bytes')
    """

    def __init__(self, path: str | os.PathLike[str], what: str, expected: object = None,
                 found: object = None):
        self.path, self.what, self.expected, self.found = str(path), what, expected, found
        msg = f"{self.path}: {what}"
        if expected is not None or found is not None:
            msg += f" (expected {expected}, found {found})"
        super().__init__(msg)


class InputError(MicrocnnError):
    """An array or argument handed to the API has the wrong shape, dtype or values.

    Example::

        >>> from microcnn.checks import check_count
        >>> check_count("epochs", 0)
        Traceback (most recent call last):
        ...
        microcnn.errors.InputError: epochs: expected an integer >= 1, found 0
    """


class DataNotFoundError(MicrocnnError, FileNotFoundError):
    """A dataset (or the bundled weights) is not on disk and could not be downloaded; the message says
    where it was looked for and where to put it. Also a ``FileNotFoundError``.

    Example::

        >>> issubclass(DataNotFoundError, FileNotFoundError)
        True
    """


class DownloadError(MicrocnnError, OSError):
    """Every mirror failed or delivered bytes with the wrong checksum; the message lists each URL tried
    and why it failed. Also an ``OSError``.

    Example::

        >>> issubclass(DownloadError, OSError)
        True
    """
