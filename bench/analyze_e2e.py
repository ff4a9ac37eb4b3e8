"""End-to-end `appliance analyze` wall time and peak memory, per stage, on 2 CPU cores.

Cases: a generated 300-slice 512x512 chest CT, the real 134-slice chest-abdomen series, and a
generated 600-slice study for peak RSS. Budget: a 300-slice chest in <= 10 s end to end with the learned lung
mask, opacity and emphysema (classifiers off, as on a real deployment; INT8 models from build_engines.py when
their parity passed); <= 2 GB peak RSS.
Each run is a fresh process with a fresh data directory, as `appliance analyze` runs in a clinic.
Run: .venv/bin/python bench/analyze_e2e.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BUDGET_S = 10.0
REAL = HERE.parents[1] / "shared" / "data" / "ct" / "tcia-pancreas-ct-chest-abdomen"


def synthetic(name: str, slices: int, region: str) -> Path:
    folder = OUT / name
    if not (folder / "ground_truth.json").exists():
        from appliance.synth.writer import SynthOptions, write_series

        write_series(folder, SynthOptions(slices=slices, size=512, region=region, seed=21))
    return folder


def run(label: str, folder: Path) -> None:
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, APPLIANCE_HOME=home)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", "analyze", "--json", *files], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    doc = json.loads(proc.stdout)
    series = doc["studies"][0]["series"][0]
    steps = ", ".join(f"{r['model']} {r['seconds']:.2f}" for r in series["results"])
    s = series["seconds"]
    print(f"{label:34} wall {wall:6.2f} s ({wall / BUDGET_S:.2f}x the {BUDGET_S:.0f} s budget)  "
          f"load {s['load']:.2f}  preprocess {s['preprocess']:.2f}  infer {s['infer']:.2f}  [{steps}]  "
          f"peak RSS so far {peak:.0f} MiB")


def main() -> int:
    run("synthetic chest 300x512x512", synthetic("chest-300", 300, "chest"))
    if REAL.exists():
        run("real chest-abdomen 134x512x512", REAL)
    run("synthetic chest-abdomen 600x512x512", synthetic("chest-abdomen-600", 600, "chest-abdomen"))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"largest peak RSS of any run: {peak:.0f} MiB (target <= 2048)")
    return 0 if peak <= 2048 else 1


if __name__ == "__main__":
    sys.exit(main())
