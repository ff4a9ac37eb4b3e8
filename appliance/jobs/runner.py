"""The job runner: the one path from a stored series to results on the PACS.

Every way in (C-STORE, ``appliance import``, USB, upload, drop folder, the first-start sample,
``appliance analyze``) stores instances and queues jobs; this runner claims them, analyses the
series, and publishes what the analysis made (DICOM SR, key images, Encapsulated PDF report) to the
outbox of every PACS. The worker loop and ``appliance analyze`` both call it, in any process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from appliance.analysis import analyze_series, artefact_dir, stored_record
from appliance.config import Settings
from appliance.inference.registry import Registry, shared_registry
from appliance.jobs import queue
from appliance.jobs.notify import sd_notify
from appliance.jobs.owner import WorkerLock, worker_alive
from appliance.outputs import outbox
from appliance.outputs.dicom_objects import write_outputs, write_report_object
from appliance.store.instances import InstanceStore, open_store, series_instances
from appliance.store.states import JobKind, SeriesStatus

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0  # at most one heartbeat (database write and watchdog ping) per this long
PUBLISHED = 1.0


class JobRunner:
    """Claims jobs as one worker and runs them: analyse, then publish. One per process and data directory."""

    def __init__(self, settings: Settings, store: InstanceStore | None = None, registry: Registry | None = None):
        self.settings = settings
        self.store = store or open_store(settings)
        self.registry = registry
        self.destinations = outbox.parse_destinations(settings.pacs_destinations)
        self.lock = WorkerLock(self.store.datadir)
        self.worker = self.lock.identity

    def close(self) -> None:
        self.lock.release()

    # --- claiming --------------------------------------------------------------------------------

    def requeue_abandoned(self) -> int:
        """Put back jobs whose worker died or whose lease ran out; a live worker's jobs stay its own."""
        ddir = self.store.datadir
        count = queue.requeue_abandoned(self.store.db, lambda worker_id: worker_alive(ddir, worker_id))
        if count:
            log.warning("re-queued %d job(s) whose worker stopped", count)
        return count

    def run_next(self, job_ids: Iterable[int] | None = None) -> dict[str, Any] | None:
        """Claim and run the most urgent due job (of ``job_ids`` when given); returns the job, or None."""
        job = queue.claim(self.store.db, self.settings.job_lease_seconds, self.worker, job_ids)
        if job is None:
            return None
        self.run(job)
        return job

    def run_until_done(self, job_ids: list[int], poll_seconds: float = 0.5) -> None:
        """Run these jobs once each in this process; waits for any that another worker is running.

        A job that fails stays queued for the worker's retry with backoff; this does not wait for that.
        """
        pending = set(job_ids)
        while pending:
            job = self.run_next(pending)
            if job is not None:
                pending.discard(job["id"])
                continue
            rows = self.store.db.execute(
                f"SELECT id, state, error FROM jobs WHERE id IN ({','.join('?' * len(pending))})",  # nosec B608 - only ? placeholders; values bound
                list(pending)).fetchall()
            pending = {i for i, state, error in rows
                       if state == queue.RUNNING.value or (state == queue.QUEUED.value and not error)}
            if pending:
                self.requeue_abandoned()
                time.sleep(poll_seconds)  # another worker holds one

    # --- running ---------------------------------------------------------------------------------

    def run(self, job: dict[str, Any]) -> None:
        """Run one claimed job; any failure is the job's (retried with backoff), never the runner's."""
        s, db = self.settings, self.store.db
        try:
            if job["kind"] == JobKind.REPORT.value:
                self._send_report(job)
            else:
                self._analyze_and_publish(job)
        except Exception as exc:
            state = queue.fail(db, job["id"], repr(exc), s.job_max_attempts, s.job_backoff_seconds)
            log.exception("job %d (%s of series %s) failed; %s", job["id"], job["kind"],
                          job["series_instance_uid"], state)
            return
        if not queue.complete(db, job["id"], self.worker.id):
            log.warning("job %d finished after its lease was taken over", job["id"])

    def _analyze_and_publish(self, job: dict[str, Any]) -> None:
        progress = self._progress(job["id"])
        if job.get("analysis_id"):  # analysed by a worker that stopped before publishing
            record = stored_record(self.store.db, job["analysis_id"])
        else:
            record = analyze_series(self.store, job["series_instance_uid"], self.settings, self._registry(),
                                    job_id=job["id"], progress=progress)
        if record["status"] == SeriesStatus.ANALYZED.value:
            progress(0.95, "publishing")
            self._publish(job, record)
        log.info("job %d: series %s %s %s", job["id"], job["series_instance_uid"], record["status"],
                 record["reason_code"] or "")

    def _registry(self) -> Registry:
        return self.registry or shared_registry(self.settings)

    def _progress(self, job_id: int) -> Callable[[float, str], None]:
        """A progress report that heart-beats the job's lease and pings the systemd watchdog."""
        last = [0.0]

        def report(fraction: float, stage: str) -> None:
            now = time.monotonic()
            if now - last[0] < HEARTBEAT_SECONDS and fraction < PUBLISHED:
                return
            last[0] = now
            sd_notify("WATCHDOG=1")
            if not queue.heartbeat(self.store.db, job_id, self.worker.id, self.settings.job_lease_seconds,
                                   round(fraction, 3), stage):
                log.warning("job %d is no longer this worker's", job_id)
        return report

    def _publish(self, job: dict[str, Any], record: dict[str, Any]) -> None:
        """Write the series' SR, key images and report, and queue them for every PACS."""
        series_uid = job["series_instance_uid"]
        out_dir = artefact_dir(self.store, series_uid) / "dicom"
        paths = write_outputs(record, series_instances(self.store.db, self.store.home, series_uid), out_dir,
                              report_pdf=self._report_pdf(job["study_instance_uid"]), home=self.store.home)
        if self.destinations:
            outbox.enqueue(self.store.db, self.destinations, paths, self.store.home, series_uid)

    def _report_pdf(self, study_uid: str) -> tuple[bytes, str]:
        """The study's PDF report as it stands now, in the site's language, and its title."""
        from appliance.outputs import report
        from appliance.store.studies import latest_reviews, study

        doc = study(self.store.db, study_uid)
        if doc is None:
            raise LookupError(f"study {study_uid} is not in the store")
        _ = report.translations(self.settings.web_language)
        pdf = report.render_pdf(doc, latest_reviews(doc["reviews"]), self.settings.site_name, _,
                                report.key_image_finder(self.store.home))
        return pdf, _("CT screening report")

    def _send_report(self, job: dict[str, Any]) -> None:
        """Send the study's report as it stands now (with its reviews) to every PACS."""
        series_uid = job["series_instance_uid"]
        path = write_report_object(series_instances(self.store.db, self.store.home, series_uid)[0],
                                   *self._report_pdf(job["study_instance_uid"]),
                                   artefact_dir(self.store, series_uid) / "dicom")
        if self.destinations:
            outbox.enqueue(self.store.db, self.destinations, [path], self.store.home, series_uid)
        log.info("job %d: report of study %s written to %s", job["id"], job["study_instance_uid"], path.name)

    def forward(self) -> None:
        """Send what waits in the outbox; a misbehaving PACS never stops analyses (rows stay queued)."""
        if not self.destinations:
            return
        try:
            outbox.forward(self.store.db, self.store.home, self.destinations, self.settings.dicom_ae_title,
                           self.settings.outbox_backoff_seconds)
        except Exception:
            log.exception("outbox: sending failed; will retry")
