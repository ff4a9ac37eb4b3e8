"""Settings: one table of name, default and help text.

Values come, in increasing priority, from the defaults below, the TOML file
(``$APPLIANCE_HOME/appliance.toml`` or the path in ``APPLIANCE_CONFIG``) and
``APPLIANCE_<NAME>`` environment variables. ``APPLIANCE_HOME`` is the data
directory that holds the database, instance store, artefacts, quarantine and
logs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def env_var(self) -> str:
        return "APPLIANCE_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("home", "./var", "Data directory: database, instance store, artefacts, quarantine, logs."),
    Setting("site_name", "Screening site", "Name of the site, shown on screens and reports."),
    Setting("log_level", "INFO", "Logging level: DEBUG, INFO, WARNING or ERROR."),
    Setting("min_slices", 10, "A CT series with fewer slices than this is rejected (TOO_FEW_SLICES)."),
    Setting("orientation_tolerance", 0.01,
            "Largest difference between direction cosines (unitless) for slices to count as one orientation."),
    Setting("duplicate_position_tolerance_mm", 0.05,
            "Two slices closer than this along the slice normal (mm) share a position (DUPLICATE_POSITIONS)."),
    Setting("slice_spacing_tolerance", 0.05,
            "Relative deviation of a slice gap from the nominal spacing still counted as regular (0.05 = 5%)."),
    Setting("max_missing_slices_fraction", 0.05,
            "Missing slices are filled by interpolation when at most this fraction of positions is missing."),
    Setting("max_missing_run", 2, "Missing slices are filled only when no gap lacks more than this many slices in a row."),
    Setting("max_irregular_gap_ratio", 2.0,
            "Irregular slice spacing is resampled when the largest gap is at most this many times the smallest."),
    Setting("gantry_tilt_correction", True,
            "Correct gantry tilt by resampling onto an orthogonal grid (true) or reject tilted series (false)."),
    Setting("max_gantry_tilt_deg", 30.0, "Tilted series beyond this angle (degrees) are rejected (GANTRY_TILT)."),
    Setting("max_rows_columns", 4096, "Images declaring more rows or columns than this are refused without decoding."),
    Setting("max_frames", 4096, "Multi-frame images declaring more frames than this are refused without decoding."),
    Setting("max_instance_bytes", 2 * 1024**3, "Largest single file (bytes) accepted on import."),
    Setting("max_upload_bytes", 4 * 1024**3, "Largest browser upload (bytes, all files together); beyond it: 413."),
    Setting("max_zip_members", 100_000, "Largest number of members read from one zip archive."),
    Setting("max_zip_bytes", 20 * 1024**3, "Largest total uncompressed size (bytes) read from one zip archive."),
    Setting("max_zip_ratio", 200.0, "A zip member whose compression ratio exceeds this is refused as a zip bomb."),
    Setting("max_import_depth", 32, "Deepest folder level descended into during an import."),
    Setting("decode_workers", 0, "Processes that decode compressed pixel data (0 = one per CPU core)."),
    Setting("dicom_ae_title", "APPLIANCE", "Our DICOM AE title (the called AE title peers must use)."),
    Setting("dicom_port", 11112, "TCP port of the DICOM receiver."),
    Setting("dicom_bind_address", "0.0.0.0", "Address the DICOM receiver listens on."),
    Setting("dicom_allowed_callers", "*@127.0.0.1,*@::1",
            "Who may send: comma-separated AE@address entries, * for any; the default admits only this box itself."),
    Setting("dicom_max_associations", 8, "Largest number of simultaneous DICOM associations."),
    Setting("dicom_acse_timeout", 30.0, "Seconds to wait for association messages."),
    Setting("dicom_dimse_timeout", 60.0, "Seconds to wait for DIMSE messages within an association."),
    Setting("dicom_network_timeout", 60.0, "Seconds an idle association is kept before it is closed."),
    Setting("dicom_max_pdu", 262144, "Largest PDU (bytes) we advertise and accept."),
    Setting("disk_low_watermark_mb", 1024,
            "Below this much free space (MiB) in the data directory, new images are refused (Out of Resources)."),
    Setting("pacs_destinations", "",
            "Where results go by C-STORE: comma-separated AE@host:port entries (empty = keep them on the box)."),
    Setting("outbox_backoff_seconds", 30.0, "Wait before resending to an unreachable PACS, doubled per attempt (max 1 h)."),
    Setting("quiet_period_seconds", 30.0,
            "A received series is analysed once no new image has arrived for this long (like Orthanc's StableAge)."),
    Setting("job_lease_seconds", 600.0, "A running job whose worker sent no heartbeat for this long is re-queued."),
    Setting("job_max_attempts", 3, "A job that failed this many times stays failed, with its error."),
    Setting("job_backoff_seconds", 30.0, "Wait before retrying a failed job, doubled after each attempt."),
    Setting("engines_dir", "", "Folder of model packs (empty = the engines/ folder shipped with the appliance)."),
    Setting("inference_backend", "auto",
            "auto (TensorRT when a GPU, TensorRT and a passing engine exist, else ONNX Runtime) or onnxruntime."),
    Setting("inference_threads", 0, "ONNX Runtime threads per operator (0 = one per CPU core)."),
    Setting("min_cpu_int8_speedup", 1.2,
            "INT8 runs on the CPU only when parity passed and it measured at least this much faster than FP32."),
    Setting("first_start_sample", True,
            "On the first start of `appliance serve`, analyse a bundled synthetic study so the screens show one."),
    Setting("web_host", "127.0.0.1",
            "Address of the web UI. Another address is used only once the first admin account exists."),
    Setting("web_port", 8080, "TCP port of the web UI."),
    Setting("web_threads", 4, "Threads of the web server (waitress)."),
    Setting("web_idle_timeout_minutes", 15.0, "A web session idle for this long must log in again."),
    Setting("web_secure_cookies", False, "Mark session cookies Secure (set when the UI is served behind TLS)."),
    Setting("web_login_attempts_per_minute", 5,
            "Wrong passwords allowed per minute for one account or address; beyond it: 429."),
    Setting("web_language", "en", "Language of the UI and reports when the browser asks for none we have (en, fr, es)."),
    Setting("site_id", "", "This site's identifier in exports (empty = derived from its signing key's fingerprint)."),
    Setting("hub_public_key", "",
            "The programme hub's X25519 public key (base64, from `appliance hub init`); exports are sealed to it."),
    Setting("export_dir", "", "Where the monthly export timer writes bundles (empty = exports/ in the data directory)."),
    Setting("export_images", "none",
            "De-identified key images in exports: none, flagged (studies with a flag) or all."),
    Setting("body_threshold_hu", -500, "Voxels above this HU may belong to the body in segmentation."),
    Setting("lung_threshold_hu", -400, "Voxels inside the body below this HU may belong to the lungs."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved settings; attribute access by setting name."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def home_path(self) -> Path:
        return Path(self.values["home"]).resolve()

    @property
    def engines_path(self) -> Path:
        if self.values["engines_dir"]:
            return Path(self.values["engines_dir"]).resolve()
        return Path(__file__).resolve().parents[1] / "engines"

    @property
    def engine_cache_path(self) -> Path:
        return self.home_path / "engines-cache"

    def replace(self, **changes: Any) -> "Settings":
        values = dict(self.values)
        for name, value in changes.items():
            if name not in _BY_NAME:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _coerce(_BY_NAME[name], value)
        return Settings(values)


def load(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Resolve every setting from defaults, the TOML file, the environment and ``overrides``."""
    env = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    home = env.get("APPLIANCE_HOME", overrides.get("home", values["home"]))
    config_path = Path(env.get("APPLIANCE_CONFIG", Path(home) / "appliance.toml"))
    if config_path.is_file():
        with open(config_path, "rb") as f:
            for name, value in tomllib.load(f).items():
                if name not in _BY_NAME:
                    raise SettingsError(f"unknown setting {name!r} in {config_path}")
                values[name] = _coerce(_BY_NAME[name], value)
    for setting in SETTINGS:
        if setting.env_var in env:
            values[setting.name] = _coerce(setting, env[setting.env_var])
    return Settings(values).replace(**overrides)


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


