"""The purge job: retention (``store.retention``) against the PACS destinations and free space in force.

Run by ``appliance purge`` (the ``appliance-purge.timer``, daily) and by the worker whenever free space
falls below the purge target (checked every :data:`CHECK_SECONDS`), so it starts well before the
receiver's refusal watermark.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import time
from collections.abc import Callable

import sqlite_utils

from appliance.config import Settings
from appliance.outputs.outbox import parse_destinations
from appliance.store import retention

log = logging.getLogger(__name__)

CHECK_SECONDS = 60.0  # how often the worker measures free space against the purge target


def run_purge(db: sqlite_utils.Database, settings: Settings, *, free_bytes: Callable[[], int] | None = None,
              now: datetime.datetime | None = None, dry_run: bool = False,
              actor: str = "retention") -> retention.PurgeReport:
    """Purge what retention allows (see :func:`appliance.store.retention.purge`); a ``pacs_destinations``
    that does not parse keeps every image (nothing can be known to be sent)."""
    try:
        names = tuple(str(d) for d in parse_destinations(settings.pacs_destinations))
    except ValueError as exc:
        measure = free_bytes or retention.disk_free_bytes(settings.home_path)
        free = measure()
        report = retention.PurgeReport(dry_run, free, retention.purge_target_bytes(settings), free)
        report.skipped_reason = f"BAD_DESTINATIONS: {exc}; nothing is purged"
        return report
    report = retention.purge(db, settings, destinations=names, free_bytes=free_bytes, now=now, dry_run=dry_run,
                             actor=actor)
    if report.purged and not dry_run:
        log.info("purge: %d series' images removed (%d MiB), free space now %d MiB", len(report.purged),
                 report.bytes_freed // retention.MIB, report.free_after // retention.MIB)
    return report


class PurgeWhenLow:
    """For the worker's loop: measure free space at most every :data:`CHECK_SECONDS` and purge when it is
    below the purge target."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last = float("-inf")

    def __call__(self, db: sqlite_utils.Database, settings: Settings) -> retention.PurgeReport | None:
        if settings.retention_days <= 0 or self.clock() - self.last < CHECK_SECONDS:
            return None
        self.last = self.clock()
        if shutil.disk_usage(settings.home_path).free >= retention.purge_target_bytes(settings):
            return None
        return run_purge(db, settings, actor="worker")
