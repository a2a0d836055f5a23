"""The data directory as the command line meets it: checked before use, locked while a node
runs on it.

A node owns its data directory: the identity key, the SQLite stores and ``control.json``. Two
nodes on one directory would share an identity and write the same files, and the second one to
stop would delete the first one's ``control.json``. A running node therefore holds an exclusive
``flock`` on ``<data-dir>/node.lock`` for as long as it runs (``Node.open`` takes it, or uses
the one ``mtor-peer run`` took first, before it set anything up); a second node on the same
directory, in this process or another, is refused before it touches anything. The lock is the
kernel's: it goes away with the process however it ends (a crash or SIGKILL leaves no stale
lock), and the file, which holds the owner's PID for ``mtor-peer stop`` and for error messages,
is never deleted (deleting it would let a third process lock a new file while the first still
holds the old one).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from mtor_p2p.config import PRIVATE_FILE_MODE, private_dir
from mtor_p2p.console import invoked_as

LOCK_FILE_NAME = "node.lock"


class DataDirError(Exception):
    """The data directory cannot be used; the message says which and what to do."""


class DataDirInUse(DataDirError):
    """Another running node holds the data directory's lock."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def prepare_data_dir(path: Path) -> Path:
    """Create ``path`` (0700) if missing and check that this process can write in it.

    Raises DataDirError with one line naming ``path`` when it is a file, cannot be created
    (a missing or read-only parent) or is not writable (a read-only directory or mount).
    """
    if path.exists() and not path.is_dir():
        raise DataDirError(
            f"--data-dir {path} is a file, not a directory: give a directory "
            "(it is created if missing)"
        )
    try:
        private_dir(path)
    except OSError as exc:
        raise DataDirError(
            f"cannot create the data directory {path}: {exc.strerror or exc}; "
            "give a --data-dir you can write to"
        ) from None
    # access() answers EROFS for a read-only mount even to root (permission bits do not).
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(
            f"the data directory {path} is not writable; give a --data-dir you can write to"
        )
    return path


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class DataDirLock:
    """An exclusive lock on a data directory, held while a node runs (see the module
    docstring). Use as a context manager, or call :meth:`acquire` and :meth:`release`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and record our PID; DataDirInUse if another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _read_pid(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            owner = f" (pid {pid})" if pid else ""
            raise DataDirInUse(
                f"another node{owner} already runs on the data directory {self.data_dir}: "
                f"stop it ({invoked_as()} stop --data-dir {self.data_dir}) or give another "
                "--data-dir",
                pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (the file stays; see the module docstring)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_owner(data_dir: Path) -> int | None:
    """The PID of the node that holds ``data_dir``'s lock, or None when no process holds it
    (0 when one does but its PID is unknown)."""
    try:
        fd = os.open(data_dir / LOCK_FILE_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
