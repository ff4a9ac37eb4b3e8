"""The durable job queue and the worker: quiet period, leases, retries, restart after a crash."""

import threading
import time

import pytest

from appliance import config
from appliance.ingest.importer import import_paths
from appliance.jobs import queue
from appliance.jobs.owner import WorkerIdentity, WorkerLock, worker_alive
from appliance.jobs.worker import Worker
from appliance.store.database import open_database, utcnow, write_transaction
from appliance.store.datadir import DataDirectory

GONE = WorkerIdentity("0" * 32, 999999, "")  # a worker whose lock nobody holds: dead


def _settings(tmp_path, **overrides):
    values = {"home": str(tmp_path / "home"), "quiet_period_seconds": 0.0, "job_backoff_seconds": 0.0}
    values.update(overrides)
    return config.load(environ={}, **values)


def test_queue_claims_by_priority_and_enqueues_once(store):
    db = store.db
    first = queue.enqueue_series(db, "1.1", "1")
    assert queue.enqueue_series(db, "1.1", "1") is None  # already queued
    urgent = queue.enqueue_series(db, "1.2", "1", priority=5)
    assert queue.claim(db, 60, GONE)["id"] == urgent
    assert queue.claim(db, 60, GONE)["id"] == first
    assert queue.claim(db, 60, GONE) is None


def test_failed_job_is_retried_with_backoff_then_left_failed(store):
    db = store.db
    job = queue.enqueue_series(db, "1.1", "1")
    queue.claim(db, 60, GONE)
    assert queue.fail(db, job, "boom", max_attempts=2, backoff_seconds=3600) == "queued"
    assert queue.claim(db, 60, GONE) is None  # not before its backoff has passed
    with write_transaction(db):
        db.execute("UPDATE jobs SET not_before = ?", [utcnow()])
    queue.claim(db, 60, GONE)
    assert queue.fail(db, job, "boom again", max_attempts=2, backoff_seconds=0) == "failed"
    assert db.table("jobs").get(job)["error"] == "boom again"


def test_only_jobs_of_dead_workers_or_expired_leases_are_requeued(store):
    db, ddir = store.db, DataDirectory(store.home)
    alive = WorkerLock(ddir)
    try:
        queue.enqueue_series(db, "1.1", "1")
        queue.enqueue_series(db, "1.2", "1")
        queue.enqueue_series(db, "1.3", "1")
        queue.claim(db, 600, alive.identity)  # a live worker's job: stays its own
        queue.claim(db, 600, GONE)  # a worker killed mid-job
        queue.claim(db, -1, alive.identity)  # alive, but its lease ran out
        requeued = queue.requeue_abandoned(db, lambda worker_id: worker_alive(ddir, worker_id))
        assert requeued == 2
        rows = db.execute("SELECT series_instance_uid, state FROM jobs ORDER BY id").fetchall()
        assert rows == [("1.1", "running"), ("1.2", "queued"), ("1.3", "queued")]
    finally:
        alive.release()
    assert not worker_alive(ddir, alive.identity.id)


def test_a_series_with_a_running_job_is_not_claimed_again(store):
    db = store.db
    first = queue.enqueue_series(db, "1.1", "1")
    assert queue.claim(db, 600, GONE)["id"] == first
    queue.enqueue_series(db, "1.1", "1")  # late images: a second job for the same series
    assert queue.claim(db, 600, GONE) is None  # waits until the first one ends
    queue.complete(db, first)
    assert queue.claim(db, 600, GONE) is not None


def test_job_state_and_study_status_speak_one_vocabulary(store):
    from appliance.store.states import JobState, StudyStatus

    assert f"{JobState.QUEUED}" == "queued" and StudyStatus("done") is StudyStatus.DONE
    assert queue.fail(store.db, queue.enqueue_series(store.db, "1.1", "1"), "x", 5, 0) is JobState.QUEUED


def test_series_waits_for_its_quiet_period(store, settings, synthetic_chest):
    import_paths(store, [synthetic_chest], settings)
    assert queue.ready_series(store.db, quiet_seconds=3600) == []
    assert len(queue.ready_series(store.db, quiet_seconds=0)) == 1


def test_worker_analyses_received_series_and_a_crash_mid_job_is_recovered(tmp_path, synthetic_chest):
    settings = _settings(tmp_path)
    worker = Worker(settings)
    import_paths(worker.store, [synthetic_chest], settings)
    job = queue.claim(worker.store.db, 600, GONE) if queue.enqueue_ready(worker.store.db, 0) else None
    assert job is not None  # ... and its worker is killed here, the job left "running"
    restarted = Worker(settings)  # start-up re-queues it: its worker is gone
    assert restarted.run_once()
    db = open_database(settings.home_path)
    assert db.execute("SELECT state, attempts FROM jobs").fetchall() == [("done", 2)]
    assert db.execute("SELECT count(*) FROM analyses WHERE superseded = 0").fetchone()[0] == 1
    assert db.execute("SELECT status FROM series").fetchone()[0] == "analyzed"
    assert db.execute("SELECT status FROM studies").fetchone()[0] == "done"
    assert not restarted.run_once()  # nothing left


