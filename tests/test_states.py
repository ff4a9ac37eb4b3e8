"""One vocabulary of states: every study status, walked through the worklist filter and the study page alike."""

from __future__ import annotations

from appliance.ingest.importer import import_paths
from appliance.jobs import queue
from appliance.jobs.owner import WorkerIdentity
from appliance.store.database import write_transaction
from appliance.store.states import JobState, SeriesStatus, StudyStatus
from appliance.store.studies import study
from appliance.web.queries import STATUSES, WorklistFilter, worklist

WORKER = WorkerIdentity("f" * 32, 1, "")


def _set_series(db, status: SeriesStatus) -> None:
    from appliance.store.database import refresh_study

    with write_transaction(db):
        db.execute("UPDATE series SET status = ?", [status.value])
        refresh_study(db, db.execute("SELECT study_instance_uid FROM studies").fetchone()[0])


def _seen(db, uid: str) -> tuple[str, list[str]]:
    """The study page's status, and every worklist filter that lists the study."""
    listed = [s for s in STATUSES
              if uid in {r["study_instance_uid"] for r in worklist(db, WorklistFilter(status=s))[0]}]
    return study(db, uid)["status"], listed


def test_every_study_status_is_the_same_on_the_worklist_and_the_study_page(store, settings, synthetic_chest):
    db = store.db
    summary = import_paths(store, [synthetic_chest], settings)
    (series_uid, uid), = summary.series.items()
    walk = []
    walk.append((StudyStatus.QUEUED, _seen(db, uid)))  # received, quiet period not yet over
    job = queue.enqueue_series(db, series_uid, uid)
    walk.append((StudyStatus.QUEUED, _seen(db, uid)))
    queue.claim(db, 600, WORKER)
    walk.append((StudyStatus.RUNNING, _seen(db, uid)))
    assert queue.fail(db, job, "boom", max_attempts=1, backoff_seconds=0) is JobState.FAILED
    walk.append((StudyStatus.FAILED, _seen(db, uid)))
    job = queue.enqueue_series(db, series_uid, uid)
    queue.claim(db, 600, WORKER)
    _set_series(db, SeriesStatus.ANALYZED)
    queue.complete(db, job)
    walk.append((StudyStatus.DONE, _seen(db, uid)))
    report = queue.enqueue_series(db, series_uid, uid, kind=queue.REPORT)
    walk.append((StudyStatus.DONE, _seen(db, uid)))  # re-sending the report does not re-open the study
    queue.claim(db, 600, WORKER, [report])
    queue.complete(db, report)
    _set_series(db, SeriesStatus.REJECTED)
    walk.append((StudyStatus.REJECTED, _seen(db, uid)))
    for expected, (page, listed) in walk:
        assert (page, listed) == (expected.value, [expected.value])
    assert {expected for expected, _ in walk} == set(StudyStatus)
