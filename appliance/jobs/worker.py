"""The worker: turns quiet series into jobs and runs them, one at a time, until told to stop."""

from __future__ import annotations

import logging
import threading

from appliance.analysis import analyze_series, open_store
from appliance.config import Settings
from appliance.inference.registry import Registry
from appliance.jobs import queue
from appliance.jobs.notify import sd_notify

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings)
        self.registry = Registry(settings)
        requeued = queue.requeue_running(self.store.db, expired_only=False)
        if requeued:
            log.warning("re-queued %d job(s) left running by a stopped worker", requeued)

    def run_once(self) -> bool:
        """Queue what is ready and run one job; returns whether a job ran."""
        db, s = self.store.db, self.settings
        queue.requeue_running(db, expired_only=True)
        queue.enqueue_ready(db, s.quiet_period_seconds)
        job = queue.claim(db, s.job_lease_seconds)
        if job is None:
            return False
        try:
            record = analyze_series(self.store, job["series_instance_uid"], s, self.registry)
        except Exception as exc:  # any failure is the job's, never the worker's
            state = queue.fail(db, job["id"], repr(exc), s.job_max_attempts, s.job_backoff_seconds)
            log.exception("job %d (series %s) failed; %s", job["id"], job["series_instance_uid"], state)
            return True
        queue.complete(db, job["id"])
        log.info("job %d: series %s %s %s", job["id"], job["series_instance_uid"], record["status"],
                 record["reason_code"] or "")
        return True

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        sd_notify("READY=1")
        while not stop.is_set():
            sd_notify("WATCHDOG=1")  # an analysis takes seconds; a hung worker is restarted by systemd
            if not self.run_once():
                stop.wait(poll_seconds)
