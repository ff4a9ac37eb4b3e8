"""The worker: turns quiet series into jobs and runs them, one at a time, until told to stop."""

from __future__ import annotations

import logging
import threading

from appliance.config import LiveSettings, Settings
from appliance.jobs import queue
from appliance.jobs.notify import sd_notify
from appliance.jobs.purge import PurgeWhenLow
from appliance.jobs.runner import JobRunner

log = logging.getLogger(__name__)


class Worker:
    """A loop over the job runner: forward the outbox, re-queue abandoned jobs, queue quiet series, purge images
    when free space is below the purge target, run one."""

    def __init__(self, settings: Settings, live: LiveSettings | None = None):
        self.live = live or LiveSettings.following(settings)
        self.settings = settings
        self.runner = JobRunner(settings)
        self.store = self.runner.store
        self.runner.requeue_abandoned()
        self.purge_when_low = PurgeWhenLow()

    def refresh(self) -> Settings:
        """Take up the settings saved since the last loop (one stat of the site's file when none changed)."""
        fresh = self.live.current()
        if fresh is not self.settings:
            changed = sorted(k for k, v in fresh.values.items() if self.settings.values[k] != v)
            if changed:
                log.info("settings changed: %s", ", ".join(changed))
            self.settings = self.runner.settings = fresh
        return fresh

    def forward(self) -> None:
        """Send what waits in the outbox (see :meth:`JobRunner.forward`), to the destinations in force now."""
        self.refresh()
        self.runner.forward()

    def run_once(self) -> bool:
        """Queue what is ready and run one job; returns whether a job ran."""
        self.forward()
        self.runner.requeue_abandoned()
        queue.enqueue_ready(self.store.db, self.settings.quiet_period_seconds)
        self.purge_when_low(self.store.db, self.settings)  # before the receiver's watermark is near
        return self.runner.run_next() is not None

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        sd_notify("READY=1")
        try:
            while not stop.is_set():
                sd_notify("WATCHDOG=1")  # between jobs; during one, its heartbeats ping the watchdog
                try:
                    ran = self.run_once()
                except Exception:  # e.g. the database stayed locked: log, wait, carry on
                    log.exception("worker step failed; retrying")
                    ran = False
                if not ran:
                    stop.wait(poll_seconds)
        finally:
            self.runner.close()
