"""Completion detection and the job service: quiet time, routes, late arrivals, retries, restarts."""

import dataclasses
import json
import time
from datetime import datetime, timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.completion import anything_to_judge, detect_complete
from dicom_node.config import LateArrival, load_config
from dicom_node.jobs import JobService
from dicom_node.scp import Node
from inference.model.card import CARD_FILE
from storage.models import Delivery, Instance, Job, Series, SeriesCompletion
from tests.conftest import TEST_PEERS
from tests.localpeers import free_port, storescu, write_node_config
from tests.synthetic import axial_positions, write_slices, write_toy_ct

EPOCH = datetime(2000, 1, 1)
NO_WEIGHTS = "is not a checkpoint"  # what loading the no_model fixture's folder says


def jobs_toml(model, wait=5.0, extra_jobs="", modalities=("CT",), tail="") -> str:
    return (f"\n[jobs]\ncompletion_wait_s = {wait}\nretry_delay_s = 30\nmax_attempts = 2\npoll_s = 0.2\n{extra_jobs}\n"
            f'[[routes]]\nname = "ct"\nmodalities = {json.dumps(list(modalities))}\nmodel = "{model}"\n{tail}\n')


@pytest.fixture
def node_factory(tmp_path):
    started = []

    def start(model, peers=TEST_PEERS, **options):
        port = free_port()
        config = load_config(write_node_config(tmp_path / "node", port, peers, extra=jobs_toml(model, **options)))
        node = Node(config)
        node.start()
        started.append(node)
        return node, config

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def no_model(tmp_path):
    """A route's model folder that passes the configuration check but cannot load: its weights are gone."""
    folder = tmp_path / "weights-gone"
    folder.mkdir()
    (folder / CARD_FILE).write_text("{}")
    return folder


def send(node, paths):
    result = storescu(node.config.node.port, paths, "DICOM_NODE")
    assert result.returncode == 0, result.stderr


def last_arrival(node, series_uid) -> datetime:
    with node.sessions() as session:
        return session.scalar(select(Series.last_received_at).where(Series.series_instance_uid == series_uid))


def detect(service, now, quiet_since=EPOCH):
    with service.sessions() as session, session.begin():
        return detect_complete(session, service.config, now, quiet_since)


def test_a_series_is_complete_after_the_quiet_time_and_routes_decide_what_is_interpreted(node_factory, no_model, tmp_path):
    node, config = node_factory(no_model)
    ct = write_slices(tmp_path / "ct", axial_positions(4))
    mr = write_slices(tmp_path / "mr", axial_positions(3), modality="MR")
    send(node, ct + mr)
    service = JobService(config)
    last = max(last_arrival(node, dcmread(p).SeriesInstanceUID) for p in (ct[0], mr[0]))

    with service.reader() as session:  # the read-only look the periodic check takes first
        assert not anything_to_judge(session, config, last + timedelta(seconds=4), EPOCH)
        assert anything_to_judge(session, config, last + timedelta(seconds=6), EPOCH)
    assert detect(service, last + timedelta(seconds=4)) == []  # 5 s of quiet needed
    decisions = detect(service, last + timedelta(seconds=6))
    assert sorted(d.outcome for d in decisions) == ["queued", "stored only"]
    assert detect(service, last + timedelta(seconds=60)) == []  # judged once
    with service.sessions() as session:
        [job] = session.scalars(select(Job)).all()
        assert (job.status, job.run, job.route, job.series.modality) == ("queued", 1, "ct", "CT")


def test_after_a_restart_senders_get_the_full_wait_to_resume(node_factory, no_model, tmp_path):
    node, config = node_factory(no_model)
    ct = write_slices(tmp_path / "ct", axial_positions(3))
    send(node, ct)
    service = JobService(config)
    last = last_arrival(node, dcmread(ct[0]).SeriesInstanceUID)
    restarted = last + timedelta(seconds=30)
    assert detect(service, restarted + timedelta(seconds=4), quiet_since=restarted) == []
    assert [d.outcome for d in detect(service, restarted + timedelta(seconds=6), quiet_since=restarted)] == ["queued"]


