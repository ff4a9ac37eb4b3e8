"""Browser upload into the same import path as folders and USB sticks (the web UI mounts it).

Parts are spooled under a private folder with generated names (a client's file
name is never a path here), counted against ``max_upload_bytes`` as they
arrive (beyond it: :class:`UploadTooLarge`, HTTP 413, and nothing is kept),
then imported like any folder: zip archives by their content, bad files
quarantined; the caller queues the series touched. Below the low-disk
watermark, or when the disk fills, the upload stops with
:class:`~appliance.errors.DiskLow` (HTTP 507): the spool is removed, what was
stored stays stored.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.ingest.importer import ImportSummary, check_disk, import_paths
from appliance.store.datadir import DataDirectory
from appliance.store.files import disk_full, is_disk_full
from appliance.store.instances import InstanceStore

CHUNK = 1024 * 1024
DISK_CHECK_CHUNKS = 64  # free space checked again after every 64 MiB spooled


class UploadTooLarge(ApplianceError):
    """The upload exceeds the size the appliance accepts (HTTP 413)."""

    http_status = 413


def _client_name(name: str) -> str:
    """The browser's file name, for messages only: its last part, printable, at most 200 characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in base if c.isprintable())[:200] or "unnamed"


def _spool(parts: Iterable[tuple[str, BinaryIO]], folder: Path, limit: int, watermark_mb: int) -> dict[str, str]:
    """Write the parts under generated names; returns spool path -> the client's file name."""
    total, names = 0, {}
    try:
        for index, (client_name, stream) in enumerate(parts):
            path = folder / f"part-{index:06d}"
            names[str(path)] = _client_name(client_name)
            check_disk(folder, watermark_mb)
            with open(path, "xb") as out:
                chunks = 0
                while chunk := stream.read(CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise UploadTooLarge(f"the upload is larger than the {limit // 2**20} MiB this appliance "
                                             "accepts")
                    out.write(chunk)
                    chunks += 1
                    if chunks % DISK_CHECK_CHUNKS == 0:
                        check_disk(folder, watermark_mb)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(folder) from exc
        raise
    return names


def _labeller(names: dict[str, str]):
    """Spool paths (and the ``part-N:member`` labels of zip members) back to the client's names."""
    by_name = {Path(spooled).name: client for spooled, client in names.items()}

    def label(name: str) -> str:
        if name in names:
            return names[name]
        head, sep, rest = name.partition(":")
        return by_name[head] + sep + rest if head in by_name else name
    return label


def receive_upload(parts: Iterable[tuple[str, BinaryIO]], store: InstanceStore, settings: Settings) -> ImportSummary:
    """Import uploaded files or zip archives; returns the import summary, whose series the caller queues
    (the web UI once the upload's last batch is in, so no series is analysed half-sent)."""
    check_disk(store.home, settings.disk_low_watermark_mb)
    folder = DataDirectory(store.home).uploads / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        names = _spool(parts, folder, settings.max_upload_bytes, settings.disk_low_watermark_mb)
        summary = import_paths(store, [folder], settings, source="upload", label=_labeller(names))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # stored files are in the instance store now
    return summary
