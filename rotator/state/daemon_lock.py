"""One daemon per SQLite state store: an exclusive lock on a file beside the database.

SQLite has one writer at a time and no way for two daemons to share work safely across hosts,
so a second ``rotator run`` on the same file is refused. The lock is the kernel's (``flock``):
it goes away with the process, kill -9 included, so there is no stale lock to clean up and no
heartbeat to tune. Commands such as ``rotator rotate-now`` do not take it: they work beside the
daemon through the per-credential leases, as before.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from rotator.errors import PermanentError
from rotator.state.urls import backend

__all__ = ["DaemonLock", "lock_path"]


def lock_path(url: str) -> Path | None:
    """The lock file of a SQLite state URL (``state.db`` -> ``state.db.daemon-lock``), or None
    for a backend that needs none (PostgreSQL) or an in-memory database."""
    if backend(url) != "sqlite":
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).with_name(Path(database).name + ".daemon-lock")


class DaemonLock:
    """Held by the one ``rotator run`` of a SQLite store for its whole life."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, url: str) -> DaemonLock | None:
        """Take the lock, or raise ``PermanentError`` naming the daemon that holds it.

        Returns None when the store needs no lock (PostgreSQL: replicas share the work)."""
        path = lock_path(url)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PermanentError(
                f"another `rotator run` ({holder}) already uses the SQLite state store "
                f"{path.with_name(path.name.removesuffix('.daemon-lock'))}: SQLite serves one "
                "daemon. Stop that one first, or, to run several replicas, set state_url to "
                "PostgreSQL (postgresql+psycopg://...) and run `rotator db upgrade` once. "
                "`rotator rotate-now` and the other commands work beside the running "
                "daemon.") from None
        except OSError:
            os.close(fd)
            raise
        info = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        return cls(path, fd)

    def release(self) -> None:
        """Let another daemon start; the file stays (removing it would race a new holder)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
