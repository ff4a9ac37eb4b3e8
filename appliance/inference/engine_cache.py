"""The TensorRT engine cache: keys, file names, optimisation-profile shapes. Pure functions.

An engine is only valid for the model, TensorRT version, GPU model and compute
capability, precision and builder settings it was built with; every one of
those is part of its key, so a change of any makes a new engine rather than
loading a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

ENGINE_SUFFIX = ".engine"
TIMING_CACHE_NAME = "timing.cache"


@dataclasses.dataclass(frozen=True)
class BuilderSettings:
    """Builder options that change the engine's contents."""

    max_batch: int = 32
    opt_batch: int = 8
    workspace_mib: int = 1024
    builder_optimization_level: int = 3

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EngineKey:
    model_id: str
    model_sha256: str  # of the ONNX file the engine is built from (FP32 or QDQ INT8)
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    builder: BuilderSettings

    def digest(self) -> str:
        doc = dataclasses.asdict(self)
        doc["compute_capability"] = list(self.compute_capability)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]

    def filename(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        sm = "sm{}{}".format(*self.compute_capability)
        return f"{self.model_id}.{self.precision}.{gpu}.{sm}.trt{self.tensorrt_version}.{self.digest()}{ENGINE_SUFFIX}"

    def path(self, cache_dir: Path) -> Path:
        return cache_dir / self.filename()


def stale_engines(cache_dir: Path, key: EngineKey) -> list[Path]:
    """Engines of the same model and precision made for another model file, GPU, TensorRT or settings."""
    if not cache_dir.is_dir():
        return []
    current = key.filename()
    prefix = f"{key.model_id}.{key.precision}."
    return [p for p in cache_dir.glob(f"{prefix}*{ENGINE_SUFFIX}") if p.name != current]


def profile_shapes(item_shape: list[int], builder: BuilderSettings, item_min: list[int] | None = None,
                   item_max: list[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes of an optimisation profile with a dynamic batch axis.

    ``item_shape`` is the optimal shape of one item; models with dynamic spatial axes (a whole-scan
    segmentation) also give the smallest and largest item shapes their manifest allows.
    """
    if builder.opt_batch < 1 or builder.opt_batch > builder.max_batch:
        raise ValueError(f"opt_batch {builder.opt_batch} must lie in 1..max_batch {builder.max_batch}")
    opt = tuple(int(d) for d in item_shape)
    low = tuple(int(d) for d in (item_min or item_shape))
    high = tuple(int(d) for d in (item_max or item_shape))
    if any(d <= 0 for d in opt + low + high) or not (len(low) == len(opt) == len(high)):
        raise ValueError(f"item shapes {low} <= {opt} <= {high} must be positive and of one rank")
    if any(not (a <= b <= c) for a, b, c in zip(low, opt, high)):
        raise ValueError(f"item shapes must satisfy min {low} <= opt {opt} <= max {high}")
    return (1, *low), (builder.opt_batch, *opt), (builder.max_batch, *high)
