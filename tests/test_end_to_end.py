"""End to end with a real Orthanc as the PACS: Orthanc sends a study, the node interprets it and sends the
SEG and the SR back; a node killed during ingest or during the job still delivers exactly one of each."""

import io
import json
import time
import warnings

import pytest
from pydicom import dcmread
from sqlalchemy import select

from storage.database import make_engine, make_sessionmaker
from storage.models import Delivery, Job
from tests.localpeers import (OrthancError, free_port, orthanc, orthanc_file, orthanc_find, orthanc_post, start_node,
                              storescu, write_node_config)
from tests.synthetic import write_toy_ct

pytestmark = pytest.mark.slow


@pytest.fixture
def site(tmp_path, trained_checkpoint):
    """Orthanc (the PACS) and a node configuration that takes CT from it and sends results back to it."""
    node_port = free_port()
    with orthanc(tmp_path / "orthanc", modalities={"NODE": ["DICOM_NODE", "127.0.0.1", node_port]}) as pacs:
        routes = (f"\n[jobs]\ncompletion_wait_s = 3\npoll_s = 0.5\n\n"
                  f'[[routes]]\nname = "ct"\nmodalities = ["CT"]\nmodel = "{trained_checkpoint}"\n')
        peers = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port,
                  "allow": ["echo", "store", "find", "destination"]},
                 {"ae_title": "STORESCU", "host": "127.0.0.1", "allow": ["store"]}]
        config = write_node_config(tmp_path / "node", node_port, peers, extra=routes)
        yield pacs, config, node_port, tmp_path
    # pytest shows this only for a failed test: what the node and the PACS logged, to tell why
    for log in (tmp_path / "node" / "node.log", tmp_path / "node" / "restart.log", tmp_path / "orthanc" / "orthanc.log"):
        if log.is_file():
            print(f"--- last lines of {log.name}:", *log.read_text(errors="replace").splitlines()[-40:], sep="\n")


def upload_study(pacs, paths) -> str:
    """Put the files into Orthanc (as a modality would) and return Orthanc's study id."""
    return [orthanc_post(pacs, "/instances", p.read_bytes()) for p in paths][0]["ParentStudy"]


def send_study_to_node(pacs, study_id, attempts: int = 1) -> None:
    """Orthanc sends the study to the node. With ``attempts`` > 1 it sends again after a failed send, as a
    PACS's router does; each failure is reported as a warning with Orthanc's reason."""
    for attempt in range(1, attempts + 1):
        try:
            orthanc_post(pacs, "/modalities/NODE/store", {"Resources": [study_id], "Synchronous": True})
            return
        except OrthancError as exc:
            if attempt == attempts:
                raise
            warnings.warn(f"send {attempt} of the study to the node failed, sending again: {exc}")
            time.sleep(2)


def results_in(pacs, study_uid, modality) -> list:
    series = orthanc_find(pacs, "Series", {"StudyInstanceUID": study_uid, "Modality": modality})
    return [dcmread(io.BytesIO(orthanc_file(pacs, i))) for s in series for i in s["Instances"]]


def wait_for_results(pacs, study_uid, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        segs, srs = results_in(pacs, study_uid, "SEG"), results_in(pacs, study_uid, "SR")
        if segs and srs:
            return segs, srs
        time.sleep(0.5)
    raise TimeoutError("no SEG and SR reached Orthanc")


def jobs_of(config):
    engine = make_engine(f"sqlite:///{config.parent / 'data' / 'index.sqlite'}")
    with make_sessionmaker(engine)() as session:
        jobs = [(j.status, j.run, j.attempts) for j in session.scalars(select(Job))]
        deliveries = [(d.destination, d.status) for d in session.scalars(select(Delivery))]
    engine.dispose()
    return jobs, deliveries


def test_orthanc_sends_a_study_and_gets_back_a_seg_on_its_series_and_an_sr_with_the_findings(site):
    pacs, config, port, tmp_path = site
    source = write_toy_ct(tmp_path / "toy", "-FFF--")
    study_uid, series_uid = (str(getattr(dcmread(source[0]), k)) for k in ("StudyInstanceUID", "SeriesInstanceUID"))
    node = start_node(config, port, tmp_path / "node")
    try:
        send_study_to_node(pacs, upload_study(pacs, source))
        [seg], [sr] = wait_for_results(pacs, study_uid)
    finally:
        node.stop()
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    source_uids = {str(dcmread(p).SOPInstanceUID) for p in source}
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == source_uids
    assert sorted(str(s.SegmentLabel) for s in seg.SegmentSequence) == ["Kidney tumor 1", "Lung nodule 1"]
    report = json.dumps(sr.to_json_dict())
    assert "Lung nodule" in report and "Kidney tumor" in report and seg.SOPInstanceUID in report
    assert sr.StudyInstanceUID == study_uid


def test_a_node_killed_during_ingest_and_during_its_job_delivers_one_seg_and_one_sr(site):
    pacs, config, port, tmp_path = site
    source = write_toy_ct(tmp_path / "toy", "--FFF--")
    study_uid = str(dcmread(source[0]).StudyInstanceUID)
    study_id = upload_study(pacs, source)
    node = start_node(config, port, tmp_path / "node")

    # 1. Killed during ingest: the series is half there when the node dies; the PACS sends the study again.
    assert storescu(port, source[:3], "DICOM_NODE").returncode == 0
    node.stop(kill=True)
    node.restart()
    send_study_to_node(pacs, study_id, attempts=3)

    # 2. Killed during the job: as soon as the interpretation is running.
    deadline = time.monotonic() + 120
    while jobs_of(config)[0][:1] != [("running", 1, 1)]:
        assert time.monotonic() < deadline, f"no job started: {jobs_of(config)}"
        time.sleep(0.1)
    node.stop(kill=True)
    node.restart()
    try:
        [seg], [sr] = wait_for_results(pacs, study_uid)
        deadline = time.monotonic() + 60
        while any(status != "sent" for _, status in jobs_of(config)[1]) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # anything sent twice would have landed by now
        assert len(results_in(pacs, study_uid, "SEG")) == 1 and len(results_in(pacs, study_uid, "SR")) == 1
    finally:
        node.stop()
    jobs, deliveries = jobs_of(config)
    assert jobs == [("done", 1, 2)]  # one run, two attempts: the killed one and the one after the restart
    assert sorted(deliveries) == [("ORTHANC", "sent"), ("ORTHANC", "sent")]