def config_path(home: Path, environ: dict[str, str] | None = None) -> Path:
    """The site's TOML file: ``APPLIANCE_CONFIG`` when set, else ``appliance.toml`` in ``home``."""
    env = os.environ if environ is None else environ
    return Path(env.get("APPLIANCE_CONFIG", Path(home) / "appliance.toml"))


def saved_values(path: Path) -> dict[str, Any]:
    """Every setting as the TOML file at ``path`` would make it (defaults where the file is silent)."""
    values = {s.name: s.default for s in SETTINGS}
    if path.is_file():
        with open(path, "rb") as f:
            for name, value in tomllib.load(f).items():
                if name in _BY_NAME:
                    values[name] = _coerce(_BY_NAME[name], value)
    return values


def save_overrides(changes: dict[str, Any], path: Path) -> Path:
    """Write ``changes`` (validated) into the site's TOML file at ``path``, keeping its other entries.

    Values take effect when each service next starts; ``APPLIANCE_*`` variables still win over the file.
    """
    from appliance.inference.packs import _toml_value
    from appliance.store.files import write_bytes_durably

    current: dict[str, Any] = {}
    if path.is_file():
        with open(path, "rb") as f:
            current = tomllib.load(f)
    for name, value in changes.items():
        if name not in _BY_NAME or name == "home":
            raise SettingsError(f"unknown or fixed setting {name!r}")
        current[name] = _coerce(_BY_NAME[name], value)
    text = "".join(f"{name} = {_toml_value(value)}\n" for name, value in sorted(current.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durably(text.encode(), path)
    return path
