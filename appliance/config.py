"""Settings: one table of name, type, default and help text.

The table is the :class:`Settings` dataclass: one typed field per setting,
its help text in the field's metadata. ``SETTINGS`` lists the same fields as
:class:`Setting` rows for documentation, the CLI and the admin page.

Values come, in increasing priority, from the defaults below, the TOML file
(``$APPLIANCE_HOME/appliance.toml`` or the path in ``APPLIANCE_CONFIG``) and
``APPLIANCE_<NAME>`` environment variables. ``APPLIANCE_HOME`` is the data
directory that holds the database, instance store, artefacts, quarantine and
logs; it is decided before the TOML file is read (the file lives in it), so
the file cannot set it.

A bottom-layer module: it imports nothing from the appliance but the TOML reader and writer.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from appliance import tomlfile

T = TypeVar("T")


def _setting(default: T, help: str) -> T:
    """A field of :class:`Settings` with its default and the help text of docs/settings.md."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved settings, one typed attribute per setting (mypy catches a misspelt name).

    Values are checked and converted on construction (``"30"`` becomes ``30`` for an int
    setting); a value that does not convert raises :class:`SettingsError`.
    """

    # the site
    home: str = _setting(
        "./var", "Data directory: database, instance store, artefacts, quarantine, logs. "
        "Set by `APPLIANCE_HOME` only, never in the TOML file, which lives in it.")
    site_name: str = _setting("Screening site", "Name of the site, shown on screens and reports.")
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")

    # series geometry: see appliance.series.geometry.GeometryTolerances
    min_slices: int = _setting(10, "A CT series with fewer slices than this is rejected (TOO_FEW_SLICES).")
    orientation_tolerance: float = _setting(
        0.01, "Largest difference between direction cosines (unitless) for slices to count as one orientation.")
    duplicate_position_tolerance_mm: float = _setting(
        0.05, "Two slices closer than this along the slice normal (mm) share a position (DUPLICATE_POSITIONS).")
    slice_spacing_tolerance: float = _setting(
        0.05, "Relative deviation of a slice gap from the nominal spacing still counted as regular (0.05 = 5%).")
    max_missing_slices_fraction: float = _setting(
        0.05, "Missing slices are filled by interpolation when at most this fraction of positions is missing.")
    max_missing_run: int = _setting(
        2, "Missing slices are filled only when no gap lacks more than this many slices in a row.")
    max_irregular_gap_ratio: float = _setting(
        2.0, "Irregular slice spacing is resampled when the largest gap is at most this many times the smallest.")
    gantry_tilt_correction: bool = _setting(
        True, "Correct gantry tilt by resampling onto an orthogonal grid (true) or reject tilted series (false).")
    max_gantry_tilt_deg: float = _setting(30.0, "Tilted series beyond this angle (degrees) are rejected (GANTRY_TILT).")

    # import limits
    max_rows_columns: int = _setting(
        4096, "Images declaring more rows or columns than this are refused without decoding.")
    max_frames: int = _setting(4096, "Multi-frame images declaring more frames than this are refused without decoding.")
    max_instance_bytes: int = _setting(2 * 1024**3, "Largest single file (bytes) accepted on import.")
    max_upload_bytes: int = _setting(4 * 1024**3, "Largest browser upload (bytes, all files together); beyond it: 413.")
    max_zip_members: int = _setting(
        100_000, "Largest number of files in one zip archive; an archive with more is refused whole (UNSAFE_ARCHIVE).")
    max_zip_bytes: int = _setting(
        20 * 1024**3, "Largest uncompressed size (bytes) of one zip archive, all its files together; a larger "
        "archive is refused whole (UNSAFE_ARCHIVE) before anything is unpacked.")
    max_zip_ratio: float = _setting(
        200.0, "Largest compression ratio accepted: a zip archive unpacking to more than 64 MiB at a higher ratio "
        "(all files together) is refused whole, a file over 1 MiB in it at a higher ratio is refused alone "
        "(UNSAFE_ARCHIVE).")
    quarantine_sample_bytes: int = _setting(
        65536, "Of a file refused for its size or as part of an unsafe or damaged archive, only this many first "
        "bytes are kept in quarantine (files refused on their own are kept whole, up to max_instance_bytes).")
    max_import_depth: int = _setting(32, "Deepest folder level descended into during an import.")
    decode_workers: int = _setting(0, "Processes that decode compressed pixel data (0 = one per CPU core).")

    # DICOM receiver
    dicom_ae_title: str = _setting("APPLIANCE", "Our DICOM AE title (the called AE title peers must use).")
    dicom_port: int = _setting(11112, "TCP port of the DICOM receiver.")
    # every interface by default: the scanner must reach the receiver; callers are allow-listed below
    dicom_bind_address: str = _setting("0.0.0.0", "Address the DICOM receiver listens on.")  # nosec B104
    dicom_allowed_callers: str = _setting(
        "*@127.0.0.1,*@::1",
        "Who may send: comma-separated AE@address entries, * for any; the default admits only this box itself.")
    dicom_max_associations: int = _setting(8, "Largest number of simultaneous DICOM associations.")
    dicom_max_associations_per_address: int = _setting(
        4, "Largest number of simultaneous connections from one address, associated or not yet; further ones "
        "are closed at once, so one host cannot hold every association.")
    dicom_first_pdu_timeout: float = _setting(
        5.0, "Seconds a new connection has to send its whole A-ASSOCIATE-RQ; one that has not is closed, so idle "
        "connections cannot hold the receiver's places.")
    dicom_acse_timeout: float = _setting(30.0, "Seconds to wait for association messages.")
    dicom_dimse_timeout: float = _setting(60.0, "Seconds to wait for DIMSE messages within an association.")
    dicom_network_timeout: float = _setting(60.0, "Seconds an idle association is kept before it is closed.")
    dicom_max_pdu: int = _setting(
        262144, "Largest PDU (bytes) we advertise and accept: a P-DATA-TF claiming more ends the association "
        "before its body is read (0 = no limit, not advised: a PDU is read whole into memory).")
    disk_low_watermark_mb: int = _setting(
        1024, "Below this much free space (MiB) in the data directory, new images are refused: the receiver answers "
        "Out of Resources, imports and uploads stop with DISK_LOW (what was stored stays stored).")

    # results to the PACS, job queue
    pacs_destinations: str = _setting(
        "", "Where results go by C-STORE: comma-separated AE@host:port entries (empty = keep them on the box).")
    outbox_backoff_seconds: float = _setting(
        30.0, "Wait before resending to an unreachable PACS, doubled per attempt (max 1 h).")
    pacs_max_attempts: int = _setting(
        5, "An object the PACS refuses for good (a failure status other than Out of Resources, or a rejected "
        "association) is tried this many times, then set aside for the admin to retry or discard; an unreachable "
        "PACS is retried without end.")
    quiet_period_seconds: float = _setting(
        30.0, "A received series is analysed once no new image has arrived for this long (like Orthanc's StableAge).")
    job_lease_seconds: float = _setting(
        600.0, "A running job whose worker sent no heartbeat for this long is re-queued.")
    job_max_attempts: int = _setting(3, "A job that failed this many times stays failed, with its error.")
    job_backoff_seconds: float = _setting(30.0, "Wait before retrying a failed job, doubled after each attempt.")

    # inference
    engines_dir: str = _setting("", "Folder of model packs (empty = the engines/ folder shipped with the appliance).")
    inference_backend: str = _setting(
        "auto", "auto (TensorRT when a GPU, TensorRT and a passing engine exist, else ONNX Runtime) or onnxruntime.")
    inference_threads: int = _setting(0, "ONNX Runtime threads per operator (0 = one per CPU core).")
    min_cpu_int8_speedup: float = _setting(
        1.2, "INT8 runs on the CPU only when parity passed and it measured at least this much faster than FP32.")
    demonstration: bool = _setting(
        False, "Demonstration mode: every model pack runs, classifiers not evaluated at this site included, each "
        "with its banner (`make run` sets it). Off on a real deployment: a classifier runs only once the admin "
        "switched it on after the site's own evaluation.")
    first_start_sample: bool = _setting(
        True, "On the first start of `appliance serve`, analyse a bundled synthetic study so the screens show one.")

    # web UI
    web_host: str = _setting(
        "127.0.0.1", "Address of the web UI. Another address is used only once the first admin account exists.")
    web_port: int = _setting(8080, "TCP port of the web UI.")
    web_threads: int = _setting(4, "Threads of the web server (waitress).")
    web_idle_timeout_minutes: float = _setting(15.0, "A web session idle for this long must log in again.")
    web_secure_cookies: bool = _setting(False, "Mark session cookies Secure (set when the UI is served behind TLS).")
    web_behind_proxy: bool = _setting(
        False, "The UI is served through the HTTPS proxy of `appliance https setup` (nginx on this box): it listens "
        "on 127.0.0.1 only, takes the client's address and scheme from X-Forwarded-For/-Proto of loopback peers "
        "and sends Strict-Transport-Security.")
    web_login_attempts_per_minute: int = _setting(
        5, "Wrong passwords allowed per minute for one account from one browser (a known device of the account, "
        "else one address); beyond it that browser gets 429 for the account.")
    web_login_attempts_per_account_per_minute: int = _setting(
        20, "Wrong passwords allowed per minute for one account from all browsers that are not a known device of "
        "it; beyond it only the account's known devices may sign in to it.")
    web_login_attempts_per_address_per_minute: int = _setting(
        30, "Wrong passwords allowed per minute from one address over all accounts, for browsers that are not a "
        "known device of the account tried; beyond it that address gets 429 (its known devices still sign in).")
    web_known_device_days: int = _setting(
        180, "A browser that signed in to an account is its known device for this many days (a signed cookie); "
        "a known device signs in even while the account is throttled for other browsers.")
    web_language: str = _setting(
        "en", "Language of the UI and reports when the browser asks for none we have (en, fr, es).")

    # recalls
    recall_due_days: int = _setting(
        14, "A confirmed flag puts the patient on the recall list, due this many days later; past it the recall "
        "shows as overdue on the worklist.")

    # monthly export
    site_id: str = _setting(
        "", "This site's identifier in exports (empty = derived from its signing key's fingerprint).")
    hub_public_key: str = _setting(
        "", "The programme hub's X25519 public key (base64, from `appliance hub init`); exports are sealed to it.")
    export_dir: str = _setting(
        "", "Where the monthly export timer writes bundles (empty = exports/ in the data directory).")
    export_images: str = _setting(
        "none", "De-identified key images in exports: none, flagged (studies with a flag) or all.")

    # retention and backup
    retention_days: int = _setting(
        0, "Days a series' images are kept at least after it was analysed, its results sent to every PACS in "
        "pacs_destinations and its month exported; after that they may be purged, oldest first, when free space "
        "falls below purge_free_target_mb. Results, reports, key images and the audit log are kept. "
        "0 = keep images for ever (nothing is purged).")
    purge_free_target_mb: int = _setting(
        0, "The purge starts when free space (MiB) in the data directory falls below this and removes eligible "
        "images until it is back above it; it must be above disk_low_watermark_mb (0, or a value not above it, "
        "= twice disk_low_watermark_mb).")
    backup_dir: str = _setting(
        "", "Where the weekly backup timer writes backups (a USB disk's mount point); empty = the timer writes "
        "none and `appliance doctor` warns.")
    backup_instances: bool = _setting(
        False, "Weekly backups include the images (instances/) as well as the database, keys, settings and "
        "artefacts.")
    backup_keep: int = _setting(4, "Backups kept in the backup folder; older ones are removed after a new one "
                                   "was verified.")

    # segmentation
    body_threshold_hu: int = _setting(-500, "Voxels above this HU may belong to the body in segmentation.")
    lung_threshold_hu: int = _setting(-400, "Voxels inside the body below this HU may belong to the lungs.")

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            object.__setattr__(self, setting.name, _coerce(setting, getattr(self, setting.name)))

    @property
    def values(self) -> dict[str, Any]:
        """Every setting's value by name (a new dict; changing it changes no setting)."""
        return {s.name: getattr(self, s.name) for s in SETTINGS}

    @property
    def home_path(self) -> Path:
        """The data directory, absolute."""
        return Path(self.home).resolve()

    @property
    def engines_path(self) -> Path:
        """The folder of model packs, absolute."""
        if self.engines_dir:
            return Path(self.engines_dir).resolve()
        checkout = Path(__file__).resolve().parents[1] / "engines"
        if checkout.is_dir():
            return checkout
        # installed from a bundle: the venv is <prefix>/versions/<version>/venv, that version's packs beside it
        return Path(sys.prefix).resolve().parent / "engines"

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (by setting name) checked and converted.

        Raises :class:`SettingsError` for an unknown name or a value that does not convert.
        """
        for name in changes:
            if name not in _BY_NAME:
                raise SettingsError(f"unknown setting {name!r}")
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the settings table: a field of :class:`Settings`."""

    name: str
    default: Any
    help: str
    type: builtins.type

    @property
    def env_var(self) -> str:
        """The environment variable that overrides this setting."""
        return "APPLIANCE_" + self.name.upper()


