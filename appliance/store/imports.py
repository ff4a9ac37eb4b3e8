"""The import ledger: each import (folder, USB medium, browser upload) with its live counts and summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.durable import write_bytes_durably
from appliance.store.database import audit, inserted_id, utcnow, write_transaction
from appliance.store.datadir import DataDirectory


def start(db: sqlite_utils.Database, source: str, actor: str) -> int:
    with write_transaction(db):
        table = db.table("imports")
        table.insert({"source": source, "actor": actor, "state": "running", "files_read": 0, "stored": 0,
                      "duplicates": 0, "quarantined": 0, "series": 0, "started_at": utcnow(), "finished_at": None})
        return inserted_id(table)


def _counts(summary: Any) -> dict[str, int]:
    quarantined = len(summary.quarantined)
    return {"files_read": summary.stored + summary.duplicates + quarantined + summary.skipped,
            "stored": summary.stored, "duplicates": summary.duplicates, "quarantined": quarantined,
            "series": len(summary.series)}


def update(db: sqlite_utils.Database, import_id: int, summary: Any) -> None:
    """Progress of a running import (counts so far)."""
    with write_transaction(db):
        db.table("imports").update(import_id, _counts(summary))


def finish(db: sqlite_utils.Database, import_id: int, summary: Any, state: str = "done") -> None:
    """The import's summary, and one audit entry for it."""
    with write_transaction(db):
        row = db.table("imports").get(import_id)
        db.table("imports").update(import_id, {**_counts(summary), "state": state, "finished_at": utcnow()})
        audit(db, row["actor"], "import", row["source"], **_counts(summary))


def recent(db: sqlite_utils.Database, limit: int = 10) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM imports ORDER BY id DESC LIMIT ?", [limit]))


def write_usb_status(home: Path, device: str, state: str) -> None:
    """``usb-status.json`` for the import page: which medium, and whether it may be pulled out now."""
    path = DataDirectory(home).usb_status
    write_bytes_durably(json.dumps({"device": device, "state": state, "at": utcnow()}).encode(), path)
    owner = os.stat(home)
    if os.geteuid() == 0:  # written by the root import unit; the web UI reads it as the data owner
        os.chown(path, owner.st_uid, owner.st_gid)


def read_usb_status(home: Path) -> dict[str, Any] | None:
    try:
        return json.loads(DataDirectory(home).usb_status.read_text())
    except (OSError, ValueError):
        return None
