"""Who runs a job: a worker's identity, and a lock that tells whether that worker is still alive.

Each worker holds ``run/workers/<id>.lock`` exclusively for its life (``flock``: the kernel drops it
when the process dies, kill -9 included, and a reused pid cannot fake it). A job's worker is gone
when that lock can be taken.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import uuid
from pathlib import Path

from appliance.store.datadir import DataDirectory


def boot_id() -> str:
    """This boot of the machine (Linux), so a job's pid is never read across a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    id: str
    pid: int
    boot_id: str


class WorkerLock:
    """This process's worker identity, held alive by its lock file until :meth:`release`."""

    def __init__(self, ddir: DataDirectory):
        self.ddir = ddir
        self.identity = WorkerIdentity(uuid.uuid4().hex, os.getpid(), boot_id())
        ddir.workers.mkdir(parents=True, exist_ok=True)
        self.path = _lock_path(ddir, self.identity.id)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _lock_path(ddir: DataDirectory, worker_id: str) -> Path:
    return ddir.workers / f"{worker_id}.lock"


def worker_alive(ddir: DataDirectory, worker_id: str) -> bool:
    """Whether the worker ``worker_id`` still holds its lock (in this process or another)."""
    if not worker_id.isalnum():
        return False
    try:
        fd = os.open(_lock_path(ddir, worker_id), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        _lock_path(ddir, worker_id).unlink(missing_ok=True)  # its owner is gone; tidy up
        return False
    finally:
        os.close(fd)
