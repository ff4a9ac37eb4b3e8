"""Durable file writes: temporary name, fsync, rename, fsync the folder.

A crash leaves either the old file or the whole new one, never a part. Used by every layer (settings,
the store, outputs, exports), so it imports nothing from the appliance.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
