"""Index writes from several worker processes and C-FIND matching rules (regressions found in review).

Every test runs on SQLite and on a real PostgreSQL server (`tests/postgres.py`).
"""

import dataclasses
import threading
import time
from datetime import timedelta
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from storage.database import make_engine, make_sessionmaker
from storage.files import FileStore
from storage.index import AddResult, IndexWriter, InstanceInserter, InstanceRecord
from storage.models import Base, Instance, Patient, Series, Study
from storage.query import QueryLevel, find
from tests.postgres import postgresql_server  # noqa: F401 - a fixture
from tests.test_index import record


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite'}"
        return
    url = request.getfixturevalue("postgresql_server")
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    yield url


def store(url: str, tmp_path, *records: InstanceRecord) -> None:
    engine = make_engine(url, writer=True)
    index = IndexWriter(engine, FileStore(tmp_path / "files"))
    for r in records:
        assert index.commit(r, None) is AddResult.NEW
    engine.dispose()


def studies(url: str, identifier: dict[str, str]) -> list[str]:
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        found = [m["StudyInstanceUID"] for m in find(session, QueryLevel.STUDY, {**identifier, "StudyInstanceUID": ""})]
    engine.dispose()
    return found


def wait_until_blocked(engine: Engine) -> None:
    """On PostgreSQL, wait until another session waits on a row lock (SQLite's writers queue on BEGIN)."""
    if engine.dialect.name != "postgresql":
        return
    deadline = time.monotonic() + 30
    with engine.connect() as connection:
        while not connection.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar():
            assert time.monotonic() < deadline, "the second writer never reached the first one's rows"
            time.sleep(0.05)


def test_two_worker_processes_create_the_same_new_series_at_once(database_url, tmp_path):
    """With node.workers > 1 each process has its own writer. Both storing the first instances of one new
    patient/study/series: the second found no rows (the first had not committed), inserted them too and, on
    PostgreSQL, failed on the unique key: a valid instance was answered 0xA700 and its file removed."""
    first_engine = make_engine(database_url, writer=True)
    second = IndexWriter(make_engine(database_url, writer=True), FileStore(tmp_path / "files"))
    outcome: list[AddResult | Exception] = []

    def second_worker() -> None:
        try:
            outcome.append(second.commit(record("1.2", "2.1", "3.1", "P1", "A^B"), None))
        except Exception as error:  # reported by the assertion below
            outcome.append(error)

    with first_engine.connect() as connection:
        transaction = connection.begin()
        assert InstanceInserter().add(connection, record("1.1", "2.1", "3.1", "P1", "A^B")) is AddResult.NEW
        thread = threading.Thread(target=second_worker)
        thread.start()
        wait_until_blocked(first_engine)
        transaction.commit()
    thread.join()
    assert outcome == [AddResult.NEW]
    with make_sessionmaker(first_engine)() as session:
        assert [session.scalar(select(func.count(m.id))) for m in (Patient, Study, Series, Instance)] == [1, 1, 1, 2]


def test_non_ascii_names_match_in_any_case(database_url, tmp_path):
    """SQLite's lower() folds ASCII only: PatientName=MÜLLER^HANS found nothing although it was stored."""
    store(database_url, tmp_path, record("1.1", "2.1", "3.1", "P1", "MÜLLER^HANS"),
          record("1.2", "2.2", "3.2", "P2", "Müller^Anna"), record("1.3", "2.3", "3.3", "P3", "BENCH^CT"))
    assert studies(database_url, {"PatientName": "MÜLLER^HANS"}) == ["3.1"]
    assert studies(database_url, {"PatientName": "müller^hans"}) == ["3.1"]
    assert studies(database_url, {"PatientName": "MÜLL*"}) == ["3.1", "3.2"]
    assert studies(database_url, {"PatientName": "mü?ler^anna"}) == ["3.2"]
    assert studies(database_url, {"PatientName": "bench*"}) == ["3.3"]


def test_non_name_keys_match_case_sensitively(database_url, tmp_path):
    """PS3.4 C.2.2.2.4: only person names match case-insensitively; SQLite's LIKE matched PatientID=ab* to AB123."""
    store(database_url, tmp_path, record("1.1", "2.1", "3.1", "AB123", "A^B"), record("1.2", "2.2", "3.2", "ab456", "C^D"))
    assert studies(database_url, {"PatientID": "ab*"}) == ["3.2"]
    assert studies(database_url, {"PatientID": "AB*"}) == ["3.1"]
    assert studies(database_url, {"PatientID": "?B123"}) == ["3.1"]
    assert studies(database_url, {"PatientID": "ab123"}) == []


def test_modalities_in_study_wildcards(database_url, tmp_path):
    """ModalitiesInStudy=* was compared literally (modality IN ('*')) and matched nothing."""
    ct = dataclasses.replace(record("1.1", "2.1", "3.1", "P1", "A^B"), modality="CT")
    seg = dataclasses.replace(record("1.2", "2.2", "3.1", "P1", "A^B"), modality="SEG")
    mr = dataclasses.replace(record("1.3", "2.3", "3.2", "P2", "C^D"), modality="MR")
    store(database_url, tmp_path, ct, seg, mr)
    assert studies(database_url, {"ModalitiesInStudy": "*"}) == ["3.1", "3.2"]
    assert studies(database_url, {"ModalitiesInStudy": "C*"}) == ["3.1"]
    assert studies(database_url, {"ModalitiesInStudy": "?R"}) == ["3.2"]
    assert studies(database_url, {"ModalitiesInStudy": "SEG\\MR"}) == ["3.1", "3.2"]
    assert studies(database_url, {"ModalitiesInStudy": "PT\\*"}) == ["3.1", "3.2"]
    assert studies(database_url, {"ModalitiesInStudy": "MR"}) == ["3.2"]
    assert studies(database_url, {"ModalitiesInStudy": "PT"}) == []
    assert studies(database_url, {"ModalitiesInStudy": "c*"}) == []


def test_each_new_instance_moves_its_series_last_arrival(database_url, tmp_path):
    """On PostgreSQL the INSERT's rowcount is -1 (SQLAlchemy reads its RETURNING row), so every new instance
    was taken for a duplicate: the series' last arrival stayed at its first and completion came too early."""
    first = record("1.1", "2.1", "3.1", "P1", "A^B")
    later = dataclasses.replace(record("1.2", "2.1", "3.1", "P1", "A^B"), received_at=first.received_at + timedelta(minutes=5))
    store(database_url, tmp_path, first, later)
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        last = session.scalar(select(Series.last_received_at))
    engine.dispose()
    assert last is not None and last.replace(tzinfo=None) == later.received_at.replace(tzinfo=None)
