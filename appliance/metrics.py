"""Binary classification metrics with bootstrap 95% confidence intervals, and AUC without sklearn."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 1000


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    all_scores = np.concatenate([pos, neg])[order]
    # average ranks of ties
    _, first, counts = np.unique(all_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    labels = labels.astype(bool)
    pred = scores >= threshold
    tp, tn = int((pred & labels).sum()), int((~pred & ~labels).sum())
    fp, fn = int((pred & ~labels).sum()), int((~pred & labels).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"sensitivity": sens, "specificity": spec, "precision": prec, "accuracy": (tp + tn) / len(labels),
            "f1": f1, "auc": auc(labels, scores)}


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, seed: int = 0) -> dict[str, dict]:
    """Each metric at ``threshold`` with a percentile-bootstrap 95% CI: {name: {value, ci95}}."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    point = _point(labels, scores, threshold)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(BOOTSTRAP_SAMPLES):
        idx = rng.integers(0, len(labels), len(labels))
        for k, v in _point(labels[idx], scores[idx], threshold).items():
            samples[k].append(v)
    out = {}
    for k, v in point.items():
        arr = np.array(samples[k], dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        ci = [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))] if len(arr) else [None, None]
        out[k] = {"value": round(v, 4), "ci95": [round(c, 4) if c is not None else None for c in ci]}
    out["n"] = {"value": int(len(labels)), "positives": int(labels.astype(bool).sum())}
    return out


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity is at least ``sensitivity``."""
    pos = np.sort(np.asarray(scores)[np.asarray(labels).astype(bool)])[::-1]
    if len(pos) == 0:
        return float("nan")
    k = int(np.ceil(sensitivity * len(pos))) - 1
    return float(pos[min(max(k, 0), len(pos) - 1)])


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1."""
    best, best_t = -1.0, 0.5
    for t in np.unique(scores):
        p = _point(np.asarray(labels), np.asarray(scores), float(t))
        j = p["sensitivity"] + p["specificity"] - 1
        if j > best:
            best, best_t = j, float(t)
    return best_t


Z_95 = 1.959963984540054  # the standard normal quantile of 0.975


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``successes / n`` (95% by default); None when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is usable for the small counts of one site
    and month (0 of 3, 3 of 3).
    """
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
