"""Store-and-forward to the PACS: every produced object waits in the outbox until a destination takes it.

A PACS that cannot be reached, or answers that it is out of resources for now, is retried with
exponential backoff (capped at an hour) for as long as it takes: nothing is dropped. A PACS that
refuses an object for good (PS3.4 B.2.3 and PS3.7 C: the data set does not match its SOP class, it
cannot understand it, it does not support the SOP class, we are not authorised; or it rejects the
association) is tried ``max_attempts`` times, then the object is SET ASIDE with the PACS's status, its
meaning and the Error Comment the PACS sent, for the admin to retry or discard. Each object is sent
once per destination (the outbox row is unique per destination and SOP Instance UID); sending a study
again re-queues its rows, sent or set aside.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
import sqlite_utils

from appliance.store.database import utcnow, write_transaction

log = logging.getLogger(__name__)
QUEUED, SENT, SET_ASIDE, DISCARDED = "queued", "sent", "set_aside", "discarded"
STATES = (QUEUED, SENT, SET_ASIDE, DISCARDED)
MAX_BACKOFF_SECONDS = 3600.0
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB007, 0xB006}  # success, and warnings: the PACS kept the object
# Failures that say "not now" rather than "never" (PS3.4 B.2.3 Refused: Out of Resources; PS3.7 C.5.x
# Resource Limitation); every other failure status is a refusal of this very object.
OUT_OF_RESOURCES = range(0xA700, 0xA800)
RESOURCE_LIMITATION = 0x0213
# Our own codes for what the PACS never answered with a DIMSE status (kept in the same column)
ASSOCIATION_REJECTED = -1  # the PACS rejected the association (A-ASSOCIATE-RJ): permanent after max_attempts
NO_PRESENTATION_CONTEXT = -2  # the PACS accepted no transfer of this SOP class: permanent after max_attempts
UNREACHABLE = -3  # nothing answered, the association was aborted or a reply never came: transient


@dataclasses.dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one C-STORE ended: ``status`` is the DIMSE status (or one of our negative codes)."""

    status: int
    meaning: str = ""
    comment: str = ""

    @property
    def stored(self) -> bool:
        return self.status in SUCCESS_STATUSES

    @property
    def permanent(self) -> bool:
        """Whether the PACS refused this object itself: sending it again as it is will not help."""
        return not self.stored and self.status != UNREACHABLE and self.status not in OUT_OF_RESOURCES \
            and self.status != RESOURCE_LIMITATION


def status_meaning(code: int) -> str:
    """The standard's name of a C-STORE status (PS3.4 B.2.3, PS3.7 C), or of one of our own codes."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    ours = {ASSOCIATION_REJECTED: "Association rejected by the PACS",
            NO_PRESENTATION_CONTEXT: "No presentation context accepted for this SOP Class",
            UNREACHABLE: "cannot associate with the PACS: unreachable, or no answer"}
    if code in ours:
        return ours[code]
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure", "Unknown status"))
    return meaning or category


def outcome_of(status: pydicom.Dataset | None) -> Outcome:
    """The :class:`Outcome` of pynetdicom's C-STORE response status (empty when no reply came)."""
    code = getattr(status, "Status", None)
    if code is None:
        return Outcome(UNREACHABLE, status_meaning(UNREACHABLE))
    comment = str(getattr(status, "ErrorComment", "") or "")
    return Outcome(int(code), status_meaning(int(code)), comment)


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
            series_uid: str, *, again: bool = False) -> int:
    """Queue ``paths`` for every destination; returns how many rows were added (or, ``again``, re-queued).

    Without ``again`` an object already in the outbox for a destination is left as it is (sent once);
    with it, its row is queued afresh whatever its state: sent, set aside or discarded.
    """
    heads = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in paths]
    conflict = ("DO UPDATE SET state = excluded.state, attempts = 0, refusals = 0, not_before = excluded.not_before, "
                "error = NULL, status = NULL, status_meaning = NULL, error_comment = NULL, set_aside_at = NULL, "
                "path = excluded.path") if again else "DO NOTHING"
    added = 0
    with write_transaction(db):
        for destination in destinations:
            for path, head in heads:
                cursor = db.execute(
                    "INSERT INTO outbox (destination, path, sop_instance_uid, series_instance_uid, modality, state, "  # nosec B608 - fixed SQL text; values bound
                    "attempts, refusals, not_before, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?) "
                    f"ON CONFLICT (destination, sop_instance_uid) {conflict}",
                    [str(destination), str(path.relative_to(home)), str(head.SOPInstanceUID), series_uid,
                     str(head.get("Modality", "")), QUEUED, utcnow(), utcnow()])
                added += cursor.rowcount
    return added