def test_a_peer_can_have_its_own_wait(node_factory, no_model, tmp_path):
    peers = [dict(TEST_PEERS[0], completion_wait_s=120)] + TEST_PEERS[1:]
    node, config = node_factory(no_model, peers=peers)
    ct = write_slices(tmp_path / "ct", axial_positions(3))
    send(node, ct)
    service = JobService(config)
    last = last_arrival(node, dcmread(ct[0]).SeriesInstanceUID)
    assert detect(service, last + timedelta(seconds=60)) == []
    assert len(detect(service, last + timedelta(seconds=121))) == 1


@pytest.mark.parametrize("policy", [LateArrival.RERUN, LateArrival.IGNORE])
def test_a_late_arrival_reopens_the_series(node_factory, no_model, tmp_path, policy):
    node, config = node_factory(no_model, extra_jobs=f'on_late_arrival = "{policy.value}"')
    series_uid = "1.2.826.0.1.3680043.8.498.77"
    send(node, write_slices(tmp_path / "a", axial_positions(3), series_uid=series_uid, frame_of_reference="1.2.3"))
    service = JobService(config)
    detect(service, last_arrival(node, series_uid) + timedelta(seconds=6))
    with service.sessions() as session, session.begin():
        session.scalars(select(Job)).one().status = "done"

    late = write_slices(tmp_path / "b", axial_positions(1, start=-4.0), series_uid=series_uid, frame_of_reference="1.2.3")
    send(node, late)
    decisions = detect(service, last_arrival(node, series_uid) + timedelta(seconds=6))
    with service.sessions() as session:
        runs = [(j.run, j.status) for j in session.scalars(select(Job).order_by(Job.run))]
        completion = session.scalars(select(SeriesCompletion)).one()
    if policy is LateArrival.RERUN:
        assert [d.outcome for d in decisions] == ["queued"] and runs == [(1, "done"), (2, "queued")]
    else:
        assert [d.outcome for d in decisions] == ["late arrival ignored"] and runs == [(1, "done")]
    assert completion.handled_through == last_arrival(node, series_uid)


def queued_job(node_factory, model, tmp_path, positions):
    """A node holding one CT series, and the job its completion queued."""
    node, config = node_factory(model)
    send(node, write_slices(tmp_path / "ct", positions))
    service = JobService(config)
    [decision] = detect(service, datetime.utcnow() + timedelta(seconds=10))
    return config, service, decision


def test_a_failing_job_is_retried_with_backoff_then_failed_with_its_reason(node_factory, no_model, tmp_path, capsys):
    config, service, decision = queued_job(node_factory, no_model, tmp_path, axial_positions(3))

    service.run(decision.job_id)
    with service.sessions() as session:
        job = session.get(Job, decision.job_id)
        assert (job.status, job.attempts) == ("queued", 1) and NO_WEIGHTS in job.error
        assert timedelta(seconds=25) < job.next_attempt_at - datetime.utcnow() <= timedelta(seconds=30)
    service.run(decision.job_id)
    with service.sessions() as session:
        job = session.get(Job, decision.job_id)
        assert (job.status, job.attempts) == ("failed", 2) and job.finished_at is not None

    assert main(["status", "--config", str(config.source)]) == 0
    out = capsys.readouterr().out
    assert "1 failed" in out and NO_WEIGHTS in out and f"dicom-node retry {decision.job_id}" in out
    assert main(["retry", str(decision.job_id), "--config", str(config.source)]) == 0
    with service.sessions() as session:
        job = session.get(Job, decision.job_id)
        assert (job.status, job.attempts, job.error) == ("queued", 0, "")


