"""Jobs are rows in SQLite: queued -> running (leased, heart-beating) -> done | failed.

They survive restarts: at start-up ``running`` rows are re-queued, as are rows
whose lease expired (a worker killed mid-job). Analyses are idempotent (a new
analysis supersedes the previous one), so re-running a job never duplicates
results. A series becomes a job once no image has arrived for the quiet period.
"""

from __future__ import annotations

import datetime
from typing import Any

import sqlite_utils

from appliance.store.database import utcnow, write_transaction

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
ANALYZE = "analyze"
REPORT = "report"  # send the study's report again (after a radiologist's review)


def _at(seconds_from_now: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_from_now)
    return moment.isoformat(timespec="milliseconds")


def enqueue_series(db: sqlite_utils.Database, series_uid: str, study_uid: str, priority: int = 0,
                   kind: str = ANALYZE) -> int | None:
    """Queue an analysis (or ``kind`` job) of the series unless one is already queued; returns the new job id
    or None."""
    with write_transaction(db):
        if db.execute("SELECT 1 FROM jobs WHERE series_instance_uid = ? AND state = ? AND kind = ?",
                      [series_uid, QUEUED, kind]).fetchone():
            return None
        now = utcnow()
        jobs = db["jobs"]
        jobs.insert({"kind": kind, "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                           "state": QUEUED, "priority": priority, "attempts": 0, "not_before": now,
                           "lease_until": None, "progress": 0.0, "error": None, "created_at": now, "updated_at": now})
        return int(jobs.last_pk)


def ready_series(db: sqlite_utils.Database, quiet_seconds: float) -> list[tuple[str, str]]:
    """(series, study) received but not analysed since their last image, quiet for ``quiet_seconds``."""
    cutoff = _at(-quiet_seconds)
    return [tuple(r) for r in db.execute(
        "SELECT s.series_instance_uid, s.study_instance_uid FROM series s WHERE s.status = 'received' "
        "AND s.last_received_at <= ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = "
        "s.series_instance_uid AND j.kind = 'analyze' AND (j.state IN ('queued', 'running') OR (j.state = 'failed' "
        "AND j.created_at >= s.last_received_at)))", [cutoff])]


def enqueue_ready(db: sqlite_utils.Database, quiet_seconds: float) -> int:
    return sum(1 for series, study in ready_series(db, quiet_seconds) if enqueue_series(db, series, study))


def claim(db: sqlite_utils.Database, lease_seconds: float) -> dict[str, Any] | None:
    """Take the most urgent due job, lease it and mark it running (one writer: no two workers get it)."""
    with write_transaction(db):
        row = db.execute("SELECT id FROM jobs WHERE state = ? AND not_before <= ? ORDER BY priority DESC, id LIMIT 1",
                         [QUEUED, utcnow()]).fetchone()
        if row is None:
            return None
        db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, lease_until = ?, updated_at = ? WHERE id = ?",
                   [RUNNING, _at(lease_seconds), utcnow(), row[0]])
        return dict(db["jobs"].get(row[0]))


def heartbeat(db: sqlite_utils.Database, job_id: int, lease_seconds: float, progress: float) -> None:
    with write_transaction(db):
        db.execute("UPDATE jobs SET lease_until = ?, progress = ?, updated_at = ? WHERE id = ?",
                   [_at(lease_seconds), progress, utcnow(), job_id])


def complete(db: sqlite_utils.Database, job_id: int) -> None:
    with write_transaction(db):
        db.execute("UPDATE jobs SET state = ?, progress = 1.0, lease_until = NULL, updated_at = ? WHERE id = ?",
                   [DONE, utcnow(), job_id])


def fail(db: sqlite_utils.Database, job_id: int, error: str, max_attempts: int, backoff_seconds: float) -> str:
    """Retry later with exponential backoff, or give up after ``max_attempts``; returns the new state."""
    with write_transaction(db):
        attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", [job_id]).fetchone()[0]
        state = FAILED if attempts >= max_attempts else QUEUED
        db.execute("UPDATE jobs SET state = ?, error = ?, not_before = ?, lease_until = NULL, updated_at = ? "
                   "WHERE id = ?", [state, error[:2000], _at(backoff_seconds * 2 ** (attempts - 1)), utcnow(), job_id])
        return state


def requeue_running(db: sqlite_utils.Database, expired_only: bool = True) -> int:
    """Put back jobs whose worker died: all ``running`` ones at start-up, else those whose lease expired."""
    with write_transaction(db):
        sql = "UPDATE jobs SET state = ?, lease_until = NULL, updated_at = ? WHERE state = ?"
        args: list[Any] = [QUEUED, utcnow(), RUNNING]
        if expired_only:
            sql += " AND lease_until < ?"
            args.append(utcnow())
        return db.execute(sql, args).rowcount
