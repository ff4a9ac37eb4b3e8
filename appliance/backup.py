"""Backup and restore of a data directory: one file, encrypted with the site's backup key and signed with its
signing key, read back and verified before the medium may be removed.

What goes in: the database (SQLite's online backup, a consistent copy while the services run), ``keys/``
(signing key, pseudonym secret, backup key, trusted keys), ``appliance.toml``, ``web-secret.key``,
``artefacts/`` (results' key images, overlays, viewer frames, DICOM outputs), ``packs/`` and, when asked,
``instances/``. Left out: the quarantine, exports (the hub has them), caches, engines and scratch files.

The file (``<site>-backup-<UTC time>.ctb``)::

    MAGIC | u32 header length | header JSON | frames... | (EOF)
    frame = u8 last (0/1) | u32 length | AES-256-GCM(plaintext <= 1 MiB)

The header (site id, time, the signer's public key and fingerprint, the backup key's id, the nonce prefix)
is in clear and bound to every frame as associated data with the frame's number and whether it is the last:
a changed header, a changed, dropped, reordered or added frame, or a missing end is refused (TAMPERED,
TRUNCATED). The plaintext is a tar of a staging folder signed with :func:`appliance.signing.sign_tree`
(``SIGNATURE.json`` first, then ``BACKUP.json``); a restore checks it with :func:`appliance.signing.verify_tree`
against the public key in the header, and refuses a backup whose signing key inside is not that key (FOREIGN:
not this site's own backup) or, with ``expect_fingerprint``, not the site the admin expects.

The backup key (``keys/backup.key``, 32 random bytes) is made on the first backup; its recovery code
(:func:`recovery_code`) must be written down once and kept away from the box, since a lost disk loses
``keys/`` too. A backup is written under a temporary name, fsynced, read back whole (every frame decrypted,
every file's SHA-256 against the signed list) and only then renamed into place: a kill -9 at any point leaves
the earlier backups as they were.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import fcntl
import getpass
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance import __version__, signing
from appliance.config import Settings
from appliance.durable import durable_rename, fsync_dir
from appliance.errors import Refused
from appliance.export import keys
from appliance.store import datadir
from appliance.store.database import audit, connect, counts, open_database, utcnow, write_transaction
from appliance.store.datadir import DataDirectory

MAGIC = b"CTSCREEN-BACKUP\n"
FORMAT = 1
FRAME = 1 << 20  # plaintext bytes per encrypted frame
SUFFIX = ".ctb"
BACKUP_KEY = "backup.key"
MANIFEST = "BACKUP.json"
STAGING = "run/backup"  # inside the data directory, so files are hard-linked, not copied
MAX_HEADER = 64 * 1024
COPIED = (datadir.SETTINGS_FILE, datadir.WEB_SECRET)  # small files copied (they may be rewritten in place)
LINKED = (datadir.ARTEFACTS, datadir.PACKS)  # folders whose files are written once: hard-linked


class BackupRefused(Refused):
    """A backup that cannot be written, read or restored, with a reason code and a sentence."""


@dataclasses.dataclass(frozen=True)
class BackupResult:
    path: Path
    sha256: str
    size_bytes: int
    files: int
    site_id: str
    signer_fingerprint: str
    instances: bool


# --- the backup key ---------------------------------------------------------------------------------------


def backup_key(home: Path, *, create: bool = False) -> bytes:
    """The site's backup key (32 bytes) from ``keys/backup.key``; made there when ``create`` and missing."""
    path = DataDirectory(home).keys / BACKUP_KEY
    if not path.is_file():
        if not create:
            raise BackupRefused("NO_BACKUP_KEY", f"no backup key at {path}: run `appliance backup --show-key`")
        keys._write_private(path, AESGCM.generate_key(bit_length=256))
    data = path.read_bytes()
    if len(data) != 32:
        raise BackupRefused("NO_BACKUP_KEY", f"{path} is not a backup key (32 bytes)")
    return data


