"""Store-and-forward to the PACS: every produced object waits in the outbox until a destination takes it.

Nothing is dropped: while a PACS is unreachable its objects stay queued and are
retried with exponential backoff (capped at an hour); each is sent once per
destination (the outbox row is unique per destination and SOP Instance UID).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections import defaultdict
from pathlib import Path

import pydicom
import sqlite_utils

from appliance.store.database import utcnow, write_transaction

log = logging.getLogger(__name__)
QUEUED, SENT = "queued", "sent"
MAX_BACKOFF_SECONDS = 3600.0
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB007, 0xB006}  # success, and warnings: the PACS kept the object


@dataclasses.dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destinations(text: str) -> tuple[Destination, ...]:
    """``"PACS@10.0.0.2:104, ORTHANC@127.0.0.1:4242"`` -> destinations."""
    out = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        ae, _, where = entry.partition("@")
        host, _, port = where.rpartition(":")
        if not ae or not host or not port.isdigit():
            raise ValueError(f"PACS destination {entry!r} is not AE@host:port")
        out.append(Destination(ae.strip(), host.strip(), int(port)))
    return tuple(out)


def enqueue(db: sqlite_utils.Database, destinations: tuple[Destination, ...], paths: list[Path], home: Path,
            series_uid: str) -> int:
    added = 0
    with write_transaction(db):
        for destination in destinations:
            for path in paths:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                cursor = db.execute(
                    "INSERT OR IGNORE INTO outbox (destination, path, sop_instance_uid, series_instance_uid, state, "
                    "attempts, not_before, created_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                    [str(destination), str(path.relative_to(home)), uid, series_uid, QUEUED, utcnow(), utcnow()])
                added += cursor.rowcount
    return added


def _later(seconds: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds")


def _send(destination: Destination, calling_ae: str, items: list[tuple[int, Path]]) -> dict[int, str | None]:
    """C-STORE ``items`` in one association; returns row id -> error (None when stored)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    datasets = {row: pydicom.dcmread(path) for row, path in items}
    for sop_class in {str(ds.SOPClassUID) for ds in datasets.values()}:
        ae.add_requested_context(sop_class)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return {row: f"cannot associate with {destination}" for row, _ in items}
    results: dict[int, str | None] = {}
    try:
        for row, ds in datasets.items():
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            results[row] = None if code in SUCCESS_STATUSES else f"C-STORE status {code!r}"
    finally:
        assoc.release()
    return results


def forward(db: sqlite_utils.Database, home: Path, destinations: tuple[Destination, ...], calling_ae: str,
            backoff_seconds: float) -> dict[str, int]:
    """Send every due object; returns counts of sent and still-queued rows."""
    by_name = {str(d): d for d in destinations}
    due = db.execute("SELECT id, destination, path, attempts FROM outbox WHERE state = ? AND not_before <= ? "
                     "ORDER BY id", [QUEUED, utcnow()]).fetchall()
    groups: dict[str, list[tuple[int, Path, int]]] = defaultdict(list)
    for row, destination, path, attempts in due:
        if destination in by_name:
            groups[destination].append((row, home / path, attempts))
    sent = 0
    for destination, rows in groups.items():
        results = _send(by_name[destination], calling_ae, [(r, p) for r, p, _ in rows])
        with write_transaction(db):
            for row, _, attempts in rows:
                error = results.get(row, "not sent")
                if error is None:
                    db.execute("UPDATE outbox SET state = ?, sent_at = ?, error = NULL WHERE id = ?",
                               [SENT, utcnow(), row])
                    sent += 1
                else:
                    wait = min(MAX_BACKOFF_SECONDS, backoff_seconds * 2 ** attempts)
                    db.execute("UPDATE outbox SET attempts = attempts + 1, error = ?, not_before = ? WHERE id = ?",
                               [error, _later(wait), row])
        if any(results.values()):
            log.warning("outbox: %s unreachable or refusing; will retry", destination)
    queued = db.execute("SELECT count(*) FROM outbox WHERE state = ?", [QUEUED]).fetchone()[0]
    return {"sent": sent, "queued": int(queued)}
