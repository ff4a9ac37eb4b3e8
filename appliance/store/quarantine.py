"""Quarantine: files refused on import, kept with their reason for the admin to review."""

from __future__ import annotations

import uuid
from pathlib import Path

import sqlite_utils

from appliance.errors import Rejected
from appliance.store.database import utcnow, write_transaction
from appliance.store.files import durable_rename

QUARANTINE_DIR = "quarantine"


def record(db: sqlite_utils.Database, home: Path, tmp: Path | None, *, source: str, original_name: str,
           size: int | None, sha256: str | None, rejection: Rejected) -> int:
    """Move ``tmp`` (if any) into quarantine and record why. Returns the quarantine row id."""
    stored = None
    if tmp is not None:
        stored = home / QUARANTINE_DIR / utcnow()[:10] / f"{uuid.uuid4().hex}.bin"
        durable_rename(tmp, stored)
    with write_transaction(db):
        table = db["quarantine"]
        table.insert({
            "source": source, "original_name": original_name[:1024],
            "path": str(stored.relative_to(home)) if stored else None, "size_bytes": size, "sha256": sha256,
            "reason_code": rejection.reason_code.value, "reason": rejection.reason, "created_at": utcnow(),
        })
        return int(table.last_pk)
