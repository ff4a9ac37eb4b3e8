"""ONNX Runtime INT8 (QDQ) against FP32 on this CPU, for every model pack, in the same run.

Prints per-item latency at batch 1 and batch 32, the INT8/FP32 speed ratio, and decision agreement
on the pack's evaluation set. Run build_engines.py first (it writes model.int8.onnx).
Run: .venv/bin/python bench/int8_vs_fp32.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from appliance import config
from appliance.inference import packs, parity
from appliance.inference.backends.onnxruntime import OnnxRuntimeSession


def per_item(session, name: str, x: np.ndarray, batch: int, repeat: int = 5) -> float:
    session.run({name: x[:batch]})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            session.run({name: x[i:i + batch]})
        times.append((time.perf_counter() - t0) / len(x))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    found, _ = packs.load_packs(config.load().engines_path)
    print(f"{'model':18} {'batch':>5} {'fp32 ms':>8} {'int8 ms':>8} {'speedup':>8} {'agreement':>9}")
    for pack in found:
        if not pack.file(packs.INT8_MODEL).exists() or not pack.build_record():
            print(f"{pack.id}: no INT8 model; run build_engines.py first")
            continue
        x, _ = parity.load_evaluation_set(pack)
        fp32 = OnnxRuntimeSession(pack.file(packs.MODEL), "fp32", args.threads)
        int8 = OnnxRuntimeSession(pack.file(packs.INT8_MODEL), "int8", args.threads)
        output = pack.manifest["decision"]["output"]
        a = fp32.run({pack.input_name: x})[output]
        b = int8.run({pack.input_name: x})[output]
        agreement = float(((a >= pack.threshold) == (b >= pack.threshold)).mean())
        for batch in (1, 32):
            t32, t8 = per_item(fp32, pack.input_name, x, batch), per_item(int8, pack.input_name, x, batch)
            print(f"{pack.id:18} {batch:>5} {t32 * 1e3:>8.3f} {t8 * 1e3:>8.3f} {t32 / t8:>7.2f}x {agreement:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
