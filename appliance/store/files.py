"""Durable file writes: temporary name, fsync, rename, fsync the folder."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from appliance.errors import InstanceRejected, ReasonCode

CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_to_temp(source: BinaryIO, tmp_dir: Path, max_bytes: int) -> tuple[Path, int, str]:
    """Copy ``source`` into a new fsynced file in ``tmp_dir``; return (path, size, sha256).

    Refuses (FILE_TOO_LARGE) past ``max_bytes`` without keeping more than one chunk in memory.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "xb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise InstanceRejected(ReasonCode.FILE_TOO_LARGE,
                                           f"The file is larger than the {max_bytes // 2**20} MiB this appliance accepts.")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest.hexdigest()


def durable_rename(tmp: Path, final: Path) -> None:
    """Move a fsynced temporary file to its final name and make the move durable."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_durably(data: bytes, final: Path) -> None:
    """Write ``data`` to ``final`` so that a crash leaves either the old file or the whole new one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    durable_rename(tmp, final)
