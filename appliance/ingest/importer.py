"""Import files, folders and zip archives into the instance store.

Bad files are quarantined with a reason and the import goes on; symbolic
links are never followed; zip members are streamed (no member name ever
becomes a path here) under limits on count, total size and compression ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from appliance.config import Settings
from appliance.errors import InstanceRejected, ReasonCode
from appliance.store import quarantine
from appliance.store.instances import InstanceStore

log = logging.getLogger(__name__)

DICOMDIR_NAME = "DICOMDIR"
ZIP_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass
class ImportSummary:
    """What one import did: counts, the series it touched, and every refusal with its reason."""

    stored: int = 0
    duplicates: int = 0
    skipped: int = 0
    quarantined: list[dict[str, str]] = dataclasses.field(default_factory=list)
    series: dict[str, str] = dataclasses.field(default_factory=dict)  # SeriesInstanceUID -> StudyInstanceUID

    def as_dict(self) -> dict[str, object]:
        return {"stored": self.stored, "duplicates": self.duplicates, "skipped": self.skipped,
                "quarantined": self.quarantined, "series": len(self.series)}


@dataclasses.dataclass(frozen=True)
class _Member:
    name: str
    open: Callable[[], IO[bytes]]


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    """Opens ``path`` when called, so a member holds no open file until it is read."""
    return lambda: open(path, "rb")


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def _walk(root: Path, max_depth: int, depth: int = 0) -> Iterator[Path]:
    """Regular files under ``root``, in name order, never following symbolic links."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot read folder %s: %s", root, exc)
        return
    for entry in entries:
        if entry.is_symlink():
            log.info("not following symbolic link %s", entry.path)
        elif entry.is_dir(follow_symlinks=False):
            if depth + 1 > max_depth:
                log.warning("not descending below %s: deeper than %d levels", entry.path, max_depth)
            else:
                yield from _walk(Path(entry.path), max_depth, depth + 1)
        elif entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


def _zip_members(path: Path, settings: Settings) -> Iterator[_Member | InstanceRejected]:
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > settings.max_zip_members:
            yield InstanceRejected(ReasonCode.UNSAFE_ARCHIVE, f"The archive holds {len(infos)} files, "
                                                              f"more than the {settings.max_zip_members} allowed.")
            return
        total = 0
        for info in infos:
            label = f"{path.name}:{info.filename}"
            ratio = info.file_size / max(info.compress_size, 1)
            total += info.file_size
            if info.filename.startswith(("/", "\\")) or ".." in Path(info.filename).parts:
                yield InstanceRejected(ReasonCode.UNSAFE_ARCHIVE,
                                       f"{label}: the member's name points outside the archive.")
            elif stat.S_ISLNK(info.external_attr >> 16):
                yield InstanceRejected(ReasonCode.UNSAFE_ARCHIVE, f"{label}: the member is a symbolic link.")
            elif ratio > settings.max_zip_ratio and info.file_size > 1024**2:
                yield InstanceRejected(ReasonCode.UNSAFE_ARCHIVE, f"{label}: compressed {ratio:.0f}:1, a zip bomb.")
            elif total > settings.max_zip_bytes:
                yield InstanceRejected(ReasonCode.UNSAFE_ARCHIVE, f"{label}: the archive unpacks to more than "
                                                                  f"{settings.max_zip_bytes // 2**30} GiB.")
                return
            else:
                yield _Member(label, functools.partial(zf.open, info))


def _members(paths: Iterable[Path], settings: Settings) -> Iterator[_Member | tuple[str, InstanceRejected] | str]:
    """Every candidate file: a member to store, a (name, rejection) pair, or a skipped name."""
    for top in paths:
        if top.is_symlink() and not top.exists():
            continue
        files = _walk(top, settings.max_import_depth) if top.is_dir() else iter([top])
        for path in files:
            if path.name.upper() == DICOMDIR_NAME:
                yield str(path)  # the directory record; the files it lists are read as loose files
            elif _is_zip(path):
                try:
                    for member in _zip_members(path, settings):
                        yield (path.name, member) if isinstance(member, InstanceRejected) else member
                except zipfile.BadZipFile:
                    yield (str(path), InstanceRejected(ReasonCode.NOT_DICOM, "The zip archive is damaged."))
            else:
                yield _Member(str(path), _opener(path))


def import_paths(store: InstanceStore, paths: Iterable[Path], settings: Settings, *, source: str = "import",
                 progress: Callable[[ImportSummary], None] | None = None,
                 label: Callable[[str], str] = str) -> ImportSummary:
    """Import files, folders and zip archives; bad files are quarantined, good ones stored.

    ``label`` turns a file's name here into the name the user knows it by (for uploads: the
    browser's file name rather than the spool file's).
    """
    summary = ImportSummary()
    for item in _members(paths, settings):
        if isinstance(item, str):
            summary.skipped += 1
            continue
        if isinstance(item, tuple):
            name, rejection = label(item[0]), item[1]
            quarantine.record(store.db, store.home, None, source=source, original_name=name, size=None,
                              sha256=None, rejection=rejection)
            summary.quarantined.append({"file": name, "reason_code": rejection.reason_code.value,
                                        "reason": rejection.reason})
            continue
        name = label(item.name)
        try:
            with item.open() as stream:
                accepted = store.accept(stream, source=source, original_name=name)
        except InstanceRejected as exc:
            summary.quarantined.append({"file": name, "reason_code": exc.reason_code.value, "reason": exc.reason})
        except OSError as exc:
            log.warning("cannot read %s: %s", name, exc)
            summary.quarantined.append({"file": name, "reason_code": "UNREADABLE", "reason": str(exc)})
        else:
            summary.series[accepted.header.series_instance_uid] = accepted.header.study_instance_uid
            if accepted.status == "stored":
                summary.stored += 1
            else:
                summary.duplicates += 1
        if progress is not None:
            progress(summary)
    return summary
