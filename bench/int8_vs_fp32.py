"""ONNX Runtime INT8 (QDQ) against FP32 on this CPU, for every model pack, in the same run.

Prints model load time, per-item latency at batch 1 and 32, the INT8/FP32 speed ratio, and decision
agreement on the pack's evaluation set, for both INT8 models (symmetric, TensorRT's form; and UINT8
activations for the CPU). Run build_engines.py first.
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


def per_item(session, name: str, x: np.ndarray, batch: int, repeat: int = 3) -> float:
    session.run({name: x[:batch]})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            session.run({name: x[i:i + batch]})
        times.append((time.perf_counter() - t0) / len(x))
    return statistics.median(times)


def load(path, precision, threads):
    t0 = time.perf_counter()
    session = OnnxRuntimeSession(path, precision, threads)
    return session, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    found, _ = packs.load_packs(config.load().engines_path)
    print(f"{'model':20} {'int8 model':22} {'batch':>5} {'fp32 ms':>8} {'int8 ms':>8} {'speedup':>8} {'agree':>6}")
    for pack in found:
        if not pack.build_record():
            print(f"{pack.id}: no INT8 models; run build_engines.py first")
            continue
        x, _ = parity.load_evaluation_set(pack)
        output = pack.manifest["decision"]["output"]
        fp32, t_load = load(pack.file(packs.MODEL), "fp32", args.threads)
        print(f"{pack.id}: FP32 model load {t_load:.3f} s (target <= 1 s)")
        reference = parity.item_scores(fp32.run({pack.input_name: x})[output])
        for name in (packs.INT8_MODEL, packs.INT8_CPU_MODEL):
            int8, _ = load(pack.file(name), "int8", args.threads)
            scores = parity.item_scores(int8.run({pack.input_name: x})[output])
            agree = float(((reference >= pack.threshold) == (scores >= pack.threshold)).mean())
            for batch in ((1, 32) if len(x) >= 32 else (1,)):
                t32, t8 = per_item(fp32, pack.input_name, x, batch), per_item(int8, pack.input_name, x, batch)
                print(f"{pack.id:20} {name:22} {batch:>5} {t32 * 1e3:>8.2f} {t8 * 1e3:>8.2f} {t32 / t8:>7.2f}x "
                      f"{agree:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
