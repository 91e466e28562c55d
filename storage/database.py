"""Engine and session set-up: SQLite in WAL mode by default, any SQLAlchemy URL (PostgreSQL) otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Base


def make_engine(url: str, writer: bool = False) -> Engine:
    """Create the engine and the schema.

    SQLite gets WAL (readers never block the writer), ``synchronous=FULL`` (a commit is on disk before it
    returns: the node acknowledges a C-STORE only after its row is committed) and a busy timeout so that the
    CLI can read while the node writes. A ``writer`` engine starts every transaction with BEGIN IMMEDIATE:
    with several worker processes, a transaction that read first and then wanted to write could otherwise
    fail at once (SQLITE_BUSY_SNAPSHOT) instead of waiting its turn.
    """
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}} if is_sqlite else {"pool_pre_ping": True}
    # hide_parameters: database errors must not carry patient names and IDs into the logs.
    engine = create_engine(url, hide_parameters=True, **kwargs)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        if writer:
            event.listen(engine, "connect", _no_implicit_begin)
            event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    Base.metadata.create_all(engine)
    return engine


def missing_database(url: str) -> Path | None:
    """The SQLite file ``url`` names where it does not exist yet (None for a server database: it cannot tell).
    Read-only commands ask first: ``make_engine`` would create an empty index, and a node that never ran
    would look like one that received nothing."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def opened(url: str, writer: bool = False) -> Iterator[sessionmaker[Session]]:
    """Sessions on the database for one command-line command, its engine disposed after (the node keeps its
    own engine for its lifetime)."""
    engine = make_engine(url, writer=writer)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _no_implicit_begin(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event issues BEGIN IMMEDIATE instead


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # PS3.4 C.2.2.2.4: only person names match case-insensitively (C-FIND lowers both sides for those).
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()
    # SQLite's lower() folds ASCII only; C-FIND lowers the query with Python's str.lower, as PostgreSQL does.
    dbapi_connection.create_function("lower", 1, _lower, deterministic=True)


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value
