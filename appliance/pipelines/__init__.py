"""Analysis steps run on a checked CT volume, one module per step.

Every step returns a :class:`StepResult` measured from the volume: none
returns a constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StepResult:
    """One analysis step's output, in the shape ``appliance analyze --json`` prints."""

    model: str
    model_version: str
    validated: bool
    backend: str
    precision: str
    score: float | None
    threshold: float | None
    flagged: bool
    findings: list[dict[str, Any]]
    seconds: float = 0.0
    notice: str | None = None  # shown with the result, e.g. why a model is not validated

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
