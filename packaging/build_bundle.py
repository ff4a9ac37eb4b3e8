#!/usr/bin/env python3
"""Build the offline bundles: ``dist/appliance-<version>-linux-<arch>.tar.gz`` (what ``make bundle`` runs).

``<arch>`` is the kernel's machine name (x86_64, aarch64); each bundle is also linked under dpkg's name for it
(``...-linux-amd64.tar.gz``, ``...-linux-arm64.tar.gz``).

Each bundle holds everything a box with no network needs to install the appliance with ``sh install.sh``:

```
appliance-<version>-linux-<arch>/
  install.sh          POSIX sh installer (checks SHA256SUMS, makes the venv, installs by hash)
  BUNDLE.json         version, platform, target Python, pip platform tags, features left out
  requirements.txt    every wheel pinned with --hash=sha256: (the appliance's own wheel too)
  wheelhouse/         the appliance wheel and every runtime dependency, binary wheels for the target
  engines/<id>/       model packs, each signed by the vendor (SIGNATURE.json)
  systemd/            unit files and the udev rule (rendered by `appliance install-systemd`)
  debs/               x86-64 only: python3-venv and its closure, the report fonts (dpkg -i)
  JETSON.md           aarch64 only: the JetPack apt packages to install first
  vendor.pub          the vendor's Ed25519 public key
  SHA256SUMS          sha256sum -c list of every file (install.sh checks it before Python exists)
  SIGNATURE.json      Ed25519 signature over every file (appliance.signing.sign_tree)
```

The vendor's private key is read from ``APPLIANCE_VENDOR_KEY`` (a PEM file); without it a throwaway key is
made under the output folder and the bundle says so with a WARNING. ``APPLIANCE_BUNDLE_VERSION`` builds the
bundle (and the wheel inside it) under another version without editing pyproject.toml.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess  # nosec B404 - pip, git and apt-get with fixed arguments
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance import signing  # noqa: E402
from appliance.inference import packs, trust  # noqa: E402

# Files build_engines.py writes into a pack on the box; a bundle never carries them
GENERATED = set(packs.DEVICE_MADE)
# What a minimal Debian 12 lacks for `python3 -m venv` and the PDF report fonts (apt-get download, dpkg -i)
DEBIAN_PACKAGES = ("python3-venv", "python3.11-venv", "python3-pip-whl", "python3-setuptools-whl",
                   "fonts-dejavu-core")
THROWAWAY_KEY = "throwaway-vendor-key.pem"


@dataclasses.dataclass(frozen=True)
class Target:
    """A box the bundle installs on: its machine name, Python and the wheel platform tags it accepts."""

    arch: str
    debian_arch: str  # dpkg's name for it: the bundle is linked under it too
    python_version: str  # the box's system Python, "3.11"
    glibc_minor: int  # newest manylinux_2_N the box's glibc runs
    system: str
    debs: bool

    @property
    def platforms(self) -> list[str]:
        tags = [f"manylinux_2_{n}_{self.arch}" for n in range(self.glibc_minor, 16, -1)]
        return [*tags, f"manylinux2014_{self.arch}"]

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    def pip_target_args(self) -> list[str]:
        args = ["--only-binary=:all:", "--python-version", self.python_version, "--implementation", "cp",
                "--abi", self.abi]
        for tag in self.platforms:
            args += ["--platform", tag]
        return args


TARGETS = {
    "x86_64": Target("x86_64", "amd64", "3.11", 36, "Debian 12 (bookworm), system Python 3.11", debs=True),
    "aarch64": Target("aarch64", "arm64", "3.10", 35, "NVIDIA Jetson, JetPack 6 (Ubuntu 22.04), system Python 3.10",
                      debs=False),
}


def say(text: str) -> None:
    print(f"bundle: {text}", flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)  # nosec B603


def project_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def runtime_requirements() -> list[str]:
    """The project's runtime dependencies (no test or training extras)."""
    import tomllib

    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def vendor_key(out: Path):
    """The vendor's private key from APPLIANCE_VENDOR_KEY, or a throwaway one under ``out`` (with a WARNING)."""
    path = os.environ.get("APPLIANCE_VENDOR_KEY")
    if path:
        return signing.load_private_key(Path(path))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    throwaway = out / THROWAWAY_KEY
    if throwaway.exists():
        key = signing.load_private_key(throwaway)
    else:
        key = Ed25519PrivateKey.generate()
        out.mkdir(parents=True, exist_ok=True)
        throwaway.write_bytes(signing.private_pem(key))
        throwaway.chmod(0o600)
    print(f"WARNING: APPLIANCE_VENDOR_KEY is not set: the bundle is signed by a THROWAWAY key ({throwaway}, "
          f"fingerprint {signing.fingerprint(key.public_key())}); boxes will trust only bundles signed by it. "
          "Use it for tests, never for a site.", file=sys.stderr, flush=True)
    return key


