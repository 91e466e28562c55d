"""A real, throwaway PostgreSQL server for the tests that must hold on PostgreSQL too (a site's larger index).

`make install` installs the Debian `postgresql` package and `psycopg`; the server runs from its own data folder
on a free loopback port, as `nobody` when the tests run as root (initdb refuses root), and is stopped at the end.
TEST_POSTGRESQL_URL, where set, names an existing scratch database to use instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_USER = "nobody"


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (the Debian package `postgresql`; `make install` installs it)")
    return Path(found[-1]).parent


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", _USER, "--", *command] if os.geteuid() == 0 else command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[str]:
    """The URL of a database on a PostgreSQL server started for this test session."""
    if url := os.environ.get("TEST_POSTGRESQL_URL"):
        yield url
        return
    bin_dir = _binaries()
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    root.chmod(0o755)  # the server user must reach its data folder
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, _USER)
    port = _free_port()
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                    "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]), check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                                    "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
