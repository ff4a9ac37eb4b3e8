"""Quarantine: files refused on import, kept with their reason for the admin to review.

Every refused file has a row. What is kept of its bytes is bounded: a file refused on its own
merits (the header checks) is kept whole, as it is at most ``max_instance_bytes``, so that it can be
retried once a setting changed; of anything refused for its size, or as part of an unsafe or damaged
archive, only the first ``quarantine_sample_bytes`` (the rest may be a zip bomb). A file that was never
opened (a FIFO, a device) or could not be read keeps a row and no bytes. Quarantined bytes lie in
the data directory, so they count toward the low-disk watermark like any stored image.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import sqlite_utils

from appliance.durable import durable_rename
from appliance.errors import DiskLow, ReasonCode, Rejected
from appliance.store.database import inserted_id, utcnow, write_transaction
from appliance.store.datadir import DataDirectory

NAME_LENGTH = 1024


def display_name(name: str) -> str:
    """A file name as rows and messages show it: characters that cannot be printed, or are not valid
    UTF-8 (names from a medium written with another encoding), become ``?``."""
    text = name.encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in text)


def record(db: sqlite_utils.Database, home: Path, tmp: Path | None, *, source: str, original_name: str,
           size: int | None, sha256: str | None, rejection: Rejected) -> int:
    """Move ``tmp`` (if any) into quarantine and record why. Returns the quarantine row id.

    The file is in quarantine with its row or not at all: on any failure ``tmp`` is removed too.
    """
    stored = None
    try:
        if tmp is not None:
            stored = DataDirectory(home).quarantine / utcnow()[:10] / f"{uuid.uuid4().hex}.bin"
            durable_rename(tmp, stored)
        with write_transaction(db):
            table = db.table("quarantine")
            table.insert({
                "source": source, "original_name": display_name(original_name)[:NAME_LENGTH],
                "path": str(stored.relative_to(home)) if stored else None, "size_bytes": size, "sha256": sha256,
                "reason_code": rejection.reason_code.value, "reason": rejection.reason, "created_at": utcnow(),
            })
            return inserted_id(table)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if stored is not None:
            stored.unlink(missing_ok=True)
        raise


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
    with today's reason) or ``LookupError`` when the row or its file is gone. The old row goes either way,
    except for a file of which only the first bytes were kept (it cannot be retried: Rejected) and when the
    disk is low (DiskLow): those stay.
    """
    rows = list(store.db.query("SELECT * FROM quarantine WHERE id = ?", [row_id]))
    if not rows or not rows[0]["path"] or not (store.home / rows[0]["path"]).is_file():
        raise LookupError(f"quarantine entry {row_id} has no file to retry")
    row = rows[0]
    kept = (store.home / row["path"]).stat().st_size
    if row["size_bytes"] is not None and kept < row["size_bytes"]:
        raise Rejected(ReasonCode(row["reason_code"]),
                       f"Only the first {kept // 1024} KiB of this file were kept, so it cannot be retried: "
                       "import the original again.")
    try:
        with open(store.home / row["path"], "rb") as f:
            accepted = store.accept(f, source=row["source"], original_name=row["original_name"])
    except DiskLow:
        raise  # the file is not at fault: it stays in quarantine, to be retried once space is freed
    except BaseException:
        delete(store.db, store.home, row_id)
        raise
    delete(store.db, store.home, row_id)
    return accepted
