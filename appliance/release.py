"""Versions of the appliance installed side by side from signed offline bundles: update and roll back.

An installed prefix (``install.sh --prefix DIR`` writes it; this module switches it)::

    DIR/versions/<version>/  venv/, engines/ (that version's model packs), systemd/, vendor.pub, BUNDLE.json,
                             .installed (written last: the version is complete)
    DIR/current -> versions/<version>
    DIR/bin/appliance -> ../current/venv/bin/appliance
    DIR/state.json           current and previous version, the data directory, the database backup taken
                             before the last update, and the history of updates and rollbacks

``update`` checks a bundle (a gzip stream read to its end, tar members plain files and folders under one
top folder, the vendor's signature over every file, the platform, a newer version) before it changes
anything; then it installs the new version beside the old one, backs the database up with SQLite's backup
API, switches ``current``, migrates, restarts the units and runs :data:`HEALTH_CHECK` of the new version,
switching back and restoring the backup by itself when that fails. ``rollback`` returns to the previous
version and its backup; it refuses while the database holds studies that arrived after the backup (they
would vanish from the worklist) unless forced.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import shutil
import sqlite3
import subprocess  # nosec B404 - the bundle's install.sh, the new version's CLI, systemctl; fixed arguments
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import durable, signing
from appliance.errors import Refused

# what the new version must pass after an update, run as `<new>/venv/bin/appliance *HEALTH_CHECK`: its doctor,
# judged on what a version itself can break (HEALTH_CHECKS; the services too when units were running before)
HEALTH_CHECK = ("doctor", "--json")
HEALTH_CHECKS = frozenset({"version", "data directory", "database", "packs"})
SERVICE_ROWS = frozenset({"receiver", "web", "worker"})
# opens the database with the new version, which applies its migrations
MIGRATE = ("status", "--json")
UNITS = ("appliance-dicom.service", "appliance-worker.service", "appliance-web.service")
DEFAULT_DATA = Path("/var/lib/appliance")
DATABASE = "appliance.sqlite"
MAX_BUNDLE_BYTES = 8 << 30  # unpacked
MAX_MEMBERS = 50_000
CHUNK = 1 << 20

NOT_INSTALLED = "NOT_INSTALLED"  # the prefix holds no installed version
BAD_ARCHIVE = "BAD_ARCHIVE"  # not a gzip-compressed tar, or damaged (CRC)
TRUNCATED = "TRUNCATED"  # the file ends before the archive does
UNSAFE_MEMBER = "UNSAFE_MEMBER"  # an absolute path, `..`, a link or device, more than one top folder
NOT_A_BUNDLE = "NOT_A_BUNDLE"  # no BUNDLE.json / install.sh, or one that cannot be read
WRONG_PLATFORM = "WRONG_PLATFORM"  # built for another machine
DOWNGRADE = "DOWNGRADE"  # older than the installed version (allowed with --allow-downgrade)
SAME_VERSION = "SAME_VERSION"  # the installed version again (allowed with --allow-downgrade)
INSTALL_FAILED = "INSTALL_FAILED"  # install.sh of the new version failed; nothing switched
HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"  # the new version failed its check; rolled back
NO_PREVIOUS = "NO_PREVIOUS"  # nothing to roll back to
STUDIES_SINCE_BACKUP = "STUDIES_SINCE_BACKUP"  # rollback would drop studies received after the backup
NO_BACKUP = "NO_BACKUP"  # the backup the last update took is missing
WRITERS_RUNNING = "WRITERS_RUNNING"  # an appliance process still writes the data directory


class ReleaseRefused(Refused):
    """An update or rollback that did not happen (or was undone), with a reason code."""


@dataclasses.dataclass(frozen=True)
class Installation:
    """An installed prefix: its versions, the ``current`` link and ``state.json``."""

    prefix: Path

    @property
    def current_link(self) -> Path:
        return self.prefix / "current"

    @property
    def state_path(self) -> Path:
        return self.prefix / "state.json"

    def version_dir(self, version: str) -> Path:
        return self.prefix / "versions" / version

    def is_installed(self, version: str) -> bool:
        return (self.version_dir(version) / ".installed").is_file()

    def current_version(self) -> str | None:
        if not self.current_link.is_symlink():
            return None
        version = Path(os.readlink(self.current_link)).name
        return version if self.is_installed(version) else None

    def appliance(self, version: str) -> Path:
        return self.version_dir(version) / "venv" / "bin" / "appliance"

    def read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = {}
        return state if isinstance(state, dict) else {}

    def write_state(self, state: dict[str, Any]) -> None:
        durable.write_bytes_durably((json.dumps(state, indent=1) + "\n").encode(), self.state_path)


def running_prefix() -> Path | None:
    """The prefix this process runs from (``<prefix>/versions/<v>/venv``), or None in a checkout."""
    venv = Path(sys.prefix).resolve()
    return venv.parents[2] if venv.name == "venv" and venv.parent.parent.name == "versions" else None


def installation(prefix: Path | None) -> Installation:
    """The installation at ``prefix`` (default: the one running); refused when nothing is installed there."""
    chosen = prefix or running_prefix()
    if chosen is None:
        raise ReleaseRefused(NOT_INSTALLED, "this appliance was not installed from a bundle; give --prefix DIR")
    inst = Installation(chosen.resolve())
    if inst.current_version() is None:
        raise ReleaseRefused(NOT_INSTALLED, f"{inst.prefix} holds no installed version (install.sh --prefix first)")
    return inst


def data_directory(inst: Installation, explicit: Path | None) -> Path:
    """--data, else APPLIANCE_HOME, else the data directory install.sh recorded, else /var/lib/appliance."""
    chosen = explicit or os.environ.get("APPLIANCE_HOME") or inst.read_state().get("data") or DEFAULT_DATA
    return Path(chosen).resolve()


def version_key(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``: versions are dotted numbers, compared number by number."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


def trusted_keys(inst: Installation) -> list:
    """The vendor keys the installed version trusts: its vendor.pub and any in ``<prefix>/trusted-keys/``."""
    current = inst.current_version()
    paths = [inst.version_dir(current) / "vendor.pub"] if current else []
    paths += sorted((inst.prefix / "trusted-keys").glob("*.pub"))
    return [signing.load_public_key(p) for p in paths if p.is_file()]


# --- the bundle file --------------------------------------------------------------------------------------


def check_stream(path: Path) -> None:
    """Read the whole gzip stream: a truncated file or a changed byte (CRC) is refused here."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(CHUNK):
                pass
    except EOFError as exc:
        raise ReleaseRefused(TRUNCATED, f"{path.name} ends before its archive does: copy it again") from exc
    except (OSError, zlib.error) as exc:
        raise ReleaseRefused(BAD_ARCHIVE, f"{path.name} is damaged or not a bundle ({exc})") from exc


