"""The site's keys: an Ed25519 signing key and the secret behind its pseudonyms, kept in ``<home>/keys/``
readable by the data owner only; and the hub's X25519 public key the site encrypts to.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from appliance.errors import ApplianceError
from appliance.store import datadir
from appliance.store.datadir import DataDirectory

KEYS_DIR = datadir.KEYS
SIGNING_KEY = "site-signing.key"
PSEUDONYM_SECRET = "site-pseudonym.secret"


class KeyProblem(ApplianceError):
    """A key is missing, unreadable or of the wrong kind."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_public(key: Ed25519PublicKey | X25519PublicKey) -> str:
    """The text form of a public key, as exchanged between site and hub: base64 of the 32 raw bytes."""
    return base64.b64encode(raw_public(key)).decode()


def fingerprint(key: Ed25519PublicKey | X25519PublicKey) -> str:
    """SHA-256 of the raw public key, first 16 bytes in hex groups (shown in the UI, printed by the CLI)."""
    digest = hashlib.sha256(raw_public(key)).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def _private_bytes(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_site_keys(home: Path) -> Ed25519PublicKey:
    """Make the site's signing key and pseudonym secret (once; an existing key is kept)."""
    folder = DataDirectory(home).keys
    if not (folder / SIGNING_KEY).exists():
        _write_private(folder / SIGNING_KEY, _private_bytes(Ed25519PrivateKey.generate()))
    if not (folder / PSEUDONYM_SECRET).exists():
        _write_private(folder / PSEUDONYM_SECRET, secrets.token_bytes(32))
    return signing_key(home).public_key()


def _load_private(path: Path):
    if not path.is_file():
        raise KeyProblem(f"no key at {path}: run `appliance keys init` first")
    if path.stat().st_mode & 0o077:
        raise KeyProblem(f"{path} is readable by other users; it must be 0600")
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def signing_key(home: Path) -> Ed25519PrivateKey:
    key = _load_private(DataDirectory(home).keys / SIGNING_KEY)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyProblem("the site signing key is not an Ed25519 key")
    return key


def pseudonym_secret(home: Path) -> bytes:
    path = DataDirectory(home).keys / PSEUDONYM_SECRET
    if not path.is_file():
        raise KeyProblem(f"no pseudonym secret at {path}: run `appliance keys init` first")
    return path.read_bytes()


def site_public_key(home: Path) -> Ed25519PublicKey | None:
    try:
        return signing_key(home).public_key()
    except KeyProblem:
        return None


def parse_ed25519_public(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"not an Ed25519 public key (base64 of 32 bytes): {exc}") from None


def parse_x25519_public(text: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"not an X25519 public key (base64 of 32 bytes): {exc}") from None


def init_hub_keys(folder: Path) -> X25519PublicKey:
    """Make the hub's X25519 key pair under ``folder`` (once)."""
    path = folder / "hub-encryption.key"
    if not path.exists():
        _write_private(path, _private_bytes(X25519PrivateKey.generate()))
    return hub_private_key(folder).public_key()


def hub_private_key(folder: Path) -> X25519PrivateKey:
    key = _load_private(folder / "hub-encryption.key")
    if not isinstance(key, X25519PrivateKey):
        raise KeyProblem("the hub key is not an X25519 key")
    return key
