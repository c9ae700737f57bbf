"""Exceptions that say which file or argument was wrong, what was expected and what was found."""

from __future__ import annotations


class MicrocnnError(ValueError):
    """Base class: every error microcnn raises on bad input is one of these."""


class FileFormatError(MicrocnnError):
    """A model or data file is malformed. The message names the file, the expectation and the finding."""

    def __init__(self, path, what: str, expected=None, found=None):
        self.path, self.what, self.expected, self.found = str(path), what, expected, found
        msg = f"{self.path}: {what}"
        if expected is not None or found is not None:
            msg += f" (expected {expected}, found {found})"
        super().__init__(msg)


class InputError(MicrocnnError):
    """An array or argument handed to the API has the wrong shape, dtype or values."""


class DataNotFoundError(MicrocnnError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded."""


class DownloadError(MicrocnnError, OSError):
    """Every mirror failed or delivered bytes with the wrong checksum."""
