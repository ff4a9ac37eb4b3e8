"""ONNX Runtime on the CPU: the embedded default that works everywhere, and the FP32 reference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from appliance.inference.backends import Availability

NAME = "onnxruntime"


def is_available() -> Availability:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return Availability(False, f"onnxruntime is not installed ({exc})")
    return Availability(True)


def session_options(threads: int = 0):
    """Options tuned for a small box: all cores in one operator, full graph optimisation, memory arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.log_severity_level = 3
    return options


class OnnxRuntimeSession:
    """One reusable ONNX Runtime session of a model file."""

    backend = NAME

    def __init__(self, model_path: Path, precision: str, threads: int = 0):
        import onnxruntime as ort

        self.precision = precision
        self.model_path = model_path
        self._session = ort.InferenceSession(str(model_path), sess_options=session_options(threads),
                                             providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(inputs[name], dtype=np.float32) for name in self.input_names}
        return dict(zip(self.output_names, self._session.run(self.output_names, feed)))
