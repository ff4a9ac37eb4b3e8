"""Render the unit files in systemd/ with this installation's paths and user."""

from __future__ import annotations

from pathlib import Path

UNITS_DIR = Path(__file__).resolve().parents[1] / "systemd"
UDEV_RULE = "99-appliance-usb.rules"
SYSTEM_UNITS = Path("/etc/systemd/system")


def units_to_enable(units_dir: Path = UNITS_DIR) -> list[str]:
    """The units an installation enables: every service and timer with an [Install] section, templates
    (started by udev for a USB medium) and services a timer starts left out."""
    timers = {p.stem for p in units_dir.glob("*.timer")}
    names = []
    for unit in sorted(units_dir.iterdir()):
        if unit.suffix not in (".service", ".timer") or "@" in unit.name:
            continue
        if unit.suffix == ".service" and unit.stem in timers:
            continue
        if "[Install]" in unit.read_text():
            names.append(unit.name)
    return names


def render(text: str, *, user: str, home: Path, venv: Path, engines: Path) -> str:
    for key, value in (("@USER@", user), ("@HOME@", str(home)), ("@VENV@", str(venv)), ("@ENGINES@", str(engines))):
        text = text.replace(key, value)
    return text


def install(dest: Path, *, user: str, home: Path, venv: Path, engines: Path) -> list[Path]:
    """Write every unit (and the udev rule, beside them unless ``dest`` is systemd's folder) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(UNITS_DIR.iterdir()):
        if source.suffix not in (".service", ".timer", ".rules"):
            continue
        target = dest / source.name
        if source.name == UDEV_RULE and dest == SYSTEM_UNITS:
            target = Path("/etc/udev/rules.d") / source.name
        target.write_text(render(source.read_text(), user=user, home=home, venv=venv, engines=engines))
        written.append(target)
    return written
