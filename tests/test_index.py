"""Index rules that C-FIND and the receiver rely on (regressions found in review)."""

import dataclasses
from datetime import datetime, timezone

from sqlalchemy import func, select

from storage.database import make_engine, make_sessionmaker
from storage.files import FileStore
from storage.index import AddResult, IndexWriter, InstanceRecord
from storage.models import Instance, Patient, Series, Study


def record(sop: str, series: str, study: str, patient_id: str = "", name: str = "") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
                          study_instance_uid=study, transfer_syntax_uid="1.2.840.10008.1.2.1",
                          path=f"{study}/{series}/{sop}.dcm", size_bytes=1, received_at=datetime.now(timezone.utc),
                          patient_id=patient_id, patient_name=name)


def writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    return IndexWriter(make_engine(url, writer=True), FileStore(tmp_path / "files")), make_sessionmaker(make_engine(url))


def counts(sessions):
    with sessions() as session:
        return [session.scalar(select(func.count(m.id))) for m in (Patient, Study, Series, Instance)]


def test_conflicting_instance_leaves_no_rows(tmp_path):
    index, sessions = writer(tmp_path)
    assert index.commit(record("1.1", "2.1", "3.1", "P1", "A^B"), None) is AddResult.NEW
    assert index.commit(record("1.1", "2.2", "3.2", "P2", "C^D"), None) is AddResult.CONFLICT
    assert counts(sessions) == [1, 1, 1, 1]
    assert index.commit(record("1.1", "2.1", "3.1", "P1", "A^B"), None) is AddResult.DUPLICATE


def test_patients_with_empty_or_shared_ids_are_not_merged(tmp_path):
    index, sessions = writer(tmp_path)
    index.commit(record("1.1", "2.1", "3.1", "", "ALICE"), None)
    index.commit(record("1.2", "2.2", "3.2", "", "CAROL"), None)
    index.commit(record("1.3", "2.3", "3.3", "", "ALICE"), None)
    with sessions() as session:
        names = dict(session.execute(select(Study.study_instance_uid, Patient.patient_name).join(Patient)).all())
    assert names == {"3.1": "ALICE", "3.2": "CAROL", "3.3": "ALICE"}
    assert counts(sessions)[0] == 2


def test_a_number_beyond_any_stored_one_matches_nothing(tmp_path):
    """C-FIND InstanceNumber=111111111111111111111: SQLite cannot bind it (OverflowError), which failed the
    query with a traceback; nothing stored can equal it, so it matches nothing."""
    from storage.query import QueryLevel, find

    index, sessions = writer(tmp_path)
    index.commit(dataclasses.replace(record("1.1", "2.1", "3.1", "P1", "A^B"), instance_number=3), None)
    with sessions() as session:
        assert list(find(session, QueryLevel.IMAGE, {"InstanceNumber": "1" * 21, "SOPInstanceUID": ""})) == []
        assert [m["SOPInstanceUID"] for m in find(session, QueryLevel.IMAGE, {"InstanceNumber": "3", "SOPInstanceUID": ""})] == ["1.1"]
