"""Safe file writes, and the check every reader makes before opening a file it was given.

Writing policy (every writer in microcnn goes through ``atomic_open``):

* Atomic: the bytes go to a temporary sibling that is renamed over the destination only once it is
  complete, so a failed or interrupted write never leaves a truncated file or replaces a good one.
  ``all_or_nothing()`` extends this to several files (a ``.raw`` and its ``.safetensors``): all are
  written first, then renamed together; if a rename fails, the ones already replaced get their old
  content back.
* Only regular files are written. A directory, FIFO, device or socket at the destination is refused
  (renaming over ``/dev/null`` would replace the device node with a regular file).
* Symbolic links are refused, never written through or replaced: replacing the link would silently
  turn it into a regular file and leave its target stale, and writing through it would change a file
  the user did not name. Give the link's target instead. (Links among the parent directories are
  fine: only the last component is checked.)
* ``overwrite=False`` refuses an existing file: the command line passes it unless ``--force`` is
  given, so no default output replaces a shipped or earlier file. The Python API (``net.save(path)``)
  is an explicit request and overwrites.
* Errors name the destination the caller gave, never the temporary file. ``check_destination`` finds
  an unusable destination (before a long computation) by the same means the write will use.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import FileFormatError, InputError

# What every function taking a file or folder accepts: a str or a path-like object (pathlib.Path).
StrPath = str | os.PathLike[str]

# mkstemp creates files readable by their owner only; a saved model or dataset should get the
# permissions open() would give it. Read once, at import, as os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# The list of (temporary, destination) pairs of the innermost active all_or_nothing() block.
_STAGED: contextvars.ContextVar[list | None] = contextvars.ContextVar("microcnn_staged_writes", default=None)


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file")


def regular_file_size(path: StrPath, what: str) -> int:
    """Size of the regular file ``path``; FileNotFoundError naming ``what`` if it is missing, and
    FileFormatError for a directory (which fails late with a bare OSError) or a FIFO, device or socket
    (which would block a reader or never end)."""
    try:
        mode, size = (info := os.stat(path)).st_mode, info.st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    if not stat.S_ISREG(mode):
        raise FileFormatError(path, f"{what} is not a regular file", "a regular file", _kind(mode))
    return size


def _renamed(exc: OSError, path: StrPath) -> OSError:
    """The same error, naming ``path`` (what the caller asked to write) instead of a temporary file."""
    if exc.errno is None:
        return OSError(f"{path}: {exc}")
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def check_destination(path: StrPath, overwrite: bool = True, probe: bool = True) -> Path:
    """Raise unless ``path`` can be written as a regular file under the policy above; return it as a Path.

    ``probe`` creates and removes an empty temporary file where the write will put its own, which finds
    a read-only or full directory (also for root, whom permission bits do not stop). Missing parent
    directories are not created here; the nearest existing one must be a writable directory.
    """
    path = Path(path)
    info: os.stat_result | None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:  # e.g. a parent is a regular file: ENOTDIR
        info = None
        if exc.errno != errno.ENOTDIR:
            raise _renamed(exc, path) from None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise InputError(f"{path}: is a symbolic link (to {os.readlink(path)}); microcnn neither "
                             "writes through links nor replaces them: give the target's path, or remove "
                             "the link")
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{path}: is a directory; expected the path of a file to write")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: is {_kind(info.st_mode)}; expected the path of a regular file to "
                             "write (special files are never replaced)")
        if not overwrite:
            raise InputError(f"{path}: already exists; not replaced (pass --force to replace it, or "
                             "choose another output path)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link among the parents
            raise InputError(f"{path}: cannot write: {parent} is a dangling symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{path}: cannot write: {parent} is not a directory")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        except OSError as exc:
            raise _renamed(exc, path) from None
        os.close(fd)
        os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_open(path: StrPath, mode: str = "wb", overwrite: bool = True) -> Iterator[IO[Any]]:
    """Yield a file object on a temporary sibling of ``path``; rename it over ``path`` only on success.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is left
    untouched. Inside ``all_or_nothing()`` the rename waits for the end of that block.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_open(path, "w") as f:
        ...     _ = f.write("complete")
        >>> path.read_text()
        'complete'
    """
    path = check_destination(path, overwrite, probe=False)  # mkstemp below is the probe
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise _renamed(exc, path) from None
    staged = _STAGED.get()
    try:
        try:  # closing retries a failed flush and raises again: the whole block names the destination
            with os.fdopen(fd, mode) as f:
                try:  # an existing file keeps its permissions, a new one gets the umask's
                    os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
                except FileNotFoundError:
                    os.fchmod(fd, 0o666 & ~_UMASK)
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # ENOSPC, EFBIG, EIO ... reported on the caller's path
            raise _renamed(exc, path) from None
        if staged is not None:
            staged.append((tmp, path))
            return
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _renamed(exc, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: StrPath, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through ``atomic_open``."""
    with atomic_open(path, "wb", overwrite) as f:
        f.write(data)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Writes made (through ``atomic_open``) inside the block replace their destinations together at
    its end, and only if the block and every write succeeded; otherwise no destination changes.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> a, b = Path(tempfile.mkdtemp()) / "a.bin", Path(tempfile.mkdtemp()) / "b.bin"
        >>> try:
        ...     with all_or_nothing():
        ...         atomic_write_bytes(a, b"first")
        ...         raise KeyboardInterrupt  # before the second file is written
        ... except KeyboardInterrupt:
        ...     pass
        >>> a.exists()
        False
    """
    staged: list = []
    token = _STAGED.set(staged)
    try:
        yield
    except BaseException:
        _discard(staged)
        raise
    finally:
        _STAGED.reset(token)
    _commit(staged)


def _discard(staged: list) -> None:
    for tmp, _ in staged:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _commit(staged: list) -> None:
    """Rename every temporary over its destination, keeping each replaced file's old content in a
    backup (a hard link, so the destination never disappears) until all renames have succeeded."""
    done, backup = [], None  # done: (destination, backup or None) of each rename that succeeded
    try:
        for tmp, path in staged:
            backup = _backup(path) if os.path.lexists(path) else None
            os.replace(tmp, path)
            done.append((path, backup))
            backup = None
    except BaseException as exc:
        # The destination whose rename failed still is its old file: drop its backup (renaming one hard
        # link over another of the same file would do nothing), then put the replaced ones back.
        if backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(backup)
        for path, old in reversed(done):
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, path)
                else:
                    os.unlink(path)
        _discard(staged)
        if isinstance(exc, OSError):
            raise _renamed(exc, staged[len(done)][1]) from None
        raise
    for _, old in done:
        if old is not None:
            with contextlib.suppress(OSError):
                os.unlink(old)


def _backup(path: Path) -> str:
    fd, backup = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(path, backup)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, backup)
    return backup