def _member_problem(member: tarfile.TarInfo, top: str | None) -> str | None:
    name = member.name
    parts = Path(name).parts
    if name.startswith("/") or not parts or ".." in parts:
        return f"{name!r} is an absolute path or leaves the bundle"
    if not (member.isfile() or member.isdir()):
        return f"{name!r} is a link or special file"
    if top is not None and parts[0] != top:
        return f"{name!r} is outside the bundle's folder {top}"
    return None


def unpack(path: Path, into: Path) -> Path:
    """Extract the bundle ``path`` into ``into`` (plain files and folders only); returns its top folder."""
    check_stream(path)
    top: str | None = None
    total = count = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                problem = _member_problem(member, top)
                if problem:
                    raise ReleaseRefused(UNSAFE_MEMBER, problem)
                top = top or Path(member.name).parts[0]
                count, total = count + 1, total + member.size
                if count > MAX_MEMBERS or total > MAX_BUNDLE_BYTES:
                    raise ReleaseRefused(UNSAFE_MEMBER, f"{path.name} holds more than a bundle can")
                _extract(tar, member, into)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ReleaseRefused(BAD_ARCHIVE, f"{path.name} is not a readable bundle ({exc})") from exc
    if top is None or not (into / top / "BUNDLE.json").is_file() or not (into / top / "install.sh").is_file():
        raise ReleaseRefused(NOT_A_BUNDLE, f"{path.name} has no BUNDLE.json and install.sh")
    return into / top


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    target = into / member.name
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise ReleaseRefused(UNSAFE_MEMBER, f"{member.name!r} cannot be read")
    with source, open(target, "xb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    target.chmod(0o755 if member.name.endswith(".sh") else 0o644)


def read_bundle(folder: Path) -> dict[str, Any]:
    """BUNDLE.json of an unpacked bundle: version, machine, Python."""
    try:
        doc = json.loads((folder / "BUNDLE.json").read_text())
        if not isinstance(doc.get("version"), str) or not isinstance(doc.get("machine"), str):
            raise ValueError("no version or machine")
    except (OSError, ValueError, AttributeError) as exc:
        raise ReleaseRefused(NOT_A_BUNDLE, f"BUNDLE.json of {folder.name} cannot be read ({exc})") from exc
    return doc


def check_bundle(path: Path, into: Path, trusted: list, installed: str, allow_downgrade: bool) -> tuple[Path, dict]:
    """Unpack and verify ``path`` (signature, platform, version); nothing outside ``into`` is touched."""
    folder = unpack(path, into)
    signing.verify_tree(folder, trusted)  # SignatureProblem carries its own reason code
    doc = read_bundle(folder)
    machine = os.uname().machine
    if doc["machine"] != machine:
        raise ReleaseRefused(WRONG_PLATFORM, f"{path.name} is for {doc['machine']}; this machine is {machine}")
    new = doc["version"]
    if not allow_downgrade and version_key(new) <= version_key(installed):
        code = SAME_VERSION if version_key(new) == version_key(installed) else DOWNGRADE
        raise ReleaseRefused(code, f"{path.name} holds version {new}; {installed} is installed "
                                   "(--allow-downgrade to install it anyway)")
    return folder, doc


# --- the database -----------------------------------------------------------------------------------------


def _owned_like(path: Path, data: Path) -> None:
    """Give ``path`` the owner of the database (root updating a data directory the service user owns)."""
    owner = data_owner(data)
    if os.geteuid() == 0 and owner:
        os.chown(path, *owner)


def backup_database(data: Path, label: str) -> Path | None:
    """A consistent copy of the data directory's database (SQLite backup API) in ``data/backups/``."""
    database = data / DATABASE
    if not database.is_file():
        return None
    folder = data / "backups"
    folder.mkdir(exist_ok=True)
    _owned_like(folder, data)
    final = folder / f"{label}-{time.strftime('%Y%m%dT%H%M%S')}.sqlite"
    partial = final.with_suffix(".partial")
    source, copy = sqlite3.connect(database), sqlite3.connect(partial)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    durable.durable_rename(partial, final)
    _owned_like(final, data)
    return final


def restore_database(backup: Path, data: Path) -> None:
    """Write ``backup`` back over the data directory's database (through SQLite, so its WAL stays right)."""
    source, live = sqlite3.connect(backup), sqlite3.connect(data / DATABASE)
    try:
        source.backup(live)
    finally:
        live.close()
        source.close()


def study_uids(database: Path) -> set[str]:
    """Every StudyInstanceUID the database at ``database`` holds (none when it has no studies table)."""
    if not database.is_file():
        return set()
    conn = sqlite3.connect(database)  # read only; a WAL database needs its -shm, so not mode=ro
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'studies'").fetchone():
            return set()
        return {row[0] for row in conn.execute("SELECT study_instance_uid FROM studies")}
    finally:
        conn.close()


# --- switching, units, checks -----------------------------------------------------------------------------


def switch(inst: Installation, version: str) -> None:
    """Point ``current`` at ``version`` in one rename; ``bin/appliance`` follows it."""
    staged = inst.prefix / "current.new"
    staged.unlink(missing_ok=True)
    staged.symlink_to(Path("versions") / version)
    os.replace(staged, inst.current_link)
    link = inst.prefix / "bin" / "appliance"
    if not link.is_symlink():
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(Path("..") / "current" / "venv" / "bin" / "appliance")
    durable.fsync_dir(inst.prefix)


def data_owner(data: Path) -> tuple[int, int] | None:
    """Who owns the database (else the data directory): root runs the new version's commands as them."""
    for path in (data / DATABASE, data):
        if path.exists():
            st = path.stat()
            return st.st_uid, st.st_gid
    return None


def run_version(inst: Installation, version: str, args: tuple[str, ...], data: Path,
                as_owner: bool = True) -> subprocess.CompletedProcess:
    """``<version>/venv/bin/appliance ARGS`` on the data directory, as its owner when run by root."""
    env = {**os.environ, "APPLIANCE_HOME": str(data)}
    owner = data_owner(data) if as_owner and os.geteuid() == 0 else None
    user, group = owner or (None, None)
    return subprocess.run([str(inst.appliance(version)), *args], env=env, user=user, group=group,  # nosec B603
                          capture_output=True, text=True, timeout=600, cwd="/")


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def restart_units(inst: Installation, version: str, data: Path, units: list[str]) -> str:
    """Start ``units`` again on ``version`` (units rewritten from it) where systemd runs; else say what to restart."""
    if not systemd_running():
        return (f"systemd is not running here: restart the appliance's processes (appliance serve, or appliance "
                f"dicom / worker / web) so that they run {version}")
    import pwd

    user = pwd.getpwuid(data.stat().st_uid).pw_name
    run_version(inst, version, ("install-systemd", "--install", "--user", user, "--home", str(data),
                                "--venv", str(inst.current_link / "venv")), data, as_owner=False)
    if units:
        subprocess.run(["systemctl", "restart", *units], check=False)  # nosec B603 B607
    return f"units rewritten for {version}; restarted: {', '.join(units) or 'none were running'}"


def stop_units() -> list[str]:
    """Stop the appliance's running units (where systemd runs); returns those that were running."""
    if not systemd_running():
        return []
    active = [unit for unit in UNITS
              if subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0]  # nosec B603 B607
    if active:
        subprocess.run(["systemctl", "stop", *active], check=False)  # nosec B603 B607
    return active


def require_no_writers(data: Path, doing: str) -> None:
    """Refuse while a process holds the data directory's writer lock (the database is about to be replaced)."""
    from appliance.store.datadir import DataDirectory, writers_alive

    if data.is_dir() and writers_alive(DataDirectory(data)):
        raise ReleaseRefused(WRITERS_RUNNING, f"an appliance process (serve, dicom, worker or import) still writes "
                                              f"{data}: stop it, then {doing} again")


def stop_for(inst: Installation, version: str, data: Path, doing: str) -> list[str]:
    """Stop the units (returns those that ran); if a process still writes the data directory, restart and refuse."""
    active = stop_units()
    try:
        require_no_writers(data, doing)
    except ReleaseRefused:
        restart_units(inst, version, data, active)
        raise
    return active


def doctor_problem(stdout: str, services: bool) -> str | None:
    """The first problem of a ``doctor --json`` report that a new version is to blame for, or None.

    A PACS that is down, an overdue export or a backlog are the site's, not the version's; the services count
    only when their units ran before the update (``services``), else nothing was meant to be running."""
    try:
        rows = json.loads(stdout)["checks"]
    except (ValueError, KeyError, TypeError):
        return "`appliance doctor --json` gave no report"
    wanted = HEALTH_CHECKS | (SERVICE_ROWS if services else frozenset())
    for r in rows:
        if r.get("status") == "problem" and r.get("check") in wanted:
            return f"doctor: {r['check']}: {r.get('detail', '')}"
    return None


def check_version(inst: Installation, version: str, data: Path, *commands: tuple[str, ...],
                  services: bool = False) -> str | None:
    """Run ``commands`` (MIGRATE, HEALTH_CHECK) of ``version`` in turn; the first problem, or None."""
    for args in commands:
        result = run_version(inst, version, args, data)
        if args == HEALTH_CHECK:
            problem = doctor_problem(result.stdout, services)
            if problem:
                return f"`appliance {' '.join(args)}` of {version}: {problem}"
            continue
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            return f"`appliance {' '.join(args)}` of {version} exited {result.returncode}: {lines[-1]}"
    return None


def carry_site_packs(inst: Installation, old: str, new: str) -> list[str]:
    """Packs the site imported into the old version (not shipped in the new one) are copied across."""
    old_engines, new_engines = inst.version_dir(old) / "engines", inst.version_dir(new) / "engines"
    carried = []
    for pack in sorted(p for p in old_engines.glob("*") if p.is_dir()) if old_engines.is_dir() else []:
        if not (new_engines / pack.name).exists():
            shutil.copytree(pack, new_engines / pack.name, symlinks=True)
            carried.append(pack.name)
    return carried


def _history(state: dict[str, Any], **event: Any) -> list[dict[str, Any]]:
    return [*state.get("history", []), {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}]


# --- the two operations -----------------------------------------------------------------------------------


def update(bundle: Path, prefix: Path | None = None, data: Path | None = None, allow_downgrade: bool = False,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Install ``bundle`` beside the current version and switch to it; undone by itself if its check fails."""
    inst = installation(prefix)
    old = inst.current_version()
    assert old is not None  # nosec B101 - installation() refused otherwise
    data = data_directory(inst, data)
    with tempfile.TemporaryDirectory(prefix="appliance-update-") as scratch:
        folder, doc = check_bundle(bundle, Path(scratch), trusted_keys(inst), old, allow_downgrade)
        if not systemd_running():
            require_no_writers(data, "update")
        new = doc["version"]
        say(f"{bundle.name}: version {new}, signed by the vendor; installing beside {old}")
        result = subprocess.run(["sh", str(folder / "install.sh"), "--prefix", str(inst.prefix),  # nosec B603 B607
                                 "--no-switch", "--trust", str(inst.version_dir(old) / "vendor.pub")],
                                capture_output=True, text=True)
        if result.returncode != 0 or not inst.is_installed(new):
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ReleaseRefused(INSTALL_FAILED, f"installing {new} failed ({last[0]}); {old} stays current")
    carried = carry_site_packs(inst, old, new)
    active = stop_for(inst, old, data, "update")
    backup = backup_database(data, old)
    state = inst.read_state()
    state.update(current=new, previous=old, data=str(data), backup=str(backup) if backup else None,
                 history=_history(state, action="update", version=new, previous=old))
    switch(inst, new)
    problem = check_version(inst, new, data, MIGRATE)
    if not problem:
        restarted = restart_units(inst, new, data, active)
        problem = check_version(inst, new, data, HEALTH_CHECK, services=bool(active))  # units running again
    if problem:
        _undo(inst, old, backup, data, active)
        raise ReleaseRefused(HEALTH_CHECK_FAILED, f"{problem}; rolled back to {old}")
    inst.write_state(state)
    return {"version": new, "previous": old, "backup": state["backup"], "carried_packs": carried,
            "restart": restarted}


def _undo(inst: Installation, old: str, backup: Path | None, data: Path, units: list[str]) -> None:
    switch(inst, old)
    if backup:
        restore_database(backup, data)
    restart_units(inst, old, data, units)


def rollback(prefix: Path | None = None, data: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Return to the previous version and restore the database backup taken before the update."""
    inst = installation(prefix)
    state = inst.read_state()
    current, previous = inst.current_version(), state.get("previous")
    if not previous or not inst.is_installed(previous):
        raise ReleaseRefused(NO_PREVIOUS, f"{inst.prefix}: no earlier version to return to")
    data = data_directory(inst, data)
    backup = Path(state["backup"]) if state.get("backup") else None
    since: set[str] = set()
    if backup is not None and not backup.is_file() and not force:
        raise ReleaseRefused(NO_BACKUP, f"the database backup {backup} of the last update is gone; --force to roll "
                                        f"back to {previous} with the database as it is now")
    if backup is not None and backup.is_file():
        since = study_uids(data / DATABASE) - study_uids(backup)
        if since and not force:
            raise ReleaseRefused(STUDIES_SINCE_BACKUP,
                                 f"{len(since)} studies arrived after the backup of {backup.name}; the database of "
                                 f"{previous} does not know them (their files stay in {data / 'instances'}). "
                                 "--force to roll back anyway, then import those files again")
    if not systemd_running():
        require_no_writers(data, "roll back")
    active = stop_for(inst, str(current), data, "roll back")
    switch(inst, previous)
    if backup is not None and backup.is_file():
        restore_database(backup, data)
    problem = check_version(inst, previous, data, MIGRATE)
    state.update(current=previous, previous=None, backup=None,
                 history=_history(state, action="rollback", version=previous, previous=current))
    inst.write_state(state)
    restarted = restart_units(inst, previous, data, active)
    problem = problem or check_version(inst, previous, data, HEALTH_CHECK, services=bool(active))
    return {"version": previous, "previous": current, "restored": str(backup) if backup else None,
            "studies_dropped": sorted(since), "problem": problem, "restart": restarted}


def verify_command(argv: list[str] | None = None) -> int:
    """``python -m appliance.release verify FOLDER --trust KEY``: install.sh's signature check."""
    parser = argparse.ArgumentParser(prog="python -m appliance.release")
    parser.add_argument("action", choices=("verify",))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--trust", type=Path, action="append", required=True, help="a vendor public key file")
    args = parser.parse_args(argv)
    try:
        verified = signing.verify_tree(args.folder, [signing.load_public_key(p) for p in args.trust])
    except signing.SignatureProblem as exc:
        print(f"error: {exc.reason_code}: {exc.reason}", file=sys.stderr)
        return 1
    print(f"signed by {verified.signer} ({verified.fingerprint}): all {len(verified.files)} files match")
    return 0


if __name__ == "__main__":
    sys.exit(verify_command())
