"""Find every series of an archive: import it (the importer's discovery, zip and hostile-file handling) into the
run's own data directory, then list one task per series with its files and content hash."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from appliance.config import Settings
from appliance.inference import packs
from appliance.inference.registry import available_packs
from appliance.ingest.importer import import_paths
from appliance.store.instances import InstanceStore

SOURCE_LABEL = "batch"


@dataclasses.dataclass(frozen=True)
class SeriesTask:
    """One series to screen: its stored files (absolute paths), where it came from and what its bytes hash to."""

    series_instance_uid: str
    study_instance_uid: str
    source: str
    files: tuple[str, ...]
    content_sha256: str
    pack_versions: str


@dataclasses.dataclass
class Discovery:
    """What the archive held: one task per series, and every file refused with its reason."""

    tasks: list[SeriesTask]
    refused: list[dict[str, str]]
    stored: int = 0
    duplicates: int = 0


def entries(source: Path) -> list[Path]:
    """The top-level entries of ``source`` (each imported on its own, so a series knows which one it came from)."""
    if not source.is_dir():
        return [source]
    return sorted((source / name for name in os.listdir(source)), key=lambda p: p.name)


def pack_versions(settings: Settings) -> str:
    """The model packs in use, ``id@version`` joined by ``;``: a series screened with others is screened again."""
    found, _ = available_packs(settings)
    return ";".join(sorted(f"{p.id}@{p.version}" for p in packs.newest(found)))


def content_sha256(rows: list[tuple[str, str]]) -> str:
    """SHA-256 over the series' (SOPInstanceUID, SHA-256 of the file) pairs, in UID order."""
    digest = hashlib.sha256()
    for uid, sha in sorted(rows):
        digest.update(f"{uid}:{sha}\n".encode())
    return digest.hexdigest()


def discover(store: InstanceStore, source: Path, settings: Settings,
             progress: Callable[[Path], None] | None = None) -> Discovery:
    """Import every top-level entry of ``source`` (already stored files count as duplicates) and list the series."""
    origin: dict[str, tuple[str, str]] = {}  # SeriesInstanceUID -> (StudyInstanceUID, source entry)
    refused: list[dict[str, str]] = []
    stored = duplicates = 0
    for entry in entries(source):
        summary = import_paths(store, [entry], settings, source=SOURCE_LABEL)
        stored, duplicates = stored + summary.stored, duplicates + summary.duplicates
        refused.extend(summary.quarantined)
        for series_uid, study_uid in summary.series.items():
            origin.setdefault(series_uid, (study_uid, str(entry)))
        if progress is not None:
            progress(entry)
    versions = pack_versions(settings)
    tasks = [_task(store, uid, study, where, versions) for uid, (study, where) in sorted(origin.items())]
    return Discovery(tasks, refused, stored, duplicates)


def _task(store: InstanceStore, series_uid: str, study_uid: str, where: str, versions: str) -> SeriesTask:
    rows = store.db.execute("SELECT sop_instance_uid, sha256, path FROM instances WHERE series_instance_uid = ? "
                            "ORDER BY path", [series_uid]).fetchall()
    return SeriesTask(series_uid, study_uid, where, tuple(str(store.home / p) for _, _, p in rows),
                      content_sha256([(u, s) for u, s, _ in rows]), versions)
