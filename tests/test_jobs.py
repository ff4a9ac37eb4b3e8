"""The durable job queue and the worker: quiet period, leases, retries, restart after a crash."""

import threading
import time

from appliance import config
from appliance.ingest.importer import import_paths
from appliance.jobs import queue
from appliance.jobs.worker import Worker
from appliance.store.database import open_database, utcnow, write_transaction


def _settings(tmp_path, **overrides):
    values = dict(home=str(tmp_path / "home"), quiet_period_seconds=0.0, job_backoff_seconds=0.0)
    values.update(overrides)
    return config.load(environ={}, **values)


def test_queue_claims_by_priority_and_enqueues_once(store):
    db = store.db
    first = queue.enqueue_series(db, "1.1", "1")
    assert queue.enqueue_series(db, "1.1", "1") is None  # already queued
    urgent = queue.enqueue_series(db, "1.2", "1", priority=5)
    assert queue.claim(db, 60)["id"] == urgent
    assert queue.claim(db, 60)["id"] == first
    assert queue.claim(db, 60) is None


def test_failed_job_is_retried_with_backoff_then_left_failed(store):
    db = store.db
    job = queue.enqueue_series(db, "1.1", "1")
    queue.claim(db, 60)
    assert queue.fail(db, job, "boom", max_attempts=2, backoff_seconds=3600) == "queued"
    assert queue.claim(db, 60) is None  # not before its backoff has passed
    with write_transaction(db):
        db.execute("UPDATE jobs SET not_before = ?", [utcnow()])
    queue.claim(db, 60)
    assert queue.fail(db, job, "boom again", max_attempts=2, backoff_seconds=0) == "failed"
    assert db["jobs"].get(job)["error"] == "boom again"


def test_expired_leases_and_running_jobs_at_start_up_are_requeued(store):
    db = store.db
    queue.enqueue_series(db, "1.1", "1")
    queue.claim(db, lease_seconds=-1)  # a worker that died at once
    assert queue.requeue_running(db, expired_only=True) == 1
    queue.claim(db, lease_seconds=600)
    assert queue.requeue_running(db, expired_only=True) == 0
    assert queue.requeue_running(db, expired_only=False) == 1


def test_series_waits_for_its_quiet_period(store, settings, synthetic_chest):
    import_paths(store, [synthetic_chest], settings)
    assert queue.ready_series(store.db, quiet_seconds=3600) == []
    assert len(queue.ready_series(store.db, quiet_seconds=0)) == 1


def test_worker_analyses_received_series_and_a_crash_mid_job_is_recovered(tmp_path, synthetic_chest):
    settings = _settings(tmp_path)
    worker = Worker(settings)
    import_paths(worker.store, [synthetic_chest], settings)
    job = queue.claim(worker.store.db, 600) if queue.enqueue_ready(worker.store.db, 0) else None
    assert job is not None  # ... and the worker is killed here, the job left "running"
    restarted = Worker(settings)  # start-up re-queues it
    assert restarted.run_once()
    db = open_database(settings.home_path)
    assert db.execute("SELECT state, attempts FROM jobs").fetchall() == [("done", 2)]
    assert db.execute("SELECT count(*) FROM analyses WHERE superseded = 0").fetchone()[0] == 1
    assert db.execute("SELECT status FROM series").fetchone()[0] == "analyzed"
    assert not restarted.run_once()  # nothing left


def test_worker_thread_stops_when_told(tmp_path):
    worker = Worker(_settings(tmp_path))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, 0.05))
    thread.start()
    time.sleep(0.2)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_sd_notify_reaches_the_socket_systemd_gives(tmp_path, monkeypatch):
    import socket

    from appliance.jobs.notify import sd_notify

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1")
        assert server.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_worker_survives_a_failing_step(tmp_path, monkeypatch):
    worker = Worker(_settings(tmp_path))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return False

    monkeypatch.setattr(worker, "run_once", flaky)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, 0.01))
    thread.start()
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=5)
    assert len(calls) > 2  # it kept going after the failure


def test_late_instances_requeue_the_series_and_supersede_its_result(tmp_path, synthetic_chest):
    settings = _settings(tmp_path)
    worker = Worker(settings)
    files = sorted(synthetic_chest.glob("*.dcm"))
    import_paths(worker.store, files[:30], settings)
    assert worker.run_once()
    import_paths(worker.store, files[30:], settings)  # the rest of the series arrives later
    assert worker.run_once()
    db = worker.store.db
    assert db.execute("SELECT slices, superseded FROM analyses ORDER BY id").fetchall() == [(30, 1), (40, 0)]
    assert db.execute("SELECT state FROM jobs").fetchall() == [("done",), ("done",)]