def _table() -> tuple[Setting, ...]:
    types = typing.get_type_hints(Settings)
    return tuple(Setting(f.name, f.default, f.metadata["help"], types[f.name]) for f in dataclasses.fields(Settings))


SETTINGS: tuple[Setting, ...] = _table()
_BY_NAME = {s.name: s for s in SETTINGS}
DEFAULT_HOME: str = _BY_NAME["home"].default


class SettingsError(ValueError):
    """A setting has a value of the wrong type or an unknown name."""


def _coerce(setting: Setting, value: Any) -> Any:
    kind = setting.type
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        else:
            try:
                return kind(text)
            except ValueError:
                pass
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise SettingsError(f"setting {setting.name!r} must be {kind.__name__}, got {value!r}")


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Resolve every setting from defaults, the TOML file, the environment and ``overrides``.

    The data directory comes first, from ``overrides["home"]``, else ``APPLIANCE_HOME``, else
    ``./var``; only then is its TOML file (or the one named by ``APPLIANCE_CONFIG``) read.
    """
    env = os.environ if environ is None else environ
    home = str(overrides["home"]) if "home" in overrides else env.get("APPLIANCE_HOME", DEFAULT_HOME)
    values = _read_toml(config_path(Path(home), env))
    for setting in SETTINGS:
        if setting.env_var in env:
            values[setting.name] = env[setting.env_var]
    values.update(overrides)
    values["home"] = home
    return Settings().replace(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    """The settings the site's TOML file at ``path`` sets, if it exists; unknown names and ``home`` are refused."""
    if not path.is_file():
        return {}
    try:
        values = tomlfile.load(path)
    except tomlfile.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from exc
    for name in values:
        if name == "home":
            raise SettingsError(f"'home' cannot be set in {path}: the data directory is chosen before this file "
                                "is read (set APPLIANCE_HOME instead)")
        if name not in _BY_NAME:
            raise SettingsError(f"unknown setting {name!r} in {path}")
    return values


