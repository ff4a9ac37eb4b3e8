"""The SQLite index: connections, versioned migrations and write transactions.

One writer at a time (``BEGIN IMMEDIATE``), WAL journal, and
``synchronous=FULL`` on connections whose commits acknowledge received data.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from appliance.store.states import STUDY_STATUS_SQL

DATABASE_NAME = "appliance.sqlite"
BUSY_TIMEOUT_MS = 30_000

migrations = Migrations("appliance")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.table("patients").create({
        "patient_key": str, "patient_id": str, "patient_name": str,
        "patient_birth_date": str, "patient_sex": str,
    }, pk="patient_key")
    db.table("studies").create({
        "study_instance_uid": str, "patient_key": str, "study_date": str, "study_time": str,
        "study_description": str, "accession_number": str, "created_at": str, "updated_at": str,
    }, pk="study_instance_uid", foreign_keys=[("patient_key", "patients")])
    db.table("series").create({
        "series_instance_uid": str, "study_instance_uid": str, "modality": str, "series_number": int,
        "series_description": str, "instance_count": int, "status": str, "reason_code": str,
        "reason": str, "last_received_at": str, "updated_at": str,
    }, pk="series_instance_uid", foreign_keys=[("study_instance_uid", "studies")])
    db.table("instances").create({
        "sop_instance_uid": str, "series_instance_uid": str, "study_instance_uid": str,
        "sop_class_uid": str, "transfer_syntax_uid": str, "instance_number": int, "path": str,
        "size_bytes": int, "sha256": str, "source": str, "received_at": str,
    }, pk="sop_instance_uid", foreign_keys=[("series_instance_uid", "series")])
    db.table("analyses").create({
        "id": int, "series_instance_uid": str, "study_instance_uid": str, "status": str,
        "reason_code": str, "reason": str, "problems": str, "slices": int, "shape_zyx": str,
        "spacing_mm_zyx": str, "seconds": str, "created_at": str, "superseded": int,
    }, pk="id", foreign_keys=[("series_instance_uid", "series")])
    db.table("results").create({
        "id": int, "analysis_id": int, "series_instance_uid": str, "model": str, "model_version": str,
        "validated": int, "backend": str, "precision": str, "score": float, "threshold": float,
        "flagged": int, "findings": str, "seconds": float, "created_at": str,
    }, pk="id", foreign_keys=[("analysis_id", "analyses")])
    db.table("jobs").create({
        "id": int, "kind": str, "study_instance_uid": str, "series_instance_uid": str, "state": str,
        "priority": int, "attempts": int, "not_before": str, "lease_until": str, "progress": float,
        "error": str, "created_at": str, "updated_at": str,
    }, pk="id")
    db.table("quarantine").create({
        "id": int, "source": str, "original_name": str, "path": str, "size_bytes": int,
        "sha256": str, "reason_code": str, "reason": str, "created_at": str,
    }, pk="id")
    db.table("audit_log").create({
        "id": int, "at": str, "actor": str, "action": str, "object": str, "detail": str,
    }, pk="id")
    db.table("instances").create_index(["series_instance_uid"])
    db.table("series").create_index(["study_instance_uid"])
    db.table("analyses").create_index(["series_instance_uid"])
    db.table("results").create_index(["analysis_id"])
    db.table("jobs").create_index(["state", "priority"])
    db.table("studies").create_index(["study_date"])


@migrations()
def m002_operating_points(db: sqlite_utils.Database) -> None:
    db.table("operating_points").create({
        "id": int, "model": str, "model_version": str, "threshold": float, "target_sensitivity": float,
        "evaluation": str, "recorded_by": str, "recorded_at": str,
    }, pk="id")
    db.table("operating_points").create_index(["model", "model_version"])


@migrations()
def m003_outbox(db: sqlite_utils.Database) -> None:
    db.table("outbox").create({
        "id": int, "destination": str, "path": str, "sop_instance_uid": str, "series_instance_uid": str,
        "state": str, "attempts": int, "not_before": str, "error": str, "created_at": str, "sent_at": str,
    }, pk="id")
    db.table("outbox").create_index(["state", "not_before"])
    db.table("outbox").create_index(["destination", "sop_instance_uid"], unique=True)


# lower-case patient name (components spaced), patient ID, accession number and study description
SEARCH_TEXT_SQL = """SELECT lower(replace(coalesce(p.patient_name, ''), '^', ' ') || ' ' || coalesce(p.patient_id, '')
  || ' ' || coalesce(studies.accession_number, '') || ' ' || coalesce(studies.study_description, ''))
  FROM patients p WHERE p.patient_key = studies.patient_key"""
# whether any current result of the study is flagged (CROSS JOIN: the study's analyses first)
FLAGGED_SQL = """SELECT EXISTS (SELECT 1 FROM analyses a CROSS JOIN results r ON r.analysis_id = a.id
  WHERE a.study_instance_uid = studies.study_instance_uid AND a.superseded = 0 AND r.flagged = 1)"""

# a synthetic or phantom study: the first-start sample (imported with source "sample") or any series written by
# appliance.synth (its Series Description). Kept, analysed and shown, but left out of every statistic.
SAMPLE_SOURCE = "sample"
SYNTHETIC_SERIES_DESCRIPTION = "SYNTHETIC PHANTOM - not a patient"
SYNTHETIC_SQL = """SELECT EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid = studies.study_instance_uid
  AND (s.series_description = 'SYNTHETIC PHANTOM - not a patient' OR EXISTS (SELECT 1 FROM instances i
  WHERE i.series_instance_uid = s.series_instance_uid AND i.source = 'sample')))"""
assert SYNTHETIC_SERIES_DESCRIPTION in SYNTHETIC_SQL and f"'{SAMPLE_SOURCE}'" in SYNTHETIC_SQL
# the studies every statistic counts (a clause on a table or alias named by the caller's study_instance_uid)
REAL_STUDIES_SQL = "SELECT study_instance_uid FROM studies WHERE synthetic = 0"


def refresh_study(db: sqlite_utils.Database, study_instance_uid: str) -> None:
    """Recompute the study row's search text, flag, synthetic mark and status (inside the caller's transaction)."""
    db.execute(f"UPDATE studies SET search_text = ({SEARCH_TEXT_SQL}), flagged = ({FLAGGED_SQL}), "  # nosec B608 - fixed SQL text; values bound
               f"synthetic = ({SYNTHETIC_SQL}), status = ({STUDY_STATUS_SQL}) WHERE study_instance_uid = ?",
               [study_instance_uid])


def refresh_study_status(db: sqlite_utils.Database, study_instance_uid: str) -> None:
    """Store the study's status (:data:`states.STUDY_STATUS_SQL`) after a job or series of it changed."""
    db.execute(f"UPDATE studies SET status = ({STUDY_STATUS_SQL}) WHERE study_instance_uid = ?",  # nosec B608 - fixed SQL text; values bound
               [study_instance_uid])


