"""Radiologists' reviews of results: recorded, carried over a re-analysis while they still apply, and the
review state of a result, of a model's results and of a study, in the words every screen and report uses.

A review names the result it was made on (``result_id``) and is never deleted. A re-analysis of a series
makes new results; the last review of the earlier result is copied onto the new one (``carried_from``
names the review it was copied from) when the model, its version and its decision (flagged or not) are the
same. Otherwise the new result *needs re-review*, and the earlier review is shown beside it with why it no
longer applies.

The study's review state is computed here from its current results and their reviews, and stored on the
study row (``review_state``, ``reviewed_by``, ``unreviewed_flags``) whenever either changes, so the
worklist filter reads one column and the screens, the report and the SR say the same thing.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from typing import Any

import sqlite_utils

from appliance.store import recalls
from appliance.store.database import audit, inserted_id, utcnow

DECISIONS = ("confirmed", "rejected")
CARRY_OVER_ACTOR = "appliance"  # the audit log's actor for a review the appliance copied onto a new result


class _Words(str, enum.Enum):
    """An enum whose members are their words in SQL, JSON and templates."""

    def __str__(self) -> str:
        return str(self.value)


class ReviewState(_Words):
    """Where one result stands with the radiologist."""

    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    NOT_REVIEWED = "not reviewed"
    NEEDS_REREVIEW = "needs re-review"  # reviewed before a re-analysis whose result differs


class NoLongerApplies(_Words):
    """Why an earlier review does not carry over to a new result."""

    NEW_MODEL_VERSION = "new model version"
    DECISION_CHANGED = "decision changed"
    NEW_ANALYSIS = "new analysis"  # same model and decision, but the review was made after the re-analysis


class StudyReviewState(_Words):
    """Where a study (or one model's results in it) stands with the radiologist, most urgent first."""

    NEEDS_REREVIEW = "needs re-review"
    FLAGGED_NOT_REVIEWED = "flagged, not reviewed"
    CONFIRMED = "confirmed"  # every flag reviewed, at least one confirmed
    FLAG_REJECTED = "flag rejected"  # every flag rejected
    NOT_FLAGGED = "not flagged"


@dataclasses.dataclass(frozen=True)
class ResultReview:
    """One result's review state: the review that applies to it, or the earlier one that no longer does."""

    state: ReviewState
    review: dict[str, Any] | None = None  # the review of this result (made on it or carried over to it)
    earlier: dict[str, Any] | None = None  # NEEDS_REREVIEW: the last review of an earlier result
    why: NoLongerApplies | None = None  # NEEDS_REREVIEW: why ``earlier`` does not apply


@dataclasses.dataclass(frozen=True)
class StudyReview:
    """A study's (or one model's) review state, who reviewed its flags, and how many flags await a review."""

    state: StudyReviewState
    reviewers: tuple[str, ...] = ()
    unreviewed_flags: int = 0


class ReviewRefused(ValueError):
    """A review that cannot be recorded, with a reason code the screen translates."""

    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code


REVIEWS_SQL = ("SELECT v.*, r.model_version AS result_model_version, r.flagged AS result_flagged "
               "FROM reviews v JOIN results r ON r.id = v.result_id")


def study_reviews(db: sqlite_utils.Database, study_uid: str) -> list[dict[str, Any]]:
    """Every review of the study, oldest first, with the model version and decision of the result it is on."""
    return list(db.query(f"{REVIEWS_SQL} WHERE v.study_instance_uid = ? ORDER BY v.id", [study_uid]))  # nosec B608


def review_state(result: dict[str, Any], reviews: Sequence[dict[str, Any]]) -> ResultReview:
    """The review state of ``result`` among ``reviews`` (as :func:`study_reviews` returns them, oldest first).

    Its own last review applies; without one, the last review of an earlier result of the same model and
    series makes it *needs re-review*; otherwise it is *not reviewed*.
    """
    own = earlier = None
    for review in reviews:
        if review["result_id"] == result["id"]:
            own = review
        elif (review["result_id"] < result["id"] and review["model"] == result["model"]
              and review["series_instance_uid"] == result["series_instance_uid"]):
            earlier = review
    if own is not None:
        return ResultReview(ReviewState(own["decision"]), review=own)
    if earlier is not None:
        return ResultReview(ReviewState.NEEDS_REREVIEW, earlier=earlier, why=_why_not(earlier, result))
    return ResultReview(ReviewState.NOT_REVIEWED)


def _why_not(earlier: dict[str, Any], result: dict[str, Any]) -> NoLongerApplies:
    if earlier["result_model_version"] != result["model_version"]:
        return NoLongerApplies.NEW_MODEL_VERSION
    if bool(earlier["result_flagged"]) != bool(result["flagged"]):
        return NoLongerApplies.DECISION_CHANGED
    return NoLongerApplies.NEW_ANALYSIS


def summarise(results: Iterable[dict[str, Any]], reviews: Sequence[dict[str, Any]]) -> StudyReview:
    """The review state of these results together (a study's current results, or one model's)."""
    states = [(bool(r["flagged"]), review_state(r, reviews)) for r in results]
    flags = [s for flagged, s in states if flagged]
    waiting = [s for s in flags if s.state in (ReviewState.NOT_REVIEWED, ReviewState.NEEDS_REREVIEW)]
    reviewers = tuple(sorted({s.review["reviewer"] for s in flags if s.review is not None}))
    if any(s.state is ReviewState.NEEDS_REREVIEW for s in waiting):
        state = StudyReviewState.NEEDS_REREVIEW
    elif waiting:
        state = StudyReviewState.FLAGGED_NOT_REVIEWED
    elif any(s.state is ReviewState.NEEDS_REREVIEW for _flagged, s in states):
        state = StudyReviewState.NEEDS_REREVIEW  # a flag that went away after it was confirmed
    elif any(s.state is ReviewState.CONFIRMED for s in flags):
        state = StudyReviewState.CONFIRMED
    elif flags:
        state = StudyReviewState.FLAG_REJECTED
    else:
        state = StudyReviewState.NOT_FLAGGED
    return StudyReview(state, reviewers, len(waiting))


def current_results(db: sqlite_utils.Database, study_uids: Sequence[str]) -> list[dict[str, Any]]:
    """The current (not superseded) results with a score of these studies: what a radiologist reviews."""
    marks = ",".join("?" * len(study_uids))
    return list(db.query(
        "SELECT a.study_instance_uid, r.id, r.series_instance_uid, r.model, r.model_version, r.flagged, r.score "  # nosec B608
        f"FROM analyses a JOIN results r ON r.analysis_id = a.id WHERE a.superseded = 0 AND r.score IS NOT NULL "
        f"AND a.study_instance_uid IN ({marks}) ORDER BY r.id", list(study_uids)))


def refresh_study_review(db: sqlite_utils.Database, study_uid: str) -> StudyReview:
    """Store the study's review state on its row (inside the caller's transaction) and return it."""
    summary = summarise(current_results(db, [study_uid]), study_reviews(db, study_uid))
    db.execute("UPDATE studies SET review_state = ?, reviewed_by = ?, unreviewed_flags = ? "
               "WHERE study_instance_uid = ?",
               [str(summary.state), ", ".join(summary.reviewers), summary.unreviewed_flags, study_uid])
    return summary


def add_review(db: sqlite_utils.Database, result_id: int, decision: str, comment: str, reviewer: str, *,
               study_uid: str, recall_due_days: int = recalls.DEFAULT_DUE_DAYS) -> int:
    """Record a radiologist's decision on a current result of ``study_uid`` (inside the caller's
    transaction), audit it and store the study's new review state; the new review's id. A confirmed flag
    opens a recall due in ``recall_due_days`` days, a rejected one cancels it (:mod:`store.recalls`).

    Raises :class:`ReviewRefused` for an unknown decision, a result of another study, or a result a
    re-analysis has replaced since the page was shown.
    """
    if decision not in DECISIONS:
        raise ReviewRefused("UNKNOWN_DECISION", f"not a decision: {decision!r}")
    row = db.execute("SELECT r.series_instance_uid, r.model, a.study_instance_uid, a.superseded FROM results r "
                     "JOIN analyses a ON a.id = r.analysis_id WHERE r.id = ?", [result_id]).fetchone()
    if row is None or row[2] != study_uid:
        raise ReviewRefused("UNKNOWN_RESULT", f"no result {result_id} in study {study_uid}")
    if row[3]:
        raise ReviewRefused("RESULT_SUPERSEDED", f"result {result_id} was replaced by a new analysis")
    reviews = db.table("reviews")
    reviews.insert({"result_id": result_id, "study_instance_uid": study_uid, "series_instance_uid": row[0],
                    "model": row[1], "decision": decision, "comment": comment, "reviewer": reviewer,
                    "at": utcnow()})
    review_id = inserted_id(reviews)
    audit(db, reviewer, "review", study_uid, result_id=result_id, model=row[1], decision=decision)
    refresh_study_review(db, study_uid)
    recalls.on_review(db, review_id, due_days=recall_due_days)
    return review_id


def previous_analysis(db: sqlite_utils.Database, analysis_id: int) -> int | None:
    """The latest earlier analysis of the same series that has results (the one a re-analysis replaces)."""
    row = db.execute("SELECT a.id FROM analyses a JOIN analyses n ON n.series_instance_uid = a.series_instance_uid "
                     "WHERE n.id = ? AND a.id < n.id AND EXISTS (SELECT 1 FROM results r WHERE r.analysis_id = a.id) "
                     "ORDER BY a.id DESC LIMIT 1", [analysis_id]).fetchone()
    return None if row is None else int(row[0])


def carry_over(db: sqlite_utils.Database, old_analysis_id: int | None, new_analysis_id: int) -> list[int]:
    """Copy each review of ``old_analysis_id``'s results onto the new analysis' result of the same model when
    its version and decision are the same (inside the caller's transaction); store the study's review state.

    Returns the ids of the copied reviews. Reviews that do not carry over stay on their result, and the new
    result shows as *needs re-review* beside them (:func:`review_state`).
    """
    study_uid = db.execute("SELECT study_instance_uid FROM analyses WHERE id = ?", [new_analysis_id]).fetchone()[0]
    carried = []
    if old_analysis_id is not None:
        old = {r["model"]: r for r in db.query("SELECT * FROM results WHERE analysis_id = ?", [old_analysis_id])}
        last = {r["result_id"]: r for r in db.query(
            "SELECT v.* FROM reviews v JOIN results r ON r.id = v.result_id WHERE r.analysis_id = ? ORDER BY v.id",
            [old_analysis_id])}
        for new in db.query("SELECT * FROM results WHERE analysis_id = ?", [new_analysis_id]):
            before = old.get(new["model"])
            review = last.get(before["id"]) if before else None
            if review is not None and _still_applies(before, new):
                carried.append(_copy(db, review, new["id"]))
    refresh_study_review(db, study_uid)
    return carried


def _still_applies(before: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return (before is not None and before["model_version"] == new["model_version"]
            and bool(before["flagged"]) == bool(new["flagged"]))


def _copy(db: sqlite_utils.Database, review: dict[str, Any], result_id: int) -> int:
    """The review copied onto ``result_id``: same reviewer, time, decision and comment; audited."""
    reviews = db.table("reviews")
    reviews.insert({**{k: v for k, v in review.items() if k != "id"}, "result_id": result_id,
                    "carried_from": review["id"]})
    review_id = inserted_id(reviews)
    audit(db, CARRY_OVER_ACTOR, "review_carried_over", review["study_instance_uid"], result_id=result_id,
          review_id=review_id, carried_from=review["id"], model=review["model"], decision=review["decision"],
          reviewer=review["reviewer"])
    return review_id


def refresh_all(db: sqlite_utils.Database) -> None:
    """Store every study's review state (the migration that adds the columns fills them with this)."""
    for (uid,) in db.execute("SELECT study_instance_uid FROM studies").fetchall():
        refresh_study_review(db, uid)
