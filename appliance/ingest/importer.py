"""Import files, folders and zip archives into the instance store.

A bad file never stops an import: every per-file problem becomes a quarantine row with a reason code
and the import goes on. Only regular files are opened (a FIFO, a device or a socket is refused without
being opened); symbolic links inside folders are never followed; zip members are streamed (no member
name ever becomes a path here) under limits on count, total size and compression ratio, for the whole
archive and for each member. What stops an import is the disk: below ``disk_low_watermark_mb`` of free
space (checked before each file) or when a write finds the disk full, :class:`DiskLow` is raised, and
what was stored until then stays stored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sqlite3
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from appliance.config import Settings
from appliance.errors import DiskLow, InstanceRejected, ReasonCode
from appliance.store import quarantine
from appliance.store.files import copy_prefix_to_temp, disk_full, is_disk_full
from appliance.store.instances import InstanceStore

log = logging.getLogger(__name__)

DICOMDIR_NAME = "DICOMDIR"
MEDIA_STORAGE_DIRECTORY = b"1.2.840.10008.1.3.10"  # Media Storage Directory Storage SOP Class UID
MEDIA_STORAGE_SOP_CLASS_TAG = b"\x02\x00\x02\x00UI"  # (0002,0002) Media Storage SOP Class UID
MEDIA_DIRECTORY_HEAD = 1024
ZIP_MAGIC = b"PK\x03\x04"
# a zip member larger than this is judged by its own compression ratio too
MEMBER_RATIO_FLOOR = 1024**2
# an archive may unpack to this much whatever its compression ratio (many small, similar files compress well)
ARCHIVE_RATIO_FLOOR = 64 * 1024**2
SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
ENCRYPTED_FLAG = 0x1


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
    """A file to offer to the store, opened only when it is read."""

    name: str
    open: Callable[[], IO[bytes]]


@dataclasses.dataclass(frozen=True)
class _Refused:
    """Refused before the store saw it; ``keep`` bytes of ``open()`` go to quarantine (0: none)."""

    name: str
    rejection: InstanceRejected
    open: Callable[[], IO[bytes]] | None = None
    keep: int = 0
    size: int | None = None


def _not_regular(name: str, mode: int) -> InstanceRejected:
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return InstanceRejected(ReasonCode.NOT_REGULAR_FILE, f"{name} is {kind}, not a file: it was not opened.")


def _unreadable(exc: OSError) -> InstanceRejected:
    return InstanceRejected(ReasonCode.UNREADABLE,
                            f"The file cannot be read ({exc.strerror or type(exc).__name__}).")


def _open_regular(path: Path, follow_symlinks: bool = False) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file, checked on the open file itself
    (O_NONBLOCK, so that a FIFO put in its place never blocks the open)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path.name, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _ReadGuard:
    """A file being read: an error reading it (a failing USB stick) refuses the file as UNREADABLE, so that
    only errors of the data directory itself reach the importer as OSError."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        try:
            return self._raw.read(size)
        except OSError as exc:
            raise _unreadable(exc) from exc

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _ReadGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _opener(path: Path, follow_symlinks: bool = False) -> Callable[[], IO[bytes]]:
    """Opens ``path`` when called, so a member holds no open file until it is read."""
    return lambda: _ReadGuard(_open_regular(path, follow_symlinks))  # type: ignore[return-value]


def _walk(root: Path, max_depth: int, depth: int = 0) -> Iterator[Path | _Refused]:
    """Regular files under ``root``, in name order, never following symbolic links; other kinds refused."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot read folder %s: %s", root, exc)
        yield _Refused(str(root), _unreadable(exc))
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
        else:
            try:
                yield _Refused(entry.path, _not_regular(entry.name, entry.stat(follow_symlinks=False).st_mode))
            except OSError as exc:
                yield _Refused(entry.path, _unreadable(exc))


def _head(path: Path, follow_symlinks: bool) -> bytes:
    """The first bytes of a file: enough to tell a zip archive and a DICOMDIR from an image, in one read."""
    with _open_regular(path, follow_symlinks) as f:
        return f.read(MEDIA_DIRECTORY_HEAD)


def is_media_directory(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a DICOMDIR whatever its name (Philips writes ``DIRFILE``): its
    file meta information (explicit VR little endian) names the Media Storage Directory Storage SOP Class."""
    if len(head) < 144 or head[128:132] != b"DICM":
        return False
    at = head.find(MEDIA_STORAGE_SOP_CLASS_TAG, 132, 144 + int.from_bytes(head[140:144], "little"))
    if at < 0:
        return False
    length = int.from_bytes(head[at + 6:at + 8], "little")
    return head[at + 8:at + 8 + length].rstrip(b"\x00 ") == MEDIA_STORAGE_DIRECTORY


