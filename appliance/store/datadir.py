"""The data directory: every path in it, and the lock that keeps crash recovery away from live writers.

Every process that writes to the data directory (receiver, worker, web, import, analyze, export)
holds the writer lock *shared* for as long as it runs. Crash recovery (removing files an
interrupted write left behind) needs the lock *exclusive*, so it runs only when no writer is
alive: at the first start after a crash or a power cut, never beside a receiver that is writing.
Opening the store never deletes anything.

Each writer also has a private scratch folder ``instances/.tmp/<token>/`` locked by that process
alone: its temporary files are its own, and a later writer removes the folder only once its
owner is gone, even while other writers run.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE = "appliance.sqlite"
LOCK_FILE = "appliance.lock"
INSTANCES = "instances"
SCRATCH = ".tmp"  # inside instances/, so a rename into the store never crosses file systems
QUARANTINE = "quarantine"
ARTEFACTS = "artefacts"
INCOMING = "incoming"
INCOMING_FAILED = "incoming-failed"
SAMPLES = "samples"
UPLOADS = "uploads"
CACHE = "cache"
KEYS = "keys"
TRUSTED_KEYS = "keys/trusted"  # public keys whose model packs the site accepts: <fingerprint>.pub
PACKS = "packs"  # model packs the site imported: packs/<id>/<version>/
EXPORTS = "exports"
ENGINES_CACHE = "engines-cache"
WORKERS = "run/workers"
SETTINGS_FILE = "appliance.toml"
WEB_SECRET = "web-secret.key"
USB_STATUS = "usb-status.json"


@dataclasses.dataclass(frozen=True)
class DataDirectory:
    """The paths of one data directory (``APPLIANCE_HOME``); see docs/architecture.md for the table."""

    home: Path

    @property
    def database(self) -> Path:
        return self.home / DATABASE

    @property
    def lock_file(self) -> Path:
        return self.home / LOCK_FILE

    @property
    def instances(self) -> Path:
        return self.home / INSTANCES

    @property
    def scratch(self) -> Path:
        return self.instances / SCRATCH

    @property
    def quarantine(self) -> Path:
        return self.home / QUARANTINE

    @property
    def artefacts(self) -> Path:
        return self.home / ARTEFACTS

    @property
    def incoming(self) -> Path:
        return self.home / INCOMING

    @property
    def incoming_failed(self) -> Path:
        return self.home / INCOMING_FAILED

    @property
    def samples(self) -> Path:
        return self.home / SAMPLES

    @property
    def uploads(self) -> Path:
        return self.home / UPLOADS

    @property
    def cache(self) -> Path:
        return self.home / CACHE

    @property
    def keys(self) -> Path:
        return self.home / KEYS

    @property
    def trusted_keys(self) -> Path:
        return self.home / TRUSTED_KEYS

    @property
    def packs(self) -> Path:
        return self.home / PACKS

    @property
    def exports(self) -> Path:
        return self.home / EXPORTS

    @property
    def engines_cache(self) -> Path:
        return self.home / ENGINES_CACHE

    @property
    def workers(self) -> Path:
        return self.home / WORKERS

    @property
    def settings_file(self) -> Path:
        return self.home / SETTINGS_FILE

    @property
    def web_secret(self) -> Path:
        return self.home / WEB_SECRET

    @property
    def usb_status(self) -> Path:
        return self.home / USB_STATUS

    def series_artefacts(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        """``artefacts/<StudyInstanceUID>/<SeriesInstanceUID>/`` (both UIDs validated by the store)."""
        return self.artefacts / study_instance_uid / series_instance_uid

    def relative(self, path: Path) -> str:
        """``path`` as stored in the database: relative to the data directory."""
        return str(Path(path).resolve().relative_to(self.home.resolve()))

    def resolve(self, stored: str, inside: Path | None = None) -> Path | None:
        """The file a stored path names, or None when it lies outside ``inside`` (default: the home).

        Older rows hold absolute paths; they are taken as they are when they lie inside.
        """
        if not stored:
            return None
        root = (inside or self.home).resolve()
        path = (self.home / stored).resolve()
        return path if path.is_relative_to(root) else None


# --- the writer lock -------------------------------------------------------------------------------

_held: dict[Path, _Writer] = {}
_held_guard = threading.Lock()


@dataclasses.dataclass
class _Writer:
    lock_fd: int
    scratch: Path
    scratch_fd: int


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold_writer_lock(ddir: DataDirectory, recover: Callable[[DataDirectory], object] | None = None) -> Path:
    """Hold the writer lock of ``ddir`` for the rest of this process; returns this process's scratch folder.

    The first writer to find no other alive runs ``recover`` (crash recovery) under the exclusive
    lock first. Calling it again in the same process returns at once.
    """
    key = ddir.home.resolve()
    with _held_guard:
        if key in _held:
            return _held[key].scratch
        fd = _open_lock(ddir.lock_file)
        if _try_lock(fd, fcntl.LOCK_EX):
            try:
                if recover is not None:
                    recover(ddir)
            finally:
                fcntl.flock(fd, fcntl.LOCK_SH)  # from here on, others may start beside us
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while another process recovers
        remove_abandoned_scratch(ddir)
        scratch, scratch_fd = _own_scratch(ddir)
        if not _held:
            atexit.register(release_all)
        _held[key] = _Writer(fd, scratch, scratch_fd)
        return scratch


def release_writer_lock(ddir: DataDirectory) -> None:
    """Give the lock back before the process ends (tests, and processes that open many homes)."""
    with _held_guard:
        writer = _held.pop(ddir.home.resolve(), None)
    if writer is None:
        return
    shutil.rmtree(writer.scratch, ignore_errors=True)
    Path(f"{writer.scratch}.lock").unlink(missing_ok=True)
    os.close(writer.scratch_fd)
    os.close(writer.lock_fd)


def release_all() -> None:
    """Give back every writer lock this process holds (at exit; a kill -9 leaves it to the kernel)."""
    for home in list(_held):
        release_writer_lock(DataDirectory(home))


def writers_alive(ddir: DataDirectory) -> bool:
    """Whether any process holds the writer lock (this one included)."""
    if ddir.home.resolve() in _held:
        return True
    if not ddir.lock_file.exists():
        return False
    fd = _open_lock(ddir.lock_file)
    try:
        if _try_lock(fd, fcntl.LOCK_EX):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def _own_scratch(ddir: DataDirectory) -> tuple[Path, int]:
    token = uuid.uuid4().hex
    scratch = ddir.scratch / token
    fd = _open_lock(ddir.scratch / f"{token}.lock")
    fcntl.flock(fd, fcntl.LOCK_EX)
    scratch.mkdir(parents=True)
    return scratch, fd


def remove_abandoned_scratch(ddir: DataDirectory) -> int:
    """Remove the scratch folders of writers that are gone (their lock is free); returns how many."""
    if not ddir.scratch.is_dir():
        return 0
    removed = 0
    for lock in ddir.scratch.glob("*.lock"):
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            if not _try_lock(fd, fcntl.LOCK_EX):
                continue  # its writer is alive
            folder = lock.with_suffix("")
            if folder.exists():
                log.info("removing %s: scratch files of a writer that stopped", folder)
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed

