"""``appliance doctor``: one screen a technician can read over the phone, each problem with what to do.

Every check is a small function of a :class:`Context` returning one or more rows
``{"check", "status", "detail", "fix"}``; ``status`` is ``ok``, ``warning`` (worth knowing, nothing stops)
or ``problem`` (something must be fixed: the exit status is 1). A check that itself fails is reported as a
problem ``check failed: ...``, never as a traceback. Nothing here writes to the data directory, and every
network check has a short timeout (``PEER_TIMEOUT``), so the whole run stays within a few seconds even
with a PACS that does not answer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import sqlite3
import subprocess  # nosec B404 - systemctl is-active with fixed arguments
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import Settings
from appliance.store.datadir import DataDirectory

OK, WARNING, PROBLEM = "ok", "warning", "problem"
PEER_TIMEOUT = 2.0  # seconds for each PACS's TCP connect, association and C-ECHO reply
SYSTEMCTL_TIMEOUT = 3.0  # seconds
EXPORT_OVERDUE_DAYS = 40  # the monthly export runs on the 1st: more than this since the last one is late
OUTBOX_STUCK_HOURS = 1.0  # results waiting longer than this for the PACS are worth a look
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket

Row = dict[str, str]


def row(check: str, status: str, detail: str, fix: str = "") -> Row:
    """One line of the report; ``fix`` says what to do (for a warning or a problem)."""
    return {"check": check, "status": status, "detail": detail, "fix": fix}


@dataclasses.dataclass
class Context:
    """What the checks read: the settings and the data directory (the database opened read-only, lazily)."""

    settings: Settings
    now: datetime.datetime = dataclasses.field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    _db: sqlite3.Connection | None = None

    @property
    def ddir(self) -> DataDirectory:
        return DataDirectory(self.settings.home_path)

    def db(self) -> sqlite3.Connection:
        """A read-only connection to the database (raises when there is none)."""
        if self._db is None:
            if not self.ddir.database.is_file():
                raise FileNotFoundError(f"no database at {self.ddir.database}")
            self._db = sqlite3.connect(f"file:{self.ddir.database}?mode=ro", uri=True, timeout=5.0)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# --- version and install ---------------------------------------------------------------------------

def install_prefix(start: Path | None = None) -> Path | None:
    """The prefix of a bundle install (``<prefix>/current`` -> ``versions/<v>``) holding this Python, or None."""
    here = (start or Path(sys.prefix)).resolve()
    for folder in (here, *here.parents):
        if (folder / "current").is_symlink() and (folder / "versions").is_dir():
            return folder
    return None


def check_version(ctx: Context) -> list[Row]:
    prefix = install_prefix()
    if prefix is None:
        return [row("version", OK, f"appliance {__version__} (not installed from a bundle: {sys.prefix})")]
    current = Path(os.readlink(prefix / "current")).name
    if current != __version__ and __version__ not in current:
        return [row("version", WARNING, f"this process runs {__version__} but {prefix}/current points to {current}",
                    "restart the services so they run the current version: "
                    "systemctl restart appliance-dicom appliance-worker appliance-web")]
    return [row("version", OK, f"appliance {__version__}, installed in {prefix} (current -> {current})")]


# --- data directory, disk, database, clock ----------------------------------------------------------

def check_data_directory(ctx: Context) -> list[Row]:
    home = ctx.ddir.home
    if not home.is_dir():
        return [row("data directory", PROBLEM, f"{home} does not exist",
                    "check APPLIANCE_HOME in the units (default /var/lib/appliance); reinstall creates it")]
    free_mb = shutil.disk_usage(home).free / 2**20
    watermark = ctx.settings.disk_low_watermark_mb
    detail = f"{home}: {free_mb:,.0f} MB free (the receiver refuses images below {watermark:,} MB)"
    if free_mb < watermark:
        return [row("data directory", PROBLEM, f"disk nearly full: {detail}",
                    "free space on that disk: copy old monthly exports off (exports/) and remove them, empty "
                    "quarantine/ from Admin -> Import, or add a disk; the scanner's images are refused until then")]
    if not os.access(home, os.W_OK):
        return [row("data directory", PROBLEM, f"{home} is not writable by this user",
                    "run as the appliance user (sudo -u appliance) or chown -R appliance: the data directory")]
    return [row("data directory", OK, detail)]


def check_database(ctx: Context) -> list[Row]:
    path = ctx.ddir.database
    if not path.is_file():
        return [row("database", PROBLEM, f"no database at {path}",
                    "start the appliance once (systemctl start appliance-dicom) to create it, "
                    "or check APPLIANCE_HOME")]
    size_mb = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file()) / 2**20
    result = [r[0] for r in ctx.db().execute("PRAGMA quick_check").fetchall()]
    if result != ["ok"]:
        return [row("database", PROBLEM, f"{path} is damaged: {'; '.join(result[:3])}",
                    "stop the services and call support: the database must be restored from its last backup "
                    "(the one `appliance update` made, or your own)")]
    return [row("database", OK, f"{path}: integrity ok, {size_mb:,.1f} MB")]


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def newest_stored_time(ctx: Context) -> datetime.datetime | None:
    """The latest time the appliance wrote into its database (studies, jobs, audit log)."""
    found = []
    for sql in ("SELECT max(updated_at) FROM studies", "SELECT max(updated_at) FROM jobs",
                "SELECT max(at) FROM audit_log"):
        try:
            found.append(_parse_time(ctx.db().execute(sql).fetchone()[0]))
        except sqlite3.Error:
            continue
    times = [t for t in found if t is not None]
    return max(times) if times else None


def build_time() -> datetime.datetime:
    """When this version's code was written to this box (the newest file of the package)."""
    package = Path(__file__).resolve().parent
    newest = max(p.stat().st_mtime for p in package.glob("*.py"))
    return datetime.datetime.fromtimestamp(newest, datetime.timezone.utc)


def check_clock(ctx: Context) -> list[Row]:
    now = ctx.now
    fix = ("set the date and time (timedatectl set-time 'YYYY-MM-DD HH:MM:SS', or enable NTP: timedatectl "
           "set-ntp true); results and exports are dated by this clock")
    built = build_time()
    if now < built - datetime.timedelta(minutes=5):
        return [row("clock", PROBLEM, f"the clock says {now:%Y-%m-%d %H:%M} UTC, before this version was "
                                      f"installed ({built:%Y-%m-%d %H:%M})", fix)]
    stored = newest_stored_time(ctx) if ctx.ddir.database.is_file() else None
    if stored is not None and now < stored - datetime.timedelta(minutes=5):
        return [row("clock", PROBLEM, f"the clock says {now:%Y-%m-%d %H:%M} UTC, before the newest record in the "
                                      f"database ({stored:%Y-%m-%d %H:%M}): it went back", fix)]
    return [row("clock", OK, f"{now:%Y-%m-%d %H:%M} UTC, after the newest record and the install")]


# --- processes, units, ports -----------------------------------------------------------------------

def listening_sockets(proc_net: Path = Path("/proc/net")) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine (``/proc/net/tcp`` and ``tcp6``)."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_LISTEN:
                continue
            address, _, port = fields[1].partition(":")
            found.append((_proc_address(address), int(port, 16)))
    return found


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp writes it (32-bit words in host order) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def bound_addresses(port: int, sockets: Iterable[tuple[str, int]]) -> list[str]:
    return sorted({address for address, p in sockets if p == port})


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def unit_state(unit: str) -> str | None:
    """``systemctl is-active UNIT`` (active, inactive, failed, ...), or None where systemd does not run."""
    if not systemd_running():
        return None
    try:
        done = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True,  # nosec B603 B607
                              timeout=SYSTEMCTL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or "unknown"


def _restart_fix(unit: str, what: str) -> str:
    return (f"start it: systemctl restart {unit} (journalctl -u {unit} -n 50 says why it stopped); "
            f"without systemd: appliance serve, or appliance {what}")


def _service_row(name: str, unit: str, command: str, port: int, sockets: list[tuple[str, int]],
                 consequence: str) -> Row:
    state = unit_state(unit)
    addresses = bound_addresses(port, sockets)
    unit_text = f" ({unit} {state})" if state else ""
    if addresses:
        return row(name, OK, f"listening on {', '.join(f'{a}:{port}' for a in addresses)}{unit_text}")
    return row(name, PROBLEM, f"nothing listens on port {port}{unit_text}: {consequence}",
               _restart_fix(unit, command))


def lock_held(path: Path) -> bool:
    """Whether a live process holds the flock on ``path`` (probed without changing anything)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def check_processes(ctx: Context) -> list[Row]:
    s = ctx.settings
    sockets = listening_sockets()
    rows = [_service_row("receiver", "appliance-dicom.service", "dicom", s.dicom_port, sockets,
                         "the scanner cannot send images"),
            _service_row("web", "appliance-web.service", "web", s.web_port, sockets,
                         "the worklist and reports cannot be opened")]
    workers = ctx.ddir.workers
    alive = sum(lock_held(p) for p in workers.glob("*.lock")) if workers.is_dir() else 0
    state = unit_state("appliance-worker.service")
    unit_text = f" (appliance-worker.service {state})" if state else ""
    if alive:
        rows.append(row("worker", OK, f"{alive} worker(s) running{unit_text}"))
    else:
        rows.append(row("worker", PROBLEM, f"no worker is running{unit_text}: received series are not analysed",
                        _restart_fix("appliance-worker.service", "worker")))
    return rows


def check_ports(ctx: Context) -> list[Row]:
    s = ctx.settings
    sockets = listening_sockets()
    dicom = bound_addresses(s.dicom_port, sockets)
    web = bound_addresses(s.web_port, sockets)
    detail = (f"DICOM {s.dicom_port} on {', '.join(dicom) or 'nothing'}; "
              f"web {s.web_port} on {', '.join(web) or 'nothing'}")
    if dicom and all(ipaddress.ip_address(a).is_loopback for a in dicom):
        return [row("ports", WARNING, f"{detail}: the receiver is reachable only from this box",
                    "set dicom_bind_address = \"0.0.0.0\" (Admin -> DICOM) so the scanner can send")]
    if web and all(ipaddress.ip_address(a).is_loopback for a in web):
        return [row("ports", OK, f"{detail} (the web UI is reachable only from this box until web_host is set)")]
    return [row("ports", OK, detail)]


# --- DICOM peers -----------------------------------------------------------------------------------

def echo(calling_ae: str, destination: Any, timeout: float = PEER_TIMEOUT) -> tuple[bool, str]:
    """C-ECHO ``destination`` (outbox.Destination); (answered with success, what happened in words)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "does not answer"
        return False, why
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and int(getattr(status, "Status", -1)) == 0x0000:
        return True, "answered C-ECHO"
    return False, "answered C-ECHO with an error status"


def check_peers(ctx: Context) -> list[Row]:
    from appliance.outputs.outbox import parse_destinations

    destinations = parse_destinations(ctx.settings.pacs_destinations)
    if not destinations:
        return [row("pacs", OK, "no PACS configured: results stay on the box (pacs_destinations)")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(destinations)) as pool:
        answers = list(pool.map(lambda d: echo(ctx.settings.dicom_ae_title, d), destinations))
    rows = []
    for destination, (ok, what) in zip(destinations, answers, strict=True):
        name = f"pacs {destination}"
        if ok:
            rows.append(row(name, OK, f"{destination} {what}"))
        else:
            rows.append(row(name, PROBLEM, f"{destination} {what}: results wait in the outbox",
                            f"check the PACS is on and reachable at {destination.host}:{destination.port} (cable, "
                            f"switch, firewall) and that it accepts AE title {ctx.settings.dicom_ae_title} from this "
                            "box; test again with Admin -> DICOM -> C-ECHO"))
    return rows


# --- model packs, GPU ------------------------------------------------------------------------------

def _engine_text(choice: Any, trt_ok: bool) -> tuple[str, str]:
    """(what the engine cache holds for this pack, a fix when an engine is missing on a GPU box)."""
    if not trt_ok:
        return "", ""
    if choice.backend == "tensorrt":
        return f"; engine {choice.path.name} valid for this GPU and TensorRT", ""
    return ("; no valid TensorRT engine for this GPU and TensorRT version",
            "build them: systemctl start appliance-build-engines (or appliance build-engines); takes minutes")


def check_packs(ctx: Context) -> list[Row]:
    import sqlite_utils

    from appliance.inference import packs, policy, registry, trust
    from appliance.inference.backends import tensorrt as trt_backend

    s = ctx.settings
    found, refused = registry.available_packs(s)
    rows = [row(f"pack {r.reason.split(':', 1)[0]}", PROBLEM, f"refused: {r.reason_code}: {r.reason}",
                "reinstall it: appliance packs import the original pack (or appliance update / rollback for a "
                "shipped one); it does not run until then") for r in refused]
    keys = trust.trusted_keys(s.home_path, s.engines_path)
    inventory = {(r["id"], r["version"], r["origin"]): r for r in registry.inventory(s)[0]}
    trt_ok = bool(trt_backend.is_available())
    for pack in packs.newest(found):
        signer, problem = registry.signer_of(pack, keys)
        if problem:
            rows.append(row(f"pack {pack.id}", PROBLEM, f"{pack.version}: {problem}: {signer}",
                            "reinstall the pack from its signed original (appliance packs import), or trust its "
                            "signer (appliance packs trust KEYFILE) if the key is right"))
            continue
        choice = inventory[(pack.id, pack.version, pack.origin)]["choice"]
        engine, fix = _engine_text(choice, trt_ok)
        off = policy.why_off(pack, s, sqlite_utils.Database(ctx.db())) if ctx.ddir.database.is_file() else None
        runs = "off at this site until evaluated and switched on" if off else "runs"
        detail = (f"{pack.version} ({pack.origin}), checksums ok, {signer}; {runs} on {choice.backend} "
                  f"{choice.precision}{engine}")
        rows.append(row(f"pack {pack.id}", WARNING if fix else OK, detail, fix))
    if not found and not refused:
        rows.append(row("packs", PROBLEM, f"no model packs in {s.engines_path}",
                        "reinstall the appliance (appliance update BUNDLE) or set engines_dir"))
    return rows


def nvidia_present() -> bool:
    return shutil.which("nvidia-smi") is not None or any(Path("/dev").glob("nvidia[0-9]*")) \
        or Path("/dev/nvhost-gpu").exists()


def check_gpu(ctx: Context) -> list[Row]:
    from appliance.inference.backends import tensorrt as trt_backend

    available = trt_backend.is_available()
    if available:
        name, (major, minor) = trt_backend.gpu_identity()
        return [row("gpu", OK, f"{name} (sm{major}{minor}), TensorRT {trt_backend.tensorrt_version()}")]
    if not nvidia_present():
        return [row("gpu", OK, "no NVIDIA GPU: CPU ONNX Runtime in use")]
    return [row("gpu", WARNING, f"an NVIDIA GPU is present but TensorRT is not usable: {available.why}",
                "install TensorRT and pycuda as system packages (JetPack: apt install python3-libnvinfer "
                "python3-pycuda), then appliance build-engines; until then the CPU runs the models")]


# --- export and outbox ------------------------------------------------------------------------------

def _no_database(ctx: Context, name: str) -> list[Row]:
    if ctx.ddir.database.is_file():
        return []
    return [row(name, WARNING, "not checked: there is no database yet (see the database check)",
                "start the appliance once")]


def check_export(ctx: Context) -> list[Row]:
    if missing := _no_database(ctx, "export"):
        return missing
    last = ctx.db().execute("SELECT month, finished_at FROM exports WHERE state = 'done' "
                            "ORDER BY finished_at DESC LIMIT 1").fetchone()
    if last is None:
        if not ctx.settings.hub_public_key:
            return [row("export", OK, "monthly export not set up (no hub_public_key)")]
        return [row("export", WARNING, "no monthly export has run yet",
                    "systemctl enable --now appliance-export.timer, or appliance export --out /media/usb")]
    finished = _parse_time(last[1])
    age = (ctx.now - finished).days if finished else None
    detail = f"last export: {last[0]}, written {last[1][:10] if last[1] else '?'}"
    if age is None or age > EXPORT_OVERDUE_DAYS:
        return [row("export", WARNING, f"{detail}: overdue",
                    "check the timer (systemctl status appliance-export.timer) or run "
                    "appliance export --out /media/usb")]
    return [row("export", OK, detail)]


BACKUP_OVERDUE_DAYS = 8  # the timer writes one a week


def check_backup(ctx: Context) -> list[Row]:
    """How old the last backup is (``backups`` rows, written by ``appliance backup``)."""
    if missing := _no_database(ctx, "last backup"):
        return missing
    last = ctx.db().execute("SELECT finished_at, path FROM backups ORDER BY finished_at DESC LIMIT 1").fetchone()
    fix = ("set backup_dir to a USB disk's mount point and systemctl enable --now appliance-backup.timer, "
           "or appliance backup --out /media/usb")
    if last is None:
        return [row("last backup", WARNING, "no backup has been written", fix)]
    finished = _parse_time(last[0])
    age = (ctx.now - finished).days if finished else None
    detail = f"last backup {last[0][:10]}, {age if age is not None else '?'} day(s) ago: {last[1]}"
    if age is None or age > BACKUP_OVERDUE_DAYS:
        return [row("last backup", WARNING, f"{detail}: overdue", fix)]
    return [row("last backup", OK, detail)]


def check_outbox(ctx: Context) -> list[Row]:
    if missing := _no_database(ctx, "outbox"):
        return missing
    db = ctx.db()
    counts = dict(db.execute("SELECT state, count(*) FROM outbox WHERE state IN ('queued', 'set_aside') "
                             "GROUP BY state").fetchall())
    queued, set_aside = counts.get("queued", 0), counts.get("set_aside", 0)
    oldest = _parse_time(db.execute("SELECT min(created_at) FROM outbox WHERE state = 'queued'").fetchone()[0])
    hours = (ctx.now - oldest).total_seconds() / 3600 if oldest else 0.0
    detail = f"{queued} waiting for the PACS" + (f" (oldest {hours:.1f} h)" if queued else "") + \
        f", {set_aside} refused by the PACS"
    if set_aside:
        return [row("outbox", PROBLEM, detail,
                    "Admin -> Results the PACS refused -> retry or discard (the PACS's reason is shown there)")]
    if queued and hours > OUTBOX_STUCK_HOURS:
        return [row("outbox", WARNING, detail, "the PACS is not taking results: see the pacs check above")]
    return [row("outbox", OK, detail)]


CERTIFICATE_WARNING_DAYS = 30


def check_https(ctx: Context) -> list[Row]:
    """The HTTPS proxy's server certificate, when one was set up: expired is a problem, near expiry a warning."""
    from appliance import https

    if not ctx.settings.web_behind_proxy:
        return [row("https", OK, "not set up: the web UI is served over HTTP on this network only")]
    left = https.days_left(https.TLSFiles.of(ctx.settings.home_path).certificate)
    renew = "appliance https setup --install (makes a new certificate from the site CA, or give --cert/--key)"
    if left is None:
        return [row("https", PROBLEM, "the web UI is behind the HTTPS proxy but has no readable server certificate",
                    renew)]
    if left < 0:
        return [row("https", PROBLEM, f"the server certificate expired {-left} days ago: browsers refuse it", renew)]
    if left < CERTIFICATE_WARNING_DAYS:
        return [row("https", WARNING, f"the server certificate expires in {left} days", renew)]
    return [row("https", OK, f"server certificate valid for {left} more days")]


CHECKS: tuple[tuple[str, Callable[[Context], list[Row]]], ...] = (
    ("version", check_version),
    ("data directory", check_data_directory),
    ("database", check_database),
    ("clock", check_clock),
    ("services", check_processes),
    ("ports", check_ports),
    ("pacs", check_peers),
    ("packs", check_packs),
    ("gpu", check_gpu),
    ("export", check_export),
    ("outbox", check_outbox),
    ("https", check_https),
    ("last backup", check_backup),
)


def run_check(name: str, check: Callable[[Context], list[Row]], ctx: Context) -> list[Row]:
    """The rows of one check; a check that fails is itself a problem, never a traceback."""
    try:
        return check(ctx)
    except Exception as exc:  # a broken check must not hide the others
        return [row(name, PROBLEM, f"check failed: {type(exc).__name__}: {exc}",
                    "read the detail to the support line; the other checks still ran")]


def run_checks(settings: Settings, checks: Iterable[tuple[str, Callable[[Context], list[Row]]]] = CHECKS
               ) -> dict[str, Any]:
    """Every check: ``{"version", "home", "ok", "checks": [rows]}``; ``ok`` is False when any is a problem."""
    ctx = Context(settings)
    quiet = logging.getLogger("pynetdicom")  # an unreachable PACS is one row, not a page of log lines
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        rows = [r for name, check in checks for r in run_check(name, check, ctx)]
    finally:
        quiet.setLevel(level)
        ctx.close()
    return {"version": __version__, "home": str(settings.home_path),
            "ok": not any(r["status"] == PROBLEM for r in rows), "checks": rows}


LABEL = {OK: "OK  ", WARNING: "WARN", PROBLEM: "FAIL"}


def as_text(report: dict[str, Any], settings: Settings | None = None) -> str:
    """One line per check (OK / WARN / FAIL, name, detail) and the fix under each warning and problem."""
    lines = [f"appliance doctor {report['version']}: {report['home']}"]
    width = max((len(r["check"]) for r in report["checks"]), default=10)
    for r in report["checks"]:
        lines.append(f"{LABEL[r['status']]}  {r['check']:<{width}}  {r['detail']}")
        if r["fix"] and r["status"] != OK:
            lines.append(f"      {'':<{width}}  fix: {r['fix']}")
    problems = sum(r["status"] == PROBLEM for r in report["checks"])
    lines.append("everything needed is working" if report["ok"] else f"{problems} problem(s) to fix")
    return "\n".join(lines)
