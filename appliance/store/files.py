"""Incoming files copied to a temporary name and fsynced, within the size the appliance accepts.

A full disk while writing is :class:`DiskLow` (the import stops), never a property of the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from appliance.errors import DiskLow, InstanceRejected, ReasonCode

CHUNK = 1024 * 1024
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system (or SQLite) running out of space."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return "database or disk is full" in str(exc)


def disk_full(path: Path) -> DiskLow:
    """The :class:`DiskLow` for a write that found no space left under ``path``."""
    try:
        free = shutil.disk_usage(path).free // 2**20
    except OSError:
        free = 0
    return DiskLow(f"The data directory's disk is full ({free} MiB free): the import stopped. Free space and "
                   "import again; what was stored is kept.")


@contextlib.contextmanager
def _scratch_file(tmp_dir: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A new file in ``tmp_dir``, fsynced when the block ends; removed when it raises (a full disk: DiskLow)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "xb") as out:
            yield tmp, out
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(tmp_dir) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_to_temp(source: IO[bytes], tmp_dir: Path, max_bytes: int) -> tuple[Path, int, str]:
    """Copy ``source`` into a new fsynced file in ``tmp_dir``; return (path, size, sha256).

    Refuses (FILE_TOO_LARGE) past ``max_bytes`` without keeping more than one chunk in memory;
    raises :class:`DiskLow` when the disk fills. Leaves no file behind when it raises.
    """
    digest, size = hashlib.sha256(), 0
    with _scratch_file(tmp_dir) as (tmp, out):
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                limit_mib = max_bytes // 2**20
                raise InstanceRejected(ReasonCode.FILE_TOO_LARGE,
                                       f"The file is larger than the {limit_mib} MiB this appliance accepts.")
            digest.update(chunk)
            out.write(chunk)
    return tmp, size, digest.hexdigest()


def copy_prefix_to_temp(source: IO[bytes], tmp_dir: Path, limit: int) -> tuple[Path, int]:
    """Copy at most ``limit`` bytes of ``source`` into a new fsynced file in ``tmp_dir``; return (path, bytes).

    For keeping a sample of something refused without reading (or unpacking) all of it.
    """
    size = 0
    with _scratch_file(tmp_dir) as (tmp, out):
        while size < limit and (chunk := source.read(min(CHUNK, limit - size))):
            size += len(chunk)
            out.write(chunk)
    return tmp, size