def refresh_all_studies(db: sqlite_utils.Database) -> None:
    db.execute(f"UPDATE studies SET search_text = ({SEARCH_TEXT_SQL}), flagged = ({FLAGGED_SQL}), "  # nosec B608 - fixed SQL text; values bound
               f"synthetic = ({SYNTHETIC_SQL}), status = ({STUDY_STATUS_SQL})")


@migrations()
def m004_web(db: sqlite_utils.Database) -> None:
    db.table("users").create({
        "username": str, "password_hash": str, "role": str, "disabled": int, "language": str,
        "created_at": str, "password_changed_at": str,
    }, pk="username")
    db.table("login_failures").create({"id": int, "username": str, "address": str, "at": str}, pk="id")
    db.table("login_failures").create_index(["at"])
    db.table("reviews").create({
        "id": int, "result_id": int, "study_instance_uid": str, "series_instance_uid": str, "model": str,
        "decision": str, "comment": str, "reviewer": str, "at": str,
    }, pk="id", foreign_keys=[("result_id", "results")])
    db.table("reviews").create_index(["study_instance_uid"])
    db.table("results").create_index(["series_instance_uid"])
    db.table("results").add_column("notice", str)  # the model's own words on its validation, shown with the result
    db.table("jobs").create_index(["series_instance_uid"])
    db.table("jobs").create_index(["study_instance_uid", "state"])
    db.table("analyses").create_index(["study_instance_uid", "superseded"])
    # what the worklist searches and flags, kept on the study row so a filter reads one table
    db.table("studies").add_column("search_text", str)
    db.table("studies").add_column("flagged", int, not_null_default=0)
    db.execute(f"UPDATE studies SET search_text = ({SEARCH_TEXT_SQL}), flagged = ({FLAGGED_SQL})")  # nosec B608 - fixed SQL text; values bound
    db.table("studies").create_index(["study_date", "study_time", "created_at"])
    db.table("series").create_index(["status", "study_instance_uid"])
    db.table("studies").create_index(["created_at"])
    db.table("audit_log").create_index(["at"])
    db.table("imports").create({
        "id": int, "source": str, "actor": str, "state": str, "files_read": int, "stored": int, "duplicates": int,
        "quarantined": int, "series": int, "started_at": str, "finished_at": str,
    }, pk="id")