def test_a_second_worker_leaves_a_live_workers_job_alone(tmp_path, synthetic_chest):
    settings = _settings(tmp_path)
    first = Worker(settings)
    import_paths(first.store, [synthetic_chest], settings)
    queue.enqueue_ready(first.store.db, 0)
    job = queue.claim(first.store.db, 600, first.runner.worker)  # the first worker is analysing
    second = Worker(settings)  # started beside it
    assert not second.run_once()  # nothing for it: the series' job is the first worker's
    assert second.store.db.execute("SELECT state, worker_id FROM jobs").fetchall() == [
        ("running", first.runner.worker.id)]
    first.runner.run(job)
    assert first.store.db.execute("SELECT state, attempts FROM jobs").fetchall() == [("done", 1)]


def test_a_job_whose_worker_died_after_saving_publishes_without_a_second_analysis(tmp_path, synthetic_chest,
                                                                                   monkeypatch):
    from appliance.analysis import analyze_series
    from appliance.inference.registry import shared_registry

    settings = _settings(tmp_path)
    worker = Worker(settings)
    import_paths(worker.store, [synthetic_chest], settings)
    queue.enqueue_ready(worker.store.db, 0)
    job = queue.claim(worker.store.db, 600, GONE)
    analyze_series(worker.store, job["series_instance_uid"], settings, shared_registry(settings), job_id=job["id"])
    published = []
    monkeypatch.setattr(worker.runner, "_publish", lambda job, record: published.append(record["analysis_id"]))
    assert worker.run_once()  # re-queued (its worker is gone), then published from the saved analysis
    db = worker.store.db
    assert db.execute("SELECT count(*) FROM analyses").fetchone()[0] == 1
    assert published == [db.execute("SELECT id FROM analyses").fetchone()[0]]
    assert db.execute("SELECT state FROM jobs").fetchall() == [("done",)]


def test_a_running_job_reports_progress_and_keeps_its_lease(tmp_path, synthetic_chest, monkeypatch):
    from appliance.jobs import runner as runner_module

    settings = _settings(tmp_path)
    worker = Worker(settings)
    import_paths(worker.store, [synthetic_chest], settings)
    seen = []
    real = queue.heartbeat

    def heartbeat(db, job_id, worker_id, lease_seconds, progress, stage=None):
        seen.append((progress, stage, db.execute("SELECT progress FROM jobs WHERE id = ?", [job_id]).fetchone()[0]))
        return real(db, job_id, worker_id, lease_seconds, progress, stage)

    monkeypatch.setattr(runner_module, "HEARTBEAT_SECONDS", 0.0)
    monkeypatch.setattr(queue, "heartbeat", heartbeat)
    assert worker.run_once()
    fractions = [p for p, _, _ in seen]
    assert fractions == sorted(fractions) and 0.0 in fractions and fractions[-1] < 1.0
    assert {"loading", "analysing", "lungs", "publishing"} <= {stage for _, stage, _ in seen}
    assert any(0.0 < stored < 1.0 for _, _, stored in seen)  # the worklist reads a value in between


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


@pytest.mark.slow
def test_two_workers_never_analyse_a_series_twice_and_a_kill_9_costs_one_retry(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from appliance.synth.writer import SynthOptions, write_series

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    # demonstration mode: every pack runs, so a job lasts long enough to be caught mid-way and killed
    env.update(APPLIANCE_HOME=str(home), APPLIANCE_QUIET_PERIOD_SECONDS="0", APPLIANCE_JOB_BACKOFF_SECONDS="0",
               APPLIANCE_DEMONSTRATION="1")
    for seed in range(4):
        write_series(tmp_path / f"s{seed}", SynthOptions(slices=60, size=256, region="chest", seed=40 + seed))
    folders = [str(tmp_path / f"s{n}") for n in range(4)]
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "import", *folders],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    workers = [subprocess.Popen([sys.executable, "-m", "appliance.cli", "worker"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    db = open_database(home)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and killed is None:
            row = db.execute("SELECT worker_pid FROM jobs WHERE state = 'running' AND progress > 0").fetchone()
            if row:
                killed = next(w for w in workers if w.pid == row[0])
                killed.send_signal(signal.SIGKILL)  # mid-job
                killed.wait()
            time.sleep(0.05)
        assert killed is not None
        while time.monotonic() < deadline and db.execute(
                "SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0] < 4:
            time.sleep(0.2)
    finally:
        for w in workers:
            w.send_signal(signal.SIGKILL)
            w.wait()
    assert db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall() == [("done", 4)]
    per_series = db.execute("SELECT series_instance_uid, count(*) FROM analyses "
                            "GROUP BY series_instance_uid").fetchall()
    assert len(per_series) == 4 and all(n == 1 for _, n in per_series)  # each series analysed exactly once
    assert db.execute("SELECT max(attempts) FROM jobs").fetchone()[0] == 2  # the killed one ran again
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
