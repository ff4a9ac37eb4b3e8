"""Write one month's bundle: gather, de-identify, sign, seal, write durably, read back, verify.

A bundle is written under a temporary name, fsynced, renamed and read back before anyone is told the
medium may be removed. An interrupted export (power cut, stick pulled, kill -9) leaves a ``running``
row and perhaps a ``.partial`` file; the next run of the same month reuses its revision and replaces
both, so a month never ends with two bundles of the same content.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import sqlite_utils

from appliance import __version__
from appliance.config import Settings
from appliance.durable import durable_rename
from appliance.errors import ApplianceError
from appliance.export import bundle, content, keys
from appliance.export.deid import DEID_METHOD, Pseudonymizer
from appliance.store.database import audit, inserted_id, open_database, utcnow, write_transaction
from appliance.store.datadir import DataDirectory

log = logging.getLogger(__name__)
IMAGE_CHOICES = ("none", "flagged", "all")


class ExportError(ApplianceError):
    """The export cannot be made (no key, no hub key, bad month, unwritable target)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    month: str
    revision: int
    sha256: str
    studies: int
    results: int
    images: int
    reused: bool  # the month's content had not changed: the existing bundle stands


def previous_month(today: datetime.date | None = None) -> str:
    today = today or datetime.date.today()
    first = today.replace(day=1) - datetime.timedelta(days=1)
    return f"{first.year:04d}-{first.month:02d}"


def check_month(month: str) -> str:
    try:
        year, mon = (int(v) for v in month.split("-"))
        datetime.date(year, mon, 1)
    except ValueError:
        raise ExportError(f"BAD_MONTH: {month!r} is not a month written YYYY-MM") from None
    return f"{year:04d}-{mon:02d}"


def site_id(settings: Settings) -> str:
    if settings.site_id:
        return settings.site_id
    public = keys.site_public_key(settings.home_path)
    if public is None:
        raise ExportError("NO_SITE_KEY: this appliance has no signing key yet; run `appliance keys init`")
    return "site-" + keys.fingerprint(public).replace(":", "")[:12]


def _hub_key(settings: Settings):
    if not settings.hub_public_key:
        raise ExportError("NO_HUB_KEY: set hub_public_key to the programme hub's public key "
                          "(printed by `appliance hub init`)")
    try:
        return keys.parse_x25519_public(settings.hub_public_key)
    except keys.KeyProblem as exc:
        raise ExportError(f"BAD_HUB_KEY: {exc}") from None


def _key_images(db: sqlite_utils.Database, home: Path, month: str, which: str,
                pseudo: Pseudonymizer) -> tuple[dict[str, bytes], int]:
    """De-identified Secondary Capture key images of the month's (flagged) real studies; images whose source
    CT declares burned-in annotation are left out (counted)."""
    if which == "none":
        return {}, 0
    start, end = content.month_bounds(month)
    flag = " AND st.flagged = 1" if which == "flagged" else ""
    members, left_out = {}, 0
    for study_uid, patient_key in db.execute(
            f"SELECT st.study_instance_uid, st.patient_key FROM studies st WHERE st.synthetic = 0 "  # nosec B608 - a fixed flag clause; values bound
            f"AND st.created_at >= ? AND st.created_at < ?{flag}", [start, end]):
        for series_uid, first_path in db.execute(
                "SELECT s.series_instance_uid, (SELECT path FROM instances i WHERE i.series_instance_uid = "
                "s.series_instance_uid LIMIT 1) FROM series s WHERE s.study_instance_uid = ?", [study_uid]):
            outputs = sorted((DataDirectory(home).series_artefacts(study_uid, series_uid) / "dicom").glob("ot-*.dcm"))
            if first_path is None:  # images purged: whether they carried burned-in text cannot be told any more
                left_out += len(outputs)
                continue
            source = pydicom.dcmread(home / first_path, stop_before_pixels=True)
            if str(source.get("BurnedInAnnotation", "")).upper() == "YES":
                left_out += len(outputs)
                continue
            for path in outputs:
                ds = pydicom.dcmread(path)
                pseudo.deidentify(ds, patient_key)
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                members[f"images/{ds.SOPInstanceUID}.dcm"] = buffer.getvalue()
    return members, left_out


def _start(db: sqlite_utils.Database, month: str) -> tuple[int, int]:
    """(row id, revision) for this run: an interrupted run of the month is taken over, else the next revision."""
    with write_transaction(db):
        running = db.execute("SELECT id, revision FROM exports WHERE month = ? AND state = 'running' "
                             "ORDER BY id DESC LIMIT 1", [month]).fetchone()
        if running:
            return int(running[0]), int(running[1])
        last = db.execute("SELECT max(revision) FROM exports WHERE month = ?", [month]).fetchone()[0] or 0
        table = db.table("exports")
        table.insert({"month": month, "revision": last + 1, "state": "running", "actor": getpass.getuser(),
                      "started_at": utcnow()})
        return inserted_id(table), last + 1


def _unchanged(db: sqlite_utils.Database, month: str, content_sha: str, out_dir: Path) -> Path | None:
    """The month's last bundle when it holds this very content for this hub and is still in ``out_dir``."""
    row = db.execute("SELECT path, sha256, content_sha256 FROM exports WHERE month = ? AND state = 'done' "
                     "ORDER BY revision DESC LIMIT 1", [month]).fetchone()
    if row is None or row[2] != content_sha:
        return None
    path = Path(row[0])
    if path.parent.resolve() != out_dir.resolve() or not path.is_file():
        return None
    return path if hashlib.sha256(path.read_bytes()).hexdigest() == row[1] else None


