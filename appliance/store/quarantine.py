"""Quarantine: files refused on import, kept with their reason for the admin to review."""

from __future__ import annotations

import uuid
from pathlib import Path

import sqlite_utils

from appliance.durable import durable_rename
from appliance.errors import Rejected
from appliance.store.database import inserted_id, utcnow, write_transaction
from appliance.store.datadir import DataDirectory


def record(db: sqlite_utils.Database, home: Path, tmp: Path | None, *, source: str, original_name: str,
           size: int | None, sha256: str | None, rejection: Rejected) -> int:
    """Move ``tmp`` (if any) into quarantine and record why. Returns the quarantine row id."""
    stored = None
    if tmp is not None:
        stored = DataDirectory(home).quarantine / utcnow()[:10] / f"{uuid.uuid4().hex}.bin"
        durable_rename(tmp, stored)
    with write_transaction(db):
        table = db.table("quarantine")
        table.insert({
            "source": source, "original_name": original_name[:1024],
            "path": str(stored.relative_to(home)) if stored else None, "size_bytes": size, "sha256": sha256,
            "reason_code": rejection.reason_code.value, "reason": rejection.reason, "created_at": utcnow(),
        })
        return inserted_id(table)


def delete(db: sqlite_utils.Database, home: Path, row_id: int) -> dict | None:
    """Remove a quarantined file and its row; returns the row (None when it was not there)."""
    rows = list(db.query("SELECT * FROM quarantine WHERE id = ?", [row_id]))
    if not rows:
        return None
    with write_transaction(db):
        db.execute("DELETE FROM quarantine WHERE id = ?", [row_id])
    if rows[0]["path"]:
        path = (home / rows[0]["path"]).resolve()
        if path.is_relative_to(DataDirectory(home).quarantine.resolve()):
            path.unlink(missing_ok=True)
    return rows[0]


def retry(store, row_id: int):
    """Offer a quarantined file to the instance store again (after a setting changed, say).

    Returns the store's :class:`Accepted`; raises :class:`Rejected` (the file is quarantined anew,
    with today's reason) or ``LookupError`` when the row or its file is gone. The old row goes either way.
    """
    rows = list(store.db.query("SELECT * FROM quarantine WHERE id = ?", [row_id]))
    if not rows or not rows[0]["path"] or not (store.home / rows[0]["path"]).is_file():
        raise LookupError(f"quarantine entry {row_id} has no file to retry")
    row = rows[0]
    try:
        with open(store.home / row["path"], "rb") as f:
            return store.accept(f, source=row["source"], original_name=row["original_name"])
    finally:
        delete(store.db, store.home, row_id)
