"""C-STORE receive throughput of `appliance dicom` against Orthanc, same storescu, same files, same run.

Both store durably (our receiver fsyncs every file and commits with synchronous=FULL; Orthanc runs with
SyncStorageArea=true). Also: the receiver's RSS over 1,000 associations (target: < 10% drift).
Run: .venv/bin/python bench/receive_throughput.py [--associations 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "tcia-pancreas-ct-chest-abdomen"
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_echo(port: int, aet: str) -> None:
    for _ in range(200):
        if subprocess.run([ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{aet} did not answer")


def send(port: int, aet: str, files: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aec", aet, "127.0.0.1", str(port), *files], check=True, capture_output=True)
    return time.perf_counter() - t0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--associations", type=int, default=1000)
    args = parser.parse_args()
    files = sorted(str(p) for p in DATA.glob("*.dcm"))
    megabytes = sum(os.path.getsize(f) for f in files) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        ours_port, orthanc_port, http_port = free_port(), free_port(), free_port()
        env = dict(os.environ, APPLIANCE_HOME=f"{tmp}/home", APPLIANCE_DICOM_PORT=str(ours_port),
                   APPLIANCE_DICOM_BIND_ADDRESS="127.0.0.1", APPLIANCE_LOG_LEVEL="WARNING",
                   APPLIANCE_DISK_LOW_WATERMARK_MB="0")
        ours = subprocess.Popen([sys.executable, "-m", "appliance.cli", "dicom"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        Path(f"{tmp}/orthanc.json").write_text(json.dumps({
            "Name": "BENCH", "StorageDirectory": f"{tmp}/orthanc", "IndexDirectory": f"{tmp}/orthanc",
            "HttpPort": http_port, "DicomPort": orthanc_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [], "SyncStorageArea": True}))
        orthanc = subprocess.Popen(["/usr/sbin/Orthanc", f"{tmp}/orthanc.json"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            wait_echo(ours_port, "APPLIANCE")
            wait_echo(orthanc_port, "ORTHANC")
            t_ours, t_orthanc = send(ours_port, "APPLIANCE", files), send(orthanc_port, "ORTHANC", files)
            stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics").read())
            n = len(files)
            print(f"{n} real CT instances, {megabytes:.0f} MB, one storescu association each")
            print(f"appliance: {t_ours:.2f} s = {n / t_ours:.0f} instances/s, {megabytes / t_ours:.1f} MB/s")
            print(f"Orthanc:   {t_orthanc:.2f} s = {n / t_orthanc:.0f} instances/s, {megabytes / t_orthanc:.1f} MB/s "
                  f"({stats['CountInstances']} stored)")
            print(f"ratio appliance/Orthanc: {t_orthanc / t_ours:.2f}x (goal >= 1.0x)")
            wait_echo(ours_port, "APPLIANCE")
            before = rss_kib(ours.pid)
            for _ in range(args.associations):
                subprocess.run([ECHOSCU, "-aec", "APPLIANCE", "127.0.0.1", str(ours_port)], capture_output=True)
            after = rss_kib(ours.pid)
            print(f"receiver RSS over {args.associations} associations: {before / 1024:.1f} -> {after / 1024:.1f} MiB "
                  f"({(after - before) / before:+.1%}, target < 10%)")
        finally:
            ours.terminate()
            orthanc.terminate()
            ours.wait()
            orthanc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
