"""Jobs and deliveries under failure: a series that crashes every start, a finish that cannot commit, a damaged
stored result, a destination that drops packets, a dead letter re-queued by a job's retry, a long PACS outage."""

import dataclasses
import socket
import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DatabaseError

from dicom_node.config import load_config
from dicom_node.jobs import JobService
from dicom_node.outbox import FAILED, PENDING, SENT, RetryPolicy, deliver_due, enqueue, resend
from storage.database import make_engine, make_sessionmaker
from storage.models import Delivery, DeliveryAttempt, Instance, Job, Series
from tests.conftest import TEST_PEERS
from tests.localpeers import free_port, write_node_config
from tests.synthetic import axial_positions, write_toy_ct
from tests.test_delivery import NOW, outbox_setup, pacs  # noqa: F401 - fixture
from tests.test_jobs import NO_WEIGHTS, detect, no_model, node_factory, queued_job, send  # noqa: F401 - fixtures
from tests.test_outputs_seg import series_with_lesions  # noqa: F401 - fixture

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def test_a_job_interrupted_in_its_last_attempt_fails_at_start_instead_of_crashing_every_start(node_factory, no_model, tmp_path):
    config, service, decision = queued_job(node_factory, no_model, tmp_path, axial_positions(3))
    with service.sessions() as session, session.begin():
        job = session.get(Job, decision.job_id)
        job.status, job.attempts = "running", config.jobs.max_attempts  # the node died in its last attempt
    restarted = JobService(config)
    restarted.start()
    try:
        with restarted.sessions() as session:
            job = session.get(Job, decision.job_id)
            assert (job.status, job.attempts) == ("failed", 2) and job.finished_at is not None
            assert "interrupted in attempt 2 of 2" in job.error
    finally:
        restarted.stop()


def test_a_finish_that_cannot_commit_is_retried_and_files_one_seg_and_one_sr(node_factory, trained_checkpoint, tmp_path):
    peers = TEST_PEERS + [{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "allow": ["destination"]}]
    node, config = node_factory(trained_checkpoint, peers=peers, wait=1.0)
    send(node, write_toy_ct(tmp_path / "toy", "-FF-"))
    service = JobService(config)
    [decision] = detect(service, datetime.utcnow() + timedelta(seconds=10))
    with service.engine.begin() as connection:  # the finish's transaction fails, as with "database is locked"
        connection.execute(text("CREATE TRIGGER no_finish BEFORE UPDATE OF status ON jobs WHEN NEW.status = 'done' "
                                "BEGIN SELECT RAISE(ABORT, 'database is locked'); END"))
    service.run(decision.job_id)
    with service.sessions() as session:
        job = session.get(Job, decision.job_id)
        assert (job.status, job.attempts) == ("queued", 1) and "database is locked" in job.error
        assert session.scalars(select(Delivery)).all() == []

    with service.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER no_finish"))
    service.run(decision.job_id)
    with service.sessions() as session:
        job = session.get(Job, decision.job_id)
        outputs = session.execute(select(Series.modality, Instance.sop_instance_uid).select_from(Instance).join(Instance.series)
                                  .where(Series.modality.in_(["SEG", "SR"]))).all()
        deliveries = session.scalars(select(Delivery.sop_instance_uid)).all()
    assert (job.status, job.attempts) == ("done", 2), job.error
    assert sorted(modality for modality, _ in outputs) == ["SEG", "SR"]  # the retry filed the same two objects
    assert sorted(deliveries) == sorted(uid for _, uid in outputs)


