"""Ed25519 signatures over a folder: an offline bundle or a model pack arrives on a USB stick and is trusted
only when every file is the one its signer listed.

``sign_tree`` writes ``SIGNATURE.json`` into the folder: the SHA-256 of every regular file under it (paths
relative, ``/``-separated, sorted), the signer's name and public key, and an Ed25519 signature over that
list. ``verify_tree`` checks the signature against the keys the caller trusts, then every file: a file
changed, missing or added, a link, or a signer nobody trusts is refused with a reason code.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import stat
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import Refused

SIGNATURE = "SIGNATURE.json"
FORMAT = 1
CHUNK = 1 << 20


class SignatureProblem(Refused):
    """A folder whose signature does not hold, with a reason code."""


UNSIGNED = "UNSIGNED"  # no SIGNATURE.json, or one that cannot be read
UNTRUSTED_SIGNER = "UNTRUSTED_SIGNER"  # signed by a key the site does not trust
BAD_SIGNATURE = "BAD_SIGNATURE"  # the signature does not match the list of files
FILE_CHANGED = "FILE_CHANGED"  # a listed file's SHA-256 differs
FILE_MISSING = "FILE_MISSING"  # a listed file is not there
EXTRA_FILE = "EXTRA_FILE"  # a file the signer did not list
NOT_REGULAR_FILE = "NOT_REGULAR_FILE"  # a link, device or other non-file inside the folder
BAD_KEY = "BAD_KEY"  # a key file that is not an Ed25519 key


@dataclasses.dataclass(frozen=True)
class Verified:
    """A folder whose signature holds: who signed it and what it holds."""

    signer: str
    fingerprint: str
    files: dict[str, str]


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, first 16 bytes in hex groups (as the site's own keys are shown)."""
    digest = hashlib.sha256(raw_public(key)).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def public_text(key: Ed25519PublicKey) -> str:
    """The text form of a public key: base64 of its 32 raw bytes (one line, as written to a .pub file)."""
    return base64.b64encode(raw_public(key)).decode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from ``path``: base64 of the raw 32 bytes, or PEM."""
    data = path.read_bytes().strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data, validate=True))
    except ValueError as exc:
        raise SignatureProblem(BAD_KEY, f"{path} is not an Ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureProblem(BAD_KEY, f"{path} is not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise SignatureProblem(BAD_KEY, f"{path} is not an Ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureProblem(BAD_KEY, f"{path} is not an Ed25519 private key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path, ignore: Collection[str] = ()) -> list[Path]:
    """Every entry under ``root`` except the signature itself and ``ignore``, sorted; a link or special file
    is refused."""
    out = []
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        relative = path.relative_to(root).as_posix()
        if relative == SIGNATURE or relative in ignore:
            continue
        if not stat.S_ISREG(mode):
            raise SignatureProblem(NOT_REGULAR_FILE, f"{relative} is not a regular file (links are not signed)")
        out.append(path)
    return out


def digest_tree(root: Path, ignore: Collection[str] = ()) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every regular file under ``root`` but the signature and ``ignore``."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in _walk(root, ignore)}


def _signed_bytes(doc: dict[str, Any]) -> bytes:
    body = {k: doc[k] for k in ("format", "signer", "key", "files")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_tree(root: Path, key: Ed25519PrivateKey, signer: str, ignore: Collection[str] = ()) -> Path:
    """Write ``root/SIGNATURE.json`` listing and signing every file under ``root``; returns its path.

    ``ignore``: relative paths left out of the signature (files the device itself writes there later).
    """
    doc: dict[str, Any] = {"format": FORMAT, "signer": signer, "key": public_text(key.public_key()),
                           "files": digest_tree(root, ignore)}
    doc["signature"] = base64.b64encode(key.sign(_signed_bytes(doc))).decode()
    path = root / SIGNATURE
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def read_signature(root: Path) -> dict[str, Any]:
    """The signature document of ``root``, its shape checked (not its signature)."""
    path = root / SIGNATURE
    if not path.is_file():
        raise SignatureProblem(UNSIGNED, f"{root.name} has no {SIGNATURE}: it is not signed")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError("unknown format")
        for field in ("key", "signature"):
            base64.b64decode(doc[field], validate=True)
        if not isinstance(doc["signer"], str):
            raise ValueError("no signer name")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SignatureProblem(UNSIGNED, f"{SIGNATURE} of {root.name} cannot be read ({exc})") from exc
    return doc


def signer_key(doc: dict[str, Any]) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(doc["key"]))


def verify_tree(root: Path, trusted: Iterable[Ed25519PublicKey], ignore: Collection[str] = ()) -> Verified:
    """Check ``root``'s signature with a trusted key, then every file; returns who signed it.

    ``ignore``: relative paths outside the signature, neither required nor checked, listed or not (files the
    device writes into the folder after it was installed, such as a model pack's build outputs).

    Raises :class:`SignatureProblem` (UNSIGNED, UNTRUSTED_SIGNER, BAD_SIGNATURE, FILE_CHANGED, FILE_MISSING,
    EXTRA_FILE, NOT_REGULAR_FILE) at the first thing that does not hold.
    """
    doc = read_signature(root)
    key = signer_key(doc)
    raw = raw_public(key)
    if not any(raw_public(t) == raw for t in trusted):
        raise SignatureProblem(UNTRUSTED_SIGNER, f"{root.name} is signed by {doc['signer']} ({fingerprint(key)}), "
                                                 "a key this appliance does not trust")
    try:
        key.verify(base64.b64decode(doc["signature"]), _signed_bytes(doc))
    except InvalidSignature as exc:
        raise SignatureProblem(BAD_SIGNATURE, f"the signature of {root.name} does not match its list of files "
                                              "(changed after signing)") from exc
    listed: dict[str, str] = {k: v for k, v in doc["files"].items() if k not in ignore}
    present = {p.relative_to(root).as_posix(): p for p in _walk(root, ignore)}
    extra = sorted(set(present) - set(listed))
    if extra:
        raise SignatureProblem(EXTRA_FILE, f"{extra[0]} in {root.name} was not signed")
    for name, expected in sorted(listed.items()):
        if name not in present:
            raise SignatureProblem(FILE_MISSING, f"{name} of {root.name} is missing")
        if sha256_file(present[name]) != expected:
            raise SignatureProblem(FILE_CHANGED, f"{name} of {root.name} differs from what {doc['signer']} signed")
    return Verified(str(doc["signer"]), fingerprint(key), dict(listed))
