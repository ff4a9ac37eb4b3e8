"""Screen one series in a worker process: the same import, job runner, packs and reason codes as
``appliance analyze``, in a scratch data directory of its own (removed afterwards), sending nothing anywhere.

The task is a pure function of its inputs, so it can run again after its worker died (a local pool or a Ray
cluster retries it); it returns the series record ``appliance analyze --json`` gives, with the task's times.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.batch.discover import SeriesTask
from appliance.config import Settings
from appliance.errors import ApplianceError, NothingUsable
from appliance.store import datadir

# Fault injection for the crash-safety tests and drills: ``SERIES_UID_SUFFIX:ONCE_MARKER_PATH`` makes the
# worker exit abruptly (os._exit, as a killed process) on that series, the first time only when the marker
# file does not exist yet (it is created), or every time when the marker part is ``always``.
FAULT_VARIABLE = "APPLIANCE_BATCH_FAULT"
CRASH_EXIT = 70
TASK_FAILED = "ANALYSIS_FAILED"
NOTHING_USABLE = "NOTHING_USABLE"


def fault_from_environment() -> str:
    """The driver's fault setting, passed to every task (a Ray worker does not share the driver's environment)."""
    return os.environ.get(FAULT_VARIABLE, "")


def _maybe_crash(series_uid: str, fault: str) -> None:
    suffix, _, marker = fault.partition(":")
    if not suffix or not series_uid.endswith(suffix):
        return
    if marker == "always":
        os._exit(CRASH_EXIT)
    if marker and not os.path.exists(marker):
        Path(marker).write_text(f"crashed once on {series_uid} in process {os.getpid()}\n")
        os._exit(CRASH_EXIT)


def screen_series(task: SeriesTask, settings: Settings, scratch_root: str | None = None,
                  fault: str = "") -> dict[str, Any]:
    """Import the series' files into a scratch data directory and run its job there; returns the series record
    (``status``, ``reason_code``, ``results`` ...) with ``task_seconds``, the ``worker`` (host:pid) and its
    peak memory so far (``worker_peak_mib``)."""
    _maybe_crash(task.series_instance_uid, fault)
    from appliance.jobs.intake import analyze_paths

    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="appliance-batch-", dir=scratch_root))
    home = scratch / "home"
    local = dataclasses.replace(settings, home=str(home), pacs_destinations="")
    try:
        doc = analyze_paths([Path(f) for f in task.files], local)
        record = _series_record(doc, task.series_instance_uid)
    except NothingUsable as exc:  # the files changed or vanished since the archive was read
        record = failed_record(task.series_instance_uid, NOTHING_USABLE, str(exc))
    except ApplianceError as exc:  # disk low in the scratch folder
        record = failed_record(task.series_instance_uid, getattr(exc, "reason_code", TASK_FAILED), str(exc))
    except Exception as exc:  # any other failure is this series', recorded with its reason, never the run's
        record = failed_record(task.series_instance_uid, TASK_FAILED, f"The analysis failed: {exc!r}")
    finally:
        datadir.release_writer_lock(datadir.DataDirectory(home))
        shutil.rmtree(scratch, ignore_errors=True)
    record["task_seconds"] = round(time.monotonic() - started, 3)
    record["worker"] = f"{os.uname().nodename}:{os.getpid()}"
    record["worker_peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return record


def _series_record(doc: dict[str, Any], series_uid: str) -> dict[str, Any]:
    for study in doc["studies"]:
        for series in study["series"]:
            if series["series_instance_uid"] == series_uid:
                return dict(series)
    return failed_record(series_uid, TASK_FAILED, "The series' files were read but the series was not found in them.")


def failed_record(series_uid: str, reason_code: str, reason: str) -> dict[str, Any]:
    """The record of a series that could not be screened (its worker crashed, it ran out of time ...)."""
    code = getattr(reason_code, "value", reason_code)
    return {"series_instance_uid": series_uid, "status": "failed", "reason_code": str(code), "reason": reason,
            "slices": None, "shape_zyx": None, "spacing_mm_zyx": None, "problems": [], "excluded": [],
            "results": [], "seconds": {"total": 0.0}}