def recovery_code(key: bytes) -> str:
    """The backup key as a code to write down: base32 in groups of four letters or digits."""
    text = base64.b32encode(key).decode().rstrip("=")
    return "-".join(text[i:i + 4] for i in range(0, len(text), 4))


def parse_recovery_code(code: str) -> bytes:
    """The backup key a recovery code stands for (dashes, spaces and case do not matter)."""
    text = "".join(ch for ch in code.upper() if ch.isalnum())
    try:
        key = base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BackupRefused("BAD_KEY_CODE", "that is not a backup recovery code (52 letters and digits)")
    return key


def key_id(key: bytes) -> str:
    """A short name of a backup key, kept in the header: which key a backup needs, without revealing it."""
    return hashlib.sha256(b"ctscreen-backup-key-id" + key).hexdigest()[:16]


# --- the file format ---------------------------------------------------------------------------------------


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">QB", index, last)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">Q", index)


class _Sealer(io.RawIOBase):
    """A write-only stream: plaintext in, encrypted frames out to ``out`` (``close_frames`` writes the last)."""

    def __init__(self, out: IO[bytes], key: bytes, header: bytes, prefix: bytes):
        super().__init__()
        self.out, self.aead, self.header, self.prefix = out, AESGCM(key), header, prefix
        self.buffer, self.index = bytearray(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.buffer += data
        while len(self.buffer) > FRAME:
            self._frame(bytes(self.buffer[:FRAME]), last=False)
            del self.buffer[:FRAME]
        return len(data)

    def _frame(self, plain: bytes, *, last: bool) -> None:
        sealed = self.aead.encrypt(_nonce(self.prefix, self.index), plain, _aad(self.header, self.index, last))
        self.out.write(struct.pack(">BI", last, len(sealed)) + sealed)
        self.index += 1

    def close_frames(self) -> None:
        self._frame(bytes(self.buffer), last=True)
        self.buffer.clear()


def read_header(f: IO[bytes]) -> tuple[dict[str, Any], bytes]:
    """The header of a backup file open at its start: (parsed, raw bytes as bound to every frame)."""
    if f.read(len(MAGIC)) != MAGIC:
        raise BackupRefused("NOT_A_BACKUP", "this file is not an appliance backup")
    size = f.read(4)
    if len(size) != 4 or not 0 < struct.unpack(">I", size)[0] <= MAX_HEADER:
        raise BackupRefused("TAMPERED", "the backup's header is damaged")
    raw = f.read(struct.unpack(">I", size)[0])
    try:
        header = json.loads(raw)
        if header["format"] != FORMAT:
            raise BackupRefused("NOT_A_BACKUP", f"backup format {header['format']} is not one this version reads")
        base64.b64decode(header["nonce_prefix"], validate=True)
        Ed25519PublicKey.from_public_bytes(base64.b64decode(header["public_key"], validate=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupRefused("TAMPERED", f"the backup's header is damaged ({type(exc).__name__})") from None
    return header, raw


def _frames(f: IO[bytes], key: bytes, header: dict[str, Any], raw: bytes) -> Iterator[bytes]:
    """Decrypted frames of a backup open after its header; every tag checked, the end required."""
    aead, prefix = AESGCM(key), base64.b64decode(header["nonce_prefix"])
    index = 0
    while True:
        head = f.read(5)
        if len(head) < 5:
            raise BackupRefused("TRUNCATED", "the backup ends before its last part: it was cut short")
        last, size = struct.unpack(">BI", head)
        sealed = f.read(size)
        if last not in (0, 1) or size > FRAME + 16 or len(sealed) != size:
            raise BackupRefused("TAMPERED" if len(sealed) == size else "TRUNCATED",
                                "the backup's framing is damaged")
        try:
            yield aead.decrypt(_nonce(prefix, index), sealed, _aad(raw, index, bool(last)))
        except InvalidTag:
            raise BackupRefused("TAMPERED", f"part {index} of the backup was changed, or the header was") from None
        index += 1
        if last:
            if f.read(1):
                raise BackupRefused("TAMPERED", "the backup has bytes after its end")
            return


class _Opened(io.RawIOBase):
    """The decrypted tar stream of a backup, for ``tarfile.open(mode="r|")``."""

    def __init__(self, frames: Iterator[bytes]):
        super().__init__()
        self.frames, self.pending = frames, b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self.pending:
            try:
                self.pending = next(self.frames)
            except StopIteration:
                return 0
        n = min(len(target), len(self.pending))
        target[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def _check_key(header: dict[str, Any], key: bytes) -> None:
    if header.get("key_id") != key_id(key):
        raise BackupRefused("WRONG_KEY", "this backup was encrypted with another backup key: give its recovery code")


# --- writing ---------------------------------------------------------------------------------------------------


def _link_tree(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard-link every regular file under ``source`` into ``target`` (copied where a link cannot be made)."""
    for folder, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        rel = Path(folder).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            src = Path(folder) / name
            if not src.is_file() or src.is_symlink():
                continue
            try:
                os.link(src, target / rel / name)
            except OSError:
                shutil.copy2(src, target / rel / name)


def _copy_database(home: Path, target: Path) -> None:
    """SQLite's online backup: a consistent copy taken page by page while other processes keep writing."""
    source = sqlite3.connect(f"file:{DataDirectory(home).database}?mode=ro", uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        copy.close()
        source.close()


def _stage(settings: Settings, staging: Path, *, instances: bool, site_id: str, created: str) -> None:
    home = settings.home_path
    ddir = DataDirectory(home)
    open_database(home).conn.close()  # migrated, so the copy is of this version's schema
    staging.mkdir(parents=True)
    _copy_database(home, staging / datadir.DATABASE)
    shutil.copytree(ddir.keys, staging / datadir.KEYS)
    for name in COPIED:
        if (home / name).is_file():
            shutil.copy2(home / name, staging / name)
    for name in (*LINKED, *((datadir.INSTANCES,) if instances else ())):
        if (home / name).is_dir():
            _link_tree(home / name, staging / name, skip=(datadir.SCRATCH,))
    copy = connect(staging / datadir.DATABASE, durable=False, read_only=True)
    try:
        held = counts(copy)
    finally:
        copy.conn.close()
    (staging / MANIFEST).write_text(json.dumps({
        "site_id": site_id, "created_at": created, "appliance_version": __version__, "instances": instances,
        "counts": held}, indent=1, sort_keys=True) + "\n")


def _tar(staging: Path, sealer: _Sealer) -> int:
    """Write the staging folder as a tar (signature and manifest first) into ``sealer``; returns the file count."""
    names = [signing.SIGNATURE, MANIFEST] + sorted(set(json.loads((staging / signing.SIGNATURE).read_text())["files"])
                                                    - {MANIFEST})
    with tarfile.open(fileobj=sealer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tar.gettarinfo(str(staging / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(staging / name, "rb") as f:
                tar.addfile(info, f)
    return len(names)


def _lock(home: Path) -> int:
    path = DataDirectory(home).home / STAGING / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BackupRefused("BACKUP_RUNNING", "another backup of this data directory is being written") from None
    for stale in path.parent.iterdir():  # what a killed backup left
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return fd


def write_backup(settings: Settings, out_dir: Path, *, instances: bool = False, actor: str | None = None,
                 now: datetime.datetime | None = None) -> BackupResult:
    """Write, read back and verify one backup of the data directory into ``out_dir``; returns what was written."""
    from appliance.export.run import site_id as export_site_id

    home = settings.home_path
    keys.init_site_keys(home)
    key, signer = backup_key(home, create=True), keys.signing_key(home)
    sid = export_site_id(settings)
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    created = moment.isoformat(timespec="seconds")
    final = out_dir / f"{sid}-backup-{moment.strftime('%Y%m%dT%H%M%S%fZ')}{SUFFIX}"
    lock = _lock(home)
    staging = home / STAGING / uuid.uuid4().hex
    try:
        _stage(settings, staging, instances=instances, site_id=sid, created=created)
        signing.sign_tree(staging, signer, sid)
        header: dict[str, Any] = {"format": FORMAT, "site_id": sid, "created_at": created, "instances": instances,
                  "public_key": signing.public_text(signer.public_key()),
                  "signer_fingerprint": signing.fingerprint(signer.public_key()), "key_id": key_id(key),
                  "nonce_prefix": base64.b64encode(os.urandom(4)).decode()}
        raw = json.dumps(header, sort_keys=True).encode()
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{sid}-backup-*{SUFFIX}.partial"):  # a killed backup's: never renamed
            stale.unlink(missing_ok=True)
        partial = out_dir / f".{final.name}.partial"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(MAGIC + struct.pack(">I", len(raw)) + raw)
            sealer = _Sealer(f, key, raw, base64.b64decode(header["nonce_prefix"]))
            files = _tar(staging, sealer)
            sealer.close_frames()
            f.flush()
            os.fsync(f.fileno())
        os.sync()  # a USB disk's cache: what was written is on the medium before it is read back
        verify_backup(partial, key)
        durable_rename(partial, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)
    digest = signing.sha256_file(final)
    result = BackupResult(final, digest, final.stat().st_size, files, sid, header["signer_fingerprint"], instances)
    _record(home, result, actor or getpass.getuser(), created)
    return result


def _record(home: Path, result: BackupResult, actor: str, started: str) -> None:
    db = open_database(home)
    try:
        with write_transaction(db):
            db.table("backups").insert({"path": str(result.path), "sha256": result.sha256,
                                        "size_bytes": result.size_bytes, "instances": int(result.instances),
                                        "signer_fingerprint": result.signer_fingerprint, "actor": actor,
                                        "started_at": started, "finished_at": utcnow()})
            audit(db, actor, "backup_written", str(result.path), sha256=result.sha256, size_bytes=result.size_bytes,
                  files=result.files, instances=result.instances)
    finally:
        db.conn.close()


def rotate(out_dir: Path, site_id: str, keep: int) -> list[Path]:
    """Remove this site's oldest backups in ``out_dir`` beyond the newest ``keep``; returns those removed."""
    backups = sorted(out_dir.glob(f"{site_id}-backup-*{SUFFIX}"))
    removed = backups[:-keep] if keep > 0 else []
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        fsync_dir(out_dir)
    return removed


def last_backup(db) -> dict[str, Any] | None:
    """The newest backup this data directory recorded (``backups`` row), or None."""
    return next(db.query("SELECT * FROM backups ORDER BY finished_at DESC LIMIT 1"), None)


# --- reading back and restoring ---------------------------------------------------------------------------------


def _signature_holds(doc_bytes: bytes, public: Ed25519PublicKey) -> dict[str, Any]:
    """The signed list of files, once its signature holds for ``public`` (checked by :func:`signing.verify_tree`
    on a folder holding only the signature, every listed file left aside)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / signing.SIGNATURE).write_bytes(doc_bytes)
        doc = signing.read_signature(Path(tmp))
        signing.verify_tree(Path(tmp), [public], ignore=set(doc["files"]))
    return doc


def verify_backup(path: Path, key: bytes) -> dict[str, Any]:
    """Read a backup whole: every frame decrypted, the signature checked against the header's key and every
    file's SHA-256 against the signed list; returns the header. Raises :class:`BackupRefused` (or
    :class:`appliance.signing.SignatureProblem`) at the first thing that does not hold."""
    with open(path, "rb") as f:
        header, raw = read_header(f)
        _check_key(header, key)
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(header["public_key"]))
        listed: dict[str, str] | None = None
        seen = set()
        frames = _frames(f, key, header, raw)
        with tarfile.open(fileobj=_Opened(frames), mode="r|") as tar:
            for member in tar:
                data = tar.extractfile(member)
                if data is None:
                    raise BackupRefused("TAMPERED", f"{member.name} in the backup is not a regular file")
                if listed is None:
                    if member.name != signing.SIGNATURE:
                        raise BackupRefused("UNSIGNED", "the backup does not start with its signature")
                    listed = _signature_holds(data.read(), public)["files"]
                    continue
                digest = hashlib.sha256()
                while chunk := data.read(signing.CHUNK):
                    digest.update(chunk)
                if listed.get(member.name) != digest.hexdigest():
                    raise BackupRefused("FILE_CHANGED", f"{member.name} in the backup is not the file that was signed")
                seen.add(member.name)
        for _rest in frames:  # past the tar's end: the last frame, and nothing after it
            pass
        if listed is None or seen != set(listed):
            raise BackupRefused("FILE_MISSING", "the backup lacks files its signature lists")
    return header


def _empty(home: Path) -> bool:
    return not home.exists() or (home.is_dir() and not any(home.iterdir()))


def restore(path: Path, home: Path, key: bytes, *, expect_fingerprint: str | None = None,
            actor: str | None = None) -> dict[str, Any]:
    """Restore the backup at ``path`` into ``home`` (missing or empty); returns its manifest.

    Everything is unpacked beside ``home`` and checked first (signature, files, the signing key inside being
    the signer, the database's integrity); a refusal leaves ``home`` as it was and nothing else behind.
    """
    if not _empty(home):
        raise BackupRefused("NOT_EMPTY", f"{home} is not empty: restore only into a new, empty data directory")
    staging = home.parent / f".{home.name}.restoring-{uuid.uuid4().hex[:8]}"
    try:
        with open(path, "rb") as f:
            header, raw = read_header(f)
            _check_key(header, key)
            staging.mkdir(parents=True)
            frames = _frames(f, key, header, raw)
            with tarfile.open(fileobj=_Opened(frames), mode="r|") as tar:
                tar.extractall(staging, filter="data")
            for _rest in frames:  # past the tar's end: the last frame, and nothing after it
                pass
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(header["public_key"]))
        verified = signing.verify_tree(staging, [public])
        _check_own(staging, header, verified, expect_fingerprint)
        _check_database(staging / datadir.DATABASE)
        manifest = json.loads((staging / MANIFEST).read_text())
        for name in (signing.SIGNATURE, MANIFEST):
            (staging / name).unlink()
        if home.exists():
            home.rmdir()
        durable_rename(staging, home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    db = open_database(home)
    try:
        with write_transaction(db):
            audit(db, actor or getpass.getuser(), "backup_restored", str(path), site_id=header["site_id"],
                  created_at=header["created_at"], signer=verified.fingerprint)
    finally:
        db.conn.close()
    return manifest


def _check_own(staging: Path, header: dict[str, Any], verified: signing.Verified, expect: str | None) -> None:
    """FOREIGN: the signing key inside is not the one that signed (not the site's own backup), or the signer is
    not the site the admin expects."""
    try:
        inside = keys.signing_key(staging).public_key()
    except keys.KeyProblem as exc:
        raise BackupRefused("FOREIGN", f"the backup holds no usable site signing key ({exc})") from None
    if signing.fingerprint(inside) != verified.fingerprint:
        raise BackupRefused("FOREIGN", f"the backup was signed by {verified.fingerprint}, not by the site key it "
                                       f"holds ({signing.fingerprint(inside)}): it is not this site's own backup")
    if expect and expect.replace(":", "").lower() != verified.fingerprint.replace(":", ""):
        raise BackupRefused("FOREIGN", f"the backup is of site {header['site_id']} ({verified.fingerprint}), not "
                                       f"the expected {expect}")


def _check_database(path: Path) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        state = conn.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        state = str(exc)
    finally:
        conn.close()
    if state != "ok":
        raise BackupRefused("DATABASE_DAMAGED", f"the database in the backup fails its integrity check: {state}")
