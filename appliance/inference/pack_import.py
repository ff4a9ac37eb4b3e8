"""Import a model pack from a USB stick: a folder or a ``.tar.gz`` of one, signed by a key the site trusts.

The pack is first copied into a staging folder of the data directory (regular files only; an archive is
read member by member: no absolute path, no ``..``, no link or device, size and count limits), and every
check runs on that copy, never on the medium: the signature against the trusted keys
(:mod:`appliance.inference.trust`), then the manifest and every file's SHA-256 (:func:`packs.load_pack`).
Only then is it renamed into ``<home>/packs/<id>/<version>/``. Nothing is overwritten: an installed
version is refused unless the new one is identical, and older versions stay for a rollback. A refusal
carries a reason code (the signature's, or ``PACK_*``) and a sentence, and leaves nothing behind.

Whether the new version runs is the registry's and the policy's business: the newest version of a pack
is used; a classifier version stays off until the site evaluated it and switched it on.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tarfile
import uuid
from pathlib import Path, PurePosixPath

from appliance import signing
from appliance.durable import fsync_dir
from appliance.inference import packs, trust
from appliance.inference.packs import PackRefused
from appliance.store.datadir import DataDirectory

STAGING = ".incoming"  # inside packs/, so the final rename never crosses file systems
MAX_FILES = 200
MAX_BYTES = 2 << 30  # 2 GiB: far above any pack (the largest shipped one is 13 MB)
MAX_DEPTH = 8
CHUNK = 1 << 20

UNSAFE_ARCHIVE = "UNSAFE_ARCHIVE"  # an absolute path, "..", a link or device, or past the limits
UNREADABLE = "PACK_UNREADABLE"  # not a tar archive, cut short, or a folder that cannot be read
NOT_A_PACK = "PACK_NOT_FOUND"  # no manifest.toml at the top or in the one folder inside
VERSION_EXISTS = "PACK_VERSION_EXISTS"  # this id and version is installed or shipped with other contents


@dataclasses.dataclass(frozen=True)
class Imported:
    """A pack that passed every check and is installed (or was already, identical)."""

    pack: packs.ModelPack
    signer: str
    fingerprint: str
    already: bool  # the same version, identical, was already there: nothing changed


def _refuse_member(member: tarfile.TarInfo, why: str) -> PackRefused:
    return PackRefused(UNSAFE_ARCHIVE, f"the archive member {member.name!r} {why}; nothing was imported.")


def _member_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if member.name.startswith("/") or name.is_absolute():
        raise _refuse_member(member, "has an absolute path")
    if ".." in name.parts:
        raise _refuse_member(member, "climbs out of the pack with '..'")
    if len(name.parts) > MAX_DEPTH:
        raise _refuse_member(member, f"lies more than {MAX_DEPTH} folders deep")
    return name


def _copy_limited(src, dst: Path, budget: int) -> int:
    """Copy the stream ``src`` into the new file ``dst``; returns the bytes written (at most ``budget``)."""
    written = 0
    with open(dst, "xb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > budget:
                raise PackRefused(UNSAFE_ARCHIVE, f"the pack is larger than {MAX_BYTES >> 20} MiB; "
                                                  "nothing was imported.")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return written


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract the tar archive (gzip or plain) ``archive`` into the empty folder ``dest``, safely."""
    total, count = 0, 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = _member_path(member)
                if member.isdir():
                    dest.joinpath(*name.parts).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise _refuse_member(member, "is a link or a special file (only regular files are accepted)")
                count += 1
                if count > MAX_FILES:
                    raise PackRefused(UNSAFE_ARCHIVE, f"the archive holds more than {MAX_FILES} files; "
                                                      "nothing was imported.")
                target = dest.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    raise _refuse_member(member, "cannot be read")
                with src:
                    total += _copy_limited(src, target, MAX_BYTES - total)
    except FileExistsError as exc:
        raise PackRefused(UNSAFE_ARCHIVE, f"the archive holds {Path(exc.filename).name} twice; "
                                          "nothing was imported.") from exc
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise PackRefused(UNREADABLE, f"{archive.name} is not a readable tar archive or was cut short ({exc}); "
                                      "nothing was imported.") from exc


