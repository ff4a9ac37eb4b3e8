"""USB import: mount the medium read-only, import it as the data directory's owner, unmount, say so.

The medium is mounted ``ro,nosuid,nodev,noexec``; the import itself runs in a
child process with the data directory owner's user and group (never as root);
symbolic links on the medium are never followed (the importer's rule). The
technician sees progress, a summary and, once unmounted, SAFE TO REMOVE.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

MOUNT_OPTIONS = "ro,nosuid,nodev,noexec,noatime"
MOUNT_ROOT = Path("/run/appliance/usb")


def mount_command(device: str, mount_point: Path) -> list[str]:
    return ["mount", "-o", MOUNT_OPTIONS, device, str(mount_point)]


def mount_point_for(device: str) -> Path:
    """A mount point named after the device's kernel name (``/dev/sdb1`` -> ``sdb1``), never a path from it."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(device).name) or "medium"
    return MOUNT_ROOT / name


def import_device(device: str, home: Path) -> int:
    """Mount ``device``, import it as the owner of ``home``, unmount; returns the import's exit status."""
    from appliance.store.imports import write_usb_status

    mount_point = mount_point_for(device)
    mount_point.mkdir(parents=True, exist_ok=True)
    write_usb_status(home, device, "importing")
    subprocess.run(mount_command(device, mount_point), check=True)
    try:
        owner = os.stat(home)
        run = subprocess.run([sys.executable, "-m", "appliance.cli", "import", str(mount_point),
                              "--source", f"usb:{Path(device).name}"],
                             user=owner.st_uid, group=owner.st_gid, env=dict(os.environ, APPLIANCE_HOME=str(home)))
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()
    write_usb_status(home, device, "safe-to-remove")
    print(f"SAFE TO REMOVE: {device} is unmounted.", flush=True)
    return run.returncode
