"""The instance store: every accepted DICOM file, as received, filed by its UIDs.

A file is copied to a temporary name and fsynced, its header checked, renamed
into ``instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
(a path built only from validated UIDs) and only then indexed and committed.
The same SOP Instance UID twice is stored once. A file filed under UIDs derived
for it (emptied or not valid, see :mod:`appliance.dicomfile.uids`) keeps the
values it wrote in ``instances.original_uids``; the store's UIDs are the ones
every output uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO

import sqlite_utils

from appliance.config import Settings
from appliance.dicomfile.header import InstanceHeader, read_header
from appliance.dicomfile.uids import file_uids, is_valid_uid
from appliance.durable import durable_rename
from appliance.errors import InstanceRejected
from appliance.store import datadir, quarantine
from appliance.store.database import open_database, refresh_study, refresh_study_status, utcnow, write_transaction
from appliance.store.datadir import DataDirectory, hold_writer_lock
from appliance.store.files import copy_to_temp

log = logging.getLogger(__name__)

INSTANCES_DIR = datadir.INSTANCES
ORIGINAL_UID_MAX_CHARS = 256  # an original value kept for the record, not a place to store a file


@dataclasses.dataclass(frozen=True)
class Accepted:
    """Outcome of offering one file to the store."""

    status: str  # "stored" | "duplicate"
    header: InstanceHeader
    path: Path


@dataclasses.dataclass(frozen=True)
class StoredInstance:
    """One stored instance: its file and the (valid) UIDs the store filed it under."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def series_instances(db: sqlite_utils.Database, home: Path, series_instance_uid: str) -> list[StoredInstance]:
    """The stored instances of a series, in the order of their paths."""
    rows = db.execute("SELECT path, sop_class_uid, sop_instance_uid, series_instance_uid, study_instance_uid "
                      "FROM instances WHERE series_instance_uid = ? ORDER BY path", [series_instance_uid])
    return [StoredInstance(home / path, *uids) for path, *uids in rows]


def original_uids(path: Path, header: InstanceHeader) -> str | None:
    """JSON of the values the file at ``path`` wrote for the UIDs derived for it; None when it has none."""
    if not header.derived_uids:
        return None
    written = file_uids(path)
    return json.dumps({k: written.get(k, "")[:ORIGINAL_UID_MAX_CHARS] for k in header.derived_uids})


def instance_path(home: Path, header: InstanceHeader) -> Path:
    """Where an instance lives; every part is a validated UID, never a name a peer supplied."""
    parts = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    if not all(is_valid_uid(p) for p in parts):
        raise ValueError(f"refusing to build a path from invalid UIDs {parts!r}")
    return home / INSTANCES_DIR / parts[0] / parts[1] / f"{parts[2]}.dcm"


def _patient_key(header: InstanceHeader) -> str:
    ident = f"{header.patient_id}\x1f{header.patient_name}\x1f{header.patient_birth_date}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _index(db: sqlite_utils.Database, header: InstanceHeader, path: Path, size: int,
           sha256: str, source: str, home: Path, originals: str | None) -> None:
    now = utcnow()
    key = _patient_key(header)
    db.table("patients").insert({
        "patient_key": key, "patient_id": header.patient_id, "patient_name": header.patient_name,
        "patient_birth_date": header.patient_birth_date, "patient_sex": header.patient_sex,
    }, ignore=True)
    db.table("studies").insert({
        "study_instance_uid": header.study_instance_uid, "patient_key": key, "study_date": header.study_date,
        "study_time": header.study_time, "study_description": header.study_description,
        "accession_number": header.accession_number, "created_at": now, "updated_at": now,
    }, ignore=True)
    db.table("series").insert({
        "series_instance_uid": header.series_instance_uid, "study_instance_uid": header.study_instance_uid,
        "modality": header.modality, "series_number": header.series_number,
        "series_description": header.series_description, "instance_count": 0, "status": "received",
        "reason_code": None, "reason": None, "last_received_at": now, "updated_at": now,
    }, ignore=True)
    db.table("instances").insert({
        "sop_instance_uid": header.sop_instance_uid, "series_instance_uid": header.series_instance_uid,
        "study_instance_uid": header.study_instance_uid, "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid, "instance_number": header.instance_number,
        "path": str(path.relative_to(home)), "size_bytes": size, "sha256": sha256, "source": source,
        "received_at": now, "original_uids": originals,
    })
    # a series whose images were purged and that arrives again has its images again (purged_at cleared)
    db.execute("UPDATE series SET instance_count = instance_count + 1, last_received_at = ?, updated_at = ?,"
               " status = 'received', purged_at = NULL WHERE series_instance_uid = ?",
               [now, now, header.series_instance_uid])
    db.execute("UPDATE studies SET updated_at = ? WHERE study_instance_uid = ?", [now, header.study_instance_uid])
    if db.execute("SELECT search_text IS NULL FROM studies WHERE study_instance_uid = ?",
                  [header.study_instance_uid]).fetchone()[0]:
        refresh_study(db, header.study_instance_uid)
    else:
        refresh_study_status(db, header.study_instance_uid)