@migrations()
def m005_exports(db: sqlite_utils.Database) -> None:
    db.table("exports").create({
        "id": int, "month": str, "revision": int, "state": str, "path": str, "sha256": str, "content_sha256": str,
        "size_bytes": int, "studies": int, "results": int, "actor": str, "started_at": str, "finished_at": str,
        "error": str,
    }, pk="id")
    db.table("exports").create_index(["month", "revision"])


@migrations()
def m006_owned_jobs(db: sqlite_utils.Database) -> None:
    """Jobs name the worker that holds them; analyses keep their whole record; studies store their status."""
    jobs = db.table("jobs")
    for column in ("worker_id", "worker_boot_id"):
        jobs.add_column(column, str)
    jobs.add_column("worker_pid", int)
    jobs.add_column("analysis_id", int)
    jobs.add_column("stage", str)
    db.table("analyses").add_column("record", str)
    db.table("studies").add_column("status", str)
    db.execute(f"UPDATE studies SET status = ({STUDY_STATUS_SQL})")  # nosec B608 - fixed SQL text; values bound
    db.table("studies").create_index(["status"])


@migrations()
def m007_original_uids(db: sqlite_utils.Database) -> None:
    """Instances filed under a derived UID keep the UIDs their file wrote (JSON by keyword; NULL when none was)."""
    db.table("instances").add_column("original_uids", str)


def site_threshold(db: sqlite_utils.Database, model: str, model_version: str) -> float | None:
    """The site's own decision threshold for this model version, when the admin recorded one."""
    row = db.execute("SELECT threshold FROM operating_points WHERE model = ? AND model_version = ? "
                     "ORDER BY id DESC LIMIT 1", [model, model_version]).fetchone()
    return None if row is None else float(row[0])


def inserted_id(table: sqlite_utils.db.Table) -> int:
    """The rowid of the row ``table`` just inserted."""
    if table.last_pk is None:
        raise RuntimeError(f"nothing was inserted into {table.name}")
    return int(table.last_pk)


