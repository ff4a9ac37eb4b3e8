"""Recalls and their outcomes: a confirmed flag puts the patient on the recall list with a due date; the
technician or radiologist records what happened, as coded outcomes, until a final one closes the recall.

A recall is opened by a radiologist's *confirmed* review of a flagged result (one open recall per study
and model); a *rejected* review of that model's result cancels it (``closed_reason`` "flag rejected").
A review carried over a re-analysis has the same decision as the one before it, so it changes nothing
here. Every change is audited; nothing is deleted.

Outcome codes are SNOMED CT where a standard concept names the event exactly, else this appliance's own
code system (:data:`PRIVATE_SYSTEM`), as :data:`OUTCOMES` says for each.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import sqlite_utils

from appliance.store.database import audit, inserted_id, utcnow

SNOMED = "http://snomed.info/sct"
PRIVATE_SYSTEM = "urn:appliance:outcome"
DEFAULT_DUE_DAYS = 14
MAX_DETAIL = 500


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One kind of outcome a recall can have: its code, and what it means for the recall."""

    key: str  # what the form posts
    code: str
    system: str
    display: str
    closes: bool  # a final outcome: the recall is closed
    diagnosis: bool = False  # counts in the positive predictive value's denominator
    malignant: bool = False  # counts in its numerator and the detection rate


OUTCOMES = {o.key: o for o in (
    Outcome("imaging", "363679005", SNOMED, "Imaging", closes=False),
    Outcome("biopsy", "86273004", SNOMED, "Biopsy", closes=False),
    Outcome("malignant", "363346000", SNOMED, "Malignant neoplastic disease", closes=True, diagnosis=True,
            malignant=True),
    Outcome("benign", "benign", PRIVATE_SYSTEM, "Benign finding, no malignancy", closes=True, diagnosis=True),
    Outcome("no-abnormality", "no-abnormality", PRIVATE_SYSTEM, "No abnormality found", closes=True, diagnosis=True),
    Outcome("other-diagnosis", "other-diagnosis", PRIVATE_SYSTEM, "Other diagnosis, not malignant", closes=True,
            diagnosis=True),
    Outcome("lost", "399307001", SNOMED, "Lost to follow-up", closes=True),
    Outcome("declined", "declined", PRIVATE_SYSTEM, "Patient declined further investigation", closes=True),
)}
BY_CODE = {(o.system, o.code): o for o in OUTCOMES.values()}


class RecallRefused(ValueError):
    """An outcome that cannot be recorded, with a reason code the screen translates."""

    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code


def today() -> datetime.date:
    """Today's date in UTC, as due dates are kept."""
    return datetime.datetime.now(datetime.timezone.utc).date()


def on_review(db: sqlite_utils.Database, review_id: int, *, due_days: int = DEFAULT_DUE_DAYS) -> int | None:
    """Open or cancel the recall a new review decides (inside the caller's transaction); the recall's id, if any.

    A confirmed flag opens a recall due in ``due_days`` days unless one is open for the study and model; a
    rejected flag cancels the open one. A review of an unflagged result changes nothing.
    """
    row = next(db.query("SELECT v.decision, v.reviewer, v.result_id, v.study_instance_uid, v.model, r.model_version, "
                        "r.flagged, st.patient_key FROM reviews v JOIN results r ON r.id = v.result_id "
                        "JOIN studies st ON st.study_instance_uid = v.study_instance_uid WHERE v.id = ?",
                        [review_id]), None)
    if row is None or not row["flagged"]:
        return None
    current = open_recall(db, row["study_instance_uid"], row["model"])
    if row["decision"] == "confirmed":
        return current["id"] if current else _open(db, row, due_days)
    if current is not None:
        _close(db, current["id"], "flag rejected", row["reviewer"])
    return None


def _open(db: sqlite_utils.Database, review: dict[str, Any], due_days: int) -> int:
    due = (today() + datetime.timedelta(days=max(int(due_days), 0))).isoformat()
    recalls = db.table("recalls")
    recalls.insert({"study_instance_uid": review["study_instance_uid"], "patient_key": review["patient_key"],
                    "result_id": review["result_id"], "model": review["model"],
                    "model_version": review["model_version"], "due_date": due, "created_at": utcnow()})
    recall_id = inserted_id(recalls)
    audit(db, review["reviewer"], "recall_opened", review["study_instance_uid"], recall_id=recall_id,
          model=review["model"], due_date=due)
    return recall_id


