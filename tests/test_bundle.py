"""The offline bundle end to end: `make bundle`'s builder, install.sh with no network, analyse a real series from
the installed prefix, update to a newer bundle, roll back; a damaged, truncated, re-packed, foreign-signed or
older bundle is refused and changes nothing (the prefix and the data directory byte for byte).

Builds two x86-64 bundles (versions 1.0.0 and 1.1.0) once for the module; the aarch64 wheelhouse is checked by
pip's dry run for the Jetson's Python 3.10. Needs the package index (or pip's cache) to build, root for
`unshare -n`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import release, signing

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO.parent / "shared" / "data" / "ct" / "tcia-pancreas-ct-chest-abdomen"
OLD, NEW = "1.0.0", "1.1.0"
MACHINE = os.uname().machine


def _offline_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-n", "true"]).returncode == 0


OFFLINE = ["unshare", "-n"] if _offline_works() else []
needs_offline = pytest.mark.skipif(not OFFLINE, reason="unshare -n (a network namespace, as root) is not available")


def build(versions: tuple[str, ...], out: Path, key: Path) -> list[Path]:
    """The x86-64 bundle of each version, built side by side as `make bundle` builds one."""
    runs = []
    for version in versions:
        env = {**os.environ, "APPLIANCE_VENDOR_KEY": str(key), "APPLIANCE_BUNDLE_VERSION": version}
        runs.append(subprocess.Popen([sys.executable, str(REPO / "packaging" / "build_bundle.py"), "--out", str(out),
                                      "--platform", "x86_64"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    for run in runs:
        output, _ = run.communicate()
        assert run.returncode == 0, output[-3000:]
    return [out / f"appliance-{version}-linux-{MACHINE}.tar.gz" for version in versions]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    if MACHINE != "x86_64":
        pytest.skip("the bundle tests install the x86-64 bundle")
    out = tmp_path_factory.mktemp("dist")
    key = Ed25519PrivateKey.generate()
    (out / "vendor.pem").write_bytes(signing.private_pem(key))
    old, new = build((OLD, NEW), out, out / "vendor.pem")
    return {"key": key, "old": old, "new": new, "out": out}


def unpack(tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    (top,) = into.iterdir()
    return top


def appliance(prefix: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "APPLIANCE_HOME": str(data)}
    return subprocess.run([*OFFLINE, str(prefix / "bin" / "appliance"), *args], env=env, capture_output=True,
                          text=True, timeout=900)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots``: links by target, files by SHA-256, folders by name."""
    out: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                if path.is_symlink():
                    out[str(path)] = ("link", os.readlink(path))
                elif path.is_file():
                    out[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
                else:
                    out[str(path)] = ("dir",)
    return out


def studies(prefix: Path, data: Path) -> int:
    result = appliance(prefix, data, "status", "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["studies"])


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """1.0.0 installed with no network into a fresh prefix, its data directory holding one analysed study."""
    if not OFFLINE:
        pytest.skip("unshare -n (a network namespace, as root) is not available")
    root = tmp_path_factory.mktemp("site")
    bundle = unpack(dist["old"], root / "usb")
    prefix, data = root / "opt" / "appliance", root / "data"
    result = subprocess.run([*OFFLINE, "sh", str(bundle / "install.sh"), "--prefix", str(prefix), "--data", str(data)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"prefix": prefix, "data": data, "bundle": bundle, "install_output": result.stdout}


def test_bundle_holds_hashed_wheels_signed_packs_and_units(dist, tmp_path):
    folder = unpack(dist["old"], tmp_path)
    assert folder.name == f"appliance-{OLD}-linux-x86_64"
    verified = signing.verify_tree(folder, [dist["key"].public_key()])
    assert verified.signer == "vendor"
    doc = json.loads((folder / "BUNDLE.json").read_text())
    assert doc["version"] == OLD and doc["machine"] == "x86_64" and doc["python_version"] == "3.11"
    wheels = sorted(p.name for p in (folder / "wheelhouse").glob("*.whl"))
    lines = (folder / "requirements.txt").read_text().splitlines()
    assert len(lines) == len(wheels) and all("==" in line and " --hash=sha256:" in line for line in lines)
    assert any(w.startswith(f"ct_screening_appliance-{OLD}-") for w in wheels)
    assert not any(w.startswith(("torch", "pytest", "SimpleITK", "playwright")) for w in wheels)
    assert all("x86_64" in w or w.endswith("-none-any.whl") for w in wheels)
    packs = sorted(p.parent.name for p in (folder / "engines").glob("*/manifest.toml"))
    assert packs == sorted(p.parent.name for p in (REPO / "engines").glob("*/manifest.toml"))
    for pack in packs:
        signing.verify_tree(folder / "engines" / pack, [dist["key"].public_key()])
        names = {p.name for p in (folder / "engines" / pack).iterdir()}
        assert not {"build.json", "model.int8.onnx", "parity.json"} & names  # the box builds those
    assert {p.name for p in (folder / "systemd").iterdir()} == {p.name for p in (REPO / "systemd").iterdir()}
    debs = {p.name.split("_")[0] for p in (folder / "debs").glob("*.deb")}
    assert {"python3-venv", "python3.11-venv", "fonts-dejavu-core"} <= debs
    assert (folder / "vendor.pub").read_text().strip() == signing.public_text(dist["key"].public_key())


def test_offline_install_gives_a_working_appliance_that_analyses_a_real_series(installed):
    prefix, data = installed["prefix"], installed["data"]
    assert os.readlink(prefix / "current") == f"versions/{OLD}"
    assert (prefix / "versions" / OLD / "engines" / "lung-segmentation" / "model.onnx").is_file()
    assert "Next steps" in installed["install_output"]
    assert appliance(prefix, data, "--help").returncode == 0
    assert appliance(prefix, data, "--version").stdout.strip() == f"appliance {OLD}"
    if not SERIES.is_dir():
        pytest.skip(f"the real 134-slice series is not at {SERIES} (see ../shared/data/README.md)")
    result = appliance(prefix, data, "analyze", str(SERIES), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (series,) = [s for st in json.loads(result.stdout)["studies"] for s in st["series"]]
    assert series["status"] == "analyzed" and series["slices"] == 134
    assert "lung-segmentation" in {r["model"] for r in series["results"]}  # the installed version's own packs
    assert studies(prefix, data) == 1


def test_a_second_install_of_the_same_version_changes_nothing(installed):
    before = snapshot(installed["prefix"])
    result = subprocess.run([*OFFLINE, "sh", str(installed["bundle"] / "install.sh"), "--prefix",
                             str(installed["prefix"]), "--data", str(installed["data"])],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout and "nothing to do" in result.stdout
    assert snapshot(installed["prefix"]) == before


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def repack(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=folder.name)
    return out


def damaged_bundles(dist, tmp: Path) -> dict[str, tuple[Path, set[str]]]:
    """Newer bundles spoiled each way, with the reason codes each may be refused with."""
    flipped = tmp / "flipped.tar.gz"
    shutil.copy(dist["new"], flipped)
    flip_byte(flipped, flipped.stat().st_size // 2)
    truncated = tmp / "truncated.tar.gz"
    truncated.write_bytes(dist["new"].read_bytes()[: dist["new"].stat().st_size // 2])
    folder = unpack(dist["new"], tmp / "pack-changed")
    flip_byte(folder / "engines" / "lung-segmentation" / "model.onnx", 5000)
    pack_changed = repack(folder, tmp / "pack-changed.tar.gz")
    other = Ed25519PrivateKey.generate()
    foreign = unpack(dist["new"], tmp / "foreign")
    (foreign / "vendor.pub").write_text(signing.public_text(other.public_key()) + "\n")
    (foreign / signing.SIGNATURE).unlink()
    signing.sign_tree(foreign, other, "vendor")
    evil = tmp / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hey"))
    return {"flipped": (flipped, {release.BAD_ARCHIVE, release.TRUNCATED}),
            "truncated": (truncated, {release.TRUNCATED}),
            "pack_changed": (pack_changed, {signing.FILE_CHANGED}),
            "foreign_key": (repack(foreign, tmp / "foreign.tar.gz"), {signing.UNTRUSTED_SIGNER}),
            "path_escape": (evil, {release.UNSAFE_MEMBER}),
            "same_version": (dist["old"], {release.SAME_VERSION})}


def test_a_damaged_foreign_or_older_bundle_is_refused_and_changes_nothing(dist, installed, tmp_path):
    prefix, data = installed["prefix"], installed["data"]
    before = snapshot(prefix, data)
    state = (prefix / "state.json").read_bytes()
    for name, (bundle, codes) in damaged_bundles(dist, tmp_path).items():
        result = appliance(prefix, data, "update", str(bundle))
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        code = result.stderr.strip().splitlines()[-1].split(":")[1].strip()
        assert code in codes, (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert os.readlink(prefix / "current") == f"versions/{OLD}" and (prefix / "state.json").read_bytes() == state
        assert sorted(p.name for p in (prefix / "versions").iterdir()) == [OLD], name
    assert snapshot(prefix, data) == before  # every file of the prefix and the data directory, byte for byte


def test_update_waits_for_no_process_writing_the_data_directory(dist, installed):
    from appliance.store.datadir import DataDirectory, hold_writer_lock, release_writer_lock

    prefix, data = installed["prefix"], installed["data"]
    ddir = DataDirectory(data)
    hold_writer_lock(ddir)  # as a running receiver or worker does
    try:
        before = snapshot(prefix, data)
        result = appliance(prefix, data, "update", str(dist["new"]))
        assert result.returncode == 1 and release.WRITERS_RUNNING in result.stderr, result.stderr
        assert snapshot(prefix, data) == before
    finally:
        release_writer_lock(ddir)


def test_install_sh_refuses_a_changed_pack_before_running_anything(dist, tmp_path):
    folder = unpack(dist["new"], tmp_path / "usb")
    flip_byte(folder / "engines" / "chest-covid19" / "model.onnx", 100)
    result = subprocess.run([*OFFLINE, "sh", str(folder / "install.sh"), "--prefix", str(tmp_path / "prefix")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "FILE_CHANGED" in result.stderr
    assert not (tmp_path / "prefix").exists()
    (folder / "engines" / "extra.py").write_text("print('not the vendor's')\n")
    flip_byte(folder / "engines" / "chest-covid19" / "model.onnx", 100)  # back as it was
    result = subprocess.run(["sh", str(folder / "install.sh"), "--prefix", str(tmp_path / "prefix")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "EXTRA_FILE" in result.stderr


def test_update_and_rollback_keep_every_study(dist, installed):
    prefix, data = installed["prefix"], installed["data"]
    count = studies(prefix, data)
    result = appliance(prefix, data, "update", str(dist["new"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.readlink(prefix / "current") == f"versions/{NEW}"
    assert appliance(prefix, data, "--version").stdout.strip() == f"appliance {NEW}"
    assert studies(prefix, data) == count
    state = json.loads((prefix / "state.json").read_text())
    assert state["current"] == NEW and state["previous"] == OLD and Path(state["backup"]).is_file()
    assert release.study_uids(Path(state["backup"])) == release.study_uids(data / release.DATABASE)
    assert "systemd is not running here" in result.stdout or "restarted" in result.stdout

    result = appliance(prefix, data, "rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.readlink(prefix / "current") == f"versions/{OLD}"
    assert appliance(prefix, data, "--version").stdout.strip() == f"appliance {OLD}"
    assert studies(prefix, data) == count
    refused = appliance(prefix, data, "rollback")
    assert refused.returncode == 1 and release.NO_PREVIOUS in refused.stderr


def test_rollback_refuses_to_drop_studies_received_since_the_backup_unless_forced(dist, installed, tmp_path):
    prefix, data = installed["prefix"], installed["data"]
    assert appliance(prefix, data, "update", str(dist["new"])).returncode == 0  # 1.1.0 is on disk: no pip run
    count = studies(prefix, data)
    assert appliance(prefix, data, "synth", "--out", str(tmp_path / "phantom"), "--slices", "12", "--size", "64",
                     "--region", "chest").returncode == 0
    assert appliance(prefix, data, "import", str(tmp_path / "phantom")).returncode == 0
    assert studies(prefix, data) == count + 1
    before = snapshot(prefix, data)
    refused = appliance(prefix, data, "rollback")
    assert refused.returncode == 1 and release.STUDIES_SINCE_BACKUP in refused.stderr
    assert snapshot(prefix, data) == before
    forced = appliance(prefix, data, "rollback", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "1 studies that arrived after the backup" in forced.stdout
    assert os.readlink(prefix / "current") == f"versions/{OLD}" and studies(prefix, data) == count
    assert any((data / "instances").rglob("*.dcm"))  # the files stay on disk


def test_a_new_version_that_fails_its_check_is_rolled_back_by_itself(dist, installed, monkeypatch):
    prefix, data = installed["prefix"], installed["data"]
    uids = release.study_uids(data / release.DATABASE)
    monkeypatch.setattr(release, "HEALTH_CHECK", ("status", "--no-such-option"))
    with pytest.raises(release.ReleaseRefused) as caught:
        release.update(dist["new"], prefix, data, say=lambda line: None)
    assert caught.value.reason_code == release.HEALTH_CHECK_FAILED and f"rolled back to {OLD}" in caught.value.reason
    assert os.readlink(prefix / "current") == f"versions/{OLD}"
    assert release.study_uids(data / release.DATABASE) == uids
    assert json.loads((prefix / "state.json").read_text())["current"] == OLD


def test_version_order_is_numeric():
    assert release.version_key("1.10.0") > release.version_key("1.9.3") > release.version_key("1.9")


def test_gzip_checks_catch_what_tar_alone_would_miss(tmp_path):
    path = tmp_path / "b.tar.gz"
    path.write_bytes(gzip.compress(b"\0" * 10240)[:-4])  # the size trailer cut off
    with pytest.raises(release.ReleaseRefused) as caught:
        release.check_stream(path)
    assert caught.value.reason_code in {release.TRUNCATED, release.BAD_ARCHIVE}


def test_the_jetson_wheelhouse_resolves_for_python_3_10_on_aarch64(tmp_path):
    sys.path.insert(0, str(REPO / "packaging"))
    try:
        import build_bundle
    finally:
        sys.path.remove(str(REPO / "packaging"))
    target = build_bundle.TARGETS["aarch64"]
    try:
        build_bundle.target_python(target)
    except SystemExit as exc:
        pytest.skip(str(exc))
    stage = tmp_path / "stage"
    (stage / "wheelhouse").mkdir(parents=True)
    build_bundle.download_wheelhouse(target, stage / "wheelhouse", tmp_path)
    lines = build_bundle.write_requirements(stage / "wheelhouse", stage / "requirements.txt")
    build_bundle.check_resolves(target, stage, tmp_path)  # raises CalledProcessError when it does not
    names = {line.split("==")[0] for line in lines}
    assert {"onnxruntime", "numpy", "pydicom", "cryptography", "tomli"} <= names  # tomli: Python 3.10 only
    assert all("aarch64" in w.name or w.name.endswith("-none-any.whl") for w in (stage / "wheelhouse").iterdir())


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (Debian package)")
def test_install_sh_is_posix_sh_that_shellcheck_passes():
    result = subprocess.run(["shellcheck", "--shell=sh", str(REPO / "packaging" / "install.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
