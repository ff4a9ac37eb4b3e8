"""Signatures over a folder: what a signer listed is what arrives, or it is refused with a reason code."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import signing


@pytest.fixture
def signed(tmp_path):
    root = tmp_path / "pack"
    (root / "sub").mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"\x00" * 1000)
    (root / "sub" / "manifest.toml").write_text('id = "x"\n')
    key = Ed25519PrivateKey.generate()
    signing.sign_tree(root, key, "vendor")
    return root, key


def test_a_signed_folder_verifies_with_its_signer_trusted(signed):
    root, key = signed
    verified = signing.verify_tree(root, [key.public_key()])
    assert verified.signer == "vendor" and set(verified.files) == {"model.onnx", "sub/manifest.toml"}
    assert verified.fingerprint == signing.fingerprint(key.public_key())


@pytest.mark.parametrize(("tamper", "code"), [
    (lambda r: (r / "model.onnx").write_bytes(b"\x00" * 999 + b"\x01"), signing.FILE_CHANGED),
    (lambda r: (r / "sub" / "manifest.toml").unlink(), signing.FILE_MISSING),
    (lambda r: (r / "extra.py").write_text("print(1)"), signing.EXTRA_FILE),
    (lambda r: (r / "link").symlink_to(r / "model.onnx"), signing.NOT_REGULAR_FILE),
    (lambda r: (r / signing.SIGNATURE).unlink(), signing.UNSIGNED),
    (lambda r: (r / signing.SIGNATURE).write_text("{"), signing.UNSIGNED),
    (lambda r: (r / signing.SIGNATURE).write_text((r / signing.SIGNATURE).read_text().replace("vendor", "vendoR")),
     signing.BAD_SIGNATURE),
])
def test_a_changed_folder_is_refused_with_its_reason(signed, tamper, code):
    root, key = signed
    tamper(root)
    with pytest.raises(signing.SignatureProblem) as caught:
        signing.verify_tree(root, [key.public_key()])
    assert caught.value.reason_code == code


def test_a_signer_nobody_trusts_is_refused(signed, tmp_path):
    root, key = signed
    other = Ed25519PrivateKey.generate()
    with pytest.raises(signing.SignatureProblem) as caught:
        signing.verify_tree(root, [other.public_key()])
    assert caught.value.reason_code == signing.UNTRUSTED_SIGNER
    # a re-signed folder by an attacker's key: still untrusted
    signing.sign_tree(root, other, "vendor")
    with pytest.raises(signing.SignatureProblem):
        signing.verify_tree(root, [key.public_key()])


def test_keys_round_trip_through_their_files(tmp_path):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "k.pem").write_bytes(signing.private_pem(key))
    (tmp_path / "k.pub").write_text(signing.public_text(key.public_key()) + "\n")
    assert signing.raw_public(signing.load_private_key(tmp_path / "k.pem").public_key()) == \
        signing.raw_public(signing.load_public_key(tmp_path / "k.pub"))
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(signing.SignatureProblem) as caught:
        signing.load_public_key(tmp_path / "bad.pub")
    assert caught.value.reason_code == signing.BAD_KEY