def source_files() -> list[str]:
    """The files of the checkout the wheel is built from (tracked and new, not ignored)."""
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
              capture_output=True).stdout.decode()
    return [name for name in out.split("\0") if name and (name in ("pyproject.toml", "README.md")
                                                          or name.startswith("appliance/"))]


def build_wheel(version: str, into: Path, work: Path) -> Path:
    """``pip wheel --no-deps`` of a clean copy of the sources, its version set to ``version``."""
    src = work / "src"
    for name in source_files():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    current = project_version()
    if version != current:
        for name, old, new in (("pyproject.toml", f'version = "{current}"', f'version = "{version}"'),
                               ("appliance/__init__.py", f'__version__ = "{current}"', f'__version__ = "{version}"')):
            text = (src / name).read_text()
            if old not in text:
                raise SystemExit(f"bundle: cannot set the version in {name}")
            (src / name).write_text(text.replace(old, new, 1))
    into.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into), str(src)])
    (wheel,) = into.glob("ct_screening_appliance-*.whl")
    return wheel


def target_python(target: Target) -> str:
    """An interpreter of the target's Python version, so that pip reads environment markers as the box will."""
    if sys.version_info[:2] == tuple(int(p) for p in target.python_version.split(".")):
        return sys.executable
    candidates = [*sorted(Path.home().glob(f".pyenv/versions/{target.python_version}.*/bin/python3")),
                  shutil.which(f"python{target.python_version}"), f"/usr/bin/python{target.python_version}"]
    for candidate in filter(None, candidates):
        probe = subprocess.run([str(candidate), "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],  # nosec B603
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == target.python_version:
            return str(candidate)
    raise SystemExit(f"bundle: Python {target.python_version} is needed to resolve the {target.arch} wheelhouse "
                     "(its dependency markers differ); install it (e.g. pyenv install 3.10)")


def pinned_versions() -> list[str]:
    """``name==version`` of what this venv runs (and was tested with), as constraints for the same Python."""
    out = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "==" in line and not line.startswith("#")]


def download_wheelhouse(target: Target, wheelhouse: Path, work: Path) -> None:
    """Every runtime dependency as a binary wheel for ``target`` (pip's cache keeps a second build fast)."""
    requirements = work / f"requirements-{target.arch}.in"
    requirements.write_text("\n".join(runtime_requirements()) + "\n")
    python = target_python(target)
    command = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--dest", str(wheelhouse), *target.pip_target_args(), "-r", str(requirements)]
    if python == sys.executable:
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(pinned_versions()) + "\n")
        command += ["--constraint", str(constraints)]
    say(f"downloading the {target.arch} wheelhouse for Python {target.python_version}")
    run(command)


def sha256(path: Path) -> str:
    return signing.sha256_file(path)


def write_requirements(wheelhouse: Path, out: Path) -> list[str]:
    """``name==version --hash=sha256:...`` for every wheel in ``wheelhouse``; returns the lines."""
    from packaging.utils import parse_wheel_filename

    lines = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        lines.append(f"{name}=={version} --hash=sha256:{sha256(wheel)}")
    names = [line.split("==")[0] for line in lines]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"bundle: more than one wheel of {', '.join(sorted(duplicates))} in {wheelhouse}")
    out.write_text("\n".join(lines) + "\n")
    return lines


def check_resolves(target: Target, stage: Path, work: Path) -> None:
    """pip's dry run, with no index, for the target's platform and Python: the wheelhouse installs there."""
    python = target_python(target)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--dry-run",
             "--ignore-installed", "--no-index", "--find-links", str(stage / "wheelhouse"), "--require-hashes",
             *target.pip_target_args(), "--target", scratch, "-r", str(stage / "requirements.txt")],
            env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_CONSTRAINT": ""})
    say(f"the {target.arch} wheelhouse resolves offline for Python {target.python_version}")


