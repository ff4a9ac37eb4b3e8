"""Render the unit files in systemd/ with this installation's paths and user."""

from __future__ import annotations

from pathlib import Path

UNITS_DIR = Path(__file__).resolve().parents[1] / "systemd"
UDEV_RULE = "99-appliance-usb.rules"


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
        if source.name == UDEV_RULE and dest == Path("/etc/systemd/system"):
            target = Path("/etc/udev/rules.d") / source.name
        target.write_text(render(source.read_text(), user=user, home=home, venv=venv, engines=engines))
        written.append(target)
    return written
