"""Jobs are rows in SQLite: queued -> running (owned by a live worker, leased, heart-beating) -> done | failed.

A running job names its worker (id, pid, boot id). They survive restarts: a job is put back in the
queue only when its worker is gone (its lock is free, see :mod:`appliance.jobs.owner`) or its lease
expired, so a second worker starting beside a busy one never takes the job it is running. A series
has at most one running job at a time. An analysis job records the analysis it saved, so a job whose
worker died after saving publishes that analysis instead of making a second one.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

import sqlite_utils

from appliance.store.database import inserted_id, refresh_study_status, utcnow, write_transaction
from appliance.store.states import JobKind, JobState, SeriesStatus

QUEUED, RUNNING, DONE, FAILED = JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED
ANALYZE, REPORT = JobKind.ANALYZE, JobKind.REPORT


def _at(seconds_from_now: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_from_now)
    return moment.isoformat(timespec="milliseconds")


def enqueue_series(db: sqlite_utils.Database, series_uid: str, study_uid: str, priority: int = 0,
                   kind: JobKind = ANALYZE) -> int | None:
    """Queue an analysis (or ``kind`` job) of the series unless one is already queued; returns the new job id
    or None."""
    with write_transaction(db):
        if db.execute("SELECT 1 FROM jobs WHERE series_instance_uid = ? AND state = ? AND kind = ?",
                      [series_uid, QUEUED.value, kind.value]).fetchone():
            return None
        now = utcnow()
        jobs = db.table("jobs")
        jobs.insert({"kind": kind.value, "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                     "state": QUEUED.value, "priority": priority, "attempts": 0, "not_before": now,
                     "lease_until": None, "progress": 0.0, "error": None, "created_at": now, "updated_at": now})
        refresh_study_status(db, study_uid)
        return inserted_id(jobs)


def enqueue_many(db: sqlite_utils.Database, series: dict[str, str], priority: int = 1) -> list[int]:
    """Queue every series of an import (SeriesInstanceUID -> StudyInstanceUID); returns the jobs to run.

    A series that already has a queued job keeps it, and that job is among those returned.
    """
    ids = []
    for series_uid, study_uid in series.items():
        job_id = enqueue_series(db, series_uid, study_uid, priority=priority)
        if job_id is None:
            row = db.execute("SELECT id FROM jobs WHERE series_instance_uid = ? AND state = ? AND kind = ? "
                             "ORDER BY id DESC LIMIT 1", [series_uid, QUEUED.value, ANALYZE.value]).fetchone()
            if row is None:
                continue
            job_id = int(row[0])
        ids.append(job_id)
    return ids


def ready_series(db: sqlite_utils.Database, quiet_seconds: float) -> list[tuple[str, str]]:
    """(series, study) received but not analysed since their last image, quiet for ``quiet_seconds``."""
    cutoff = _at(-quiet_seconds)
    return [(r[0], r[1]) for r in db.execute(
        "SELECT s.series_instance_uid, s.study_instance_uid FROM series s WHERE s.status = ? "
        "AND s.last_received_at <= ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = "
        "s.series_instance_uid AND j.kind = ? AND (j.state IN (?, ?) OR (j.state = ? "
        "AND j.created_at >= s.last_received_at)))",
        [SeriesStatus.RECEIVED.value, cutoff, ANALYZE.value, QUEUED.value, RUNNING.value, FAILED.value])]


def enqueue_ready(db: sqlite_utils.Database, quiet_seconds: float) -> int:
    return sum(1 for series, study in ready_series(db, quiet_seconds) if enqueue_series(db, series, study))


_CLAIMABLE = ("SELECT j.id FROM jobs j WHERE j.state = ? AND j.not_before <= ? AND NOT EXISTS "
              "(SELECT 1 FROM jobs r WHERE r.state = ? AND r.kind = j.kind "
              "AND r.series_instance_uid = j.series_instance_uid)")


def claim(db: sqlite_utils.Database, lease_seconds: float, worker: Any,
          job_ids: Iterable[int] | None = None) -> dict[str, Any] | None:
    """Take the most urgent due job (of ``job_ids`` when given), lease it to ``worker`` and mark it running.

    One writer at a time: no two workers get the same job, and a series whose job is running waits.
    ``worker`` is a :class:`appliance.jobs.owner.WorkerIdentity`.
    """
    sql = _CLAIMABLE
    args: list[Any] = [QUEUED.value, utcnow(), RUNNING.value]
    if job_ids is not None:
        ids = list(job_ids)
        if not ids:
            return None
        sql += f" AND j.id IN ({','.join('?' * len(ids))})"
        args += ids
    with write_transaction(db):
        row = db.execute(sql + " ORDER BY j.priority DESC, j.id LIMIT 1", args).fetchone()
        if row is None:
            return None
        db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, lease_until = ?, updated_at = ?, "
                   "worker_id = ?, worker_pid = ?, worker_boot_id = ?, progress = 0.0, stage = NULL WHERE id = ?",
                   [RUNNING.value, _at(lease_seconds), utcnow(), worker.id, worker.pid, worker.boot_id, row[0]])
        job = dict(db.table("jobs").get(row[0]))
        refresh_study_status(db, job["study_instance_uid"])
        return job


def heartbeat(db: sqlite_utils.Database, job_id: int, worker_id: str, lease_seconds: float, progress: float,
              stage: str | None = None) -> bool:
    """Extend the job's lease and record its progress (0..1); False when the job is no longer this worker's."""
    with write_transaction(db):
        return db.execute("UPDATE jobs SET lease_until = ?, progress = ?, stage = ?, updated_at = ? "
                          "WHERE id = ? AND worker_id = ? AND state = ?",
                          [_at(lease_seconds), progress, stage, utcnow(), job_id, worker_id, RUNNING.value]
                          ).rowcount == 1


def record_analysis(db: sqlite_utils.Database, job_id: int, analysis_id: int) -> None:
    """Tie the analysis just saved to its job (inside the caller's transaction)."""
    db.execute("UPDATE jobs SET analysis_id = ? WHERE id = ?", [analysis_id, job_id])


def complete(db: sqlite_utils.Database, job_id: int, worker_id: str | None = None) -> bool:
    """Mark the job done; False when it was no longer this worker's (its lease was taken over)."""
    with write_transaction(db):
        sql = "UPDATE jobs SET state = ?, progress = 1.0, lease_until = NULL, stage = NULL, updated_at = ? WHERE id = ?"
        args: list[Any] = [DONE.value, utcnow(), job_id]
        if worker_id is not None:
            sql += " AND worker_id = ?"
            args.append(worker_id)
        done = db.execute(sql, args).rowcount == 1
        _refresh_job_study(db, job_id)
        return done


def fail(db: sqlite_utils.Database, job_id: int, error: str, max_attempts: int, backoff_seconds: float) -> JobState:
    """Retry later with exponential backoff, or give up after ``max_attempts``; returns the new state."""
    with write_transaction(db):
        attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", [job_id]).fetchone()[0]
        state = FAILED if attempts >= max_attempts else QUEUED
        db.execute("UPDATE jobs SET state = ?, error = ?, not_before = ?, lease_until = NULL, stage = NULL, "
                   "updated_at = ? WHERE id = ?",
                   [state.value, error[:2000], _at(backoff_seconds * 2 ** (attempts - 1)), utcnow(), job_id])
        _refresh_job_study(db, job_id)
        return state


def _refresh_job_study(db: sqlite_utils.Database, job_id: int) -> None:
    row = db.execute("SELECT study_instance_uid FROM jobs WHERE id = ?", [job_id]).fetchone()
    if row is not None:
        refresh_study_status(db, row[0])


def requeue_abandoned(db: sqlite_utils.Database, worker_alive: Callable[[str], bool]) -> int:
    """Put back running jobs whose worker is gone (``worker_alive(id)`` false) or whose lease expired."""
    now = utcnow()
    running = list(db.execute("SELECT id, worker_id, lease_until, study_instance_uid FROM jobs WHERE state = ?",
                              [RUNNING.value]))
    abandoned = [(job_id, worker_id, study) for job_id, worker_id, lease_until, study in running
                 if not worker_id or (lease_until or "") < now or not worker_alive(worker_id)]
    if not abandoned:
        return 0
    with write_transaction(db):
        count = 0
        for job_id, worker_id, study in abandoned:  # unless another worker took it over meanwhile
            count += db.execute("UPDATE jobs SET state = ?, lease_until = NULL, worker_id = NULL, updated_at = ? "
                                "WHERE id = ? AND state = ? AND worker_id IS ?",
                                [QUEUED.value, utcnow(), job_id, RUNNING.value, worker_id]).rowcount
            refresh_study_status(db, study)
        return count