class InstanceStore:
    """Accepts DICOM files durably into the data directory ``home`` and its database.

    ``tmp_dir`` is where files are written before they are renamed into place: the writer's own
    scratch folder (see :mod:`appliance.store.datadir`), never shared with another process.
    """

    def __init__(self, home: Path, db: sqlite_utils.Database, *, tmp_dir: Path, max_bytes: int = 2 * 1024**3,
                 max_rows_columns: int = 4096, max_frames: int = 4096):
        self.home = home
        self.db = db
        self.max_bytes = max_bytes
        self.max_rows_columns = max_rows_columns
        self.max_frames = max_frames
        self.tmp_dir = tmp_dir

    @property
    def datadir(self) -> DataDirectory:
        return DataDirectory(self.home)
    def accept(self, stream: IO[bytes], *, source: str, original_name: str) -> Accepted:
        """Store the DICOM file read from ``stream``; return only once it is durable.

        Raises :class:`InstanceRejected` after quarantining a file that cannot be accepted.
        """
        try:
            tmp, size, sha256 = copy_to_temp(stream, self.tmp_dir, self.max_bytes)
        except InstanceRejected as exc:
            quarantine.record(self.db, self.home, None, source=source, original_name=original_name,
                              size=None, sha256=None, rejection=exc)
            raise
        try:
            header = read_header(tmp, max_rows_columns=self.max_rows_columns, max_frames=self.max_frames,
                                 max_inflated_bytes=self.max_bytes, sha256=sha256)
        except InstanceRejected as exc:
            quarantine.record(self.db, self.home, tmp, source=source, original_name=original_name,
                              size=size, sha256=sha256, rejection=exc)
            raise
        try:
            return self._file(tmp, header, size, sha256, source)
        finally:
            tmp.unlink(missing_ok=True)  # filed under its UIDs or not at all: no scratch file outlives a failure

    def _file(self, tmp: Path, header: InstanceHeader, size: int, sha256: str, source: str) -> Accepted:
        """Rename into place and index in one write transaction, so two writers never file one instance twice."""
        final = instance_path(self.home, header)
        originals = original_uids(tmp, header)
        renamed = False
        try:
            with write_transaction(self.db):
                if self.db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                                   [header.sop_instance_uid]).fetchone():
                    tmp.unlink(missing_ok=True)
                    return Accepted("duplicate", header, final)
                durable_rename(tmp, final)
                renamed = True
                _index(self.db, header, final, size, sha256, source, self.home, originals)
        except BaseException:
            # rolled back (a full disk, say): the file was never indexed, so it is not kept either
            (final if renamed else tmp).unlink(missing_ok=True)
            raise
        return Accepted("stored", header, final)


def open_store(settings: Settings) -> InstanceStore:
    """Open the data directory of ``settings`` as a writer: migrate the database, hold the writer lock.

    Deletes nothing: crash recovery (:func:`recover`) runs inside the lock, and only when this is the
    first writer alive.
    """
    ddir = DataDirectory(settings.home_path)
    db = open_database(ddir.home)
    scratch = hold_writer_lock(ddir, recover)
    return InstanceStore(ddir.home, db, tmp_dir=scratch, max_bytes=settings.max_instance_bytes,
                         max_rows_columns=settings.max_rows_columns, max_frames=settings.max_frames)


def recover(ddir: DataDirectory) -> int:
    """Remove what an interrupted write left: scratch files, spooled uploads, files never indexed.

    Call only under the exclusive writer lock (no writer alive). Returns how many files went.
    """
    removed = 0
    for folder in (ddir.scratch, ddir.uploads):
        if folder.is_dir():
            for entry in folder.iterdir():
                removed += 1
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if not ddir.instances.is_dir():
        return removed
    db = open_database(ddir.home)
    try:
        known = {row[0] for row in db.execute("SELECT path FROM instances")}
    finally:
        db.conn.close()
    for dirpath, dirnames, filenames in os.walk(ddir.instances):
        dirnames[:] = [d for d in dirnames if d != datadir.SCRATCH]
        for name in filenames:
            path = Path(dirpath) / name
            if str(path.relative_to(ddir.home)) not in known:
                log.warning("removing %s: stored but never indexed (interrupted write)", path)
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("crash recovery removed %d file(s) left by an interrupted write", removed)
    return removed
