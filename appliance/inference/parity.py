"""The parity gate: a faster precision is enabled only if it keeps the FP32 reference's decisions.

On the pack's fixed evaluation set, each candidate (ONNX Runtime INT8,
TensorRT FP16/INT8) is compared with FP32 on ONNX Runtime: largest and mean
absolute difference of the decision output, agreement of decisions at the
manifest threshold, and the drop in AUC (classifiers, when labels exist) or
Dice (segmentation) against FP32. Outside the manifest's tolerance -> not enabled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.inference.packs import ModelPack, Tolerance
from appliance.metrics import auc

EVAL_BATCH = 32


@dataclasses.dataclass
class ParityResult:
    backend: str
    precision: str
    enabled: bool
    why: str
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    decision_agreement: float | None = None
    metric: str | None = None
    reference_metric: float | None = None
    candidate_metric: float | None = None
    metric_drop: float | None = None
    seconds_per_item: float | None = None
    reference_seconds_per_item: float | None = None
    model_file: str | None = None

    @property
    def speedup(self) -> float | None:
        if not self.seconds_per_item or not self.reference_seconds_per_item:
            return None
        return self.reference_seconds_per_item / self.seconds_per_item

    def as_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["speedup"] = None if self.speedup is None else round(self.speedup, 2)
        return doc


def run_batches(session, input_name: str, output: str, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Outputs of ``session`` over ``x`` in batches, and the seconds per item (second, warm pass)."""
    session.run({input_name: x[:EVAL_BATCH]})  # warm-up
    out, t0 = [], time.perf_counter()
    for i in range(0, len(x), EVAL_BATCH):
        out.append(session.run({input_name: x[i:i + EVAL_BATCH]})[output])
    return np.concatenate(out), (time.perf_counter() - t0) / len(x)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def item_scores(output: np.ndarray) -> np.ndarray:
    """One score per item: the value of an (N, 1) output, the largest 3x3x3 local mean of a map output
    (the lesion-map pipelines' study score)."""
    if output.ndim <= 2:
        return output.reshape(len(output))
    from scipy import ndimage

    size = (1, 1) + (3,) * (output.ndim - 2)
    return ndimage.uniform_filter(output.astype(np.float32), size, mode="constant").reshape(len(output), -1).max(1)


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, threshold: float,
            task: str, tolerance: Tolerance) -> dict[str, Any]:
    """Parity metrics of ``candidate`` against ``reference`` outputs, and whether they pass ``tolerance``.

    Segmentation decisions are per voxel (Dice against FP32); classification decisions per item.
    """
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    if task == "segmentation":
        ref_decision, cand_decision = reference >= threshold, candidate >= threshold
    else:
        reference, candidate = item_scores(reference), item_scores(candidate)
        ref_decision, cand_decision = reference >= threshold, candidate >= threshold
    doc: dict[str, Any] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                           "decision_agreement": float((ref_decision == cand_decision).mean())}
    if task == "segmentation":
        doc.update(metric="dice_vs_fp32", reference_metric=1.0,
                   candidate_metric=_dice(ref_decision, cand_decision))
    elif labels is not None:
        ref_auc, cand_auc = auc(labels, reference.ravel()), auc(labels, candidate.ravel())
        doc.update(metric="auc", reference_metric=ref_auc, candidate_metric=cand_auc)
    if doc.get("metric"):
        doc["metric_drop"] = float(doc["reference_metric"] - doc["candidate_metric"])
    failures = []
    if doc["max_abs_diff"] > tolerance.max_abs_diff:
        failures.append(f"max abs diff {doc['max_abs_diff']:.4f} > {tolerance.max_abs_diff}")
    if doc["decision_agreement"] < tolerance.min_decision_agreement:
        failures.append(f"decision agreement {doc['decision_agreement']:.4f} < {tolerance.min_decision_agreement}")
    if doc.get("metric_drop") is not None and doc["metric_drop"] > tolerance.max_metric_drop:
        failures.append(f"{doc['metric']} drop {doc['metric_drop']:.4f} > {tolerance.max_metric_drop}")
    doc["enabled"] = not failures
    doc["why"] = "; ".join(failures) if failures else "within the manifest's tolerance"
    return doc


