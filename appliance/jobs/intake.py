"""Every way in ends the same: store the instances, queue their series; ``analyze`` then runs those jobs here.

``appliance import``, USB, the drop folder, the first-start sample and ``appliance analyze`` call
:func:`import_and_queue`; the browser upload and the receiver queue through :mod:`appliance.jobs.queue`
themselves (an upload once its last batch is in, the receiver's series once quiet). Analysis and
publishing happen only in :class:`appliance.jobs.runner.JobRunner`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.analysis import stored_record
from appliance.config import Settings
from appliance.errors import NothingUsable
from appliance.ingest.importer import ImportSummary, import_paths
from appliance.jobs import queue
from appliance.jobs.runner import JobRunner
from appliance.store.instances import InstanceStore, open_store

JOB_FAILED = "ANALYSIS_FAILED"


@dataclasses.dataclass
class Intake:
    """What one import stored and the jobs it queued."""

    summary: ImportSummary
    job_ids: list[int]


def import_and_queue(store: InstanceStore, paths: Iterable[Path], settings: Settings, *, source: str = "import",
                     progress: Callable[[ImportSummary], None] | None = None, priority: int = 1) -> Intake:
    """Import files, folders and zip archives; queue every series they touched (an explicit import is complete).

    Bad files are quarantined and the import goes on. Raises :class:`~appliance.errors.DiskLow` when free
    space falls below ``disk_low_watermark_mb``: the files stored until then stay stored, and their series
    are queued by the worker once quiet, like any received series (or by importing again once space is freed).
    """
    summary = import_paths(store, paths, settings, source=source, progress=progress)
    return Intake(summary, queue.enqueue_many(store.db, summary.series, priority=priority))


def analyze_paths(paths: Iterable[Path], settings: Settings,
                  progress: Callable[[ImportSummary], None] | None = None) -> dict[str, Any]:
    """``appliance analyze``: import ``paths``, then run their jobs to the end in this process with the
    job runner (analyse and publish), and return the ``--json`` document.

    Raises :class:`NothingUsable` when no DICOM instance was found, :class:`~appliance.errors.DiskLow` when
    the disk fills below its watermark (nothing is analysed then).
    """
    store = open_store(settings)
    intake = import_and_queue(store, paths, settings, source="analyze", progress=progress)
    if not intake.summary.series:
        raise NothingUsable(f"no DICOM images found ({len(intake.summary.quarantined)} file(s) quarantined)")
    runner = JobRunner(settings, store)
    try:
        runner.run_until_done(intake.job_ids)
        runner.forward()
    finally:
        runner.close()
    studies: dict[str, list[dict[str, Any]]] = {}
    for job_id in intake.job_ids:
        job = store.db.table("jobs").get(job_id)
        studies.setdefault(job["study_instance_uid"], []).append(_job_record(store, job))
    return {"import": intake.summary.as_dict(),
            "studies": [{"study_instance_uid": uid, "series": series} for uid, series in studies.items()]}


def _job_record(store: InstanceStore, job: dict[str, Any]) -> dict[str, Any]:
    """The analysis a job saved, or why it has none (it failed; the worker retries it later)."""
    if job["analysis_id"]:
        return stored_record(store.db, job["analysis_id"])
    slices = store.db.execute("SELECT count(*) FROM instances WHERE series_instance_uid = ?",
                              [job["series_instance_uid"]]).fetchone()[0]
    return {"series_instance_uid": job["series_instance_uid"], "status": "failed", "reason_code": JOB_FAILED,
            "reason": f"The analysis failed and will be retried: {job['error'] or 'unknown error'}",
            "slices": slices, "shape_zyx": None, "spacing_mm_zyx": None, "problems": [], "excluded": [],
            "results": [], "seconds": {"load": 0.0, "preprocess": 0.0, "infer": 0.0, "total": 0.0}}