def markdown_table() -> str:
    """docs/settings.md: the settings table as Markdown."""
    lines = ["# Settings", "",
             "Every setting has a default, can be set in the TOML file `$APPLIANCE_HOME/appliance.toml` (or the file",
             "named by `APPLIANCE_CONFIG`) and overridden by an `APPLIANCE_<NAME>` environment variable.",
             "`appliance settings` prints the values in force; `appliance settings --markdown` prints this page.", "",
             "| name | default | environment variable | what it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.name}` | `{s.default!r}` | `{s.env_var}` | {s.help} |")
    return "\n".join(lines) + "\n"


def config_path(home: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The site's TOML file: ``APPLIANCE_CONFIG`` when set, else ``appliance.toml`` in ``home``."""
    env = os.environ if environ is None else environ
    return Path(env.get("APPLIANCE_CONFIG", Path(home) / "appliance.toml"))


def saved_values(path: Path) -> dict[str, Any]:
    """Every setting as the TOML file at ``path`` would make it (defaults where the file is silent)."""
    values = {s.name: s.default for s in SETTINGS}
    if path.is_file():
        for name, value in tomlfile.load(path).items():
            if name in _BY_NAME:
                values[name] = _coerce(_BY_NAME[name], value)
    return values


def save_overrides(changes: dict[str, Any], path: Path) -> Path:
    """Write ``changes`` (validated) into the site's TOML file at ``path``, keeping its other entries.

    Every process reading its settings through :class:`LiveSettings` takes them up at once, but those in
    :data:`FIXED_WHILE_RUNNING`; ``APPLIANCE_*`` variables still win over the file.
    """
    current = tomlfile.load(path) if path.is_file() else {}
    for name, value in changes.items():
        if name not in _BY_NAME or name == "home":
            raise SettingsError(f"unknown or fixed setting {name!r}")
        current[name] = _coerce(_BY_NAME[name], value)
    tomlfile.dump_durably(dict(sorted(current.items())), path)
    return path


# Settings a running process cannot change: the sockets it listens on, its threads, its data directory.
# The DICOM receiver's are taken up by restarting the receiver in its process (dicom_server.serve_receiver).
FIXED_WHILE_RUNNING: dict[str, str] = {
    "home": "every service", "web_host": "the web UI", "web_port": "the web UI", "web_threads": "the web UI",
    "web_secure_cookies": "the web UI", "web_behind_proxy": "the web UI", "max_upload_bytes": "the web UI",
    "decode_workers": "the worker",
}
RECEIVER_SETTINGS = ("dicom_ae_title", "dicom_port", "dicom_bind_address", "dicom_allowed_callers",
                     "dicom_max_associations", "dicom_max_associations_per_address", "dicom_first_pdu_timeout",
                     "dicom_acse_timeout", "dicom_dimse_timeout", "dicom_network_timeout", "dicom_max_pdu")


class LiveSettings:
    """The settings of a running process, read again whenever the site's TOML file changes.

    :meth:`current` costs one ``stat`` of the file (its mtime and size) when nothing changed, so it is
    called at every request and every worker loop. Settings of :data:`FIXED_WHILE_RUNNING` keep the
    values the process started with. ``APPLIANCE_*`` variables and ``overrides`` still
    win over the file; a file that does not parse keeps the settings in force (and says why once).
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, initial: Settings | None = None,
                 **overrides: Any):
        self.environ = dict(os.environ if environ is None else environ)
        self.overrides = overrides
        self._settings = initial or load(self.environ, **overrides)
        self.path = config_path(self._settings.home_path, self.environ)
        self._stamp = self._stat()
        self.problem: str | None = None

    @classmethod
    def following(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> LiveSettings:
        """Live settings that start from ``settings``: values its caller gave directly (neither the defaults,
        the file nor ``environ`` made them, as in tests) stay as given; the rest follows the file."""
        env = dict(os.environ if environ is None else environ)
        try:
            base = load(env, home=settings.home).values
        except SettingsError:
            base = settings.values
        overrides = {name: value for name, value in settings.values.items() if base[name] != value}
        return cls(env, initial=settings, **{**overrides, "home": settings.home})

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> Settings:
        """The settings in force now: reloaded when the file's mtime or size changed since the last look."""
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                fresh = load(self.environ, **{"home": self._settings.home, **self.overrides})
            except SettingsError as exc:
                self.problem = str(exc)
            else:
                self.problem = None
                # what this process took when it started stays (see FIXED_WHILE_RUNNING)
                self._settings = fresh.replace(**{name: getattr(self._settings, name) for name in FIXED_WHILE_RUNNING})
        return self._settings
