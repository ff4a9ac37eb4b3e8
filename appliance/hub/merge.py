"""Import bundles at the hub: check, decrypt, refuse what is wrong, merge idempotently.

Refusals carry a reason code and nothing is merged: NOT_A_BUNDLE, TRUNCATED, UNKNOWN_SITE,
WRONG_SITE_KEY, TAMPERED, WRONG_HUB_KEY, FUTURE_DATED, REPLAYED (this very bundle was merged before),
STALE (a newer revision of the same site and month is merged). A later revision of a month replaces
the earlier one's rows in one transaction.

Imports may run in parallel (several processes, one database): decryption and checks happen outside any
transaction, and the merge holds a lock on its own site and month only (:meth:`HubDB.lock`), so different
sites never wait for each other and two imports of one month are merged one after the other, the second
seeing the first (REPLAYED or STALE, or superseding it).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path
from typing import Any

from appliance.export import bundle, keys
from appliance.hub.store import HubDB

RESULT_FIELDS = ["study", "patient", "study_date_shifted", "series", "model", "model_version", "validated",
                 "backend", "precision", "score", "threshold", "flagged", "review", "turnaround_seconds"]


def add_site(db: HubDB, public_key_text: str, name: str, site_id: str | None = None) -> str:
    """Register a site's Ed25519 public key; returns its site id (derived from the key unless given)."""
    key = keys.parse_ed25519_public(public_key_text)
    site_id = site_id or "site-" + keys.fingerprint(key).replace(":", "")[:12]
    with db.transaction():
        db.execute("INSERT INTO sites (site_id, name, public_key, added_at) VALUES (?, ?, ?, ?)",
                   [site_id, name, keys.encode_public(key), _now()])
    return site_id


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def import_bundle(db: HubDB, hub_dir: Path, path: Path, now: datetime.datetime | None = None) -> dict[str, Any]:
    """Merge one bundle file; returns a summary, or raises :class:`bundle.BundleRefused` (nothing merged)."""
    data = path.read_bytes()
    header = bundle.read_header(data)[0]
    sites = db.rows("SELECT site_id, public_key FROM sites WHERE site_id = ?", [str(header.get("site_id"))])
    if not sites:
        raise bundle.BundleRefused("UNKNOWN_SITE", f"site {header.get('site_id')!r} is not registered at this hub "
                                   "(appliance hub add-site PUBKEY)")
    opened = bundle.open_bundle(data, keys.parse_ed25519_public(sites[0]["public_key"]), keys.hub_private_key(hub_dir))
    bundle.check_dates(opened.header, now)
    site, month, revision = opened.header["site_id"], opened.header["month"], int(opened.header["revision"])
    with db.transaction():
        db.lock(f"month:{site}/{month}")
        seen = db.rows("SELECT imported_at FROM bundles WHERE sha256 = ?", [opened.sha256])
        if seen:
            raise bundle.BundleRefused("REPLAYED", f"this bundle was already merged on {seen[0]['imported_at']}")
        newest = db.rows("SELECT max(revision) AS r FROM bundles WHERE site_id = ? AND month = ?",
                         [site, month])[0]["r"]
        if newest is not None and int(newest) >= revision:
            raise bundle.BundleRefused("STALE", f"revision {revision} of {site} {month} is not newer than the merged "
                                       f"revision {newest}")
        for table in ("results", "stats", "models"):
            db.execute(f"DELETE FROM {table} WHERE site_id = ? AND month = ?", [site, month])  # nosec B608 - table from a fixed tuple; values bound
        db.execute("DELETE FROM recalls WHERE site_id = ? AND month = ?", [site, month])
        db.execute("UPDATE bundles SET superseded = 1 WHERE site_id = ? AND month = ?", [site, month])
        results = _merge_members(db, opened, site, month, revision)
        _merge_recalls(db, opened, site, month, revision)
        db.execute("INSERT INTO bundles (sha256, site_id, month, revision, created_at, imported_at, superseded) "
                   "VALUES (?, ?, ?, ?, ?, ?, 0)", [opened.sha256, site, month, revision,
                                                    opened.header["created_at"], _now()])
    return {"site_id": site, "month": month, "revision": revision, "results": results,
            "superseded": newest is not None, "sha256": opened.sha256}


def _merge_members(db: HubDB, opened: bundle.Opened, site: str, month: str, revision: int) -> int:
    rows = list(csv.DictReader(io.StringIO(opened.members["results.csv"].decode())))
    db.executemany("INSERT INTO results (site_id, month, revision, study, patient, study_date, series, model, "
                   "model_version, validated, backend, model_precision, score, threshold, flagged, review, "
                   "turnaround_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [[site, month, revision, r["study"], r["patient"], r["study_date_shifted"], r["series"], r["model"],
                     r["model_version"], int(r["validated"] == "True"), r["backend"], r["precision"],
                     _number(r["score"]), _number(r["threshold"]), int(r["flagged"] == "True"), r["review"],
                     _number(r["turnaround_seconds"])] for r in rows])
    stats = json.loads(opened.members["statistics.json"])
    flat = {"studies_received": stats["studies_received"], "instances_received": stats["instances_received"],
            "series_analysed": stats["series_analysed"], "jobs_failed": stats["jobs_failed"],
            "turnaround_median_seconds": stats["turnaround_seconds"]["median"],
            "turnaround_p90_seconds": stats["turnaround_seconds"]["p90"]}
    flat.update({f"rejected:{k}": v for k, v in stats["series_rejected_by_reason"].items()})
    flat.update({f"quarantined:{k}": v for k, v in stats["files_quarantined_by_reason"].items()})
    db.executemany("INSERT INTO stats (site_id, month, revision, name, value) VALUES (?, ?, ?, ?, ?)",
                   [[site, month, revision, name, value] for name, value in flat.items()])
    models = json.loads(opened.members["inventory.json"])["models"]
    db.executemany("INSERT INTO models (site_id, month, revision, model, version, validated, backend, "
                   "model_precision, model_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [[site, month, revision, m["id"], m["version"], int(bool(m["validated"])), m["backend"],
                     m["precision"], m["model_sha256"]] for m in models])
    return len(rows)


def _merge_recalls(db: HubDB, opened: bundle.Opened, site: str, month: str, revision: int) -> int:
    """The month's recall rows (``recalls.csv``; none in bundles from appliances before recalls)."""
    rows = list(csv.DictReader(io.StringIO(opened.members.get("recalls.csv", b"").decode())))
    for r in rows:
        db.execute("INSERT INTO recalls (site_id, month, revision, study, patient, model, model_version, "
                   "screened_month, state, outcome_code, outcome_system, diagnosis, malignant, days_to_outcome) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [site, month, revision, r["study"], r["patient"], r["model"], r["model_version"],
                    r["screened_month"], r["state"], r["outcome_code"] or None, r["outcome_system"] or None,
                    int(r["diagnosis"] == "True"), int(r["malignant"] == "True"), _number(r["days_to_outcome"])])
    return len(rows)
