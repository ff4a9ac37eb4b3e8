"""Peak memory of assembling a 600-slice 512x512 CT series, against the int16 volume it produces.

Generates the synthetic series once (bench/out/synth-600), then loads it in a fresh process and
reads that process's peak RSS. Target: peak RSS <= 2x the int16 volume (600*512*512*2 bytes).
Run: .venv/bin/python bench/memory_600.py [--slices N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

CHILD = """
import json, resource, sys, time
from pathlib import Path
from appliance import config
from appliance.series.volume import load_series
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
files = sorted(Path(sys.argv[1]).glob("*.dcm"))
t0 = time.perf_counter()
volume = load_series(files, config.load(environ={}))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"shape": list(volume.hu.shape), "volume_bytes": volume.hu.nbytes, "peak_rss": peak,
                  "baseline_rss": baseline, "seconds": seconds}))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=600)
    args = parser.parse_args()
    folder = OUT / f"synth-{args.slices}"
    if not (folder / "ground_truth.json").exists():
        from appliance.synth.writer import SynthOptions, write_series

        t0 = time.perf_counter()
        write_series(folder, SynthOptions(slices=args.slices, size=512, region="chest-abdomen", seed=11))
        print(f"generated {args.slices} slices in {time.perf_counter() - t0:.1f} s")
    run = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True)
    doc = json.loads(run.stdout)
    ratio = doc["peak_rss"] / doc["volume_bytes"]
    above = (doc["peak_rss"] - doc["baseline_rss"]) / doc["volume_bytes"]
    print(f"volume {doc['shape']} int16 = {doc['volume_bytes'] / 2**20:.0f} MiB; "
          f"peak RSS {doc['peak_rss'] / 2**20:.0f} MiB "
          f"(interpreter and libraries {doc['baseline_rss'] / 2**20:.0f} MiB); loaded in {doc['seconds']:.2f} s")
    print(f"peak RSS / volume = {ratio:.2f}x (target <= 2.0x); above the interpreter baseline {above:.2f}x")
    return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