def test_a_job_whose_finish_and_failure_both_cannot_commit_is_queued_again_by_the_next_check(node_factory, no_model, tmp_path):
    config, service, decision = queued_job(node_factory, no_model, tmp_path, axial_positions(3))
    with service.engine.begin() as connection:  # the database refuses every way out of "running" for a while
        connection.execute(text("CREATE TRIGGER stuck BEFORE UPDATE OF status ON jobs WHEN OLD.status = 'running' "
                                "BEGIN SELECT RAISE(ABORT, 'database is locked'); END"))
    with pytest.raises(DatabaseError, match="database is locked"):
        service.run(decision.job_id)  # the model is missing: the attempt fails, and recording that fails too
    with pytest.raises(DatabaseError):  # the periodic check fails too (APScheduler logs it and runs the next)
        service.check()
    assert job_state(service, decision.job_id)[0] == "running"

    with service.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER stuck"))
    service.check()  # the sweep: no worker holds the job
    status, attempts, error = job_state(service, decision.job_id)
    assert (status, attempts) == ("queued", 1) and "worker ended without recording" in error
    assert service.scheduler.get_job(f"series-job-{decision.job_id}") is not None  # and it is scheduled to run

    service.run(decision.job_id)  # its retry counts as the last attempt: failed with the reason, not running
    status, attempts, error = job_state(service, decision.job_id)
    assert (status, attempts) == ("failed", 2) and NO_WEIGHTS in error
    service.check()
    assert job_state(service, decision.job_id)[0] == "failed"


def test_the_sweep_leaves_a_job_that_a_worker_is_running_alone(node_factory, no_model, tmp_path):
    config, service, decision = queued_job(node_factory, no_model, tmp_path, axial_positions(3))
    inside, release = threading.Event(), threading.Event()

    def slow_work(claim):
        inside.set()
        release.wait(30)
        raise RuntimeError("the model is slow, then gone")

    service.work = slow_work
    worker = threading.Thread(target=service.run, args=(decision.job_id,))
    worker.start()
    try:
        assert inside.wait(30)
        service.check()
        assert job_state(service, decision.job_id)[0] == "running"  # held by the worker: not an orphan
    finally:
        release.set()
        worker.join(30)
    assert job_state(service, decision.job_id)[:2] == ("queued", 1)


def job_state(service, job_id: int) -> tuple[str, int, str]:
    with service.sessions() as session:
        job = session.get(Job, job_id)
        return job.status, job.attempts, job.error


def test_a_damaged_stored_result_is_a_failed_attempt_and_the_others_are_sent(series_with_lesions, pacs):
    sources, volume, lesions, tmp_path = series_with_lesions
    config, seg, sr = outbox_setup(tmp_path, pacs, sources, volume, lesions, tmp_path)
    (config.storage.path / "seg.dcm").write_bytes(b"not DICOM: the disk lost this file" * 10)
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    damaged = enqueue(sessions, seg.SOPInstanceUID, seg.SOPClassUID, "seg.dcm", "ORTHANC")
    enqueue(sessions, sr.SOPInstanceUID, sr.SOPClassUID, "sr.dcm", "ORTHANC")
    assert deliver_due(config, sessions, config.storage.path, NOW) == {"sent": 1, "failed": 1}
    with sessions() as session:
        row = session.get(Delivery, damaged)
        assert (row.status, row.attempts) == (PENDING, 1) and "InvalidDicomError" in row.last_error
    for _ in range(2):  # it is retried, then dead-lettered like any failing item
        deliver_due(config, sessions, config.storage.path, NOW)
    with sessions() as session:
        assert session.get(Delivery, damaged).status == FAILED


def test_a_destination_that_drops_packets_does_not_hold_back_another(series_with_lesions, pacs):
    sources, volume, lesions, tmp_path = series_with_lesions
    hole = socket.socket()  # a listener whose accept queue is full: the kernel drops further SYNs, a black hole
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())
    try:
        config, seg, sr = outbox_setup(tmp_path, pacs, sources, volume, lesions, tmp_path)
        config.source.write_text(config.source.read_text() + '\n[[peers]]\nae_title = "HOLE"\nhost = "127.0.0.1"\n'
                                 f'port = {hole.getsockname()[1]}\nallow = ["destination"]\n')
        config = load_config(config.source)
        sessions = make_sessionmaker(make_engine(config.storage.database_url))
        enqueue(sessions, seg.SOPInstanceUID, seg.SOPClassUID, "seg.dcm", "HOLE")  # first in the outbox
        sent = enqueue(sessions, sr.SOPInstanceUID, sr.SOPClassUID, "sr.dcm", "ORTHANC")
        counts = {}
        policy = RetryPolicy(first_delay_s=0.0, timeout_s=20.0)
        round_ = threading.Thread(target=lambda: counts.update(deliver_due(config, sessions, config.storage.path, policy)))
        round_.start()
        while round_.is_alive() and not delivered(sessions, sent):
            time.sleep(0.1)
        assert round_.is_alive() and delivered(sessions, sent)  # sent and recorded while HOLE is still connecting
        round_.join(120)
        assert not round_.is_alive() and counts == {"sent": 1, "failed": 1}  # the connect gave up at timeout_s
        with sessions() as session:
            hole_row = session.scalars(select(Delivery).where(Delivery.destination == "HOLE")).one()
            assert (hole_row.status, hole_row.attempts) == (PENDING, 1) and "no association" in hole_row.last_error
    finally:
        filler.close()
        hole.close()