def utcnow() -> str:
    """The current UTC time as ISO 8601 text, as stored in every ``*_at`` column."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path, *, durable: bool = True, read_only: bool = False) -> sqlite_utils.Database:
    """Open the database at ``path``.

    ``durable`` sets ``synchronous=FULL`` so a commit survives a power cut;
    connections that only read or rebuild derived data may pass ``False``.
    """
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    return sqlite_utils.Database(conn)


def open_database(home: Path, **kwargs: Any) -> sqlite_utils.Database:
    """Open (creating if needed) the database in the data directory and apply migrations."""
    home.mkdir(parents=True, exist_ok=True)
    db = connect(home / DATABASE_NAME, **kwargs)
    if not kwargs.get("read_only"):
        with write_transaction(db):
            pass  # take the write lock once so concurrent first starts migrate in turn
        migrations.apply(db)
    return db


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time, rolled back on error."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:  # also when COMMIT itself failed (a full disk): nothing was written
            db.conn.execute("ROLLBACK")
        raise


def audit(db: sqlite_utils.Database, actor: str, action: str, obj: str = "", **detail: Any) -> None:
    """Append one row to the audit log (inside the caller's transaction if any)."""
    db.table("audit_log").insert({"at": utcnow(), "actor": actor, "action": action, "object": obj,
                            "detail": json.dumps(detail, sort_keys=True)})


def counts(db: sqlite_utils.Database) -> dict[str, Any]:
    """What the store holds, for ``appliance status``."""
    def one(sql: str) -> int:
        return int(db.execute(sql).fetchone()[0])

    jobs = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
    outbox = dict(db.execute("SELECT state, count(*) FROM outbox GROUP BY state"))
    series = dict(db.execute("SELECT status, count(*) FROM series GROUP BY status"))
    return {
        "patients": one("SELECT count(*) FROM patients"),
        "studies": one("SELECT count(*) FROM studies"),
        "synthetic_studies": one("SELECT count(*) FROM studies WHERE synthetic = 1"),
        "series": one("SELECT count(*) FROM series"),
        "series_by_status": series,
        "instances": one("SELECT count(*) FROM instances"),
        "quarantined": one("SELECT count(*) FROM quarantine"),
        "results": one("SELECT count(*) FROM results"),
        "jobs": {s: jobs.get(s, 0) for s in ("queued", "running", "done", "failed")},
        "outbox": {s: outbox.get(s, 0) for s in ("queued", "sent", "set_aside", "discarded")},
    }


@migrations()
def m008_web_sessions(db: sqlite_utils.Database) -> None:
    """Web sessions end on the server: each account has a session generation that logout, a password
    change or reset and disabling move on; a wrong password names the known device it came from."""
    db.table("users").add_column("session_generation", int, not_null_default=0)
    db.table("login_failures").add_column("known_device", str)
    db.table("login_failures").create_index(["username", "at"])
    db.table("login_failures").create_index(["address", "at"])


@migrations()
def m009_model_switches(db: sqlite_utils.Database) -> None:
    """Classifiers a site switched on or off, by version, after its own evaluation (latest row wins)."""
    db.table("model_switches").create({
        "id": int, "model": str, "model_version": str, "enabled": int, "operating_point_id": int,
        "switched_by": str, "switched_at": str,
    }, pk="id")
    db.table("model_switches").create_index(["model", "model_version"])


@migrations()
def m010_synthetic_studies(db: sqlite_utils.Database) -> None:
    """Studies say whether they are synthetic (the sample, any phantom series), so statistics leave them out."""
    db.table("studies").add_column("synthetic", int, not_null_default=0)
    db.execute(f"UPDATE studies SET synthetic = ({SYNTHETIC_SQL})")  # nosec B608 - fixed SQL text


@migrations()
def m011_review_carry_over(db: sqlite_utils.Database) -> None:
    """A review copied onto a re-analysis' result names the review it came from; each study keeps its review
    state (``store.reviews``) so the worklist filters on it."""
    from appliance.store import reviews

    db.table("reviews").add_column("carried_from", int)
    db.table("reviews").create_index(["result_id"])
    studies = db.table("studies")
    studies.add_column("review_state", str)
    studies.add_column("reviewed_by", str)
    studies.add_column("unreviewed_flags", int, not_null_default=0)
    studies.create_index(["unreviewed_flags"])
    reviews.refresh_all(db)


@migrations()
def m012_outbox_refusals(db: sqlite_utils.Database) -> None:
    """A PACS's refusal is kept with the outbox row (DIMSE status, its meaning, the PACS's Error Comment);
    an object refused for good is set aside; every output of an analysis is recorded, sent or not."""
    outbox = db.table("outbox")
    outbox.add_column("status", int)  # the last C-STORE (or association) status, NULL when none came back
    outbox.add_column("status_meaning", str)
    outbox.add_column("error_comment", str)
    outbox.add_column("refusals", int, not_null_default=0)  # permanent refusals since the last retry
    outbox.add_column("set_aside_at", str)
    outbox.add_column("modality", str)
    for row_id, path in db.execute("SELECT id, path FROM outbox").fetchall():
        db.execute("UPDATE outbox SET modality = ? WHERE id = ?", [Path(path).name.split("-")[0].upper(), row_id])
    db.table("outputs").create({
        "id": int, "analysis_id": int, "study_instance_uid": str, "series_instance_uid": str, "modality": str,
        "path": str, "sop_instance_uid": str, "created_at": str,
    }, pk="id")
    db.table("outputs").create_index(["analysis_id"])
    db.table("outputs").create_index(["study_instance_uid"])


@migrations()
def m013_retention(db: sqlite_utils.Database) -> None:
    """A series whose images were purged (``store.retention``) says when, and how many and how large they were;
    every backup written is recorded (``appliance backup``)."""
    series = db.table("series")
    series.add_column("purged_at", str)
    series.add_column("purged_instances", int)
    series.add_column("purged_bytes", int)
    db.table("outbox").create_index(["series_instance_uid"])  # when a series' results were last sent
    db.table("backups").create({
        "id": int, "path": str, "sha256": str, "size_bytes": int, "instances": int, "signer_fingerprint": str,
        "actor": str, "started_at": str, "finished_at": str,
    }, pk="id")


@migrations()
def m014_recalls(db: sqlite_utils.Database) -> None:
    """The recall list a confirmed flag puts a patient on, and the coded outcomes recorded on it
    (``store.recalls``)."""
    db.table("recalls").create({
        "id": int, "study_instance_uid": str, "patient_key": str, "result_id": int, "model": str,
        "model_version": str, "due_date": str, "created_at": str, "closed_at": str, "closed_reason": str,
    }, pk="id")
    db.table("recalls").create_index(["study_instance_uid", "model"])
    db.table("recalls").create_index(["closed_at", "due_date"])
    db.table("outcomes").create({
        "id": int, "recall_id": int, "code": str, "system": str, "display": str, "detail": str,
        "recorded_by": str, "recorded_at": str,
    }, pk="id", foreign_keys=[("recall_id", "recalls")])
    db.table("outcomes").create_index(["recall_id"])
    db.table("outcomes").create_index(["recorded_at"])
