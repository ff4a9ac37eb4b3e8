"""``appliance batch screen``: find every series of an archive, screen the ones not screened yet (local
worker processes or a Ray cluster), and write the results table and the HTML summary."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.batch import results
from appliance.batch.discover import Discovery, SeriesTask, discover
from appliance.batch.pool import run_pool
from appliance.batch.task import fault_from_environment
from appliance.config import Settings
from appliance.durable import write_bytes_durably
from appliance.errors import ApplianceError
from appliance.store.instances import open_store

HOME = "home"  # the run's own data directory under DIR: the archive's images, imported once
SCRATCH = "scratch"  # per-series scratch data directories of the local workers
WORKER_MEMORY_BYTES = int(1.5 * 1024**3)  # one 600-slice volume with its working copies and the models


class OutNotEmpty(ApplianceError):
    """DIR holds something other than a screening run, or a run the user did not ask to resume."""


@dataclasses.dataclass
class BatchOptions:
    """How to run: ``workers`` local processes (0: sized from free memory), or ``ray`` (an address or ``auto``)."""

    workers: int = 0
    ray: str | None = None
    resume: bool = False
    retries: int = 2
    series_timeout: float = 600.0
    gpus_per_task: float = 0.0


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (free pages elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_workers(free_bytes: int | None = None, cpus: int | None = None) -> int:
    """One worker per CPU, as many as free memory holds one volume each for; at least one."""
    free = available_memory_bytes() if free_bytes is None else free_bytes
    return max(1, min(cpus or os.cpu_count() or 1, free // WORKER_MEMORY_BYTES))


def _check_out(out: Path, resume: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / HOME).is_dir():
        raise OutNotEmpty(f"OUT_NOT_EMPTY: {out} holds other files; screen into an empty or new folder.")
    if not resume:
        raise OutNotEmpty(f"OUT_NOT_EMPTY: {out} holds an earlier screening run; add --resume to continue it "
                          "(series already screened with the same images and model packs are skipped).")


def screen_archive(source: Path, out: Path, settings: Settings, options: BatchOptions,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Screen every series under ``source`` into ``out``; returns the run's summary (also in summary.html).

    ``progress(stage, done, total)`` is called as entries are imported and as series come back.
    """
    _check_out(out, options.resume)
    out.mkdir(parents=True, exist_ok=True)
    home = out / HOME
    local = dataclasses.replace(settings, home=str(home), pacs_destinations="")
    started = time.monotonic()
    store = open_store(local)
    found = _discover(store, source, local, progress)
    earlier = results.load_records(out)
    todo = [t for t in found.tasks if not results.already_screened(t, earlier)]
    screened = [0]

    def done(task: SeriesTask, record: dict[str, Any], attempts: int) -> None:
        results.save_record(out, task, record, attempts)
        screened[0] += 1
        if progress is not None:
            progress("screen", screened[0], len(todo))

    imported = time.monotonic()
    runner = _run(todo, local, done, out, options)
    seconds = time.monotonic() - imported
    records = results.load_records(out)
    table = results.rows(records[t.series_instance_uid] for t in found.tasks if t.series_instance_uid in records)
    run = {"source": str(source), "out": str(out), "series": len(found.tasks), "screened": screened[0],
           "skipped": len(found.tasks) - len(todo), "refused_files": len(found.refused), "runner": runner,
           "import_seconds": round(imported - started, 2), "seconds": round(seconds, 2),
           "series_per_minute": round(60 * screened[0] / seconds, 2) if seconds else 0.0,
           "rows": len(table), "counts": results.summary_counts(table)}
    _write(out, table, found, run)
    return run


def _discover(store: Any, source: Path, settings: Settings,
              progress: Callable[[str, int, int], None] | None) -> Discovery:
    from appliance.batch.discover import entries

    total, seen = len(entries(source)), [0]

    def step(_entry: Path) -> None:
        seen[0] += 1
        if progress is not None:
            progress("import", seen[0], total)
    return discover(store, source, settings, step)


def _run(todo: list[SeriesTask], settings: Settings, done: Callable[[SeriesTask, dict[str, Any], int], None],
         out: Path, options: BatchOptions) -> str:
    """Screen ``todo``; returns what ran it, in words."""
    fault = fault_from_environment()
    if options.ray:
        from appliance.batch.cluster import run_ray

        cpus = run_ray(todo, settings, done, address=options.ray, retries=options.retries,
                       series_timeout=options.series_timeout, gpus_per_task=options.gpus_per_task, fault=fault)
        return f"Ray cluster {options.ray} ({cpus} CPUs)"
    workers = options.workers if options.workers > 0 else default_workers()
    scratch = out / SCRATCH
    scratch.mkdir(exist_ok=True)
    try:
        run_pool(todo, settings, done, workers=workers, retries=options.retries,
                 series_timeout=options.series_timeout, scratch_root=str(scratch), fault=fault)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return f"{workers} local worker process(es)"


def _write(out: Path, table: list[dict[str, Any]], found: Discovery, run: dict[str, Any]) -> None:
    results.write_csv(out / results.CSV_NAME, table)
    run["parquet"] = results.write_parquet(out / results.PARQUET_NAME, table)
    write_bytes_durably(json.dumps(found.refused, indent=1).encode(), out / results.REFUSED_NAME)
    results.write_summary(out / results.SUMMARY_NAME, table, found.refused, run)