def test_a_series_that_cannot_be_sliced_fails_at_once_with_the_reason(node_factory, no_model, tmp_path):
    tilted = [[-10.0, -20.0 + 0.5 * k, -10.0 + 2.0 * k] for k in range(5)]
    config, service, decision = queued_job(node_factory, no_model, tmp_path, tilted)
    service.run(decision.job_id)
    with service.sessions() as session:
        job = session.get(Job, decision.job_id)
        assert (job.status, job.attempts) == ("failed", 1) and "gantry tilt" in job.error


def test_a_job_left_running_by_a_crash_is_queued_again_at_start(node_factory, no_model, tmp_path):
    config, service, decision = queued_job(node_factory, no_model, tmp_path, axial_positions(3))
    with service.sessions() as session, session.begin():
        job = session.get(Job, decision.job_id)
        job.status, job.attempts = "running", 1
    restarted = JobService(dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, poll_s=60.0)))
    restarted.start()
    try:
        with restarted.sessions() as session:
            job = session.get(Job, decision.job_id)
            assert (job.status, job.attempts) == ("queued", 1) and "interrupted" in job.error
    finally:
        restarted.stop()


def test_the_scheduler_interprets_a_routed_series_stores_the_results_and_queues_their_delivery(node_factory, trained_checkpoint, tmp_path):
    peers = TEST_PEERS + [{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "allow": ["destination"]}]
    node, config = node_factory(trained_checkpoint, peers=peers, wait=1.0)
    service = JobService(config)
    service.start()
    try:
        source = write_toy_ct(tmp_path / "toy", "-FF-")
        send(node, source)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with service.sessions() as session:
                job = session.scalars(select(Job)).first()
                if job is not None and job.status in ("done", "failed"):
                    break
            time.sleep(0.2)
    finally:
        service.stop()
    assert job.status == "done", job.error
    summary = json.loads(job.summary)
    assert sorted(l["label"] for l in summary["lesions"]) == ["Kidney tumor", "Lung nodule"]
    with node.sessions() as session:
        outputs = {i.series.modality: i for i in session.scalars(select(Instance).join(Series).where(Series.modality.in_(["SEG", "SR"])))}
        deliveries = session.scalars(select(Delivery)).all()
    assert set(outputs) == {"SEG", "SR"} and all(i.calling_ae_title == "DICOM_NODE" for i in outputs.values())
    assert {d.sop_instance_uid for d in deliveries} == {summary["seg_sop_instance_uid"], summary["sr_sop_instance_uid"]}
    assert {d.destination for d in deliveries} == {"PACS"}
    seg = dcmread(config.storage.path / outputs["SEG"].path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dcmread(source[0]).SeriesInstanceUID


def test_scheduled_training_is_a_cron_job_that_registers_and_never_activates(node_factory, no_model, tmp_path, caplog):
    node, config = node_factory(no_model, tail='\n[training]\nschedule = "30 2 * * *"\nsteps = 5\n')
    service = JobService(dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, poll_s=60.0)))
    service.start()
    try:
        job = service.scheduler.get_job("scheduled-training")
        assert job is not None and job.next_run_time.hour == 2 and job.next_run_time.minute == 30
    finally:
        service.stop()
    assert service.train() == 2  # nothing labelled in the store yet: no model, and nothing activated
    assert config.training.start_from == "active"  # by default the nightly run fine-tunes the model in use
    elsewhere = JobService(dataclasses.replace(config, training=dataclasses.replace(config.training, start_from="v-gone")))
    assert elsewhere.train() == 2 and "--start-from: no model v-gone" in caplog.text  # it starts from what is configured


def test_a_failing_job_waits_longer_each_time_but_never_more_than_a_day():
    from dicom_node.jobs import MAX_RETRY_DELAY, retry_delay

    assert [retry_delay(60, attempt).total_seconds() for attempt in (1, 2, 3)] == [60, 120, 240]
    assert retry_delay(60, 50) == MAX_RETRY_DELAY  # a large max_attempts overflowed timedelta at about 33
