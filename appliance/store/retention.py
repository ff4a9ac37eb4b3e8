"""Retention: which series' images may go, and the purge that removes the oldest of them first.

A series' instances (the files as received) are *eligible* for purging only when all of these hold:

- it was analysed: its status is ``analyzed``, a current (not superseded) analysis exists and no analysis
  or report job of it is queued or running;
- its results were sent: every output of the current analysis (``outputs``) has an outbox row in state
  ``sent`` for every destination in ``pacs_destinations``. With no PACS configured there is nothing to
  send and the condition holds; with a PACS configured, an analysis with no outputs, an output still
  queued, set aside or discarded keeps the images;
- its month was exported: a monthly export of the study's month (``studies.created_at``, as the export
  groups studies) finished after the current analysis was made (``exports`` rows in state ``done``);
- ``retention_days`` have passed since the last of those three moments (analysed, last sent, exported).

The purge runs only when ``retention_days`` is above 0 and free space is below the purge target
(:func:`purge_target_bytes`); it removes eligible series, the one eligible longest first, until free space
is back above the target. Results, reports, key images, overlays, viewer frames, outputs and the audit
log stay; the reduced viewer volume (``volume-int16.npy``) goes with the instances. The instance rows are
deleted (a series sent again is stored and analysed anew) and the series row keeps ``purged_at``,
``purged_instances`` and ``purged_bytes``. Rows first, in one transaction with the audit row, then the
files: a crash in between leaves files without rows, which crash recovery removes.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.config import Settings
from appliance.store.database import audit, write_transaction
from appliance.store.datadir import DataDirectory

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# the web's reduced volume for coronal and sagittal planes (pipelines.viewer_volume, a layer above), and the
# geometry the web writes beside it for series analysed before it was kept: cut from the instances, they go too
VIEWER_VOLUME_FILES = ("volume-int16.npy", "volume-int16.json")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One series whose images may be purged, and since when (ISO 8601 UTC)."""

    series_instance_uid: str
    study_instance_uid: str
    eligible_since: str
    instances: int
    size_bytes: int


@dataclasses.dataclass
class PurgeReport:
    """What a purge did (or, ``dry_run``, would do)."""

    dry_run: bool
    free_before: int
    target: int
    free_after: int
    purged: list[Candidate] = dataclasses.field(default_factory=list)
    skipped_reason: str = ""

    @property
    def bytes_freed(self) -> int:
        return sum(c.size_bytes for c in self.purged)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "free_before_bytes": self.free_before, "target_bytes": self.target,
                "free_after_bytes": self.free_after, "bytes_freed": self.bytes_freed,
                "series_purged": len(self.purged), "instances_purged": sum(c.instances for c in self.purged),
                "skipped_reason": self.skipped_reason,
                "series": [dataclasses.asdict(c) for c in self.purged]}


def purge_target_bytes(settings: Settings) -> int:
    """Free space (bytes) the purge brings the data directory back to: ``purge_free_target_mb``, or twice
    ``disk_low_watermark_mb`` when it is unset or not above the watermark."""
    target = settings.purge_free_target_mb
    if target <= settings.disk_low_watermark_mb:
        target = 2 * settings.disk_low_watermark_mb
    return target * MIB


def disk_free_bytes(home: Path) -> Callable[[], int]:
    """Free space of the file system holding ``home``, in bytes, measured at each call."""
    return lambda: shutil.disk_usage(home).free


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _sent_clause(destinations: tuple[str, ...]) -> tuple[str, str, list[str]]:
    """A CTE naming the destinations, and SQL (over ``a``, the current analysis) that holds when every output
    of it went to every destination; vacuously true with none."""
    if not destinations:
        return "", "1", []
    marks = ", ".join("(?)" for _ in destinations)
    return (f"WITH dest(name) AS (VALUES {marks}) ",
            """EXISTS (SELECT 1 FROM outputs o WHERE o.analysis_id = a.id)
        AND NOT EXISTS (SELECT 1 FROM outputs o CROSS JOIN dest d WHERE o.analysis_id = a.id
          AND NOT EXISTS (SELECT 1 FROM outbox ob WHERE ob.sop_instance_uid = o.sop_instance_uid
                          AND ob.destination = d.name AND ob.state = 'sent'))""", list(destinations))


# the first export of the study's month (as the export groups studies: by studies.created_at) made after the
# current analysis
_EXPORTED_SQL = """SELECT min(e.finished_at) FROM exports e WHERE e.state = 'done'
  AND e.month = substr(st.created_at, 1, 7) AND e.finished_at >= a.created_at"""