def copy_packs(stage: Path, key) -> list[str]:
    """Each model pack's own files (not what the box builds), signed by the vendor."""
    ids = []
    for manifest in sorted((REPO / "engines").glob(f"*/{packs.MANIFEST}")):
        pack = manifest.parent
        dest = stage / "engines" / pack.name
        dest.mkdir(parents=True)
        for path in sorted(pack.iterdir()):
            if path.is_file() and not path.is_symlink() and path.name not in GENERATED \
                    and not path.name.startswith(".") and path.name != signing.SIGNATURE:
                shutil.copy2(path, dest / path.name)
        packs.load_pack(dest)  # every file the manifest lists is there and matches
        trust.sign_pack(dest, key, "vendor")  # the files build-engines adds on the box stay out of it
        ids.append(pack.name)
    return ids


def download_debs(stage: Path, cache: Path) -> list[str]:
    """The .deb files a minimal Debian 12 needs for ``python3 -m venv`` and the report fonts."""
    cache.mkdir(parents=True, exist_ok=True)

    def fetch() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=cache,  # nosec B603 B607
                              capture_output=True, text=True)

    have = {p.name.split("_")[0] for p in cache.glob("*.deb")}
    if not set(DEBIAN_PACKAGES) <= have and fetch().returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False)  # nosec B603 B607
        result = fetch()
        if result.returncode != 0:
            raise SystemExit(f"bundle: apt-get download failed: {result.stderr.strip()}")
    debs = []
    (stage / "debs").mkdir()
    for name in DEBIAN_PACKAGES:
        newest = max(cache.glob(f"{name}_*.deb"))
        shutil.copy2(newest, stage / "debs" / newest.name)
        debs.append(newest.name)
    return debs


def write_sums(stage: Path) -> None:
    """SHA256SUMS in sha256sum's format: install.sh checks it with no Python at all."""
    lines = []
    for path in sorted(stage.rglob("*")):
        relative = path.relative_to(stage).as_posix()
        if path.is_file() and relative not in ("SHA256SUMS", signing.SIGNATURE):
            lines.append(f"{sha256(path)}  ./{relative}")
    (stage / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o755 if info.isdir() or info.name.endswith(".sh") else 0o644
    return info


def build(target: Target, version: str, out: Path, work: Path, wheel: Path, key) -> Path:
    """One bundle for ``target``: stage the folder, sign it, pack it into ``out``."""
    name = f"appliance-{version}-linux-{target.arch}"
    stage = work / name
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "wheelhouse").mkdir(parents=True)
    shutil.copy2(wheel, stage / "wheelhouse" / wheel.name)
    download_wheelhouse(target, stage / "wheelhouse", work)
    write_requirements(stage / "wheelhouse", stage / "requirements.txt")
    check_resolves(target, stage, work)
    pack_ids = copy_packs(stage, key)
    shutil.copytree(REPO / "systemd", stage / "systemd")
    debs = download_debs(stage, REPO / "build" / "bundle" / "debs-cache") if target.debs else []
    if not target.debs:
        shutil.copy2(REPO / "packaging" / "JETSON.md", stage / "JETSON.md")
    shutil.copy2(REPO / "packaging" / "install.sh", stage / "install.sh")
    (stage / "vendor.pub").write_text(signing.public_text(key.public_key()) + "\n")
    doc = {"name": "ct-screening-appliance", "version": version, "platform": f"linux-{target.arch}",
           "machine": target.arch, "system": target.system, "python_version": target.python_version,
           "pip_platforms": target.platforms, "packs": pack_ids, "debs": debs,
           "features_absent": [], "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (stage / "BUNDLE.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_sums(stage)
    signing.sign_tree(stage, key, "vendor")
    out.mkdir(parents=True, exist_ok=True)
    tarball = out / f"{name}.tar.gz"
    partial = tarball.with_suffix(".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(stage, arcname=name, filter=_tar_filter)
    partial.replace(tarball)
    alias = out / f"appliance-{version}-linux-{target.debian_arch}.tar.gz"
    alias.unlink(missing_ok=True)
    alias.symlink_to(tarball.name)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    say(f"wrote {tarball} ({tarball.stat().st_size / 1e6:.0f} MB, sha256 {digest})")
    return tarball


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="where the bundles go (default dist/)")
    parser.add_argument("--platform", action="append", choices=sorted(TARGETS),
                        help="build only this platform (repeatable; default: all)")
    args = parser.parse_args(argv)
    version = os.environ.get("APPLIANCE_BUNDLE_VERSION") or project_version()
    key = vendor_key(args.out)
    work = REPO / "build" / "bundle"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        wheel = build_wheel(version, Path(scratch) / "wheel", Path(scratch))
        for arch in args.platform or sorted(TARGETS):
            build(TARGETS[arch], version, args.out, Path(scratch), wheel, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
