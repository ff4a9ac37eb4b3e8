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
from pathlib import Path
from typing import Any

import pydicom
import sqlite_utils

from appliance.analysis import analyze_series, artefact_dir, stored_record
from appliance.config import Settings
from appliance.inference.registry import Registry, shared_registry
from appliance.jobs import queue
from appliance.jobs.notify import sd_notify
from appliance.jobs.owner import WorkerLock, worker_alive
from appliance.outputs import outbox
from appliance.outputs.dicom_objects import write_outputs, write_report_object, write_reviewed_sr
from appliance.store.database import utcnow, write_transaction
from appliance.store.datadir import DataDirectory
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
        self.lock = WorkerLock(self.store.datadir)
        self.worker = self.lock.identity

    @property
    def destinations(self) -> tuple[outbox.Destination, ...]:
        """The PACS destinations of the settings in force (the worker replaces them when the file changes)."""
        return outbox.parse_destinations(self.settings.pacs_destinations)

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
        """Write the series' SR, key images and report, record them, and queue them for every PACS."""
        db, home = self.store.db, self.store.home
        paths = build_outputs(db, home, self.settings, job["series_instance_uid"], record)
        if self.destinations:
            outbox.enqueue(db, self.destinations, paths, home, job["series_instance_uid"])

    def _send_report(self, job: dict[str, Any]) -> None:
        """Send the study's report and the series' SR as they stand now (with their reviews) to every PACS."""
        series_uid, db, home = job["series_instance_uid"], self.store.db, self.store.home
        reference = series_instances(db, home, series_uid)[0]
        out_dir = artefact_dir(self.store, series_uid) / "dicom"
        paths = [write_report_object(reference, *report_pdf(db, home, self.settings, job["study_instance_uid"]),
                                     out_dir)]
        results = reviewed_results(db, job["study_instance_uid"], series_uid)
        if results:
            paths.insert(0, write_reviewed_sr(reference, results, out_dir))
        analysis = db.execute("SELECT id FROM analyses WHERE series_instance_uid = ? AND superseded = 0 "
                              "ORDER BY id DESC LIMIT 1", [series_uid]).fetchone()
        record_outputs(db, home, analysis[0] if analysis else None, series_uid, paths)
        if self.destinations:
            outbox.enqueue(db, self.destinations, paths, home, series_uid)
        log.info("job %d: report and SR of study %s written (%s)", job["id"], job["study_instance_uid"],
                 ", ".join(p.name for p in paths))

    def forward(self) -> None:
        """Send what waits in the outbox; a misbehaving PACS never stops analyses (rows stay queued)."""
        if not self.destinations:
            return
        try:
            outbox.forward(self.store.db, self.store.home, self.destinations, self.settings.dicom_ae_title,
                           self.settings.outbox_backoff_seconds, self.settings.pacs_max_attempts)
        except Exception:
            log.exception("outbox: sending failed; will retry")


# --- outputs of an analysis, and sending a study's again --------------------------------------------


def report_pdf(db: sqlite_utils.Database, home: Path, settings: Settings, study_uid: str) -> tuple[bytes, str]:
    """The study's PDF report as it stands now, in the site's language, and its title."""
    from appliance.outputs import report
    from appliance.store.studies import latest_reviews, study

    doc = study(db, study_uid)
    if doc is None:
        raise LookupError(f"study {study_uid} is not in the store")
    _ = report.translations(settings.web_language)
    pdf = report.render_pdf(doc, latest_reviews(doc["reviews"]), settings.site_name, _,
                            report.key_image_finder(home))
    return pdf, _("CT screening report")


def reviewed_results(db: sqlite_utils.Database, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
    """The series' current results with their review state, as the study page shows them."""
    from appliance.store.studies import study

    doc = study(db, study_uid) or {"series": []}
    return next((s["results"] for s in doc["series"] if s["series_instance_uid"] == series_uid), [])


def record_outputs(db: sqlite_utils.Database, home: Path, analysis_id: int | None, series_uid: str,
                   paths: list[Path]) -> None:
    """Remember which DICOM objects an analysis produced (sent to a PACS or not), to send them again later."""
    study = db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid = ?", [series_uid]).fetchone()
    heads = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in paths]
    with write_transaction(db):
        for path, head in heads:
            db.table("outputs").insert({
                "analysis_id": analysis_id, "study_instance_uid": study[0] if study else None,
                "series_instance_uid": series_uid, "modality": str(head.get("Modality", "")),
                "path": str(path.relative_to(home)), "sop_instance_uid": str(head.SOPInstanceUID),
                "created_at": utcnow()})


def build_outputs(db: sqlite_utils.Database, home: Path, settings: Settings, series_uid: str,
                  record: dict[str, Any]) -> list[Path]:
    """Write the SR, key images and report of an analysed series and record them; returns their paths."""
    images = series_instances(db, home, series_uid)
    out_dir = DataDirectory(home).series_artefacts(images[0].study_instance_uid, series_uid) / "dicom"
    paths = write_outputs(record, images, out_dir, home=home,
                          report_pdf=report_pdf(db, home, settings, images[0].study_instance_uid))
    record_outputs(db, home, record.get("analysis_id"), series_uid, paths)
    return paths


def current_outputs(db: sqlite_utils.Database, home: Path, settings: Settings, study_uid: str) -> dict[str, list[Path]]:
    """Series UID -> the objects of its current analysis: SR and key images, and the latest report.

    An analysis whose objects were never recorded (made before they were, or never built) has them built now.
    """
    out: dict[str, list[Path]] = {}
    analyses = db.execute("SELECT id, series_instance_uid FROM analyses WHERE study_instance_uid = ? "
                          "AND superseded = 0 AND status = ? ORDER BY id",
                          [study_uid, SeriesStatus.ANALYZED.value]).fetchall()
    for analysis_id, series_uid in analyses:
        rows = db.execute("SELECT modality, path FROM outputs WHERE analysis_id = ? ORDER BY id",
                          [analysis_id]).fetchall()
        rows = [(m, p) for m, p in rows if (home / p).is_file()]
        if not rows:
            build_outputs(db, home, settings, series_uid, stored_record(db, analysis_id))
            rows = db.execute("SELECT modality, path FROM outputs WHERE analysis_id = ? ORDER BY id",
                              [analysis_id]).fetchall()
        reports = [p for m, p in rows if m == "DOC"]
        out[series_uid] = [home / p for m, p in rows if m != "DOC"] + [home / p for p in reports[-1:]]
    return out


def send_again(db: sqlite_utils.Database, home: Path, settings: Settings, study_uid: str) -> int:
    """Queue every output of the study's current analyses for every PACS destination, those sent or set
    aside before included (built first when missing); returns how many outbox rows were queued."""
    destinations = outbox.parse_destinations(settings.pacs_destinations)
    if not destinations:
        return 0
    return sum(outbox.enqueue(db, destinations, paths, home, series_uid, again=True)
               for series_uid, paths in current_outputs(db, home, settings, study_uid).items())
