"""The worker: turns quiet series into jobs and runs them, one at a time, until told to stop."""

from __future__ import annotations

import logging
import threading

from appliance.analysis import analyze_series, artefact_dir, open_store, series_paths
from appliance.config import Settings
from appliance.inference.registry import Registry
from appliance.jobs import queue
from appliance.jobs.notify import sd_notify
from appliance.outputs import outbox
from appliance.outputs.dicom_objects import write_outputs

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings)
        self.registry = Registry(settings)
        self.destinations = outbox.parse_destinations(settings.pacs_destinations)
        requeued = queue.requeue_running(self.store.db, expired_only=False)
        if requeued:
            log.warning("re-queued %d job(s) left running by a stopped worker", requeued)

    def _publish(self, job: dict, record: dict) -> None:
        """Write the series' SR and key images, read them back, and queue them for every PACS."""
        series_uid = job["series_instance_uid"]
        out_dir = artefact_dir(self.store, series_uid) / "dicom"
        paths = write_outputs(record, series_paths(self.store, series_uid), out_dir,
                              report_pdf=self._report(job["study_instance_uid"]))
        if self.destinations:
            outbox.enqueue(self.store.db, self.destinations, paths, self.store.home, series_uid)

    def _report(self, study_uid: str) -> tuple[bytes, str]:
        """The study's PDF report as it stands now, in the site's language, and its title."""
        from appliance.outputs import report
        from appliance.store.studies import latest_reviews, study

        doc = study(self.store.db, study_uid)
        _ = report.translations(self.settings.web_language)
        pdf = report.render_pdf(doc, latest_reviews(doc["reviews"]), self.settings.site_name, _,
                                report.key_image_finder(self.store.home))
        return pdf, _("CT screening report")

    def _run_report(self, job: dict) -> bool:
        """Send the study's report as it stands now (with its reviews) to every PACS."""
        from appliance.outputs.dicom_objects import write_report_object

        db, series_uid = self.store.db, job["series_instance_uid"]
        try:
            path = write_report_object(series_paths(self.store, series_uid)[0], *self._report(job["study_instance_uid"]),
                                       artefact_dir(self.store, series_uid) / "dicom")
            if self.destinations:
                outbox.enqueue(db, self.destinations, [path], self.store.home, series_uid)
        except Exception as exc:
            s = self.settings
            log.exception("job %d: the report of study %s was not built", job["id"], job["study_instance_uid"])
            queue.fail(db, job["id"], repr(exc), s.job_max_attempts, s.job_backoff_seconds)
            return True
        queue.complete(db, job["id"])
        log.info("job %d: report of study %s written to %s", job["id"], job["study_instance_uid"], path.name)
        return True

    def forward(self) -> None:
        if not self.destinations:
            return
        try:
            outbox.forward(self.store.db, self.store.home, self.destinations, self.settings.dicom_ae_title,
                           self.settings.outbox_backoff_seconds)
        except Exception:  # a misbehaving PACS must not stop analyses; rows stay queued
            log.exception("outbox: sending failed; will retry")

    def run_once(self) -> bool:
        """Queue what is ready and run one job; returns whether a job ran."""
        db, s = self.store.db, self.settings
        self.forward()
        queue.requeue_running(db, expired_only=True)
        queue.enqueue_ready(db, s.quiet_period_seconds)
        job = queue.claim(db, s.job_lease_seconds)
        if job is None:
            return False
        if job["kind"] == queue.REPORT:
            return self._run_report(job)
        try:
            record = analyze_series(self.store, job["series_instance_uid"], s, self.registry)
        except Exception as exc:  # any failure is the job's, never the worker's
            state = queue.fail(db, job["id"], repr(exc), s.job_max_attempts, s.job_backoff_seconds)
            log.exception("job %d (series %s) failed; %s", job["id"], job["series_instance_uid"], state)
            return True
        if record["status"] == "analyzed":
            try:
                self._publish(job, record)
            except Exception:  # the analysis is stored; its DICOM outputs can be rebuilt
                log.exception("could not build or queue the DICOM outputs of series %s", job["series_instance_uid"])
        queue.complete(db, job["id"])
        log.info("job %d: series %s %s %s", job["id"], job["series_instance_uid"], record["status"],
                 record["reason_code"] or "")
        return True

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        sd_notify("READY=1")
        while not stop.is_set():
            sd_notify("WATCHDOG=1")  # an analysis takes seconds; a hung worker is restarted by systemd
            try:
                ran = self.run_once()
            except Exception:  # e.g. the database stayed locked: log, wait, carry on
                log.exception("worker step failed; retrying")
                ran = False
            if not ran:
                stop.wait(poll_seconds)
