"""One record per screened series under ``DIR/series/`` (written durably as each comes back, so a stopped run
resumes), and what is made of them: the results table (CSV, and Parquet with ``appliance[scale]``) and the
HTML summary."""

from __future__ import annotations

import collections
import csv
import hashlib
import html
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from appliance.batch.discover import SeriesTask
from appliance.durable import write_bytes_durably

RECORDS = "series"
CSV_NAME = "results.csv"
PARQUET_NAME = "results.parquet"
SUMMARY_NAME = "summary.html"
REFUSED_NAME = "refused_files.json"  # not a CSV: a tool taking the first *.csv of DIR gets the results
STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #999;padding:2px 8px;text-align:left}</style></head><body>")
UID = re.compile(r"^[0-9][0-9.]{0,63}$")

# one row per series and model; a series without a model result (rejected, failed) has one row, model empty
COLUMNS = ("series_instance_uid", "study_instance_uid", "model", "model_version", "status", "reason_code",
           "reason", "flagged", "score", "threshold", "validated", "backend", "precision", "findings", "notice",
           "slices", "shape_zyx", "spacing_mm_zyx", "problems", "source", "content_sha256", "pack_versions",
           "attempts", "model_seconds", "series_seconds", "task_seconds", "worker", "worker_peak_mib")
# where and how fast a series ran: not part of its result (a run elsewhere gives the same rows but these)
TIMING_COLUMNS = ("model_seconds", "series_seconds", "task_seconds", "worker", "worker_peak_mib")


def record_path(out: Path, series_uid: str) -> Path:
    """Where a series' record lies: named by its UID, or by the UID's hash when it is not a plain UID."""
    name = series_uid if UID.match(series_uid) else hashlib.sha256(series_uid.encode()).hexdigest()
    return out / RECORDS / f"{name}.json"


def save_record(out: Path, task: SeriesTask, record: dict[str, Any], attempts: int) -> dict[str, Any]:
    """Keep what screening a series gave, with what identifies the work (content hash, pack versions)."""
    doc = {**record, "study_instance_uid": task.study_instance_uid, "source": task.source,
           "content_sha256": task.content_sha256, "pack_versions": task.pack_versions, "attempts": attempts}
    path = record_path(out, task.series_instance_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durably(json.dumps(doc, indent=1, sort_keys=True).encode(), path)
    return doc


def load_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every series record in ``out`` by SeriesInstanceUID; an unreadable one is left out (screened again)."""
    records = {}
    for path in sorted((out / RECORDS).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "series_instance_uid" in doc:
            records[doc["series_instance_uid"]] = doc
    return records


def already_screened(task: SeriesTask, records: dict[str, dict[str, Any]]) -> bool:
    """Whether ``records`` holds this series with the same bytes, screened with the same pack versions."""
    doc = records.get(task.series_instance_uid)
    return (doc is not None and doc.get("content_sha256") == task.content_sha256
            and doc.get("pack_versions") == task.pack_versions)


def rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results table: one row per series and model, in SeriesInstanceUID then model order."""
    table = []
    for doc in sorted(records, key=lambda d: d["series_instance_uid"]):
        base = {"series_instance_uid": doc["series_instance_uid"], "study_instance_uid": doc.get("study_instance_uid"),
                "status": doc["status"], "reason_code": doc.get("reason_code") or "", "reason": doc.get("reason") or "",
                "slices": doc.get("slices"), "shape_zyx": _json(doc.get("shape_zyx")),
                "spacing_mm_zyx": _json(doc.get("spacing_mm_zyx")),
                "problems": ";".join(p["reason_code"] for p in doc.get("problems") or []),
                "source": doc.get("source"), "content_sha256": doc.get("content_sha256"),
                "pack_versions": doc.get("pack_versions"), "attempts": doc.get("attempts"),
                "series_seconds": (doc.get("seconds") or {}).get("total"), "task_seconds": doc.get("task_seconds"),
                "worker": doc.get("worker"), "worker_peak_mib": doc.get("worker_peak_mib")}
        results = sorted(doc.get("results") or [], key=lambda r: r["model"])
        if not results:
            table.append({c: base.get(c) for c in COLUMNS} | {"model": "", "flagged": None, "score": None})
        for r in results:
            row = {**base, "model": r["model"], "model_version": r["model_version"], "flagged": bool(r["flagged"]),
                   "score": r["score"], "threshold": r["threshold"], "validated": bool(r["validated"]),
                   "backend": r["backend"], "precision": r["precision"], "findings": _json(r["findings"]),
                   "notice": r.get("notice") or "", "model_seconds": r.get("seconds")}
            table.append({c: row.get(c) for c in COLUMNS})
    return table


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def write_csv(path: Path, table: list[dict[str, Any]], columns: Iterable[str] = COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in table)
    tmp.replace(path)


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_parquet(path: Path, table: list[dict[str, Any]]) -> bool:
    """Write the table as Parquet; False (nothing written) when pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    types = {"flagged": pa.bool_(), "validated": pa.bool_(), "score": pa.float64(), "threshold": pa.float64(),
             "slices": pa.int64(), "attempts": pa.int64(), "model_seconds": pa.float64(),
             "series_seconds": pa.float64(), "task_seconds": pa.float64(), "worker_peak_mib": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(table, schema=schema), tmp)
    tmp.replace(path)
    return True


def summary_counts(table: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Series by status and by reason code, and flags by model."""
    series = {r["series_instance_uid"]: r for r in table}
    return {"status": dict(collections.Counter(r["status"] for r in series.values())),
            "reason_code": dict(collections.Counter(r["reason_code"] for r in series.values() if r["reason_code"])),
            "flagged": dict(collections.Counter(r["model"] for r in table if r["flagged"]))}


def write_summary(path: Path, table: list[dict[str, Any]], refused: list[dict[str, str]],
                  run: dict[str, Any]) -> None:
    """The HTML summary: counts by status, reason code and flag, throughput, failures with their reasons."""
    counts = summary_counts(table)
    esc = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Archive screening</title>",
             STYLE,
             f"<h1>Archive screening of {esc(str(run.get('source', '')))}</h1>",
             (f"<p>{run.get('series', 0)} series: {run.get('screened', 0)} screened in this run "
              f"({run.get('skipped', 0)} already screened) in {run.get('seconds', 0.0):.1f} s after "
              f"{run.get('import_seconds', 0.0):.1f} s reading the archive, "
              f"{run.get('series_per_minute', 0.0):.1f} series/min on {esc(str(run.get('runner', '')))}. "
              f"{len(refused)} file(s) refused.</p>")]
    for title, key in (("Series by status", "status"), ("Series by reason code", "reason_code"),
                       ("Flagged series by model", "flagged")):
        parts.append(_table(title, ("", "series"), sorted(counts[key].items())))
    failures = [(r["series_instance_uid"], r["status"], r["reason_code"], r["reason"])
                for r in {r["series_instance_uid"]: r for r in table}.values() if r["status"] != "analyzed"]
    parts.append(_table("Series not analysed", ("series", "status", "reason code", "reason"), failures))
    parts.append(_table("Files refused", ("file", "reason code", "reason"),
                        [(q["file"], q["reason_code"], q["reason"]) for q in refused]))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _table(title: str, head: tuple[str, ...], body: Iterable[tuple[Any, ...]]) -> str:
    esc = html.escape
    lines = [f"<h2>{esc(title)}</h2><table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>"]
    lines += [f"<tr>{''.join(f'<td>{esc(str(c))}</td>' for c in row)}</tr>" for row in body]
    return "\n".join([*lines, "</table>"])
