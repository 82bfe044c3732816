"""One writer per run: an exclusive ``flock`` on ``<db>.<run_id>.lock``.

The kernel drops the lock when its holder dies (SIGKILL included), so a resume
after a crash just takes it over. The lock file holds the holder's pid, host
and start time as JSON, so a refused writer can be told who holds the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from .codec import now
from .writer import WriterInfo

try:  # POSIX only; the writer lock needs flock.
    import fcntl
except ImportError:  # pragma: no cover - not exercised on Linux
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class WriterLease:
    """An exclusive writer lock on one run; a context manager. Release it with
    :meth:`release` or by leaving the ``with`` block. Idempotent."""

    def __init__(
        self, run_id: str, path: Path, fd: int, on_release: Callable[[str], None] | None = None
    ) -> None:
        self.run_id = run_id
        self.path = path
        self._fd: int | None = fd
        self._on_release = on_release

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink while still holding the lock: a waiter that opened the old
            # inode notices (inode check in try_lock) and retries on a new file.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)
            if self._on_release is not None:
                self._on_release(self.run_id)
            log.debug("released writer lock on run %s", self.run_id)

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<WriterLease run={self.run_id} held={self.held}>"


def lock_available() -> bool:
    """Whether this system has ``fcntl.flock`` (POSIX)."""
    return fcntl is not None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock_file(path: Path) -> WriterInfo | None:
    """Who wrote the lock file (``None`` if it cannot be read)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return WriterInfo(None, None, None)
    pid = data.get("pid")
    host = data.get("host")
    alive = pid_alive(pid) if isinstance(pid, int) and host == socket.gethostname() else None
    return WriterInfo(pid, host, data.get("since"), alive)


def try_lock(path: Path) -> int | None:
    """Lock ``path`` exclusively without blocking; the fd, or None if held."""
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder unlinked it as we locked: retry on the new file
    return None


def write_holder(fd: int) -> None:
    """Write this process's pid, host and the time into the locked file."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def holder_of(path: Path) -> WriterInfo | None:
    """Who holds the lock on ``path`` now (``None`` if nobody)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_lock_file(path) or WriterInfo(None, None, None)
    finally:
        os.close(fd)
    return None


def this_process(alive: bool | None = None) -> WriterInfo:
    """A :class:`WriterInfo` naming this process."""
    return WriterInfo(os.getpid(), socket.gethostname(), None, alive)
