"""Incoming files copied to a temporary name and fsynced, within the size the appliance accepts."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import IO

from appliance.errors import InstanceRejected, ReasonCode

CHUNK = 1024 * 1024


def copy_to_temp(source: IO[bytes], tmp_dir: Path, max_bytes: int) -> tuple[Path, int, str]:
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
                    limit_mib = max_bytes // 2**20
                    raise InstanceRejected(ReasonCode.FILE_TOO_LARGE,
                                           f"The file is larger than the {limit_mib} MiB this appliance accepts.")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest.hexdigest()
