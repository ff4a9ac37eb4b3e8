"""Retention under steady load, on a simulated clock and a small modelled disk.

Every simulated day ``studies_per_day`` studies arrive (one CT series of ``instances_per_series`` real files
of ``instance_bytes`` each, rows as the store keeps them), are analysed (an analysis, a done job, one SR
output) and sent to the PACS (outbox rows ``sent``); a few series are rejected (never analysed), the PACS is
down some days (rows wait, sent later) and refuses a few objects for good (set aside). The monthly export
of the previous month is recorded on the 1st (one month late now and then, as when nobody plugged in the
stick). The purge runs after each day's arrivals, as the worker does when free space falls below the purge
target, and its timer runs it again at night. Free space is the modelled disk's capacity less the bytes of
the stored instances (``free_bytes``), the function the purge measures.

Afterwards every purged series is checked against the rules with the database's own record: analysed, every
output sent before the purge, its month exported after its analysis and before the purge, and at least
``retention_days`` between then and the purge; the files on disk must be exactly those still indexed.

    python bench/retention_sim.py                      # two years, 40 studies a day
    python bench/retention_sim.py --days 90 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from appliance import config
from appliance.jobs.purge import run_purge
from appliance.store import retention
from appliance.store.database import open_database, write_transaction
from appliance.store.datadir import DataDirectory

MIB = retention.MIB
DESTINATION = "PACS@192.0.2.10:104"
START = datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class SimResult:
    days: int
    studies: int
    series_purged: int
    min_free_bytes: int
    watermark_bytes: int
    target_bytes: int
    capacity_bytes: int
    violations: list[str]
    stored_bytes_end: int
    files_on_disk_bytes: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _uid(*parts: int) -> str:
    return "2.25." + ".".join(str(p) for p in parts)


class Site:
    """A data directory fed with rows and files as the store, the job runner, the outbox and the export write
    them, on a simulated clock."""

    def __init__(self, home: Path, settings: config.Settings, *, instances_per_series: int, instance_bytes: int,
                 capacity: int, seed: int):
        self.home, self.settings = home, settings
        self.ddir = DataDirectory(home)
        self.db = open_database(home, durable=False)
        self.per_series, self.instance_bytes, self.capacity = instances_per_series, instance_bytes, capacity
        self.rng = random.Random(seed)
        self.payload = os.urandom(instance_bytes)
        self.counter = 0
        self.waiting: list[int] = []  # outbox rows held by a PACS outage

    def stored_bytes(self) -> int:
        return int(self.db.execute("SELECT coalesce(sum(size_bytes), 0) FROM instances").fetchone()[0])

    def free_bytes(self) -> int:
        return self.capacity - self.stored_bytes()

    def _study(self, moment: datetime.datetime, pacs_down: bool) -> None:
        self.counter += 1
        n = self.counter
        study, series = _uid(1, n), _uid(2, n)
        db, at = self.db, _iso(moment)
        db.table("patients").insert({"patient_key": f"P{n}", "patient_id": f"P{n}", "patient_name": f"SIM^{n}"})
        db.table("studies").insert({"study_instance_uid": study, "patient_key": f"P{n}", "created_at": at,
                                    "updated_at": at, "study_date": moment.strftime("%Y%m%d")})
        rejected = self.rng.random() < 0.02
        db.table("series").insert({"series_instance_uid": series, "study_instance_uid": study, "modality": "CT",
                                   "instance_count": self.per_series, "last_received_at": at, "updated_at": at,
                                   "status": "rejected" if rejected else "analyzed",
                                   "reason_code": "TOO_FEW_SLICES" if rejected else None})
        folder = self.ddir.instances / study / series
        folder.mkdir(parents=True)
        rows = []
        for k in range(self.per_series):
            path = folder / f"{_uid(3, n, k)}.dcm"
            path.write_bytes(self.payload)
            rows.append({"sop_instance_uid": _uid(3, n, k), "series_instance_uid": series,
                         "study_instance_uid": study, "path": self.ddir.relative(path),
                         "size_bytes": self.instance_bytes, "source": "dicom", "received_at": at})
        db.table("instances").insert_all(rows)
        if rejected:
            return
        done = _iso(moment + datetime.timedelta(minutes=5))
        analysis = db.table("analyses").insert({"series_instance_uid": series, "study_instance_uid": study,
                                                "status": "analyzed", "created_at": done, "superseded": 0}).last_pk
        db.table("jobs").insert({"kind": "analyze", "study_instance_uid": study, "series_instance_uid": series,
                                 "state": "done", "analysis_id": analysis, "created_at": at, "updated_at": done})
        sop = _uid(4, n)
        db.table("outputs").insert({"analysis_id": analysis, "study_instance_uid": study,
                                    "series_instance_uid": series, "modality": "SR", "sop_instance_uid": sop,
                                    "path": f"artefacts/{study}/{series}/dicom/sr-{sop}.dcm", "created_at": done})
        refused = self.rng.random() < 0.005
        state = "set_aside" if refused else ("queued" if pacs_down else "sent")
        row = db.table("outbox").insert({"destination": DESTINATION, "path": "", "sop_instance_uid": sop,
                                         "series_instance_uid": series, "state": state, "attempts": 1,
                                         "created_at": done, "sent_at": done if state == "sent" else None}).last_pk
        if state == "queued":
            self.waiting.append(int(row))

    def day(self, moment: datetime.datetime, studies: int, pacs_down: bool) -> None:
        with write_transaction(self.db):
            if not pacs_down and self.waiting:  # the PACS is back: what waited is sent
                marks = ",".join("?" * len(self.waiting))
                self.db.execute(f"UPDATE outbox SET state = 'sent', sent_at = ? WHERE id IN ({marks})",  # nosec B608
                                [_iso(moment), *self.waiting])
                self.waiting.clear()
            for k in range(studies):
                self._study(moment + datetime.timedelta(minutes=15 * k), pacs_down)

    def export(self, month: str, moment: datetime.datetime) -> None:
        with write_transaction(self.db):
            self.db.table("exports").insert({"month": month, "revision": 1, "state": "done", "started_at": _iso(moment),
                                             "finished_at": _iso(moment + datetime.timedelta(minutes=1))})

    def purge(self, moment: datetime.datetime) -> int:
        return len(run_purge(self.db, self.settings, free_bytes=self.free_bytes, now=moment).purged)


def _previous_month(day: datetime.datetime) -> str:
    last = day - datetime.timedelta(days=1)
    return f"{last.year:04d}-{last.month:02d}"


def violations(db, retention_days: int) -> list[str]:
    """Every purged series that broke a rule, in words (empty when none did)."""
    found = []
    for series, status, purged_at, analysed_at, month in db.execute(
            "SELECT s.series_instance_uid, s.status, s.purged_at, a.created_at, substr(st.created_at, 1, 7) "
            "FROM series s JOIN studies st USING (study_instance_uid) LEFT JOIN analyses a ON "
            "a.series_instance_uid = s.series_instance_uid AND a.superseded = 0 WHERE s.purged_at IS NOT NULL"):
        if status != "analyzed" or analysed_at is None:
            found.append(f"{series}: purged but not analysed")
            continue
        unsent = db.execute("SELECT count(*) FROM outbox WHERE series_instance_uid = ? AND (state != 'sent' "
                            "OR sent_at > ?)", [series, purged_at]).fetchone()[0]
        if unsent:
            found.append(f"{series}: purged before its results were sent")
        exported = db.execute("SELECT min(finished_at) FROM exports WHERE state = 'done' AND month = ? AND "
                              "finished_at >= ? AND finished_at <= ?", [month, analysed_at, purged_at]).fetchone()[0]
        if exported is None:
            found.append(f"{series}: purged before its month {month} was exported")
            continue
        last_sent = db.execute("SELECT max(sent_at) FROM outbox WHERE series_instance_uid = ?", [series]).fetchone()[0]
        since = max(analysed_at, exported, last_sent or "")
        held = datetime.datetime.fromisoformat(purged_at) - datetime.datetime.fromisoformat(since)
        if held < datetime.timedelta(days=retention_days):
            found.append(f"{series}: purged {held} after it became eligible, under {retention_days} days")
    return found


def _disk_bytes(instances: Path) -> int:
    return sum(p.stat().st_size for p in instances.rglob("*.dcm"))


def simulate(home: Path, *, days: int = 730, studies_per_day: int = 40, retention_days: int = 30,
             instances_per_series: int = 2, instance_bytes: int = 16 * 1024, capacity_mb: int = 120,
             watermark_mb: int = 8, target_mb: int = 16, seed: int = 1) -> SimResult:
    """Run the simulation in ``home`` (an empty folder) and return what it measured."""
    started = time.monotonic()
    settings = config.load(environ={}, home=str(home), retention_days=retention_days,
                           disk_low_watermark_mb=watermark_mb, purge_free_target_mb=target_mb,
                           pacs_destinations=DESTINATION)
    site = Site(home, settings, instances_per_series=instances_per_series, instance_bytes=instance_bytes,
                capacity=capacity_mb * MIB, seed=seed)
    rng = random.Random(seed + 1)
    min_free, purged, outage = site.free_bytes(), 0, 0
    pending: tuple[str, datetime.datetime] | None = None  # the month to export, and when it is done
    for d in range(days):
        morning = START + datetime.timedelta(days=d, hours=7)
        if morning.day == 1:
            late = rng.random() < 0.15  # nobody exported on the 1st this month: done ten days later
            pending = (_previous_month(morning), morning + datetime.timedelta(days=10 if late else 0, hours=-5))
        if pending and pending[1] <= morning:
            site.export(*pending)
            pending = None
        if outage == 0 and rng.random() < 0.03:
            outage = rng.randint(1, 5)  # the PACS is down for a few days
        site.day(morning, studies_per_day, pacs_down=outage > 0)
        outage = max(0, outage - 1)
        min_free = min(min_free, site.free_bytes())
        purged += site.purge(morning + datetime.timedelta(hours=11))  # the worker: free space below the target
        purged += site.purge(morning + datetime.timedelta(hours=20))  # the nightly timer
        min_free = min(min_free, site.free_bytes())
    return SimResult(days=days, studies=site.counter, series_purged=purged, min_free_bytes=min_free,
                     watermark_bytes=watermark_mb * MIB, target_bytes=settings.purge_free_target_mb * MIB,
                     capacity_bytes=capacity_mb * MIB, violations=violations(site.db, retention_days),
                     stored_bytes_end=site.stored_bytes(), files_on_disk_bytes=_disk_bytes(site.ddir.instances),
                     seconds=round(time.monotonic() - started, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--studies-per-day", type=int, default=40)
    parser.add_argument("--retention-days", type=int, default=30)
    parser.add_argument("--capacity-mb", type=int, default=120)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate(Path(tmp) / "home", days=args.days, studies_per_day=args.studies_per_day,
                          retention_days=args.retention_days, capacity_mb=args.capacity_mb)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(f"{result.days} days, {result.studies} studies, {result.series_purged} series purged, "
              f"{result.seconds} s")
        print(f"free space: min {result.min_free_bytes / MIB:.1f} MiB; watermark {result.watermark_bytes / MIB:.0f} "
              f"MiB, purge target {result.target_bytes / MIB:.0f} MiB, disk {result.capacity_bytes / MIB:.0f} MiB")
        print(f"rules broken by a purge: {len(result.violations)}")
        for line in result.violations[:20]:
            print(f"  {line}")
    ok = result.min_free_bytes > result.watermark_bytes and not result.violations
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
