"""The export bundle file: a signed manifest inside, sealed to the hub, signed again outside.

Layout (all lengths big-endian)::

    MAGIC (8) | header length (4) | header (JSON) | ciphertext | Ed25519 signature (64)

- the header says who sent what: format, site id and signing key, month, revision, creation time,
  the hub key it is sealed to, the ephemeral X25519 key and the AES-GCM nonce;
- the ciphertext is AES-256-GCM of the inner zip, the key derived (HKDF-SHA256) from X25519 between an
  ephemeral key and the hub's key, the header as associated data;
- the signature covers everything before it, so a flipped byte anywhere is refused before decryption.

Inside, ``manifest.json`` lists every member with its SHA-256 and ``manifest.sig`` signs the manifest
with the same site key; the hub checks both.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import ApplianceError
from appliance.export.keys import encode_public, fingerprint, raw_public

MAGIC = b"CTSXPRT1"
FORMAT = "ct-screening-export/1"
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 64 * 1024
HKDF_INFO = b"ct-screening-export/1 AES-256-GCM"
MANIFEST, MANIFEST_SIG = "manifest.json", "manifest.sig"
SUFFIX = ".ctx"


class BundleRefused(ApplianceError):
    """A bundle the hub will not merge, with a reason code and a sentence."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code, self.reason = reason_code, reason


@dataclass(frozen=True)
class Opened:
    header: dict[str, Any]
    manifest: dict[str, Any]
    members: dict[str, bytes]
    sha256: str  # of the whole bundle file: its identity at the hub


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=HKDF_INFO).derive(shared)


def pack_members(members: dict[str, bytes], manifest: dict[str, Any], signer: Ed25519PrivateKey) -> bytes:
    """The inner zip: members, then the manifest (with every member's SHA-256) and its signature."""
    manifest = {**manifest, "members": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                                        for name, data in sorted(members.items())}}
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(members.items()):
            z.writestr(name, data)
        z.writestr(MANIFEST, manifest_bytes)
        z.writestr(MANIFEST_SIG, signer.sign(manifest_bytes))
    return out.getvalue()


def seal(inner: bytes, header: dict[str, Any], signer: Ed25519PrivateKey, hub: X25519PublicKey) -> bytes:
    """The bundle file's bytes: ``inner`` encrypted to ``hub``, with ``header`` in clear, signed."""
    ephemeral = X25519PrivateKey.generate()
    eph_raw = raw_public(ephemeral.public_key())
    key = _key(ephemeral.exchange(hub), eph_raw, raw_public(hub))
    nonce = os.urandom(12)
    header = {**header, "format": FORMAT, "site_public_key": encode_public(signer.public_key()),
              "hub_key_fingerprint": fingerprint(hub), "ephemeral_public_key": base64.b64encode(eph_raw).decode(),
              "nonce": base64.b64encode(nonce).decode()}
    header_bytes = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes + AESGCM(key).encrypt(nonce, inner, header_bytes)
    return body + signer.sign(body)


def read_header(data: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """(header, header bytes, ciphertext, signature) of a bundle, or :class:`BundleRefused`."""
    if len(data) < len(MAGIC) + 4 + SIGNATURE_BYTES or data[:len(MAGIC)] != MAGIC:
        raise BundleRefused("NOT_A_BUNDLE", "this file is not an export bundle of this programme (or is cut short)")
    size = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "big")
    start = len(MAGIC) + 4
    if size > MAX_HEADER_BYTES or start + size + 16 + SIGNATURE_BYTES > len(data):
        raise BundleRefused("TRUNCATED", "the bundle is shorter than its header says: copied only in part?")
    header_bytes = data[start:start + size]
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise BundleRefused("TAMPERED", "the bundle's header is not readable") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else "?"
        raise BundleRefused("NOT_A_BUNDLE", f"unknown bundle format {found}")
    return header, header_bytes, data[start + size:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]


def verify_outer(data: bytes, site_key: Ed25519PublicKey) -> None:
    """The outer signature, by the site's registered key: else TAMPERED (or WRONG_SITE_KEY)."""
    header = json.loads(read_header(data)[1])
    if header.get("site_public_key") != encode_public(site_key):
        raise BundleRefused("WRONG_SITE_KEY", "the bundle is signed with a key that is not this site's registered key")
    try:
        site_key.verify(data[-SIGNATURE_BYTES:], data[:-SIGNATURE_BYTES])
    except InvalidSignature:
        raise BundleRefused("TAMPERED", "the signature does not match the content: the bundle was altered "
                            "or damaged in transit") from None


def open_bundle(data: bytes, site_key: Ed25519PublicKey, hub_key: X25519PrivateKey) -> Opened:
    """Verify, decrypt and check a bundle completely; raises :class:`BundleRefused` with the first problem."""
    header, header_bytes, ciphertext, _signature = read_header(data)
    verify_outer(data, site_key)
    if header.get("hub_key_fingerprint") != fingerprint(hub_key.public_key()):
        raise BundleRefused("WRONG_HUB_KEY", "the bundle was sealed to another hub key")
    try:
        eph_raw = base64.b64decode(header["ephemeral_public_key"])
        nonce = base64.b64decode(header["nonce"])
        key = _key(hub_key.exchange(X25519PublicKey.from_public_bytes(eph_raw)), eph_raw,
                   raw_public(hub_key.public_key()))
        inner = AESGCM(key).decrypt(nonce, ciphertext, header_bytes)
    except (InvalidTag, KeyError, ValueError):
        raise BundleRefused("WRONG_HUB_KEY", "the bundle cannot be decrypted with this hub's key") from None
    manifest, members = _unpack(inner, site_key)
    for field in ("site_id", "month", "revision"):
        if manifest.get(field) != header.get(field):
            raise BundleRefused("TAMPERED", f"the manifest and the header disagree on {field}")
    return Opened(header, manifest, members, hashlib.sha256(data).hexdigest())


def _unpack(inner: bytes, site_key: Ed25519PublicKey) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(inner)) as z:
            files = {info.filename: z.read(info) for info in z.infolist()}
    except zipfile.BadZipFile:
        raise BundleRefused("TAMPERED", "the bundle's content is not a readable archive") from None
    manifest_bytes, signature = files.pop(MANIFEST, None), files.pop(MANIFEST_SIG, None)
    if manifest_bytes is None or signature is None:
        raise BundleRefused("TAMPERED", "the bundle has no signed manifest")
    try:
        site_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleRefused("TAMPERED", "the manifest's signature does not match") from None
    manifest = json.loads(manifest_bytes)
    listed = manifest.get("members", {})
    if set(listed) != set(files):
        raise BundleRefused("TAMPERED", "the bundle's members differ from its manifest")
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
            raise BundleRefused("TAMPERED", f"{name} does not match its SHA-256 in the manifest")
    return manifest, files


def check_dates(header: dict[str, Any], now: datetime.datetime | None = None) -> None:
    """Refuse bundles dated in the future (clock wrong or forged): created after now + 1 day, or a month
    that has not ended when it was made."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        created = datetime.datetime.fromisoformat(header["created_at"])
        year, month = (int(v) for v in header["month"].split("-"))
    except (KeyError, ValueError):
        raise BundleRefused("TAMPERED", "the bundle's dates are not readable") from None
    if created > now + datetime.timedelta(days=1):
        raise BundleRefused("FUTURE_DATED", f"the bundle says it was made on {created:%Y-%m-%d}, after today")
    if (year, month) > (created.year, created.month):
        raise BundleRefused("FUTURE_DATED", f"the bundle covers {header['month']}, after the day it was made")
