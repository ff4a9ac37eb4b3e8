"""kill -9 rounds: the receiver killed at random moments during DCMTK sends, the worker killed mid-job.

    python bench/kill_rounds.py --rounds 100          # the full form; `make test` runs 3 rounds

Prints one table: rounds, instances acknowledged, acknowledged instances missing or unreadable after
restart, database integrity, and for the worker: series analysed, analyses per series.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from appliance.store.database import open_database
from appliance.synth.writer import SynthOptions, write_series

STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path, port: int) -> dict[str, str]:
    return dict(os.environ, APPLIANCE_HOME=str(home), APPLIANCE_DICOM_PORT=str(port),
                APPLIANCE_DICOM_BIND_ADDRESS="127.0.0.1", APPLIANCE_DISK_LOW_WATERMARK_MB="0",
                APPLIANCE_QUIET_PERIOD_SECONDS="0", APPLIANCE_LOG_LEVEL="WARNING")


def _start(command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_echo(port: int) -> None:
    for _ in range(300):
        if subprocess.run([ECHOSCU, "-aec", "APPLIANCE", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit("the receiver did not come up")


def _acknowledged(output: str) -> set[str]:
    done, current = set(), None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            done.add(current)
    return done


def receiver_rounds(work: Path, rounds: int, instances: int, rng: random.Random) -> dict[str, object]:
    series = work / "series"
    write_series(series, SynthOptions(slices=instances, size=64, region="chest-abdomen", seed=31))
    files = sorted(str(p) for p in series.glob("*.dcm"))
    home, port = work / "home", _free_port()
    env = _env(home, port)
    acknowledged: set[str] = set()
    receiver = _start("dicom", env)
    kills = 0
    try:
        _wait_for_echo(port)
        while kills < rounds or len(acknowledged) < len(files):
            remaining = [f for f in files if f not in acknowledged] or files[:50]  # re-sends count too
            sender = subprocess.Popen([STORESCU, "-v", "-aec", "APPLIANCE", "127.0.0.1", str(port), *remaining],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if kills < rounds:
                time.sleep(rng.uniform(0.2, 1.2))
                receiver.send_signal(signal.SIGKILL)
                receiver.wait()
                kills += 1
            out, _ = sender.communicate(timeout=600)
            acknowledged |= _acknowledged(out)
            if receiver.poll() is not None:
                receiver = _start("dicom", env)
                _wait_for_echo(port)
    finally:
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
    db = open_database(home)
    stored = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    lost = 0
    for f in acknowledged:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        try:
            pydicom.dcmread(home / stored[sop], stop_before_pixels=True)
        except (KeyError, OSError):
            lost += 1
    return {"kills": kills, "acknowledged": len(acknowledged), "lost": lost,
            "integrity": db.execute("PRAGMA integrity_check").fetchone()[0]}


def worker_rounds(work: Path, rounds: int, rng: random.Random) -> dict[str, object]:
    home = work / "worker-home"
    env = _env(home, 0)
    folders = []
    for n in range(rounds):
        folder = work / f"study{n}"
        write_series(folder, SynthOptions(slices=40, size=128, region="chest", seed=100 + n))
        (folder / "ground_truth.json").unlink()
        folders.append(str(folder))
    subprocess.run([sys.executable, "-m", "appliance.cli", "import", *folders], env=env, capture_output=True,
                   check=True)
    db = open_database(home)
    kills = 0
    deadline = time.monotonic() + 60 + 30 * rounds
    worker = _start("worker", env)
    try:
        while time.monotonic() < deadline:
            done = db.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
            if done == rounds:
                break
            running = db.execute("SELECT 1 FROM jobs WHERE state = 'running'").fetchone()
            if running and kills < rounds:
                time.sleep(rng.uniform(0.0, 1.5))
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                kills += 1
                worker = _start("worker", env)
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    per_series = [n for _, n in db.execute("SELECT series_instance_uid, count(*) FROM analyses "
                                           "GROUP BY series_instance_uid")]
    return {"kills": kills, "series": rounds,
            "done": db.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0],
            "analyses per series": sorted(set(per_series)),
            "integrity": db.execute("PRAGMA integrity_check").fetchone()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        receiver = receiver_rounds(Path(tmp), args.rounds, args.instances, rng)
        worker = worker_rounds(Path(tmp), args.rounds, rng)
    print("| process | kill -9 rounds | result |")
    print("|---|---|---|")
    print(f"| receiver | {receiver['kills']} | {receiver['acknowledged']} instances acknowledged, "
          f"{receiver['lost']} lost, integrity {receiver['integrity']} |")
    print(f"| worker | {worker['kills']} | {worker['done']}/{worker['series']} series done, analyses per "
          f"series {worker['analyses per series']}, integrity {worker['integrity']} |")
    ok = receiver["lost"] == 0 and worker["done"] == worker["series"] and worker["analyses per series"] == [1]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
