"""The job service: completion checks, a bounded pool of interpretation jobs, retries, restart recovery.

APScheduler runs it: an interval job checks completion every ``jobs.poll_s`` on its own thread, and each
series job is a date job in APScheduler's SQLAlchemy job store, run on a pool of ``jobs.workers`` threads.
The ``jobs`` table is the truth: a job is claimed (queued -> running, attempt counted) in one transaction,
worked on with no transaction open, and finished (done with its results and their deliveries, or queued
again with backoff, or failed with the reason) in another. The check also sweeps for queued jobs that are
due and not scheduled (a retry asked for on the command line, an entry lost to a crash), so a job in the
table always runs, and for jobs "running" that no worker holds (a finish and its failure that both could
not commit), which go back to the queue. Jobs left running by a crash are queued again at start, or failed
if that was their ``max_attempts``-th attempt (a series that crashes the process must not crash every
start); a retry of a run writes the same SOP Instance UIDs, so the PACS gets one SEG and one SR per run
however often the node died.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import status
from dicom_node.completion import DONE, FAILED, QUEUED, RUNNING, anything_to_judge, detect_complete, requeue_interrupted
from dicom_node.config import NodeConfig, Route
from dicom_node.model_registry import resolve_model
from dicom_node.outbox import RetryPolicy, add_delivery
from dicom_node.outputs.encode import encode
from dicom_node.outputs.seg import OutputError
from dicom_node.pipeline import Question, SeriesOutputs, interpret_series
from dicom_node.receive import InstanceReceiver, StoreRequest
from inference.model.loading import ModelCache
from inference.slicing import SlicingError
from storage.database import make_engine, make_sessionmaker
from storage.files import FileStore
from storage.index import IndexWriter
from storage.models import Instance, Job, now_utc

logger = logging.getLogger(__name__)

PERMANENT_ERRORS = (SlicingError, OutputError, InvalidDicomError)  # the same input fails the same way: no retry
_service: JobService | None = None  # the running service, for APScheduler's module-level job functions



MAX_RETRY_DELAY = timedelta(days=1)


def retry_delay(base_s: float, attempt: int) -> timedelta:
    """The wait before a failed job's next attempt: ``base_s`` doubling per attempt, at most a day (an
    uncapped doubling overflowed ``timedelta`` from about the 33rd attempt)."""
    return RetryPolicy(first_delay_s=base_s, max_delay_s=MAX_RETRY_DELAY.total_seconds()).delay(attempt)


class JobError(RuntimeError):
    """A job could not be worked on (its series or route is gone, a result could not be stored)."""


@dataclass(frozen=True)
class Claim:
    job_id: int
    run: int
    route: Route
    paths: list[Path]


class JobService:
    def __init__(self, config: NodeConfig, on_results: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.on_results = on_results
        url = config.storage.database_url
        self.engine = make_engine(url, writer=True)  # every transaction here reads then writes
        self.sessions = make_sessionmaker(self.engine)
        self.reader = make_sessionmaker(make_engine(url))  # looks that need no write lock
        self.files = FileStore(config.storage.path)
        self.receiver = InstanceReceiver(self.files, self.sessions, IndexWriter(make_engine(url, writer=True), self.files))
        self.models = ModelCache(config.jobs.device, config.jobs.encoder_precision, config.jobs.compile_encoder)
        self.started_at = now_utc()
        self._loader: threading.Thread | None = None  # loads the routes' models at start
        self._stopping = threading.Event()
        self._working: set[int] = set()  # jobs a worker thread of this process holds, from before its claim to after its finish
        self._working_lock = threading.Lock()
        self.scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=make_engine(url), tablename="apscheduler_jobs")},
            executors={"default": ThreadPoolExecutor(config.jobs.workers), "checks": ThreadPoolExecutor(1),
                       "training": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=timezone.utc,
        )

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        global _service
        _service = self
        self.started_at = now_utc()
        with self.sessions() as session, session.begin():
            interrupted = requeue_interrupted(session, self.config.jobs.max_attempts, self.started_at)
        if interrupted:
            logger.warning("jobs %s were running when the node stopped; queued again", interrupted)
        self._loader = threading.Thread(target=self._load_models, name="model-load", daemon=True)
        self._loader.start()
        self.scheduler.start()
        self.scheduler.add_job(check, "interval", seconds=self.config.jobs.poll_s, id="completion-check",
                               replace_existing=True, executor="checks")
        if self.config.training.schedule:
            from tzlocal import get_localzone

            from dicom_node.config_values import crontab_trigger

            trigger = crontab_trigger(self.config.training.schedule, get_localzone())  # crontab's weekdays
            # A run missed while the node was down is dropped after an hour, not started with the node.
            self.scheduler.add_job(scheduled_training, trigger, id="scheduled-training", replace_existing=True,
                                   executor="training", misfire_grace_time=3600)
        elif self.scheduler.get_job("scheduled-training") is not None:
            self.scheduler.remove_job("scheduled-training")  # the schedule was taken out of the config
        logger.info("jobs: completion after %.0f s quiet, %d worker(s), %d route(s)", self.config.jobs.completion_wait_s,
                    self.config.jobs.workers, len(self.config.routes))

    def stop(self, load_wait_s: float = 120.0) -> None:
        """Stop scheduling; a job still running is left to the next start (it is queued again then).

        A model still loading is waited for (up to ``load_wait_s``): an encoder compile cannot be interrupted,
        and a process that exits with the loader inside torch aborts ("terminate called without an active
        exception", exit status 134) instead of stopping cleanly."""
        self._stopping.set()
        self.scheduler.shutdown(wait=False)
        if self._loader is not None and self._loader.is_alive():
            logger.info("waiting for the model load to finish (an encoder compile cannot be interrupted)")
            self._loader.join(load_wait_s)
            if self._loader.is_alive():
                logger.warning("the model was still loading after %.0f s; stopping anyway", load_wait_s)

    def _load_models(self) -> None:
        """Load the routes' models at start: the first series does not wait for it, a broken model shows at once."""
        for route in self.config.routes:
            if self._stopping.is_set():
                return
            try:
                self.models.get(self.model_path(route))
            except Exception as exc:  # noqa: BLE001 - reported here; the jobs that need it fail with the reason
                logger.error("route %s: cannot load the model in %s: %s", route.name, route.model, exc)

    # -- the periodic check -------------------------------------------------------------------------------

    def check(self) -> None:
        """Judge quiet series, then make sure every due queued job is scheduled."""
        now = now_utc()
        decisions = []
        with self.reader() as session:
            judge = anything_to_judge(session, self.config, now, self.started_at)
        if judge:
            with self.sessions() as session, session.begin():
                decisions = detect_complete(session, self.config, now, self.started_at)
        for decision in decisions:
            if decision.job_id is not None:
                self.schedule(decision.job_id, now)
        with self.reader() as session:
            due = session.scalars(select(Job.id).where(Job.status == QUEUED, Job.next_attempt_at <= now)).all()
        for job_id in due + self._requeue_orphans(now):
            if self.scheduler.get_job(_job_key(job_id)) is None:
                self.schedule(job_id, now)

    def _requeue_orphans(self, now: datetime) -> list[int]:
        """Jobs "running" in the table that no worker here holds: the worker's finish and its failure both
        failed to commit (a database locked or gone for a while). Without this sweep they stay "running"
        until a restart; with it they are retried (same SOP Instance UIDs), or failed in their last attempt."""
        with self.reader() as session:
            running = set(session.scalars(select(Job.id).where(Job.status == RUNNING)))
        with self._working_lock:  # a worker registers before it claims, so a job not held now is nobody's
            orphans = running - self._working
            if not orphans:
                return []
            with self.sessions() as session, session.begin():
                requeued = requeue_interrupted(session, self.config.jobs.max_attempts, now, only=orphans,
                                               cause="its worker ended without recording the result (database error?)")
        if requeued:
            logger.warning("jobs %s were left running by a worker that could not record its result; queued again",
                           requeued)
        return requeued

    def schedule(self, job_id: int, when: datetime) -> None:
        self.scheduler.add_job(run_job, "date", run_date=when.replace(tzinfo=timezone.utc), args=[job_id],
                               id=_job_key(job_id), replace_existing=True)

    # -- one job ------------------------------------------------------------------------------------------

    def run(self, job_id: int) -> None:
        with self._working_lock:
            if job_id in self._working:
                return  # a worker here has it already
            self._working.add(job_id)
        try:
            self._run(job_id)
        finally:
            with self._working_lock:
                self._working.discard(job_id)

    def _run(self, job_id: int) -> None:
        claim = self._claim(job_id)
        if claim is None:
            return
        logger.info("job %d: run %d of a series, route %s, %d instances", job_id, claim.run, claim.route.name, len(claim.paths))
        try:
            outputs = self.work(claim)
            stored = self._store(outputs)
            # In the try: a failed finish (database locked) is retried, else the job stays "running" until a
            # restart; the retry files the same SOP Instance UIDs, so the PACS still gets one SEG and one SR.
            self._done(job_id, outputs, stored)
        except PERMANENT_ERRORS as exc:
            self._failed(job_id, exc, retry=False)
        except Exception as exc:  # noqa: BLE001 - any other failure is retried with backoff, then shown
            self._failed(job_id, exc, retry=True)
        else:
            self.on_results()

    def work(self, claim: Claim) -> SeriesOutputs:
        question = Question(claim.route.question, claim.route.target)
        return interpret_series(claim.paths, lambda: self.models.get(self.model_path(claim.route)), question, claim.run)

    def model_path(self, route: Route) -> Path:
        """The route's checkpoint; for model = "active", the version an administrator activated (or the shipped one)."""
        with self.reader() as session:
            return resolve_model(session, route.model)

    def train(self) -> int:
        """The scheduled training run, in its own process (memory, and a crash there is not the node's)."""
        command = [sys.executable, "-m", "dicom_node.cli", "train", "--from-store", "--quiet", "--config", str(self.config.source),
                   "--steps", str(self.config.training.steps)]
        command += ["--modality", self.config.training.modality] if self.config.training.modality else []
        command += ["--label", self.config.training.label] if self.config.training.label else []
        command += ["--start-from", self.config.training.start_from] if self.config.training.start_from else []
        logger.info("scheduled training: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            logger.info("scheduled training registered a new model (not active): %s", done.stdout.strip().splitlines()[0:1])
        else:  # only its own "error:" lines: at DEBUG its log names subjects (Patient IDs)
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            logger.warning("scheduled training did not produce a model (exit %d): %s", done.returncode,
                           " ".join(errors)[-500:] or "no error message; its output is in the DEBUG log")
            logger.debug("scheduled training's output: %s", done.stderr.strip()[-2000:])
        return done.returncode

    def _claim(self, job_id: int) -> Claim | None:
        with self.sessions() as session, session.begin():
            claimed = session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED)
                                      .values(status=RUNNING, attempts=Job.attempts + 1, started_at=now_utc())).rowcount
            if not claimed:
                return None  # done, failed or being run already
            job = session.get(Job, job_id)
            route = next((r for r in self.config.routes if r.name == job.route), None)
            paths = [self.files.root / p for p in session.scalars(select(Instance.path).where(Instance.series_fk == job.series_fk))]
            if route is not None and paths:
                return Claim(job_id, job.run, route, paths)
            reason = f"route {job.route!r} is no longer configured" if route is None else "the series has no instances"
            job.status, job.error, job.finished_at = FAILED, reason, now_utc()
            logger.error("job %d failed: %s", job_id, reason)
            return None

    def _store(self, outputs: SeriesOutputs) -> dict[str, tuple[str, str, str]]:
        """File and index the SEG and SR like any received instance; returns kind -> (SOP UID, class, path)."""
        stored = {}
        for kind, dataset in (("seg", outputs.seg), ("sr", outputs.sr)):
            if dataset is None:
                continue
            data, syntax = encode(dataset)
            request = StoreRequest(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), syntax, self.config.node.ae_title, data)
            code = self.receiver.receive(request)
            if code != status.SUCCESS:
                raise JobError(f"could not store the {kind.upper()} (status 0x{code:04X})")
            path = self.files.path_for(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
            stored[kind] = (str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), self.files.relative(path))
        return stored

    def _done(self, job_id: int, outputs: SeriesOutputs, stored: dict[str, tuple[str, str, str]]) -> None:
        with self.sessions() as session, session.begin():
            job = session.get(Job, job_id)
            job.status, job.finished_at, job.error = DONE, now_utc(), ""
            job.summary = json.dumps(outputs.summary())
            for kind, (sop_uid, sop_class, path) in stored.items():
                for peer in self.config.destinations(kind):
                    add_delivery(session, sop_uid, sop_class, path, peer.ae_title)
        lesions = len(outputs.result.lesions)
        logger.info("job %d done: %s, %d lesion(s), %.1f s", job_id, outputs.result.assessment.value, lesions,
                    sum(outputs.seconds.values()))

    def _failed(self, job_id: int, exc: Exception, retry: bool) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        with self.sessions() as session, session.begin():
            job = session.get(Job, job_id)
            job.error = reason
            if retry and job.attempts < self.config.jobs.max_attempts:
                delay = retry_delay(self.config.jobs.retry_delay_s, job.attempts)
                job.status, job.next_attempt_at = QUEUED, now_utc() + delay
                logger.warning("job %d attempt %d failed (%s); retry in %s", job_id, job.attempts, reason, delay)
            else:
                job.status, job.finished_at = FAILED, now_utc()
                logger.error("job %d failed after %d attempt(s): %s", job_id, job.attempts, reason,
                             exc_info=retry and not isinstance(exc, JobError))
                return
            when = job.next_attempt_at
        self.schedule(job_id, when)


def retry_failed(sessions: sessionmaker[Session], job_id: int) -> bool:
    """Queue a failed (or done) job again now with fresh attempts; the running node picks it up."""
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None or job.status in (QUEUED, RUNNING):
            return False
        job.status, job.attempts, job.next_attempt_at, job.error = QUEUED, 0, now_utc(), ""
        return True


def _job_key(job_id: int) -> str:
    return f"series-job-{job_id}"


def check() -> None:
    """APScheduler's interval job (a module-level function: the job store keeps a reference to it)."""
    if _service is not None:
        _service.check()


def scheduled_training() -> None:
    """APScheduler's cron job for [training] schedule."""
    if _service is not None:
        _service.train()


def run_job(job_id: int) -> None:
    """APScheduler's date job for one series job."""
    if _service is not None:
        _service.run(job_id)