def candidates(db: sqlite_utils.Database, destinations: tuple[str, ...], retention_days: int,
               now: datetime.datetime) -> list[Candidate]:
    """Every series eligible for purging at ``now`` (see the module docstring), the longest eligible first.

    ``destinations`` are the PACS destinations as the outbox names them (``AE@host:port``).
    """
    cte, sent, params = _sent_clause(destinations)
    cutoff = _iso(now - datetime.timedelta(days=retention_days))
    sql = f"""{cte}SELECT s.series_instance_uid, s.study_instance_uid, max(a.created_at,
        coalesce((SELECT max(ob.sent_at) FROM outbox ob WHERE ob.series_instance_uid = s.series_instance_uid
                  AND ob.state = 'sent'), ''), ({_EXPORTED_SQL})) AS since,
        (SELECT count(*) FROM instances i WHERE i.series_instance_uid = s.series_instance_uid),
        (SELECT coalesce(sum(i.size_bytes), 0) FROM instances i WHERE i.series_instance_uid = s.series_instance_uid)
      FROM series s JOIN studies st ON st.study_instance_uid = s.study_instance_uid
      JOIN analyses a ON a.series_instance_uid = s.series_instance_uid AND a.superseded = 0
      WHERE s.status = 'analyzed' AND s.purged_at IS NULL
        AND EXISTS (SELECT 1 FROM instances i WHERE i.series_instance_uid = s.series_instance_uid)
        AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = s.series_instance_uid
                        AND j.state IN ('queued', 'running'))
        AND ({_EXPORTED_SQL}) IS NOT NULL
        AND {sent}
      GROUP BY s.series_instance_uid HAVING since <= ? ORDER BY since, s.last_received_at"""  # nosec B608 - fixed SQL text; values bound
    rows = db.execute(sql, [*params, cutoff]).fetchall()
    return [Candidate(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]


def _files(db: sqlite_utils.Database, ddir: DataDirectory, candidate: Candidate) -> Iterator[Path]:
    for (stored,) in db.execute("SELECT path FROM instances WHERE series_instance_uid = ?",
                                [candidate.series_instance_uid]).fetchall():
        path = ddir.resolve(stored, inside=ddir.instances)
        if path is not None:
            yield path
    folder = ddir.series_artefacts(candidate.study_instance_uid, candidate.series_instance_uid)
    yield from (folder / name for name in VIEWER_VOLUME_FILES)


def purge_series(db: sqlite_utils.Database, ddir: DataDirectory, candidate: Candidate, *, actor: str,
                 now: datetime.datetime, reason: str) -> None:
    """Remove one eligible series' instances: rows, series mark and audit row in one transaction, then files."""
    files = list(_files(db, ddir, candidate))
    with write_transaction(db):
        db.execute("DELETE FROM instances WHERE series_instance_uid = ?", [candidate.series_instance_uid])
        db.execute("UPDATE series SET purged_at = ?, purged_instances = ?, purged_bytes = ?, instance_count = 0 "
                   "WHERE series_instance_uid = ?", [_iso(now), candidate.instances, candidate.size_bytes,
                                                    candidate.series_instance_uid])
        audit(db, actor, "images_purged", candidate.series_instance_uid, study=candidate.study_instance_uid,
              instances=candidate.instances, bytes=candidate.size_bytes, eligible_since=candidate.eligible_since,
              reason=reason)
    for path in files:
        path.unlink(missing_ok=True)
    for folder in {p.parent for p in files[:-len(VIEWER_VOLUME_FILES)]}:
        _remove_empty(folder, ddir.instances)


def _remove_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def purge(db: sqlite_utils.Database, settings: Settings, *, destinations: tuple[str, ...],
          free_bytes: Callable[[], int] | None = None,
          now: datetime.datetime | None = None, dry_run: bool = False, actor: str = "retention") -> PurgeReport:
    """Purge eligible series, longest eligible first, while free space is below the purge target.

    ``destinations`` are the PACS destinations as the outbox names them. ``free_bytes`` measures free
    space (bytes; default: the data directory's file system) and is asked again after each series, so a
    simulated disk can stand in for the real one. ``dry_run`` lists what would go and deletes nothing (free
    space then counts up by the sizes recorded for the instances).
    """
    ddir = DataDirectory(settings.home_path)
    measure = free_bytes or disk_free_bytes(settings.home_path)
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    target, free = purge_target_bytes(settings), measure()
    report = PurgeReport(dry_run, free, target, free)
    if settings.retention_days <= 0:
        report.skipped_reason = "RETENTION_OFF: retention_days is 0, images are kept for ever"
        return report
    if free >= target:
        report.skipped_reason = "ENOUGH_SPACE: free space is above purge_free_target_mb"
        return report
    reason = f"free space {free // MIB} MiB below the purge target {target // MIB} MiB"
    for candidate in candidates(db, destinations, settings.retention_days, moment):
        if free >= target:
            break
        if not dry_run:
            purge_series(db, ddir, candidate, actor=actor, now=moment, reason=reason)
            free = measure()
        else:
            free += candidate.size_bytes
        report.purged.append(candidate)
    report.free_after = free
    if free < target and not report.skipped_reason:
        report.skipped_reason = ("NOTHING_ELIGIBLE: free space stays below the purge target; the rest of the images "
                                 "are not yet analysed, sent, exported or past retention_days")
    return report