# --- zip archives -----------------------------------------------------------------------------------------

class _MemberStream:
    """A zip member being read: a damaged member (bad CRC, broken deflate data, cut short) is refused as
    DAMAGED_ARCHIVE, and an archive inside the archive is not opened."""

    def __init__(self, raw: IO[bytes]):
        self._raw, self._first = raw, True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._raw.read(size)
        except Exception as exc:  # zipfile, zlib, bz2 and lzma raise many kinds on damaged data
            raise _damaged_member(exc) from exc
        if self._first:
            self._first = False
            if data[:4] == ZIP_MAGIC:
                raise InstanceRejected(ReasonCode.UNSAFE_ARCHIVE,
                                       "The file is itself a zip archive inside the archive; archives inside "
                                       "archives are not opened (a way to hide a zip bomb): unpack it first.")
        return data

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _MemberStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _damaged_member(exc: BaseException) -> InstanceRejected:
    why = "its checksum does not match" if "CRC" in str(exc) else f"{type(exc).__name__}"
    return InstanceRejected(ReasonCode.DAMAGED_ARCHIVE,
                            f"The file is damaged inside the zip archive ({why}) and cannot be unpacked.")


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    try:
        return _MemberStream(zf.open(info))  # type: ignore[return-value]
    except Exception as exc:  # zipfile raises many kinds on a damaged local header
        raise _damaged_member(exc) from exc


