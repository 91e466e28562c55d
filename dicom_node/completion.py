"""Completion detection: a series is complete when nothing has arrived for it for a while.

DICOM has no "end of series" message; a PACS push is a burst of C-STOREs, so quiet time is the signal.
The wait is ``jobs.completion_wait_s``, or the sending peer's own ``completion_wait_s``. It is counted from
the later of the series' last arrival and the node's start: after a restart the senders whose transfer the
restart cut off get the full wait to resume before a series is judged. An arrival after the series was
judged re-opens it: interpreted again as a new run, or ignored, as ``jobs.on_late_arrival`` says.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session

from dicom_node.config import LateArrival, NodeConfig
from storage.models import Job, Series, SeriesCompletion

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


@dataclass(frozen=True)
class Decision:
    series_id: int
    outcome: str  # "queued", "stored only", "late arrival ignored"
    job_id: int | None = None
    route: str = ""


def detect_complete(session: Session, config: NodeConfig, now: datetime, quiet_since: datetime) -> list[Decision]:
    """Judge every series that has been quiet long enough; call inside a transaction (it writes the decisions)."""
    query = _candidates(config, now, quiet_since)
    if query is None:
        return []
    candidates = session.execute(query).all()
    decisions = []
    for series, completion in candidates:
        quiet_for = now - max(series.last_received_at, quiet_since)
        if quiet_for < timedelta(seconds=config.completion_wait_s(series.calling_ae_title)):
            continue
        decision = _decide(session, config, series, completion, now)
        if completion is None:
            session.add(SeriesCompletion(series_fk=series.id, handled_through=series.last_received_at,
                                         decision=decision.outcome, route=decision.route))
        else:
            completion.handled_through, completion.decision = series.last_received_at, decision.outcome
        decisions.append(decision)
        logger.info("series %s (%s) complete: %s%s", series.series_instance_uid, series.modality or "?", decision.outcome,
                    f" as job {decision.job_id}" if decision.job_id else "")
    return decisions


def anything_to_judge(session: Session, config: NodeConfig, now: datetime, quiet_since: datetime) -> bool:
    """A read-only look first, so that the check takes the database's write lock only when it has work."""
    query = _candidates(config, now, quiet_since)
    return query is not None and session.execute(query.limit(1)).first() is not None


def _candidates(config: NodeConfig, now: datetime, quiet_since: datetime) -> Select | None:
    """Series quiet for at least the shortest configured wait and not judged since their last arrival."""
    waits = [config.jobs.completion_wait_s] + [p.completion_wait_s for p in config.peers if p.completion_wait_s is not None]
    cutoff = now - timedelta(seconds=min(waits))
    if quiet_since > cutoff:
        return None
    return (
        select(Series, SeriesCompletion)
        .outerjoin(SeriesCompletion, SeriesCompletion.series_fk == Series.id)
        .where(Series.last_received_at <= cutoff,
               or_(SeriesCompletion.series_fk.is_(None), Series.last_received_at > SeriesCompletion.handled_through))
        .order_by(Series.last_received_at)
    )


def _decide(session: Session, config: NodeConfig, series: Series, completion: SeriesCompletion | None,
            now: datetime) -> Decision:
    route = None if series.calling_ae_title == config.node.ae_title else \
        config.route_for(series.modality, series.calling_ae_title, series.series_description)
    if route is None:  # the node's own results come back here too: stored, never interpreted
        return Decision(series.id, "stored only")
    if completion is not None and config.jobs.on_late_arrival is LateArrival.IGNORE:
        return Decision(series.id, "late arrival ignored", route=route.name)
    waiting = session.scalar(select(Job).where(Job.series_fk == series.id, Job.status == QUEUED, Job.attempts == 0))
    if waiting is not None:  # not started yet: it will read the late instances too
        waiting.arrivals_through = series.last_received_at
        return Decision(series.id, "queued", waiting.id, route.name)
    run = (session.scalar(select(func.max(Job.run)).where(Job.series_fk == series.id)) or 0) + 1
    job = Job(series_fk=series.id, run=run, route=route.name, status=QUEUED, arrivals_through=series.last_received_at,
              created_at=now, next_attempt_at=now)
    session.add(job)
    session.flush()
    return Decision(series.id, "queued", job.id, route.name)


def requeue_interrupted(session: Session, max_attempts: int, now: datetime, only: Collection[int] | None = None,
                        cause: str = "the node stopped or crashed while running it (out of memory?)") -> list[int]:
    """Jobs left "running" by a crash or a stop go back to the queue (their attempt stays counted); one that
    has used its ``max_attempts`` fails instead: a series that kills the process must not crash every start.

    ``only`` limits it to the given jobs: the running node's sweep for jobs whose worker ended without
    recording how (a finish and a failure that could not commit), which would otherwise stay "running"."""
    running = [Job.status == RUNNING] + ([Job.id.in_(list(only))] if only is not None else [])
    ids = list(session.scalars(select(Job.id).where(*running, Job.attempts < max_attempts)))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), Job.status == RUNNING)
                        .values(status=QUEUED, error=f"interrupted: {cause}", next_attempt_at=now))
    for job in session.scalars(select(Job).where(*running, Job.attempts >= max_attempts)):
        job.status, job.finished_at = FAILED, now
        job.error = f"interrupted in attempt {job.attempts} of {max_attempts}: {cause}"
        logger.error("job %d failed: %s", job.id, job.error)
    return ids
