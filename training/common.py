"""Shared training helpers: seeding, splits, metrics with bootstrap confidence intervals."""

from __future__ import annotations

import random

import numpy as np

from appliance.metrics import binary_metrics  # noqa: F401  (re-exported for the training scripts)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the global generator that libraries draw from
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def stratified_split(labels: np.ndarray, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> list[np.ndarray]:
    """Indices of train / validation / test parts, each with the class balance of the whole."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.cumsum([int(round(f * len(idx))) for f in fractions[:-1]])
        for k, chunk in enumerate(np.split(idx, bounds)):
            parts[k].extend(chunk.tolist())
    return [np.array(sorted(p)) for p in parts]
