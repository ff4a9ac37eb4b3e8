"""Read queries behind the screens: worklist page, study detail, progress of running work.

Aggregates are computed for the rows of one page only, so the worklist stays fast with 50,000 studies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlite_utils

from appliance.store import recalls, reviews
from appliance.store.states import StudyStatus

PAGE_SIZE = 50
SORTS = {"arrival": "st.created_at DESC, st.study_instance_uid",
         "study_date": "st.study_date DESC, st.study_time DESC, st.created_at DESC"}
STATUSES = tuple(s.value for s in (StudyStatus.QUEUED, StudyStatus.RUNNING, StudyStatus.DONE, StudyStatus.FAILED,
                                    StudyStatus.REJECTED))

@dataclasses.dataclass
class WorklistFilter:
    """What the technician narrowed the worklist to (all optional)."""

    text: str = ""
    status: str = ""
    flagged: bool = False
    unreviewed: bool = False  # flagged results no review applies to (never reviewed, or needing re-review)
    recall_overdue: bool = False  # an open recall past its due date (store.recalls)
    date_from: str = ""  # YYYYMMDD, as StudyDate
    date_to: str = ""
    page: int = 1
    sort: str = "arrival"  # newest arrival first; "study_date": by StudyDate and time, newest first

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if self.text:
            clauses.append("st.search_text LIKE ? ESCAPE '\\'")
            escaped = self.text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
        if self.date_from:
            clauses.append("st.study_date >= ?")
            args.append(self.date_from)
        if self.date_to:
            clauses.append("st.study_date <= ?")
            args.append(self.date_to)
        if self.flagged:
            clauses.append("st.flagged = 1")
        if self.unreviewed:
            clauses.append("st.unreviewed_flags > 0")  # stored by store.reviews whenever results or reviews change
        if self.recall_overdue:
            clauses.append(recalls.OVERDUE_CLAUSE)
            args.append(recalls.today().isoformat())
        if self.status in STATUSES:
            clauses.append("st.status = ?")  # stored on the row whenever its jobs or series change
            args.append(self.status)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def worklist(db: sqlite_utils.Database, flt: WorklistFilter) -> tuple[list[dict[str, Any]], int]:
    """One page of studies, newest arrival first (or newest StudyDate), with status, progress and per-model flags;
    and the total count.

    The page's studies are chosen first on cheap columns; status and aggregates are then computed
    for those 50 rows only.
    """
    where, args = flt.where()
    base = f"FROM studies st{where}"
    total = int(db.execute(f"SELECT count(*) {base}", args).fetchone()[0])
    offset = (max(flt.page, 1) - 1) * PAGE_SIZE
    order = SORTS.get(flt.sort, SORTS["arrival"])
    uids = [r[0] for r in db.execute(
        f"SELECT st.study_instance_uid {base} ORDER BY {order} LIMIT ? OFFSET ?",  # nosec B608 - order from SORTS
        args + [PAGE_SIZE, offset])]
    if not uids:
        return [], total
    found = {r["study_instance_uid"]: r for r in db.query(
        f"SELECT st.study_instance_uid, st.study_date, st.study_time, st.study_description, st.accession_number, "  # nosec B608
        f"st.created_at, p.patient_name, p.patient_id, st.status, st.review_state, st.reviewed_by FROM studies st "
        f"LEFT JOIN patients p ON p.patient_key = st.patient_key WHERE st.study_instance_uid IN ({_in(uids)})", uids)}
    rows = [found[uid] for uid in uids]
    _decorate(db, rows)
    return rows, total


def _in(values: list[str]) -> str:
    """One ``?`` per value, for ``IN (...)``.

    The statements of this module are built from fixed clauses (:meth:`WorklistFilter.where`) and these
    placeholders only, never from a value: their ``# nosec B608`` says so to bandit.
    """
    return ",".join("?" * len(values))


@dataclasses.dataclass
class _StudyExtras:
    """What the worklist shows of one study beyond its own row."""

    series_count: int = 0
    modalities: set[str] = dataclasses.field(default_factory=set)
    flags: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    progress: float | None = None  # mean of its running analyses, 0..1
    error: str | None = None  # why its last analysis failed
    reasons: set[str] = dataclasses.field(default_factory=set)  # reason codes of its rejected series

    def columns(self) -> dict[str, Any]:
        """The extra columns of the worklist row, sets joined for display."""
        return {"series_count": self.series_count, "modalities": ", ".join(sorted(self.modalities)),
                "flags": self.flags, "progress": self.progress, "error": self.error,
                "reasons": ", ".join(sorted(self.reasons))}


def _decorate(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Series count, modalities, progress, failure reason and flags of the studies on one page."""
    uids = [r["study_instance_uid"] for r in rows]
    if not uids:
        return
    info = {uid: _StudyExtras() for uid in uids}
    for uid, modality, status, reason_code in db.execute(
            f"SELECT study_instance_uid, modality, status, reason_code FROM series "  # nosec B608
            f"WHERE study_instance_uid IN ({_in(uids)})", uids):
        info[uid].series_count += 1
        info[uid].modalities.add(modality or "?")
        if status == "rejected" and reason_code:
            info[uid].reasons.add(reason_code)
    for uid, progress in db.execute(
            f"SELECT study_instance_uid, avg(progress) FROM jobs WHERE state = 'running' AND kind = 'analyze' "  # nosec B608
            f"AND study_instance_uid IN ({_in(uids)}) GROUP BY study_instance_uid", uids):
        info[uid].progress = progress
    for uid, error in db.execute(
            f"SELECT study_instance_uid, error FROM jobs WHERE state = 'failed' AND kind = 'analyze' "  # nosec B608
            f"AND study_instance_uid IN ({_in(uids)}) ORDER BY id", uids):
        info[uid].error = error
    for uid, model, flagged, score, validated in db.execute(
            f"SELECT a.study_instance_uid, r.model, max(r.flagged), max(r.score), min(r.validated) "  # nosec B608
            f"FROM analyses a JOIN results r ON r.analysis_id = a.id WHERE a.superseded = 0 "
            f"AND r.score IS NOT NULL AND a.study_instance_uid IN ({_in(uids)}) "
            f"GROUP BY a.study_instance_uid, r.model ORDER BY r.model", uids):
        info[uid].flags.append({"model": model, "flagged": bool(flagged), "score": score,
                                "validated": bool(validated)})
    _review_flags(db, uids, info)
    overdue = recalls.overdue_since(db, uids)
    for row in rows:
        row.update(info[row["study_instance_uid"]].columns())
        row["recall_overdue_since"] = overdue.get(row["study_instance_uid"])


