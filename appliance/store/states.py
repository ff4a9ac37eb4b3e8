"""Every state a job, a series and a study can be in: one vocabulary for the database, the screens and the CLI.

A study's status is defined once, by :data:`STUDY_STATUS_SQL`, from its series and their analysis
jobs; it is stored on the study row whenever one of those changes (``store.database.refresh_study``),
so the worklist filter and the study page read the same column and cannot disagree.
"""

from __future__ import annotations

import enum


class _Text(str, enum.Enum):
    """An enum whose members are their text in SQL, JSON, f-strings and templates."""

    def __str__(self) -> str:
        return str(self.value)


class JobState(_Text):
    QUEUED = "queued"
    RUNNING = "running"  # leased by a live worker, heart-beating
    DONE = "done"
    FAILED = "failed"  # gave up after job_max_attempts


class JobKind(_Text):
    ANALYZE = "analyze"  # assemble, check, analyse a series, then publish its outputs
    REPORT = "report"  # send the study's report again (after a radiologist's review)


class SeriesStatus(_Text):
    RECEIVED = "received"  # images stored; not analysed since the last one arrived
    ANALYZED = "analyzed"
    REJECTED = "rejected"  # refused by the series checks, with a reason code


class StudyStatus(_Text):
    """What the worklist shows, most urgent first."""

    RUNNING = "running"
    QUEUED = "queued"
    FAILED = "failed"
    DONE = "done"
    REJECTED = "rejected"


_ANALYZE = JobKind.ANALYZE.value
_RECEIVED = SeriesStatus.RECEIVED.value

# One study's status from its series and analysis jobs, most urgent first; ``studies`` is the study row.
STUDY_STATUS_SQL = f"""
CASE
  WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = studies.study_instance_uid
               AND j.state = '{JobState.RUNNING.value}' AND j.kind = '{_ANALYZE}')
    THEN '{StudyStatus.RUNNING.value}'
  WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = studies.study_instance_uid
               AND j.state = '{JobState.QUEUED.value}' AND j.kind = '{_ANALYZE}')
    THEN '{StudyStatus.QUEUED.value}'
  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid = studies.study_instance_uid
               AND s.status = '{_RECEIVED}'
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = s.series_instance_uid
                           AND j.state = '{JobState.FAILED.value}' AND j.kind = '{_ANALYZE}'
                           AND j.created_at >= s.last_received_at))
    THEN '{StudyStatus.FAILED.value}'
  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid = studies.study_instance_uid
               AND s.status = '{_RECEIVED}')
    THEN '{StudyStatus.QUEUED.value}'
  WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid = studies.study_instance_uid
               AND s.status = '{SeriesStatus.ANALYZED.value}')
    THEN '{StudyStatus.DONE.value}'
  ELSE '{StudyStatus.REJECTED.value}'
END"""  # nosec B608 - fixed text from enums
