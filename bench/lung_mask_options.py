"""Speed options of the learned lung mask against the full-resolution FP32 reference, on 2 CPU threads.

Reference: the network at 512x512 (stored values, every slice, FP32 on ONNX Runtime), the probability
mean-pooled to the half-resolution grid and thresholded at 0.5, then the step's post-processing (body,
airway, two lungs, holes); every option gets the same post-processing.
Options: 256x256 input (2x2 mean-pooled, body-box crop), 128x128 input, INT8 QDQ (symmetric and u8s8) at
256, running every k-th slice with the probability interpolated along z, and the whole ``segment`` step
(post-processing included). Dice of both lungs on the grid ``hu[:, ::2, ::2]``. Cases: the real 134-slice
chest-abdomen series (3 mm) and a generated 300-slice 512x512 thin-slice chest (seed 21).

Run: .venv/bin/python bench/lung_mask_options.py [--model engines/lung-segmentation/model.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
OUT = HERE / "out"
SHARED = Path(os.environ.get("APPLIANCE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL = SHARED / "ct" / "tcia-pancreas-ct-chest-abdomen"
THREADS = 2
# Above about 380 mm the phantom's lungs reach its skin: the body ring breaks, the lungs join the outside air and
# both the classical and the learned masks lose them there (a phantom artefact: real lungs lie inside the ribs).
PHANTOM_INTACT_MM = 380.0

from appliance import config  # noqa: E402
from appliance.inference.backends.onnxruntime import OnnxRuntimeSession  # noqa: E402
from appliance.inference.quantize import quantize_qdq  # noqa: E402
from appliance.pipelines import lung_segmentation as ls  # noqa: E402
from appliance.pipelines import lungs  # noqa: E402
from appliance.series.volume import CTVolume, load_series  # noqa: E402


def pack_like(model: Path, stride: int = 2):
    """What the step reads of a pack, for a bare model file."""
    return types.SimpleNamespace(input_name="x", threshold=0.5, validated=False, notice="", version="bench",
                                 manifest={"decision": {"output": "prob"}, "input": {"in_plane_stride": stride}},
                                 path=model.parent)


def load(folder: Path) -> CTVolume:
    settings = config.load(environ={}, home=tempfile.mkdtemp())
    return load_series(sorted(folder.glob("*.dcm")), settings)


def synthetic_chest() -> Path:
    folder = OUT / "chest-300"
    if not (folder / "ground_truth.json").exists():
        from appliance.synth.writer import SynthOptions, write_series

        write_series(folder, SynthOptions(slices=300, size=512, region="chest", seed=21))
    return folder


def every_slice(volume: CTVolume, session, stride: int, body4: np.ndarray) -> tuple[np.ndarray, float]:
    """Raw mask on every slice on the grid ``hu[:, ::2, ::2]`` at network stride ``stride`` (body-box crop);
    ms per slice. At stride 1 the probability is mean-pooled 2x2 before the threshold."""
    pack = pack_like(Path("."), stride)
    grid = (volume.hu.shape[1] // stride, volume.hu.shape[2] // stride)
    box = ls.crop_box(body4, grid, stride)
    indices = np.arange(volume.hu.shape[0])
    t0 = time.perf_counter()
    probs = ls.predict(volume, session, pack, indices, box, stride)
    ms = (time.perf_counter() - t0) / len(indices) * 1000
    full = np.zeros((len(indices),) + grid, dtype=np.float32)
    full[:, box[0], box[1]] = probs
    if stride == 1:
        h, w = grid[0] // 2, grid[1] // 2
        return full.reshape(len(indices), h, 2, w, 2).mean(axis=(2, 4)) >= 0.5, ms
    return ls.interpolate_mask(full, indices, len(indices), 0.5, stride // 2), ms


def quantized(model: Path, calibration: np.ndarray, symmetric: bool) -> Path:
    out = OUT / ("lung-int8.onnx" if symmetric else "lung-int8-u8s8.onnx")
    quantize_qdq(model, out, "x", calibration, symmetric_activations=symmetric)
    return out


def calibration_inputs(volumes: list[CTVolume]) -> np.ndarray:
    """256x256 inputs of every 8th slice of each volume."""
    return np.concatenate([ls.pooled(v.hu[::8])[:, None] for v in volumes])


def lungs_of(raw: np.ndarray, body: np.ndarray, volume: CTVolume) -> np.ndarray:
    """The step's post-processing (body, airway, two lungs, holes) of a raw mask: lung labels 1/2."""
    return ls.postprocess(raw, body, volume)


def stages(name: str, volume: CTVolume, session, model: Path) -> list[tuple]:
    """Wall and CPU seconds of each stage of ``segment`` (the machine is shared: CPU time shows the work)."""
    rows = []
    clock = [time.perf_counter(), time.process_time()]

    def lap(label: str) -> None:
        wall, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
        rows.append((name, f"  stage: {label} (CPU {cpu:.2f} s)", "", wall / volume.hu.shape[0] * 1000,
                     wall))
        clock[:] = [time.perf_counter(), time.process_time()]

    body4 = ls.coarse_body(volume)
    lap("coarse body mask and box (stride 4)")
    raw = ls.lung_probability_mask(volume, session, pack_like(model), body4=body4)
    lap("network passes and z interpolation")
    body = ls.upsample_body(body4, raw.shape)
    ls.postprocess(raw, body, volume)
    lap("post-processing (airway, components, sides, holes)")
    lungs.segment(volume, stride=4)
    lap("classical cross-check at stride 4")
    return rows