def _review_flags(db: sqlite_utils.Database, uids: list[str], info: dict[str, _StudyExtras]) -> None:
    """Each model flag's review state (:func:`store.reviews.summarise` over that model's current results) and
    who reviewed it: a flag every review rejected is no longer shown as one."""
    results = reviews.current_results(db, uids)
    history = list(db.query(f"{reviews.REVIEWS_SQL} WHERE v.study_instance_uid IN ({_in(uids)}) ORDER BY v.id",  # nosec B608
                            uids))
    for uid in uids:
        for flag in info[uid].flags:
            mine = [r for r in results if r["study_instance_uid"] == uid and r["model"] == flag["model"]]
            summary = reviews.summarise(mine, [v for v in history if v["study_instance_uid"] == uid])
            flag["review"], flag["reviewers"] = str(summary.state), ", ".join(summary.reviewers)


def progress(db: sqlite_utils.Database, study_uids: list[str]) -> dict[str, dict[str, Any]]:
    """Status and progress of these studies, for the worklist's live refresh."""
    uids = study_uids[:PAGE_SIZE]
    if not uids:
        return {}
    rows = list(db.query(f"SELECT st.study_instance_uid, st.status, st.review_state, st.reviewed_by FROM studies st "  # nosec B608
                         f"WHERE st.study_instance_uid IN ({_in(uids)})", uids))
    _decorate(db, rows)
    return {r["study_instance_uid"]: {"status": r["status"], "progress": r["progress"], "error": r["error"],
                                      "reasons": r["reasons"], "flags": r["flags"], "review_state": r["review_state"],
                                      "reviewed_by": r["reviewed_by"]} for r in rows}
