"""Atomic file writes: a failed or interrupted write never replaces a good file. And the check every
reader makes before opening a file it was given."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import FileFormatError, InputError

# mkstemp creates files readable by their owner only; a saved model or dataset should get the
# permissions open() would give it. Read once, at import, as os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def regular_file_size(path, what: str) -> int:
    """Size of the regular file ``path``; FileNotFoundError naming ``what`` if it is missing, and
    FileFormatError for a directory (which fails late with a bare OSError) or a FIFO, device or socket
    (which would block a reader or never end)."""
    try:
        mode, size = (info := os.stat(path)).st_mode, info.st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file")
        raise FileFormatError(path, f"{what} is not a regular file", "a regular file", kind)
    return size


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Yield a file object on a temporary sibling of ``path``; rename it over ``path`` only on success.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole file was written
        raise InputError(f"{path}: is a directory; expected the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            try:  # an existing file keeps its permissions, a new one gets the umask's
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
            except FileNotFoundError:
                os.fchmod(fd, 0o666 & ~_UMASK)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)