def _later(seconds: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds")


def _send(destination: Destination, calling_ae: str, items: list[tuple[int, Path]]) -> dict[int, Outcome]:
    """C-STORE ``items`` in one association; returns row id -> outcome."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    datasets = {row: pydicom.dcmread(path) for row, path in items}
    for sop_class in {str(ds.SOPClassUID) for ds in datasets.values()}:
        ae.add_requested_context(sop_class)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        code = ASSOCIATION_REJECTED if assoc.is_rejected else UNREACHABLE
        return {row: Outcome(code, status_meaning(code)) for row, _ in items}
    results: dict[int, Outcome] = {}
    try:
        for row, ds in datasets.items():
            if not assoc.is_established:  # aborted by the PACS part way
                results[row] = Outcome(UNREACHABLE, status_meaning(UNREACHABLE))
                continue
            try:
                results[row] = outcome_of(assoc.send_c_store(ds))
            except ValueError:  # pynetdicom: no accepted presentation context for this SOP Class
                results[row] = Outcome(NO_PRESENTATION_CONTEXT, status_meaning(NO_PRESENTATION_CONTEXT))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _describe(outcome: Outcome) -> str:
    code = f"0x{outcome.status:04X}" if outcome.status >= 0 else "-"
    return f"{code} {outcome.meaning}" + (f": {outcome.comment}" if outcome.comment else "")


def _record(db: sqlite_utils.Database, row: int, attempts: int, refusals: int, outcome: Outcome,
            backoff_seconds: float, max_attempts: int) -> str:
    """Write one row's outcome; returns its new state."""
    if outcome.stored:
        db.execute("UPDATE outbox SET state = ?, sent_at = ?, error = NULL, status = ?, status_meaning = ?, "
                   "error_comment = ? WHERE id = ?", [SENT, utcnow(), outcome.status, outcome.meaning,
                                                      outcome.comment or None, row])
        return SENT
    refusals += outcome.permanent
    state = SET_ASIDE if outcome.permanent and refusals >= max_attempts else QUEUED
    wait = min(MAX_BACKOFF_SECONDS, backoff_seconds * 2 ** attempts)
    db.execute("UPDATE outbox SET attempts = attempts + 1, refusals = ?, state = ?, error = ?, status = ?, "
               "status_meaning = ?, error_comment = ?, not_before = ?, set_aside_at = ? WHERE id = ?",
               [refusals, state, _describe(outcome), outcome.status, outcome.meaning, outcome.comment or None,
                _later(wait), utcnow() if state == SET_ASIDE else None, row])
    return state


def forward(db: sqlite_utils.Database, home: Path, destinations: tuple[Destination, ...], calling_ae: str,
            backoff_seconds: float, max_attempts: int = 5) -> dict[str, int]:
    """Send every due object; returns counts of rows sent and set aside now, and of rows still queued.

    An object refused for good ``max_attempts`` times is set aside; one that could not be delivered for
    now (unreachable, out of resources) stays queued with backoff.
    """
    by_name = {str(d): d for d in destinations}
    due = db.execute("SELECT id, destination, path, attempts, refusals FROM outbox WHERE state = ? "
                     "AND not_before <= ? ORDER BY id", [QUEUED, utcnow()]).fetchall()
    groups: dict[str, list[tuple[int, Path, int, int]]] = defaultdict(list)
    for row, destination, path, attempts, refusals in due:
        if destination in by_name:
            groups[destination].append((row, home / path, attempts, refusals))
    counts = {SENT: 0, SET_ASIDE: 0}
    for destination, rows in groups.items():
        results = _send(by_name[destination], calling_ae, [(r, p) for r, p, _, _ in rows])
        with write_transaction(db):
            for row, _, attempts, refusals in rows:
                outcome = results.get(row, Outcome(UNREACHABLE, status_meaning(UNREACHABLE)))
                state = _record(db, row, attempts, refusals, outcome, backoff_seconds, max_attempts)
                counts[state] = counts.get(state, 0) + 1
        failed = [o for o in results.values() if not o.stored]
        if failed:
            log.warning("outbox: %s did not take %d object(s) (%s); %s", destination, len(failed),
                        _describe(failed[0]), "will retry" if not counts[SET_ASIDE] else "some set aside")
    queued = db.execute("SELECT count(*) FROM outbox WHERE state = ?", [QUEUED]).fetchone()[0]
    return {"sent": counts[SENT], "set_aside": counts[SET_ASIDE], "queued": int(queued)}


def set_aside_rows(db: sqlite_utils.Database, study_instance_uid: str | None = None) -> list[dict[str, Any]]:
    """Objects set aside after a PACS refused them (of one study when given), newest first, with their study."""
    return list(db.query(
        "SELECT o.id, o.destination, o.path, o.sop_instance_uid, o.modality, o.status, o.status_meaning, "
        "o.error_comment, o.attempts, o.set_aside_at, s.study_instance_uid FROM outbox o "
        "LEFT JOIN series s ON s.series_instance_uid = o.series_instance_uid WHERE o.state = ? "
        "AND (? IS NULL OR s.study_instance_uid = ?) ORDER BY o.set_aside_at DESC, o.id DESC",
        [SET_ASIDE, study_instance_uid, study_instance_uid]))


def study_rows(db: sqlite_utils.Database, study_instance_uid: str) -> list[dict[str, Any]]:
    """Every outbox row of one study's objects (any state), in the order they were queued."""
    return list(db.query(
        "SELECT o.id, o.destination, o.modality, o.state, o.attempts, o.status, o.status_meaning, o.error_comment, "
        "o.error, o.sent_at, o.set_aside_at FROM outbox o JOIN series s ON s.series_instance_uid = "
        "o.series_instance_uid WHERE s.study_instance_uid = ? ORDER BY o.id", [study_instance_uid]))


def retry(db: sqlite_utils.Database, row: int) -> bool:
    """Queue a set-aside (or discarded) row again, now, with a fresh count of tries; False when no such row."""
    with write_transaction(db):
        cursor = db.execute("UPDATE outbox SET state = ?, attempts = 0, refusals = 0, not_before = ?, "
                            "set_aside_at = NULL WHERE id = ? AND state IN (?, ?)",
                            [QUEUED, utcnow(), row, SET_ASIDE, DISCARDED])
    return cursor.rowcount == 1


def discard(db: sqlite_utils.Database, row: int) -> bool:
    """Take a set-aside or queued row out of the queue for good (kept as discarded); False when no such row."""
    with write_transaction(db):
        cursor = db.execute("UPDATE outbox SET state = ? WHERE id = ? AND state IN (?, ?)",
                            [DISCARDED, row, SET_ASIDE, QUEUED])
    return cursor.rowcount == 1