def copy_folder(source: Path, dest: Path) -> None:
    """Copy the pack folder ``source`` into the empty folder ``dest``: regular files only, no link followed."""
    total, count = 0, 0

    def walk(folder: Path, target: Path, depth: int) -> None:
        nonlocal total, count
        if depth > MAX_DEPTH:
            raise PackRefused(UNSAFE_ARCHIVE, f"{folder} lies more than {MAX_DEPTH} folders deep; "
                                              "nothing was imported.")
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                (target / entry.name).mkdir()
                walk(Path(entry.path), target / entry.name, depth + 1)
            elif stat.S_ISREG(mode):
                count += 1
                if count > MAX_FILES:
                    raise PackRefused(UNSAFE_ARCHIVE, f"the pack holds more than {MAX_FILES} files; "
                                                      "nothing was imported.")
                with open(entry.path, "rb") as src:
                    total += _copy_limited(src, target / entry.name, MAX_BYTES - total)
            else:
                raise PackRefused(signing.NOT_REGULAR_FILE,
                                  f"{entry.name} in {folder.name} is a link or a special file (only regular files "
                                  "are accepted); nothing was imported.")

    try:
        walk(source, dest, 0)
    except OSError as exc:
        raise PackRefused(UNREADABLE, f"{source} cannot be read ({exc}); nothing was imported.") from exc


def _pack_root(staged: Path) -> Path:
    """The folder holding ``manifest.toml``: the staged folder itself or the one folder inside it."""
    if (staged / packs.MANIFEST).is_file():
        return staged
    inside = list(staged.iterdir())
    if len(inside) == 1 and inside[0].is_dir() and (inside[0] / packs.MANIFEST).is_file():
        return inside[0]
    raise PackRefused(NOT_A_PACK, f"no {packs.MANIFEST} at the top of the pack or in the one folder inside it; "
                                  "nothing was imported.")


def _identity(root: Path) -> tuple[str, str]:
    manifest = packs.read_manifest(root)
    pack_id, version = str(manifest.get("id", "")), str(manifest.get("version", ""))
    if not packs.PACK_ID.match(pack_id):
        raise PackRefused("PACK_INCONSISTENT", f"the pack's id {pack_id!r} is not lower-case letters, digits and '-'.")
    if not packs.PACK_VERSION.match(version):
        raise PackRefused("PACK_INCONSISTENT", f"the pack's version {version!r} is not letters, digits, '.', '+', '-'.")
    return pack_id, version


def _same_contents(installed: Path, verified: signing.Verified) -> bool:
    try:
        return signing.digest_tree(installed, packs.DEVICE_MADE) == verified.files
    except signing.SignatureProblem:
        return False


def _check_not_taken(pack: packs.ModelPack, verified: signing.Verified, target: Path, engines_dir: Path) -> bool:
    """True when this exact pack is already installed; raises when its id and version hold something else."""
    shipped = engines_dir / pack.id
    if (shipped / packs.MANIFEST).is_file():
        try:
            same_version = packs.read_manifest(shipped).get("version") == pack.version
        except PackRefused:
            same_version = False
        if same_version and not _same_contents(shipped, verified):
            raise PackRefused(VERSION_EXISTS, f"{pack.id} {pack.version} ships with this appliance and the imported "
                                              "pack differs from it; a new pack needs a new version. Nothing changed.")
    if target.exists():
        if _same_contents(target, verified):
            return True
        raise PackRefused(VERSION_EXISTS, f"{pack.id} {pack.version} is already installed with other contents; "
                                          "a new pack needs a new version. Nothing changed.")
    return False


def _stage(source: Path, staging: Path) -> Path:
    if source.is_dir() and not source.is_symlink():
        copy_folder(source, staging)
    elif source.is_file():
        extract_archive(source, staging)
    else:
        raise PackRefused(UNREADABLE, f"{source} is neither a pack folder nor a pack archive; nothing was imported.")
    return _pack_root(staging)


def import_pack(source: Path, home: Path, engines_dir: Path) -> Imported:
    """Verify the pack at ``source`` (folder or tar archive) and install it into ``<home>/packs/<id>/<version>/``.

    Raises :class:`PackRefused` (a signature reason code such as ``UNSIGNED``, ``UNTRUSTED_SIGNER``,
    ``FILE_CHANGED``; or ``UNSAFE_ARCHIVE``, ``PACK_*``) with nothing installed.
    """
    keys = trust.trusted_keys(home, engines_dir)
    installed = DataDirectory(home).packs
    staging = installed / STAGING / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        root = _stage(source, staging)
        try:
            verified = trust.verify_pack(root, keys)
        except signing.SignatureProblem as exc:
            raise PackRefused(exc.reason_code, f"{exc.reason}; nothing was imported.") from exc
        for name in packs.DEVICE_MADE:  # made on this device from the signed model, never taken from a medium
            (root / name).unlink(missing_ok=True)
        pack_id, version = _identity(root)
        pack = packs.load_pack(root, expected_id=pack_id, origin=packs.IMPORTED)
        target = installed / pack_id / version
        if _check_not_taken(pack, verified, target, engines_dir):
            return Imported(packs.load_pack(target, pack_id, packs.IMPORTED), verified.signer,
                            verified.fingerprint, True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(root, target)
        fsync_dir(target.parent)
        return Imported(packs.load_pack(target, pack_id, packs.IMPORTED), verified.signer, verified.fingerprint, False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
