"""Archive screening throughput: `appliance batch screen` with the local worker pool, then on a local Ray cluster
(a head node and a second node on loopback, one CPU each) when Ray is installed, on the same archive.

The archive: N generated studies (default 200, 40 slices of 128x128 each, as the tests make them) plus the real
series in ../shared/data/ct when present. Prints series/min of each runner (screening only: the archive is
imported once by each run first, and that time is printed apart), the Ray / pool ratio, whether both gave the
same rows (timings aside), and what a cluster of N nodes should give.
Run: .venv/bin/python bench/archive_throughput.py [--studies 200] [--workers 2] [--no-ray]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL = HERE.parents[1] / "shared" / "data" / "ct"
FIGURES = ("runner", "import_seconds", "seconds", "series_per_minute", "wall_seconds")
REAL_SERIES = ("tcia-pancreas-ct-chest-abdomen", "totalseg-example-3mm", "dcm-qa-ct-ge")


def make_archive(root: Path, studies: int) -> Path:
    from appliance.synth.writer import SynthOptions, write_series

    source = root / "archive"
    for seed in range(studies):
        write_series(source / f"study{seed:04d}", SynthOptions(slices=40, size=128, seed=1000 + seed))
    for name in REAL_SERIES:
        if (REAL / name).is_dir():
            shutil.copytree(REAL / name, source / name)
    return source


def screen(source: Path, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, APPLIANCE_HOME=str(out.parent / f"{out.name}-home"))
    started = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).with_name("appliance")), "batch", "screen", str(source),
                           "--out", str(out), "--json", *extra], env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"batch screen failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    doc["wall_seconds"] = round(time.monotonic() - started, 1)
    return doc


def peak_mib(out: Path) -> float:
    """The largest peak memory of a worker process while it screened a series, MiB."""
    with (out / "results.csv").open(newline="") as f:
        return max((float(r["worker_peak_mib"]) for r in csv.DictReader(f) if r["worker_peak_mib"]), default=0.0)


def rows(out: Path) -> list[tuple[str, ...]]:
    from appliance.batch.results import COLUMNS, TIMING_COLUMNS

    keep = [c for c in COLUMNS if c not in (*TIMING_COLUMNS, "attempts")]
    with (out / "results.csv").open(newline="") as f:
        return [tuple(r[c] for c in keep) for r in csv.DictReader(f)]


def ray_cluster(temp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp}", *common], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(5)
    node = subprocess.Popen([ray, "start", f"--address=127.0.0.1:{port}", *common], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    return f"127.0.0.1:{port}", [node, head]


def stop(nodes: list[subprocess.Popen[bytes]]) -> None:
    for node in nodes:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(node.pid, sig)
                node.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="archive-bench-") as tmp:
        root = Path(tmp)
        source = make_archive(root, args.studies)
        pool = screen(source, root / "pool", ["--workers", str(args.workers)])
        report = {"studies": args.studies, "series": pool["series"], "cpus": os.cpu_count(),
                  "worker_peak_mib": peak_mib(root / "pool"),
                  "pool": {k: pool[k] for k in FIGURES}}
        try:
            import ray  # noqa: F401
            have_ray = not args.no_ray
        except ImportError:
            have_ray = False
        if have_ray:
            temp = Path("/tmp") / f"ray-bench-{os.getpid()}"
            address, nodes = ray_cluster(temp)
            try:
                on_ray = screen(source, root / "ray", ["--ray", address])
            finally:
                stop(nodes)
                shutil.rmtree(temp, ignore_errors=True)
            report["ray"] = {k: on_ray[k] for k in FIGURES}
            report["ray_over_pool"] = round(on_ray["series_per_minute"] / pool["series_per_minute"], 2)
            report["same_rows"] = rows(root / "ray") == rows(root / "pool")
        print(json.dumps(report, indent=2))
    print("\nA cluster of N nodes of this kind should screen about N times the series/min of one node, less the\n"
          "driver's share: every series is an independent task (no task waits on another), each reads only its\n"
          "own files from the shared archive (the storage must deliver N nodes' reads: about 60 MB per 134-slice\n"
          "series), and each worker process loads the models once and keeps them for its series, so the fixed\n"
          "cost per node is paid once. The driver's import of the archive and the table it writes are serial:\n"
          "with thousands of series they are a few percent of the run. On this 2-core box the pool and Ray\n"
          "share the same two cores, so parity (a ratio near 1) is the honest result.")


if __name__ == "__main__":
    main()
