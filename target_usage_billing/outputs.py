"""Output files several runs may share: whole lines appended under a lock, failures named.

Two pipelines of one Meltano project write the same default dead-letter file, so every
line is one locked append (``flock``, then ``O_APPEND`` writes): lines of two runs never
interleave. A write the filesystem cuts short (disk full, a file size limit) is undone
by truncating the file back to where the line started, still under the lock, so no
reader ever sees half a line; the run then stops with ``OutputError`` (exit 9).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path

from target_usage_billing.errors import OutputError


def check_writable(path: Path) -> None:
    """Raise OSError unless ``path`` can be appended to (created if need be), leaving no
    file behind: a missing file is created only when the first line is written."""
    if path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path.parent):  # unlinked at once: the directory takes files
        pass


def open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def append_line(fd: int, line: bytes, setting: str, path: Path) -> None:
    """Append ``line`` (ending with a newline) whole, or raise OutputError having left
    the file as it was."""
    locked = _lock(fd)
    try:
        start = _size(fd)
        view = memoryview(line)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            if start is not None:
                try:
                    os.ftruncate(fd, start)  # no half line for anyone to read
                except OSError:
                    pass
            raise output_error(setting, path, exc) from None
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)


def sync(fd: int, setting: str, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NOT_SYNCABLE:
            raise output_error(setting, path, exc) from None


def output_error(setting: str, path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"{setting}: cannot write {str(path)!r}: {reason}")


# /dev/null and pipes cannot be fsynced, and need not be
_NOT_SYNCABLE = {errno.EINVAL, errno.EOPNOTSUPP}


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # e.g. a filesystem without locks: O_APPEND alone still appends whole writes
        return False
    return True


def _size(fd: int) -> int | None:
    """Where an append starts, when the file is a regular file (which can be truncated)."""
    status = os.fstat(fd)
    return status.st_size if stat.S_ISREG(status.st_mode) else None
