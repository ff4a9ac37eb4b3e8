"""Inference backends behind one small protocol; ONNX Runtime on the CPU is always the reference."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, what is missing (one sentence)."""

    available: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.available


class Session(Protocol):
    """A loaded model: named float32 inputs in, named outputs out."""

    backend: str
    precision: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def is_available(self) -> Availability: ...