def delivered(sessions, delivery_id: int) -> bool:
    with sessions() as session:
        return session.get(Delivery, delivery_id).status == SENT


def nowhere_outbox(tmp_path):
    """An outbox with one SEG for a destination that is not configured: every attempt fails, with no network."""
    config = load_config(write_node_config(tmp_path / "node", free_port(), []))
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    return config, sessions, enqueue(sessions, "2.25.1", SEG_CLASS, "seg.dcm", "NOWHERE")


def attempt_now(config, sessions, delivery_id: int, policy: RetryPolicy) -> Delivery:
    """One delivery round with the item due now (as if its retry delay had passed)."""
    with sessions() as session, session.begin():
        session.get(Delivery, delivery_id).next_attempt_at = datetime.utcnow()
    assert deliver_due(config, sessions, config.storage.path, policy)["failed"] == 1
    with sessions() as session:
        return session.get(Delivery, delivery_id)


def test_a_job_retry_gives_its_dead_lettered_deliveries_fresh_attempts(tmp_path):
    config, sessions, delivery = nowhere_outbox(tmp_path)
    for _ in range(3):
        row = attempt_now(config, sessions, delivery, NOW)
    assert (row.status, row.attempts) == (FAILED, 3)
    enqueue(sessions, "2.25.1", SEG_CLASS, "seg.dcm", "NOWHERE")  # what a retried job's finish does
    row = attempt_now(config, sessions, delivery, NOW)
    assert (row.status, row.attempts) == (PENDING, 1)


def test_an_hour_long_outage_keeps_results_pending_and_a_week_long_one_dead_letters_them(tmp_path):
    config, sessions, delivery = nowhere_outbox(tmp_path)
    policy = RetryPolicy()
    for _ in range(12):  # 30 s doubling to 10 min: about an hour and a quarter of attempts
        row = attempt_now(config, sessions, delivery, policy)
    assert (row.status, row.attempts) == (PENDING, 12) and policy.delay(100) == timedelta(minutes=10)

    with sessions() as session, session.begin():  # the first of these attempts was a week ago
        for attempt in session.scalars(select(DeliveryAttempt)):
            attempt.at -= timedelta(days=7)
    assert attempt_now(config, sessions, delivery, policy).status == FAILED

    assert resend(sessions, delivery)  # a resend starts a new week: its first failure is no dead letter
    for _ in range(policy.min_attempts):
        row = attempt_now(config, sessions, delivery, policy)
    assert (row.status, row.attempts) == (PENDING, policy.min_attempts)


def test_the_give_up_period_is_the_configured_one(tmp_path):
    """`[jobs] delivery_give_up_h` is what the node's delivery loop waits out: an hour here, not the week."""
    config, sessions, delivery = nowhere_outbox(tmp_path)
    policy = RetryPolicy.of(dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, delivery_give_up_h=1.0)))
    assert RetryPolicy.of(config).give_up_after_s == 7 * 24 * 3600.0
    for _ in range(policy.min_attempts):
        row = attempt_now(config, sessions, delivery, policy)
    assert row.status == PENDING  # ten attempts, but not yet an hour of trying
    with sessions() as session, session.begin():
        for attempt in session.scalars(select(DeliveryAttempt)):
            attempt.at -= timedelta(hours=1)
    assert attempt_now(config, sessions, delivery, policy).status == FAILED
