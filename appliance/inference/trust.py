"""Whose model packs this appliance accepts: the vendor's key shipped with the installed version, and the
keys the site admin added (``appliance packs trust KEYFILE``).

A pack is signed with :func:`appliance.signing.sign_tree` (``SIGNATURE.json``), leaving out the files the
device makes itself (:data:`appliance.inference.packs.DEVICE_MADE`: the INT8 models and parity reports that
``build_engines.py`` writes into the pack, checked instead against the model they were made from).

Trusted keys live in ``<home>/keys/trusted/<fingerprint>.pub`` (base64 of the raw Ed25519 key, the colons
of the fingerprint left out of the name); the vendor key is ``vendor.pub`` beside the ``engines/`` folder of
the installed version (``<prefix>/versions/<v>/vendor.pub``); a development checkout has none.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import signing
from appliance.durable import write_bytes_durably
from appliance.inference.packs import DEVICE_MADE
from appliance.store.datadir import DataDirectory

log = logging.getLogger(__name__)

VENDOR_KEY = "vendor.pub"
VENDOR, SITE = "vendor", "site"  # where a trusted key came from


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    """A public key whose signatures the appliance accepts, and why (``VENDOR`` or ``SITE``)."""

    key: Ed25519PublicKey
    fingerprint: str
    source: str
    path: Path


def vendor_key_path(engines_dir: Path) -> Path:
    """Where the vendor key of the installed version lies: ``vendor.pub`` beside its ``engines/`` folder."""
    return engines_dir.parent / VENDOR_KEY


def _load(path: Path, source: str) -> TrustedKey | None:
    try:
        key = signing.load_public_key(path)
    except (signing.SignatureProblem, OSError) as exc:
        log.error("trusted key %s cannot be used: %s", path, exc)
        return None
    return TrustedKey(key, signing.fingerprint(key), source, path)


def vendor_keys(engines_dir: Path) -> list[TrustedKey]:
    """The vendor key shipped with the installed version (none in a development checkout)."""
    path = vendor_key_path(engines_dir)
    found = _load(path, VENDOR) if path.is_file() else None
    return [found] if found else []


def site_keys(home: Path) -> list[TrustedKey]:
    """The keys the site admin trusted (``appliance packs trust``)."""
    folder = DataDirectory(home).trusted_keys
    if not folder.is_dir():
        return []
    return [k for k in (_load(p, SITE) for p in sorted(folder.glob("*.pub"))) if k is not None]


def trusted_keys(home: Path, engines_dir: Path) -> list[TrustedKey]:
    """Every key whose packs this appliance accepts: the vendor's, then the site's."""
    return vendor_keys(engines_dir) + site_keys(home)


def key_file_name(fingerprint: str) -> str:
    return fingerprint.replace(":", "") + ".pub"


def trust_key(home: Path, key_file: Path) -> TrustedKey:
    """Add the public key in ``key_file`` (base64 or PEM) to the site's trusted keys; returns it.

    Raises :class:`appliance.signing.SignatureProblem` (``BAD_KEY``) for a file that is not an Ed25519 key.
    """
    key = signing.load_public_key(key_file)
    fingerprint = signing.fingerprint(key)
    target = DataDirectory(home).trusted_keys / key_file_name(fingerprint)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durably((signing.public_text(key) + "\n").encode(), target)
    return TrustedKey(key, fingerprint, SITE, target)


def sign_pack(folder: Path, key: Ed25519PrivateKey, signer: str) -> Path:
    """Sign the pack in ``folder`` (every file but the device-made ones); returns ``SIGNATURE.json``."""
    return signing.sign_tree(folder, key, signer, ignore=DEVICE_MADE)


def verify_pack(folder: Path, keys: list[TrustedKey]) -> signing.Verified:
    """The pack's signer when its signature holds with one of ``keys`` and every signed file is intact.

    Raises :class:`appliance.signing.SignatureProblem` with the reason code otherwise.
    """
    return signing.verify_tree(folder, [k.key for k in keys], ignore=DEVICE_MADE)


def is_signed(folder: Path) -> bool:
    return (folder / signing.SIGNATURE).exists()