def _unsafe_name(name: str) -> bool:
    """A member name pointing outside the archive (zip slip), were it ever used as a path."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or ".." in posix.split("/") or re.match(r"^[A-Za-z]:", posix) is not None


def _archive_refusal(infos: list[zipfile.ZipInfo], archive_size: int, settings: Settings) -> str | None:
    """Why the whole archive is refused (count, total size, overall compression ratio), or None."""
    if len(infos) > settings.max_zip_members:
        return f"it holds {len(infos)} files, more than the {settings.max_zip_members} allowed"
    total = sum(i.file_size for i in infos)
    if total > settings.max_zip_bytes:
        return (f"it unpacks to {total / 2**30:.1f} GiB, more than the "
                f"{settings.max_zip_bytes / 2**30:.1f} GiB allowed")
    ratio = total / max(archive_size, 1)
    if total > ARCHIVE_RATIO_FLOOR and ratio > settings.max_zip_ratio:
        return (f"it unpacks to {total / 2**20:.0f} MiB from {archive_size / 2**20:.1f} MiB, compressed "
                f"{ratio:.0f}:1 (more than {settings.max_zip_ratio:.0f}:1): a zip bomb")
    return None


def _member_refusal(info: zipfile.ZipInfo, label: str, settings: Settings) -> _Refused | None:
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > MEMBER_RATIO_FLOOR and ratio > settings.max_zip_ratio:
        return _Refused(label, InstanceRejected(ReasonCode.UNSAFE_ARCHIVE,
                                                f"The file is compressed {ratio:.0f}:1 in the archive: a zip bomb."),
                        keep=settings.quarantine_sample_bytes, size=info.file_size)
    if info.flag_bits & ENCRYPTED_FLAG or info.compress_type not in SUPPORTED_COMPRESSION:
        why = ("it is encrypted (password protected)" if info.flag_bits & ENCRYPTED_FLAG
               else f"it is compressed with a method (number {info.compress_type}) this appliance cannot unpack")
        return _Refused(label, InstanceRejected(ReasonCode.UNSUPPORTED_ARCHIVE,
                                                f"The file cannot be taken out of the zip archive: {why}."))
    if _unsafe_name(info.filename):  # kept whole when it may be an image, so that it can be retried
        whole = info.file_size <= settings.max_instance_bytes
        keep = info.file_size if whole else settings.quarantine_sample_bytes
        return _Refused(label, InstanceRejected(ReasonCode.UNSAFE_ARCHIVE,
                                                "The file's name in the archive points outside the archive."),
                        keep=keep, size=info.file_size)
    if stat.S_ISLNK(info.external_attr >> 16):
        return _Refused(label, InstanceRejected(ReasonCode.UNSAFE_ARCHIVE, "The file is a symbolic link."),
                        keep=settings.quarantine_sample_bytes, size=info.file_size)
    return None


def _zip_members(path: Path, settings: Settings, follow_symlinks: bool) -> Iterator[_Member | _Refused]:
    try:
        source = _open_regular(path, follow_symlinks)
    except InstanceRejected as exc:
        yield _Refused(str(path), exc)
        return
    except OSError as exc:
        yield _Refused(str(path), _unreadable(exc))
        return
    size = os.fstat(source.fileno()).st_size

    def whole(code: ReasonCode, reason: str) -> _Refused:  # the archive refused: a sample of it kept
        return _Refused(str(path), InstanceRejected(code, reason), open=_opener(path, follow_symlinks),
                        keep=settings.quarantine_sample_bytes, size=size)
    try:
        zf = zipfile.ZipFile(source)
    except Exception as exc:  # zipfile raises many kinds on a damaged directory
        source.close()
        detail = "a file name is marked UTF-8 but is not" if isinstance(exc, UnicodeDecodeError) else str(exc)
        yield whole(ReasonCode.DAMAGED_ARCHIVE, f"The zip archive is damaged ({detail}) and cannot be read.")
        return
    with source, zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        refusal = _archive_refusal(infos, size, settings)
        if refusal is not None:
            yield whole(ReasonCode.UNSAFE_ARCHIVE, f"The zip archive is refused: {refusal}.")
            return
        for info in infos:
            label = f"{path.name}:{info.filename}"
            refused = _member_refusal(info, label, settings)
            opener = _member_opener(zf, info)
            if refused is None:
                yield _Member(label, opener)
            else:
                yield dataclasses.replace(refused, open=opener if refused.keep else None)


def _member_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: _open_member(zf, info)


# --- the import -------------------------------------------------------------------------------------------

def _candidates(top: Path, settings: Settings) -> Iterator[Path | _Refused]:
    """The files one import path names: itself, or what its folder holds."""
    try:
        mode = os.stat(top).st_mode  # a path the user named is followed if it is a link; links inside are not
    except FileNotFoundError:
        if top.is_symlink():
            return  # a dangling link
        yield _Refused(str(top), InstanceRejected(ReasonCode.UNREADABLE, "The file does not exist."))
        return
    except OSError as exc:
        yield _Refused(str(top), _unreadable(exc))
        return
    if stat.S_ISDIR(mode):
        yield from _walk(top, settings.max_import_depth)
    elif stat.S_ISREG(mode):
        yield top
    else:
        yield _Refused(str(top), _not_regular(top.name, mode))


def _members(paths: Iterable[Path], settings: Settings) -> Iterator[_Member | _Refused | str]:
    """Every candidate file: a member to store, a refusal, or a skipped name."""
    for top in paths:
        for path in _candidates(top, settings):
            if isinstance(path, _Refused):
                yield path
                continue
            follow = path == top
            if path.name.upper() == DICOMDIR_NAME:
                yield str(path)  # the directory record; the files it lists are read as loose files
                continue
            try:
                head = _head(path, follow)
            except InstanceRejected as exc:
                yield _Refused(str(path), exc)
                continue
            except OSError as exc:
                yield _Refused(str(path), _unreadable(exc))
                continue
            if is_media_directory(head):
                yield str(path)  # a DICOMDIR under another name (Philips DIRFILE)
                continue
            if head[:4] == ZIP_MAGIC:
                yield from _zip_members(path, settings, follow)
            else:
                yield _Member(str(path), _opener(path, follow))


def check_disk(home: Path, watermark_mb: int, summary: ImportSummary | None = None) -> None:
    """Raise :class:`DiskLow` when the data directory has less than ``watermark_mb`` MiB free.

    Quarantined files lie in the data directory too, so they count like stored images.
    """
    free_mb = shutil.disk_usage(home).free / 2**20
    if free_mb < watermark_mb:
        done = (f"the import stopped after {summary.stored} new image(s) ({len(summary.quarantined)} quarantined)"
                if summary is not None else "the import stopped before storing anything")
        raise DiskLow(f"Only {free_mb:.0f} MiB is free in the data directory, below the {watermark_mb} MiB "
                      f"low-disk watermark: {done}. Free space and import again; what was stored is kept.")


def _quarantine(store: InstanceStore, refused: _Refused, name: str, source: str) -> None:
    """A row for a file refused before the store saw it, with what is kept of its bytes."""
    tmp = None
    if refused.open is not None and refused.keep:
        try:
            with refused.open() as stream:
                tmp, _ = copy_prefix_to_temp(stream, store.tmp_dir, min(refused.keep, store.max_bytes))
        except (InstanceRejected, OSError) as exc:
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise disk_full(store.home) from exc
            log.info("nothing kept of refused %s: %s", name, exc)
    quarantine.record(store.db, store.home, tmp, source=source, original_name=name, size=refused.size,
                      sha256=None, rejection=refused.rejection)


def _store(store: InstanceStore, item: _Member, name: str, source: str, summary: ImportSummary) -> None:
    """Offer one file to the store and count the outcome; any per-file problem is a quarantine row."""
    try:
        stream = item.open()
    except (InstanceRejected, OSError) as exc:
        _refuse(store, name, source, summary, exc if isinstance(exc, InstanceRejected) else _unreadable(exc))
        return
    try:
        with stream:
            accepted = store.accept(stream, source=source, original_name=name)
    except DiskLow:
        raise
    except InstanceRejected as exc:  # the store quarantined it
        _count_refusal(summary, name, exc)
        return
    except (OSError, sqlite3.OperationalError) as exc:  # the data directory failing, not the file
        if is_disk_full(exc):
            raise disk_full(store.home) from exc
        raise
    summary.series[accepted.header.series_instance_uid] = accepted.header.study_instance_uid
    if accepted.status == "stored":
        summary.stored += 1
    else:
        summary.duplicates += 1


def _refuse(store: InstanceStore, name: str, source: str, summary: ImportSummary,
            rejection: InstanceRejected) -> None:
    """A row (and no bytes) for a file that could not be opened."""
    _quarantine(store, _Refused(name, rejection), name, source)
    _count_refusal(summary, name, rejection)


def _count_refusal(summary: ImportSummary, name: str, rejection: InstanceRejected) -> None:
    summary.quarantined.append({"file": name, "reason_code": rejection.reason_code.value,
                                "reason": rejection.reason})


def import_paths(store: InstanceStore, paths: Iterable[Path], settings: Settings, *, source: str = "import",
                 progress: Callable[[ImportSummary], None] | None = None,
                 label: Callable[[str], str] = str) -> ImportSummary:
    """Import files, folders and zip archives; bad files are quarantined, good ones stored.

    ``label`` turns a file's name here into the name the user knows it by (for uploads: the
    browser's file name rather than the spool file's).

    Raises :class:`DiskLow` (and stops) when free space falls below ``disk_low_watermark_mb``; every
    file stored until then stays stored.
    """
    summary = ImportSummary()
    for item in _members(paths, settings):
        check_disk(store.home, settings.disk_low_watermark_mb, summary)
        if isinstance(item, str):
            summary.skipped += 1
        else:
            name = quarantine.display_name(label(item.name))
            if isinstance(item, _Refused):
                _quarantine(store, item, name, source)
                _count_refusal(summary, name, item.rejection)
            else:
                _store(store, item, name, source, summary)
        if progress is not None:
            progress(summary)
    return summary
