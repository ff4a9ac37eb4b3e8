"""Model packs from a partner: trusted keys, signed packs imported side by side, refusals with a reason.

Packs here are copies of the shipped ones with a new version, their manifest's checksums written again
(``packs.write_pack``) and signed with a key made for the test, as a partner would.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import cli, config, signing, tomlfile
from appliance.inference import pack_import, packs, policy, registry, trust
from appliance.inference.packs import PackRefused
from appliance.store.database import open_database
from appliance.store.datadir import DataDirectory

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "engines"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    """A real deployment's settings (classifiers off until evaluated), for the CLI too (APPLIANCE_HOME)."""
    home = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    monkeypatch.delenv("APPLIANCE_DEMONSTRATION", raising=False)
    monkeypatch.delenv("APPLIANCE_ENGINES_DIR", raising=False)
    return config.load(environ={"APPLIANCE_HOME": str(home)})


@pytest.fixture
def partner(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A partner's signing key and its public key file."""
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "partner.pub"
    pub.write_text(signing.public_text(key.public_key()) + "\n")
    return key, pub


def make_pack(out: Path, model_id: str, version: str, key: Ed25519PrivateKey | None) -> Path:
    """A copy of the shipped ``model_id`` pack as ``version`` (checksums written again), signed by ``key``."""
    folder = out / model_id
    shutil.copytree(SHIPPED / model_id, folder, ignore=shutil.ignore_patterns(*packs.DEVICE_MADE))
    manifest = tomlfile.loads((folder / packs.MANIFEST).read_text())
    manifest["version"] = version
    packs.write_pack(folder, manifest, list(manifest["files"]))
    if key is not None:
        trust.sign_pack(folder, key, "Partner Hospital AI Lab")
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def audit_actions(settings: config.Settings) -> list[tuple[str, str, dict]]:
    db = open_database(settings.home_path)
    return [(r["action"], r["object"], json.loads(r["detail"]))
            for r in db.query("SELECT action, object, detail FROM audit_log ORDER BY id")]


def installed(settings: config.Settings) -> list[str]:
    root = DataDirectory(settings.home_path).packs
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*")) if root.is_dir() else []


def test_a_signed_new_classifier_version_is_installed_beside_the_old_listed_and_off(site, partner, tmp_path, capsys):
    key, pub = partner
    rc, out, _ = run_cli(capsys, "packs", "trust", str(pub))
    assert rc == 0
    fingerprint = signing.fingerprint(key.public_key())
    assert fingerprint in out
    assert (DataDirectory(site.home_path).trusted_keys / trust.key_file_name(fingerprint)).is_file()

    pack = make_pack(tmp_path / "usb", "chest-covid19", "2.0.0", key)
    rc, out, err = run_cli(capsys, "packs", "import", str(pack))
    assert rc == 0, err
    assert "chest-covid19 2.0.0" in out and "OFF until evaluated" in out
    assert installed(site) == ["chest-covid19/2.0.0"]

    rc, out, _ = run_cli(capsys, "packs", "list", "--json")
    assert rc == 0
    rows = {(r["id"], r["version"]): r for r in json.loads(out)}
    new, old = rows[("chest-covid19", "2.0.0")], rows[("chest-covid19", "1.0.0")]
    assert new["origin"] == "imported" and new["in_use"] and fingerprint in new["signer"]
    assert new["enabled"].startswith("off") and new["kind"] == "classifier" and new["validated"] is False
    assert old["origin"] == "shipped" and not old["in_use"] and (SHIPPED / "chest-covid19").samefile(old["path"])
    assert old["signer"] == "unsigned (shipped with this version)"

    in_use = registry.Registry(site).pack("chest-covid19")
    assert in_use is not None and in_use.version == "2.0.0"
    assert policy.why_off(in_use, site, open_database(site.home_path)) is not None  # off until evaluated
    actions = audit_actions(site)
    assert ("pack_key_trusted", fingerprint) in [(a, o) for a, o, _ in actions]
    imported = next(d for a, o, d in actions if a == "pack_imported")
    assert imported["version"] == "2.0.0" and imported["fingerprint"] == fingerprint


def test_the_registry_uses_a_newer_measurement_pack_at_once_and_it_runs(site, partner, tmp_path):
    key, pub = partner
    trust.trust_key(site.home_path, pub)
    before = registry.shared_registry(site)
    assert before.pack("lung-segmentation").version == "1.0.0"
    done = pack_import.import_pack(make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", key),
                                   site.home_path, site.engines_path)
    assert not done.already and done.fingerprint == signing.fingerprint(key.public_key())

    after = registry.shared_registry(site)  # reloaded: the imported packs changed
    assert after is not before
    pack = after.pack("lung-segmentation")
    assert (pack.version, pack.origin) == ("1.1.0", packs.IMPORTED)
    assert policy.why_off(pack, site, open_database(site.home_path)) is None  # a measurement runs at once
    session, choice = after.session(pack)
    assert choice.path.is_relative_to(DataDirectory(site.home_path).packs)
    out = session.run({pack.input_name: np.full((1, 1, 64, 64), 1024.0, np.float32)})
    assert next(iter(out.values())).shape == (1, 1, 64, 64)
    older = [p for p in after.all_packs if p.id == "lung-segmentation" and p.version == "1.0.0"]
    assert len(older) == 1  # kept for a rollback


def _refused(site: config.Settings, source: Path) -> PackRefused:
    with pytest.raises(PackRefused) as caught:
        pack_import.import_pack(source, site.home_path, site.engines_path)
    assert installed(site) == []
    staging = DataDirectory(site.home_path).packs / pack_import.STAGING
    assert not staging.exists() or not any(staging.iterdir())
    return caught.value


def test_a_tampered_model_is_refused_file_changed_and_nothing_installed(site, partner, tmp_path, capsys):
    key, pub = partner
    trust.trust_key(site.home_path, pub)
    pack = make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", key)
    data = bytearray((pack / packs.MODEL).read_bytes())
    data[len(data) // 2] ^= 0x01
    (pack / packs.MODEL).write_bytes(bytes(data))
    assert _refused(site, pack).reason_code == signing.FILE_CHANGED
    rc, _, err = run_cli(capsys, "packs", "import", str(pack))
    assert rc == 1 and "FILE_CHANGED" in err
    assert ("pack_refused", "FILE_CHANGED") in [(a, d.get("reason_code")) for a, _, d in audit_actions(site)]


def test_an_unsigned_pack_is_refused(site, tmp_path):
    pack = make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", None)
    refusal = _refused(site, pack)
    assert refusal.reason_code == signing.UNSIGNED and "not signed" in refusal.reason


def test_a_pack_signed_by_a_key_the_site_does_not_trust_is_refused(site, partner, tmp_path):
    trust.trust_key(site.home_path, partner[1])
    stranger = Ed25519PrivateKey.generate()
    refusal = _refused(site, make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", stranger))
    assert refusal.reason_code == signing.UNTRUSTED_SIGNER
    assert signing.fingerprint(stranger.public_key()) in refusal.reason


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_a_signed_pack_archive_is_imported(site, partner, tmp_path):
    key, pub = partner
    trust.trust_key(site.home_path, pub)
    pack = make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", key)
    archive = tmp_path / "lung-segmentation-1.1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pack, arcname="lung-segmentation")
    done = pack_import.import_pack(archive, site.home_path, site.engines_path)
    assert (done.pack.id, done.pack.version) == ("lung-segmentation", "1.1.0")
    again = pack_import.import_pack(archive, site.home_path, site.engines_path)
    assert again.already and installed(site) == ["lung-segmentation/1.1.0"]


@pytest.mark.parametrize(("member", "words"), [
    ("climbing", "'..'"), ("absolute", "absolute path"), ("symlink", "link or a special file"),
    ("hardlink", "link or a special file"), ("device", "link or a special file")])
def test_a_hostile_archive_is_refused_with_a_reason(site, tmp_path, member, words):
    manifest = (SHIPPED / "lung-segmentation" / packs.MANIFEST).read_bytes()
    ok = tarfile.TarInfo("pack/manifest.toml")
    ok.size = len(manifest)
    bad = tarfile.TarInfo({"climbing": "pack/../../evil.txt", "absolute": "/tmp/evil.txt"}.get(member, "pack/x"))
    data: bytes | None = b"evil"
    if member == "symlink":
        bad.type, bad.linkname, data = tarfile.SYMTYPE, "/etc/passwd", None
    elif member == "hardlink":
        bad.type, bad.linkname, data = tarfile.LNKTYPE, "pack/manifest.toml", None
    elif member == "device":
        bad.type, data = tarfile.CHRTYPE, None
    else:
        bad.size = len(data)
    refusal = _refused(site, _tar(tmp_path / "hostile.tar.gz", [(ok, manifest), (bad, data)]))
    assert refusal.reason_code == pack_import.UNSAFE_ARCHIVE and words in refusal.reason
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_a_truncated_archive_and_a_folder_with_a_link_are_refused(site, partner, tmp_path):
    key, pub = partner
    trust.trust_key(site.home_path, pub)
    pack = make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", key)
    archive = tmp_path / "cut.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pack, arcname="lung-segmentation")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert _refused(site, archive).reason_code == pack_import.UNREADABLE
    (pack / "extra").symlink_to("/etc/passwd")
    assert _refused(site, pack).reason_code == signing.NOT_REGULAR_FILE


def test_a_version_already_there_is_never_overwritten(site, partner, tmp_path):
    key, pub = partner
    trust.trust_key(site.home_path, pub)
    first = make_pack(tmp_path / "a", "lung-segmentation", "1.1.0", key)
    pack_import.import_pack(first, site.home_path, site.engines_path)
    other = make_pack(tmp_path / "b", "lung-segmentation", "1.1.0", key)
    manifest = tomlfile.loads((other / packs.MANIFEST).read_text())
    manifest["validation_note"] = "a different pack under the same version"
    packs.write_pack(other, manifest, list(manifest["files"]))
    trust.sign_pack(other, key, "Partner Hospital AI Lab")
    with pytest.raises(PackRefused) as caught:
        pack_import.import_pack(other, site.home_path, site.engines_path)
    assert caught.value.reason_code == pack_import.VERSION_EXISTS
    kept = packs.load_pack(DataDirectory(site.home_path).packs / "lung-segmentation" / "1.1.0", "lung-segmentation")
    assert kept.notice != "a different pack under the same version"
    same_as_shipped = make_pack(tmp_path / "c", "lung-segmentation", "1.0.0", key)
    (same_as_shipped / "LICENSE").write_text("changed")
    manifest = tomlfile.loads((same_as_shipped / packs.MANIFEST).read_text())
    packs.write_pack(same_as_shipped, manifest, list(manifest["files"]))
    trust.sign_pack(same_as_shipped, key, "Partner Hospital AI Lab")
    with pytest.raises(PackRefused) as caught:
        pack_import.import_pack(same_as_shipped, site.home_path, site.engines_path)
    assert caught.value.reason_code == pack_import.VERSION_EXISTS and "ships with this appliance" in caught.value.reason


def test_vendor_key_beside_the_engines_folder_is_trusted(tmp_path):
    vendor = Ed25519PrivateKey.generate()
    engines = tmp_path / "versions" / "0.2.0" / "engines"
    engines.mkdir(parents=True)
    (engines.parent / trust.VENDOR_KEY).write_text(signing.public_text(vendor.public_key()))
    keys = trust.trusted_keys(tmp_path / "home", engines)
    assert [(k.source, k.fingerprint) for k in keys] == [(trust.VENDOR, signing.fingerprint(vendor.public_key()))]
    assert trust.vendor_keys(SHIPPED) == []  # a development checkout ships none


def test_a_key_file_that_is_not_a_key_is_refused(site, tmp_path, capsys):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    rc, _, err = run_cli(capsys, "packs", "trust", str(bad))
    assert rc == 1 and "BAD_KEY" in err
    assert not DataDirectory(site.home_path).trusted_keys.exists() or \
        not any(DataDirectory(site.home_path).trusted_keys.iterdir())


def test_pack_versions_sort_as_numbers():
    assert packs.version_key("1.10.0") > packs.version_key("1.9.2") > packs.version_key("1.9")
    assert packs.version_key("2.0.0") > packs.version_key("1.0.0")


def test_the_admin_switches_on_the_new_classifier_version_only_after_its_evaluation(site, partner, tmp_path):
    from appliance.store.database import utcnow
    from appliance.web import create_app
    from tests.web_helpers import csrf, login, make_accounts

    key, pub = partner
    trust.trust_key(site.home_path, pub)
    pack_import.import_pack(make_pack(tmp_path / "usb", "chest-covid19", "2.0.0", key), site.home_path,
                            site.engines_path)
    make_accounts(site.home_path)
    client = create_app(site).test_client()
    login(client, "admin")
    page = client.get("/admin/").get_data(as_text=True)
    assert "2.0.0" in page and "1.0.0" in page

    def switch_on() -> str:
        form = {"model": "chest-covid19", "version": "2.0.0", "enabled": "1", "csrf_token": csrf(client, "/admin/")}
        return client.post("/admin/models/switch", data=form, follow_redirects=True).get_data(as_text=True)

    assert "Not switched on" in switch_on()
    db = open_database(site.home_path)
    db.table("operating_points").insert({"model": "chest-covid19", "model_version": "2.0.0", "threshold": 0.5,
                                         "target_sensitivity": 0.9, "evaluation": "{}", "recorded_by": "admin",
                                         "recorded_at": utcnow()})
    assert "switched on" in switch_on()
    new = registry.Registry(site).pack("chest-covid19")
    assert new is not None and new.version == "2.0.0" and policy.why_off(new, site, db) is None
