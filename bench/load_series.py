"""Load real CT series to HU volumes: this appliance's loader against SimpleITK, same run, same files.

Prints median wall time of each and the speed ratio (>1 means the appliance is faster).
Run: .venv/bin/python bench/load_series.py [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from appliance import config
from appliance.series.volume import load_series

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"
SERIES = ["tcia-pancreas-ct-chest-abdomen", "totalseg-example-j2k"]


def _ours(files: list[Path], settings) -> np.ndarray:
    return load_series(files, settings).hu


def _sitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def _time(func, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    settings = config.load(environ={}, min_slices=1)
    print(f"{'series':34} {'slices':>6} {'appliance s':>12} {'SimpleITK s':>12} {'ratio':>6}")
    for name in SERIES:
        folder = DATA / name
        if not folder.exists():
            print(f"{name}: skipped, {folder} not found")
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in ("LICENSE", "Citations"))
        ours, theirs = _ours(files, settings), _sitk(folder)  # warm the page cache, check agreement
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        t_ours = _time(functools.partial(_ours, files, settings), args.repeat)
        t_sitk = _time(functools.partial(_sitk, folder), args.repeat)
        print(f"{name:34} {ours.shape[0]:>6} {t_ours:>12.3f} {t_sitk:>12.3f} {t_sitk / t_ours:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