def _close(db: sqlite_utils.Database, recall_id: int, reason: str, actor: str) -> None:
    db.execute("UPDATE recalls SET closed_at = ?, closed_reason = ? WHERE id = ? AND closed_at IS NULL",
               [utcnow(), reason, recall_id])
    study_uid = db.execute("SELECT study_instance_uid FROM recalls WHERE id = ?", [recall_id]).fetchone()[0]
    audit(db, actor, "recall_closed", study_uid, recall_id=recall_id, reason=reason)


def open_recall(db: sqlite_utils.Database, study_uid: str, model: str) -> dict[str, Any] | None:
    """The open recall of this study for this model's flag, or None."""
    return next(db.query("SELECT * FROM recalls WHERE study_instance_uid = ? AND model = ? AND closed_at IS NULL "
                         "ORDER BY id DESC LIMIT 1", [study_uid, model]), None)


def record_outcome(db: sqlite_utils.Database, recall_id: int, key: str, detail: str, recorded_by: str) -> int:
    """Record what happened on an open recall (inside the caller's transaction), audited; a final outcome
    closes the recall. The outcome's id.

    Raises :class:`RecallRefused` for an unknown outcome (UNKNOWN_OUTCOME), an unknown recall
    (UNKNOWN_RECALL) or one already closed (RECALL_CLOSED).
    """
    outcome = OUTCOMES.get(key)
    if outcome is None:
        raise RecallRefused("UNKNOWN_OUTCOME", f"not an outcome: {key!r}")
    row = db.execute("SELECT study_instance_uid, closed_at FROM recalls WHERE id = ?", [recall_id]).fetchone()
    if row is None:
        raise RecallRefused("UNKNOWN_RECALL", f"no recall {recall_id}")
    if row[1] is not None:
        raise RecallRefused("RECALL_CLOSED", f"recall {recall_id} was closed on {row[1][:10]}")
    outcomes = db.table("outcomes")
    outcomes.insert({"recall_id": recall_id, "code": outcome.code, "system": outcome.system,
                     "display": outcome.display, "detail": detail.strip()[:MAX_DETAIL], "recorded_by": recorded_by,
                     "recorded_at": utcnow()})
    outcome_id = inserted_id(outcomes)
    audit(db, recorded_by, "outcome_recorded", row[0], recall_id=recall_id, outcome_id=outcome_id,
          code=outcome.code, system=outcome.system)
    if outcome.closes:
        _close(db, recall_id, "outcome", recorded_by)
    return outcome_id


def with_outcomes(db: sqlite_utils.Database, recalls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each recall with its outcomes (oldest first) and whether it is overdue today."""
    now = today().isoformat()
    for recall in recalls:
        recall["outcomes"] = list(db.query("SELECT * FROM outcomes WHERE recall_id = ? ORDER BY id", [recall["id"]]))
        recall["overdue"] = recall["closed_at"] is None and recall["due_date"] < now
    return recalls


def study_recalls(db: sqlite_utils.Database, study_uid: str) -> list[dict[str, Any]]:
    """Every recall of a study, newest first, with its outcomes."""
    return with_outcomes(db, list(db.query("SELECT * FROM recalls WHERE study_instance_uid = ? ORDER BY id DESC",
                                           [study_uid])))


def open_recalls(db: sqlite_utils.Database, limit: int = 500) -> list[dict[str, Any]]:
    """The open recalls, earliest due first (so the overdue ones lead), with patient and study words."""
    return with_outcomes(db, list(db.query(
        "SELECT rc.*, p.patient_name, p.patient_id, st.study_date, st.accession_number FROM recalls rc "
        "JOIN studies st ON st.study_instance_uid = rc.study_instance_uid "
        "LEFT JOIN patients p ON p.patient_key = rc.patient_key WHERE rc.closed_at IS NULL "
        "ORDER BY rc.due_date, rc.id LIMIT ?", [limit])))


# the worklist's ``?recall=overdue`` clause over ``studies st``; its one parameter is today (ISO date)
OVERDUE_CLAUSE = ("EXISTS (SELECT 1 FROM recalls rc WHERE rc.study_instance_uid = st.study_instance_uid "
                  "AND rc.closed_at IS NULL AND rc.due_date < ?)")


def overdue_since(db: sqlite_utils.Database, study_uids: list[str]) -> dict[str, str]:
    """For the studies among ``study_uids`` with an overdue open recall: the earliest due date it passed."""
    if not study_uids:
        return {}
    marks = ",".join("?" * len(study_uids))
    return dict(db.execute(
        f"SELECT study_instance_uid, min(due_date) FROM recalls WHERE closed_at IS NULL AND due_date < ? "  # nosec B608
        f"AND study_instance_uid IN ({marks}) GROUP BY study_instance_uid", [today().isoformat(), *study_uids]))