def write_durably(data: bytes, final: Path) -> None:
    """Temporary name -> write -> fsync -> rename -> fsync folder -> read back and compare."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")  # a fixed name: the next run overwrites what a crash left
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    durable_rename(tmp, final)
    if final.read_bytes() != data:
        raise ExportError(f"WRITE_FAILED: {final} did not read back as written (failing medium?)")


def export_month(settings: Settings, month: str, out_dir: Path, images: str = "none",
                 now: datetime.datetime | None = None) -> ExportResult:
    """Write the bundle of ``month`` into ``out_dir`` (see the module docstring); returns what was written."""
    month = check_month(month)
    if images not in IMAGE_CHOICES:
        raise ExportError(f"BAD_IMAGES: images must be one of {', '.join(IMAGE_CHOICES)}")
    home = settings.home_path
    hub, sid = _hub_key(settings), site_id(settings)
    try:
        signer, pseudo = keys.signing_key(home), Pseudonymizer(keys.pseudonym_secret(home))
    except keys.KeyProblem as exc:
        raise ExportError(f"NO_SITE_KEY: {exc}") from None
    db = open_database(home)
    try:
        return _export(db, settings, month, out_dir, images, now, hub, sid, signer, pseudo)
    finally:
        db.conn.close()


def _members(db, settings: Settings, month: str, sid: str, images: str, pseudo: Pseudonymizer):
    from appliance.inference.registry import inventory

    rows = content.study_results(db, month, pseudo)
    packs, refused, availability = inventory(settings)
    inventory_doc = {"appliance_version": __version__, "tensorrt": availability.why or "available",
                     "models": [{**{k: v for k, v in p.items() if k != "choice"}, "backend": p["choice"].backend,
                                 "precision": p["choice"].precision, "why": p["choice"].reason} for p in packs],
                     "refused": [str(r) for r in refused]}
    recall_rows = content.recall_rows(db, month, pseudo)
    fhir = content.fhir_bundle(rows, sid, month)
    fhir["entry"] += content.fhir_outcomes(recall_rows, sid)
    fhir = content.validate_fhir(fhir)  # FHIR_INVALID stops the export
    members = {"results.fhir.json": content.json_bytes(fhir, compact=True),
               "results.csv": content.results_csv(rows),
               "recalls.csv": content.recalls_csv(recall_rows),
               "statistics.json": content.json_bytes(content.statistics_doc(db, month)),
               "inventory.json": content.json_bytes(inventory_doc)}
    image_members, left_out = _key_images(db, settings.home_path, month, images, pseudo)
    members.update(image_members)
    content_sha = hashlib.sha256(b"".join(hashlib.sha256(members[k]).digest() for k in sorted(members))).hexdigest()
    members["audit-summary.json"] = content.json_bytes(content.audit_summary(db, month))
    return members, rows, content_sha, len(image_members), left_out


def _export(db, settings, month, out_dir, images, now, hub, sid, signer, pseudo) -> ExportResult:
    members, rows, content_sha, n_images, left_out = _members(db, settings, month, sid, images, pseudo)
    studies = len({r["study"] for r in rows})
    content_sha = hashlib.sha256((content_sha + keys.fingerprint(hub)).encode()).hexdigest()  # same content, same hub
    existing = _unchanged(db, month, content_sha, out_dir)
    if existing is not None:
        revision = db.execute("SELECT revision FROM exports WHERE path = ?", [str(existing)]).fetchone()[0]
        return ExportResult(existing, month, revision, hashlib.sha256(existing.read_bytes()).hexdigest(), studies,
                            len(rows), n_images, True)
    row_id, revision = _start(db, month)
    created = (now or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="seconds")
    manifest = {"site_id": sid, "site_name": settings.site_name, "month": month, "revision": revision,
                "created_at": created, "appliance_version": __version__, "deidentification": DEID_METHOD,
                "counts": {"studies": studies, "results": len(rows), "flagged": sum(r["flagged"] for r in rows),
                           "images": n_images, "images_left_out_burned_in": left_out}}
    inner = bundle.pack_members(members, manifest, signer)
    data = bundle.seal(inner, {"site_id": sid, "month": month, "revision": revision, "created_at": created},
                       signer, hub)
    final = out_dir / f"{sid}-{month}-r{revision}{bundle.SUFFIX}"
    write_durably(data, final)
    bundle.verify_outer(final.read_bytes(), signer.public_key())
    digest = hashlib.sha256(data).hexdigest()
    with write_transaction(db):
        db.table("exports").update(row_id, {"state": "done", "path": str(final), "sha256": digest,
                                      "content_sha256": content_sha, "size_bytes": len(data), "studies": studies,
                                      "results": len(rows), "finished_at": utcnow()})
        audit(db, getpass.getuser(), "export", month, revision=revision, path=str(final), sha256=digest,
              studies=studies, results=len(rows), images=n_images)
    log.info("export %s revision %d written to %s (%d bytes, sha256 %s)", month, revision, final, len(data), digest)
    return ExportResult(final, month, revision, digest, studies, len(rows), n_images, False)


def recent(db: sqlite_utils.Database, limit: int = 12) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM exports ORDER BY id DESC LIMIT ?", [limit]))