def evaluate(pack: ModelPack, reference_session, candidate_session, x: np.ndarray,
             labels: np.ndarray | None) -> ParityResult:
    """Run both sessions over the evaluation set and gate the candidate."""
    output = pack.manifest["decision"]["output"]
    ref, ref_s = run_batches(reference_session, pack.input_name, output, x)
    cand, cand_s = run_batches(candidate_session, pack.input_name, output, x)
    doc = compare(ref, cand, labels, pack.threshold, pack.manifest["task"], pack.tolerance())
    model_file = getattr(candidate_session, "model_path", None)
    return ParityResult(backend=candidate_session.backend, precision=candidate_session.precision,
                        seconds_per_item=cand_s, reference_seconds_per_item=ref_s,
                        model_file=model_file.name if model_file else None, **doc)


def load_evaluation_set(pack: ModelPack) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(pack.file(pack.manifest["evaluation"]["file"])) as data:
        x = data["x"].astype(np.float32)
        labels = data["y"] if "y" in data.files else None
    return x, labels


def calibration_line(calibration: dict[str, Any] | None) -> str:
    """One sentence on what the INT8 models were calibrated on (a build record's ``calibration``)."""
    if not calibration:
        return "INT8 calibration: none (no INT8 model was built)."
    if calibration.get("source") == "file":
        return (f"INT8 calibration: the pack's shipped {calibration['file']} ({calibration['items']} inputs, "
                f"SHA-256 {calibration['sha256'][:16]}; {calibration.get('description', '')}; "
                f"licence: {calibration.get('licence') or 'not stated'}).")
    return (f"INT8 calibration: calibration set {calibration.get('inputs')!r} made on this box "
            f"({calibration['items']} inputs; {calibration.get('description', '')}).")


def markdown_report(pack: ModelPack, results: list[ParityResult], skipped: list[dict[str, str]],
                    calibration: dict[str, Any] | None = None) -> str:
    lines = [f"# Parity report: {pack.id} {pack.version}", "",
             f"Reference: FP32 on ONNX Runtime (CPU). Evaluation set: {pack.manifest['evaluation']['description']}.",
             calibration_line(calibration),
             f"Tolerance: {json.dumps(dataclasses.asdict(pack.tolerance()))}.", "",
             ("| backend | precision | model | enabled | max abs diff | mean abs diff | decision agreement | metric | "
              "FP32 | candidate | drop | speed vs FP32 | why |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: float | None, digits: int = 4) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    for r in results:
        lines.append(f"| {r.backend} | {r.precision} | {r.model_file or 'engine'} | {'yes' if r.enabled else 'NO'} | "
                     f"{f(r.max_abs_diff)} | "
                     f"{f(r.mean_abs_diff)} | {f(r.decision_agreement)} | {r.metric or ''} | {f(r.reference_metric)} | "
                     f"{f(r.candidate_metric)} | {f(r.metric_drop)} | {f(r.speedup, 2)}x | {r.why} |")
    for s in skipped:
        lines.append(f"| {s['backend']} | {s['precision']} | | skipped | | | | | | | | | {s['why']} |")
    if not pack.validated:
        lines += ["", f"**Not validated:** {pack.notice}"]
    return "\n".join(lines) + "\n"


def write_reports(folder: Path, pack: ModelPack, results: list[ParityResult], skipped: list[dict[str, str]],
                  calibration: dict[str, Any] | None = None) -> None:
    """``parity.json`` and ``parity.md``; ``calibration`` is the build record's account of the INT8
    calibration inputs (the shipped file or the function used)."""
    from appliance.durable import write_bytes_durably

    doc = {"model": pack.id, "version": pack.version, "model_sha256": pack.model_sha256, "calibration": calibration,
           "results": [r.as_dict() for r in results], "skipped": skipped}
    write_bytes_durably(json.dumps(doc, indent=2).encode(), folder / "parity.json")
    write_bytes_durably(markdown_report(pack, results, skipped, calibration).encode(), folder / "parity.md")
