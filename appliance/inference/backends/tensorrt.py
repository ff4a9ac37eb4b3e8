"""TensorRT engines: build from ONNX on the device, cache, load and run.

Written against the TensorRT 10 Python API (named I/O tensors, ``set_input_shape``,
``execute_async_v3``, optimisation profiles), with the differences of TensorRT
8.6 (JetPack 5/6) handled where they matter: 8.6 needs the EXPLICIT_BATCH flag
to create a network. Device memory and streams come from pycuda.

Nothing here runs without TensorRT and an NVIDIA GPU; ``is_available()`` says
which is missing and the registry then falls back to ONNX Runtime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from appliance.durable import write_bytes_durably
from appliance.inference.backends import Availability
from appliance.inference.engine_cache import BuilderSettings, profile_shapes

NAME = "tensorrt"
log = logging.getLogger(__name__)


def is_available() -> Availability:
    """TensorRT and pycuda importable and a CUDA device present."""
    try:
        import tensorrt
    except ImportError as exc:
        return Availability(False, f"TensorRT is not installed ({exc})")
    if not hasattr(tensorrt, "Builder"):  # e.g. only type stubs, or the index's download placeholder
        return Availability(False, "the tensorrt package found is not a working TensorRT (no Builder)")
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return Availability(False, f"pycuda is not installed ({exc})")
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return Availability(False, "no NVIDIA GPU found")
    except Exception as exc:  # driver missing or broken
        return Availability(False, f"the CUDA driver is not usable ({exc})")
    return Availability(True)


def tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of device 0."""
    import pycuda.driver as cuda

    cuda.init()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return str(device.name()), (int(major), int(minor))


def _major(version: str) -> int:
    return int(version.split(".", maxsplit=1)[0])


def network_flags(version: str) -> int:
    """Flags for ``Builder.create_network``: explicit batch must be asked for before TensorRT 10."""
    import tensorrt as trt

    if _major(version) < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def build_engine(onnx_path: Path, engine_path: Path, precision: str, item_shape: list[int],
                 builder_settings: BuilderSettings, timing_cache_path: Path | None = None,
                 item_min: list[int] | None = None, item_max: list[int] | None = None) -> None:
    """Build a serialized engine for ``onnx_path`` in ``precision`` and write it durably to ``engine_path``.

    INT8 uses explicit quantization: ``onnx_path`` is then the QDQ model, whose scales TensorRT keeps.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt.__version__))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, builder_settings.workspace_mib << 20)
    config.builder_optimization_level = builder_settings.builder_optimization_level
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized may still run in FP16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    smallest, optimal, largest = profile_shapes(item_shape, builder_settings, item_min, item_max)
    for i in range(network.num_inputs):
        profile.set_shape(network.get_input(i).name, trt.Dims(list(smallest)), trt.Dims(list(optimal)),
                          trt.Dims(list(largest)))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.exists() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a {precision} engine for {onnx_path.name}")
    write_bytes_durably(bytes(memoryview(serialized)), engine_path)
    if timing_cache_path is not None:
        write_bytes_durably(bytes(memoryview(timing_cache.serialize())), timing_cache_path)


class TensorRTSession:
    """A deserialized engine with its execution context, device buffers and stream."""

    backend = NAME

    def __init__(self, engine_path: Path, precision: str):
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        self._context_cuda = cuda.Device(0).retain_primary_context()
        self._context_cuda.push()
        try:
            self.precision = precision
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT could not load {engine_path.name} (built for another GPU or version?)")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.output_names = [n for n in names if n not in self.input_names]
            self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
            self._device: dict[str, Any] = {}
            self._capacity: dict[str, int] = {}
        finally:
            self._context_cuda.pop()

    def _buffer(self, name: str, nbytes: int) -> int:
        import pycuda.driver as cuda

        if self._capacity.get(name, 0) < nbytes:
            self._device[name] = cuda.mem_alloc(max(nbytes, 1))
            self._capacity[name] = nbytes
        return int(self._device[name])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pycuda.driver as cuda

        self._context_cuda.push()
        try:
            host_inputs = {n: np.ascontiguousarray(inputs[n], dtype=self._dtypes[n]) for n in self.input_names}
            for name, array in host_inputs.items():
                self._context.set_input_shape(name, tuple(array.shape))
                address = self._buffer(name, array.nbytes)
                self._context.set_tensor_address(name, address)
                cuda.memcpy_htod_async(address, array, self._stream)
            outputs = {}
            for name in self.output_names:
                dims = self._context.get_tensor_shape(name)
                shape = tuple(int(dims[i]) for i in range(len(dims)))
                outputs[name] = cuda.pagelocked_empty(shape, self._dtypes[name])
                self._context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
            if not self._context.execute_async_v3(self._stream.handle):
                raise RuntimeError("TensorRT execution failed")
            for name, array in outputs.items():
                cuda.memcpy_dtoh_async(array, self._device[name], self._stream)
            self._stream.synchronize()
            return {n: np.array(a, dtype=np.float32) for n, a in outputs.items()}
        finally:
            self._context_cuda.pop()
