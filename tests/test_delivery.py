"""Delivery of SEG and SR to a real Orthanc: retried while it is down, completed after, one copy on resend."""

from datetime import timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.outbox import FAILED, PENDING, SENT, RetryPolicy, deliver_due, enqueue, resend
from dicom_node.outputs.seg import build_seg
from dicom_node.outputs.sr import build_sr
from inference.engine import Assessment, SeriesResult
from storage.database import make_engine, make_sessionmaker
from storage.models import Delivery
from tests.localpeers import orthanc, orthanc_find, storescu, write_node_config
from tests.test_outputs_seg import ALGORITHM, series_with_lesions  # noqa: F401 - fixture

NOW = RetryPolicy(first_delay_s=0.0, give_up_after_s=0.0, min_attempts=3, timeout_s=5.0)  # dead letter at the 3rd failure


@pytest.fixture
def pacs(tmp_path):
    with orthanc(tmp_path / "orthanc") as peer:
        yield peer


def outbox_setup(tmp_path, pacs, sources, volume, lesions, paths_folder):
    config = load_config(write_node_config(tmp_path / "node", 11112, [
        {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port, "allow": ["destination"]}]))
    storage = config.storage.path
    storage.mkdir(parents=True, exist_ok=True)
    seg = build_seg(sources, volume, lesions, ALGORITHM)
    sr = build_sr(sources, volume, SeriesResult(Assessment.ASSESSED, "", lesions, ALGORITHM.version), seg, ALGORITHM)
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        ds.save_as(storage / name)
    return config, seg, sr


def copies_in(pacs, sop_uid: str) -> int:
    return len(orthanc_find(pacs, "Instance", {"SOPInstanceUID": sop_uid}))


def test_seg_and_sr_reach_orthanc_under_the_source_study_survive_an_outage_and_stay_single(series_with_lesions, pacs):
    sources, volume, lesions, tmp_path = series_with_lesions
    assert storescu(pacs.port, sorted((tmp_path / "ct").glob("*.dcm")), "ORTHANC").returncode == 0
    config, seg, sr = outbox_setup(tmp_path, pacs, sources, volume, lesions, tmp_path)
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    ids = [enqueue(sessions, ds.SOPInstanceUID, ds.SOPClassUID, name, "ORTHANC") for name, ds in (("seg.dcm", seg), ("sr.dcm", sr))]

    pacs.stop()  # the PACS is down: attempts fail and are recorded, items stay pending
    assert deliver_due(config, sessions, config.storage.path, NOW) == {"sent": 0, "failed": 2}
    with sessions() as session:
        rows = session.scalars(select(Delivery)).all()
        assert [(r.status, r.attempts) for r in rows] == [(PENDING, 1), (PENDING, 1)]
        assert "no association" in rows[0].last_error and len(rows[0].history) == 1

    pacs.restart()  # and the node restarts: a new engine reads the same outbox
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    assert deliver_due(config, sessions, config.storage.path, NOW) == {"sent": 2, "failed": 0}
    study = orthanc_find(pacs, "Study", {"StudyInstanceUID": str(sources[0].StudyInstanceUID)})
    assert len(study) == 1
    modalities = {s["MainDicomTags"].get("Modality") for s in orthanc_find(pacs, "Series", {"StudyInstanceUID": str(sources[0].StudyInstanceUID)})}
    assert {"CT", "SEG", "SR"} <= modalities
    referenced = dcmread(config.storage.path / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == volume.series_instance_uid

    assert resend(sessions, ids[0]) and deliver_due(config, sessions, config.storage.path, NOW)["sent"] == 1
    assert copies_in(pacs, seg.SOPInstanceUID) == 1 and copies_in(pacs, sr.SOPInstanceUID) == 1
    with sessions() as session:
        assert [r.status for r in session.scalars(select(Delivery))] == [SENT, SENT]


def test_unreachable_destination_becomes_a_dead_letter_without_blocking_others(series_with_lesions, pacs):
    sources, volume, lesions, tmp_path = series_with_lesions
    config, seg, sr = outbox_setup(tmp_path, pacs, sources, volume, lesions, tmp_path)
    text = config.source.read_text() + '\n[[peers]]\nae_title = "DOWN"\nhost = "127.0.0.1"\nport = 9\nallow = ["destination"]\n'
    config.source.write_text(text)
    config = load_config(config.source)
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    enqueue(sessions, seg.SOPInstanceUID, seg.SOPClassUID, "seg.dcm", "DOWN")
    enqueue(sessions, sr.SOPInstanceUID, sr.SOPClassUID, "sr.dcm", "ORTHANC")
    for _ in range(3):
        deliver_due(config, sessions, config.storage.path, NOW)
    with sessions() as session:
        status = {r.destination: (r.status, r.attempts) for r in session.scalars(select(Delivery))}
    assert status == {"DOWN": (FAILED, 3), "ORTHANC": (SENT, 1)}
    assert RetryPolicy().delay(1) == timedelta(seconds=30) and RetryPolicy().delay(10) == timedelta(seconds=600)


def test_status_lists_failed_deliveries_and_resend_requeues(series_with_lesions, pacs, capsys):
    from dicom_node.cli import main

    sources, volume, lesions, tmp_path = series_with_lesions
    config, seg, _ = outbox_setup(tmp_path, pacs, sources, volume, lesions, tmp_path)
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    delivery = enqueue(sessions, seg.SOPInstanceUID, seg.SOPClassUID, "seg.dcm", "NOWHERE")
    for _ in range(3):
        deliver_due(config, sessions, config.storage.path, NOW)
    assert main(["status", "--config", str(config.source)]) == 0
    out = capsys.readouterr().out
    assert "deliveries 0 pending, 0 sent, 1 failed" in out and f"dicom-node resend {delivery}" in out
    assert main(["resend", str(delivery), "--config", str(config.source)]) == 0
    assert main(["resend", "999", "--config", str(config.source)]) == 2
    with sessions() as session:
        assert session.get(Delivery, delivery).status == PENDING


def test_destinations_and_their_results_come_from_the_config(tmp_path):
    from dicom_node.config import ConfigError, parse_config

    config = parse_config({"peers": [{"ae_title": "PACS", "host": "pacs", "allow": ["destination"], "results": ["sr"]},
                                     {"ae_title": "VIEW", "host": "view", "allow": ["destination"]}, {"ae_title": "MOD"}]}, tmp_path)
    assert [p.ae_title for p in config.destinations("seg")] == ["VIEW"]
    assert [p.ae_title for p in config.destinations("sr")] == ["PACS", "VIEW"]
    with pytest.raises(ConfigError, match=r"peers\[0\]\.results"):
        parse_config({"peers": [{"ae_title": "PACS", "results": ["pdf"]}]}, tmp_path)
