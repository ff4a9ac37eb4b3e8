"""The DICOM receiver under four attacks, each against a real `appliance dicom` process on loopback.

1. idle holders: connections that never send an A-ASSOCIATE-RQ, from another address and from the
   caller's own; how long until DCMTK's echoscu is answered, and until the idle ones are closed;
2. oversize PDU: a P-DATA-TF claiming 64 MiB (256 KiB advertised), its body streamed; how soon the
   receiver ends the association and how much its peak RSS grows;
3. refused-association flood: 200 associations from an AE title not on the allow-list and 200
   connections from an address not on it; how many audit rows they leave, and whether the counts add up;
4. disk full (root only): a 20 MiB tmpfs data directory nearly full, a series sent with storescu;
   the statuses answered and any `.part` scratch file left.

Each attack is bounded (seconds); the whole run takes well under a minute.
Run: .venv/bin/python bench/receiver_abuse.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
FIRST_PDU_TIMEOUT = 5.0  # the default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_ok(port: int, calling: str = "ECHOSCU") -> bool:
    run = subprocess.run([ECHOSCU, "-aet", calling, "-aec", "APPLIANCE", "127.0.0.1", str(port)], capture_output=True)
    return run.returncode == 0


def seconds_until_echo(port: int, limit: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if echo_ok(port):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def receiver(home: Path, **settings: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """`appliance dicom` on a free loopback port; stopped with SIGINT (so it writes its last audit rows)."""
    port = free_port()
    env = dict(os.environ, APPLIANCE_HOME=str(home), APPLIANCE_DICOM_PORT=str(port),
               APPLIANCE_DICOM_BIND_ADDRESS="127.0.0.1", APPLIANCE_LOG_LEVEL="ERROR",
               APPLIANCE_DISK_LOW_WATERMARK_MB="0",
               **{"APPLIANCE_" + name.upper(): value for name, value in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "dicom"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if seconds_until_echo(port, 60) is None:
            raise RuntimeError("the receiver did not start")
        yield proc, port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the receiver from ``source`` (any 127.x.y.z address is this box, as another host)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def wait_closed(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the receiver closed ``sock`` (reading whatever it sent), or None if it stayed open."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            if time.monotonic() - t0 > limit:
                return None
    except TimeoutError:
        return None
    except OSError:  # a reset is a close too
        pass
    return time.monotonic() - t0


def association_request(calling: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification, encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "APPLIANCE"
    context = build_context("1.2.840.10008.1.1")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def idle_holders(port: int) -> list[tuple[str, str, str]]:
    rows = []
    others = [connect(port, "127.0.0.2") for _ in range(8)]
    try:
        waited = seconds_until_echo(port, 10)
        closed_at_once = sum(wait_closed(s, 0.2) is not None for s in others)
        rows.append(("8 idle connections from 127.0.0.2",
                     f"echoscu from 127.0.0.1 answered; {closed_at_once} of 8 closed at connect (per-address limit)",
                     f"echo after {waited:.2f} s" if waited is not None else "echo FAILED for 10 s"))
        own = [connect(port) for _ in range(8)]
        t0 = time.monotonic()
        waited = seconds_until_echo(port, 15)
        closed = [wait_closed(s, FIRST_PDU_TIMEOUT + 3) for s in own]
        last = max((c for c in closed if c is not None), default=None)
        figure = "echo FAILED for 15 s" if waited is None else f"echo after {waited:.2f} s"
        if last is not None:
            figure += f"; idle ones closed {time.monotonic() - t0:.1f} s after connecting"
        rows.append(("8 idle connections from 127.0.0.1 (the caller's own)",
                     f"idle ones closed by the first-PDU timeout ({FIRST_PDU_TIMEOUT:.0f} s); then echoscu answered",
                     figure))
        for sock in own:
            sock.close()
    finally:
        for sock in others:
            sock.close()
    return rows


def oversize_pdu(pid: int, port: int) -> tuple[str, str, str]:
    claimed = 64 * 2**20
    peak_before = vm_kib(pid, "VmHWM")
    with connect(port) as sock:
        sock.sendall(association_request("ATTACKER"))
        accepted = sock.recv(6)[:1] == b"\x02"
        time.sleep(0.2)
        t0 = time.monotonic()
        sock.sendall(b"\x04\x00" + struct.pack(">I", claimed))
        sent, chunk = 0, b"\0" * 2**20
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while sent < claimed and time.monotonic() - t0 < 10:
                sent += sock.send(chunk)
        reply = b""
        with contextlib.suppress(OSError):
            reply = sock.recv(10)
        wait_closed(sock, 5)
        seconds = time.monotonic() - t0
    growth = (vm_kib(pid, "VmHWM") - peak_before) / 1024
    answer = "A-ABORT" if reply[:1] == b"\x07" else "connection closed"
    return ("P-DATA-TF claiming 64 MiB (256 KiB advertised)",
            (f"{'associated, then ' if accepted else ''}{answer} after {seconds * 1000:.0f} ms; "
             f"{sent / 2**20:.1f} MiB taken by socket buffers"),
            f"peak RSS +{growth:.1f} MiB")


def refused_flood(port: int) -> float:
    request = association_request("INTRUDER")
    t0 = time.monotonic()
    for _ in range(200):
        with connect(port) as sock:
            sock.sendall(request)
            wait_closed(sock, 5)
    for _ in range(200):
        with connect(port, "127.0.0.3") as sock:
            wait_closed(sock, 5)
    return time.monotonic() - t0


def audit_rows(home: Path) -> list[tuple[str, str, dict]]:
    db = sqlite3.connect(home / "appliance.sqlite")
    try:
        return [(actor, action, json.loads(detail)) for actor, action, detail in
                db.execute("SELECT actor, action, detail FROM audit_log WHERE action LIKE 'dicom_%'")]
    finally:
        db.close()


def disk_full(tmp: Path) -> tuple[str, str, str]:
    title = "disk full: 20 MiB tmpfs, 40-image series"
    if os.geteuid() != 0:
        return (title, "skipped: mounting a tmpfs needs root", "")
    from appliance.synth.writer import SynthOptions, write_series

    series = tmp / "series"
    write_series(series, SynthOptions(slices=40, size=128, seed=3))
    mount = tmp / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)]).returncode != 0:
        return (title, "skipped: cannot mount a tmpfs here", "")
    try:
        home = mount / "home"
        with receiver(home) as (_, port):
            free = shutil.disk_usage(mount).free
            with open(mount / "filler.bin", "wb") as out:
                for _ in range((free - 400 * 1024) // 2**20):
                    out.write(b"\xff" * 2**20)
            run = subprocess.run([STORESCU, "-v", "--no-halt", "-aec", "APPLIANCE", "127.0.0.1", str(port),
                                  *sorted(map(str, series.glob("*.dcm")))], capture_output=True, text=True,
                                 timeout=120)
            lines = [ln for ln in (run.stdout + run.stderr).splitlines() if "Received Store Response" in ln]
            ok = sum("Success" in ln for ln in lines)
            full = sum("OutOfResources" in ln for ln in lines)
            parts = len(list((home / "instances").rglob("*.part")))
        return (title, f"{ok} Success, {full} Out of Resources (0xA700), {len(lines) - ok - full} other",
                f"{parts} .part files left")
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def main() -> int:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        allowed = "ECHOSCU@127.0.0.1,ATTACKER@127.0.0.1,*@127.0.0.2"  # not INTRUDER, nothing from 127.0.0.3
        with receiver(home, dicom_allowed_callers=allowed) as (proc, port):
            rows += idle_holders(port)
            rows.append(oversize_pdu(proc.pid, port))
            seconds = refused_flood(port)
        rows.append(("200 associations as AE INTRUDER + 200 connections from 127.0.0.3",
                     f"all refused in {seconds:.1f} s (A-ASSOCIATE-RJ / closed at connect)", "audit: see below"))
        by_action: dict[str, tuple[int, int]] = {}
        for _, action, detail in audit_rows(home):  # read after the receiver stopped: its last counts are in
            n_rows, count = by_action.get(action, (0, 0))
            by_action[action] = (n_rows + 1, count + detail["count"])
        for action, (n_rows, count) in sorted(by_action.items()):
            rows.append((f"audit log after the attacks above: {action}", f"{count} refusals counted",
                         f"{n_rows} rows"))
        rows.append(disk_full(Path(tmp)))
    widths = [max(len(r[i]) for r in [("attack", "outcome", "figure"), *rows]) for i in range(3)]
    for row in [("attack", "outcome", "figure"), tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