def case(name: str, volume: CTVolume, model: Path, int8: dict[str, Path],
         z_max_mm: float | None = None) -> list[tuple]:
    """Rows (case, option, Dice vs the post-processed 512 FP32 mask, ms per slice, seconds).

    ``z_max_mm``: Dice only on slices below this patient z (the phantom's lungs reach its skin above it).
    """
    rows = []
    z = np.array([volume.world(np.array([k, 0, 0]))[2] for k in range(volume.hu.shape[0])])
    kept = np.ones(len(z), dtype=bool) if z_max_mm is None else z < z_max_mm

    def dice(a: np.ndarray, b: np.ndarray) -> str:
        whole = f"{ls.dice(a, b):.4f}"
        return whole if z_max_mm is None else f"{whole} ({ls.dice(a[kept], b[kept]):.4f} below {z_max_mm:.0f} mm)"

    body4 = ls.coarse_body(volume)
    body = ls.upsample_body(body4, (volume.hu.shape[0], volume.hu.shape[1] // 2, volume.hu.shape[2] // 2))
    fp32 = OnnxRuntimeSession(model, "fp32", THREADS)
    sessions = {"FP32": fp32, **{f"INT8 {k}": OnnxRuntimeSession(p, "int8", THREADS) for k, p in int8.items()}}
    raw_ref, ref_ms = every_slice(volume, fp32, 1, body4)
    reference = lungs_of(raw_ref, body, volume)
    rows.append((name, "512 FP32 every slice, body-box crop (reference)", "1", ref_ms, None))
    lung_slices = np.flatnonzero(reference.any(axis=(1, 2)))
    sample = lung_slices[np.linspace(0, len(lung_slices) - 1, 8).astype(int)]
    p = fp32.run({"x": ls.pooled(volume.hu[sample], 1)[:, None]})["prob"][:, 0]
    uncropped = p.reshape(len(sample), p.shape[1] // 2, 2, p.shape[2] // 2, 2).mean(axis=(2, 4)) >= 0.5
    rows.append((name, "512 FP32 uncropped vs cropped, raw masks in the body, 8 lung slices",
                 f"{ls.dice(uncropped & body[sample], raw_ref[sample] & body[sample]):.4f}", float("nan"), None))
    for label, session in sessions.items():
        for stride in (2, 4) if label == "FP32" else (2,):
            raw, ms = every_slice(volume, session, stride, body4)
            rows.append((name, f"{512 // stride} {label} every slice", dice(lungs_of(raw, body, volume) > 0,
                                                                            reference > 0), ms, None))
    dz = volume.spacing_mm_zyx[0]
    for step in (1, 2, 3, 5, 8):
        if step * dz > 10:
            continue
        for label, session in sessions.items():
            t0 = time.perf_counter()
            raw = ls.lung_probability_mask(volume, session, pack_like(model), step=step, body4=body4)
            net_s = time.perf_counter() - t0
            rows.append((name, f"256 {label} step {step} ({step * dz:.1f} mm), ends refined",
                         dice(lungs_of(raw, body, volume) > 0, reference > 0),
                         net_s / volume.hu.shape[0] * 1000, net_s))
    for label, session in sessions.items():
        t0 = time.perf_counter()
        seg = ls.segment(volume, session, pack_like(model))
        seconds = time.perf_counter() - t0
        per_lung = [ls.dice(seg.lungs[kept] == k, reference[kept] == k) for k in (1, 2)]
        rows.append((name, (f"segment() 256 {label}, default step {ls.slice_step(volume)}, with post-processing "
                           f"(right {per_lung[0]:.3f}, left {per_lung[1]:.3f})"),
                     dice(seg.lungs > 0, reference > 0), seconds / volume.hu.shape[0] * 1000, seconds))
    rows += stages(name, volume, sessions.get("INT8 u8s8", fp32), model)
    t0 = time.perf_counter()
    classical = lungs.segment(volume)
    seconds = time.perf_counter() - t0
    rows.append((name, "classical lungs.segment (stride 2)", dice(classical.lungs > 0, reference > 0),
                 seconds / volume.hu.shape[0] * 1000, seconds))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "engines" / "lung-segmentation" / "model.onnx")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    volumes = {"synthetic chest 300x512 (1.03 mm)": load(synthetic_chest())}
    if REAL.exists():
        volumes = {"real chest-abdomen 134x512 (3 mm)": load(REAL), **volumes}
    else:
        print(f"real series not found at {REAL}: synthetic case only")
    calibration = calibration_inputs(list(volumes.values()))
    int8 = {"s8s8": quantized(args.model, calibration, True), "u8s8": quantized(args.model, calibration, False)}
    print(f"| case | option | Dice vs 512 FP32 | ms per slice ({THREADS} threads, per slice of the series) | "
          "seconds |")
    print("|---|---|---|---|---|")
    for name, volume in volumes.items():
        z_max = PHANTOM_INTACT_MM if name.startswith("synthetic") else None
        for row in case(name, volume, args.model, int8, z_max):
            seconds = "" if row[4] is None else f"{row[4]:.2f}"
            print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.1f} | {seconds} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
