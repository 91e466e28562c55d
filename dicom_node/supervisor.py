"""Several receiving processes on one port, supervised.

pynetdicom serves each association on a thread, and the GIL lets one process use about one core. With
``workers`` > 1 the node runs that many worker processes that all listen on the node's port
(SO_REUSEPORT; the kernel spreads new associations across them) and share the file store and the index
(SQLite serialises their commits; PostgreSQL takes them concurrently). The supervisor runs start-up
recovery once, starts the workers, restarts one that dies, and stops them all on SIGTERM or SIGINT.
Workers are killed with the supervisor if it is killed (PR_SET_PDEATHSIG), so no orphan keeps the port.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicom_node.config import NodeConfig

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
RESTART_DELAY_S = 2.0


def run_supervisor(config: NodeConfig, config_path: Path, verbose: bool) -> int:
    """Recover the store, run ``config.node.worker_count`` workers until a stop signal; returns the exit code."""
    from dicom_node.recovery import recover
    from storage.database import make_engine, make_sessionmaker
    from storage.files import FileStore
    from storage.index import IndexWriter

    engine, writer_engine = make_engine(config.storage.database_url), make_engine(config.storage.database_url, writer=True)
    files = FileStore(config.storage.path)
    writer = IndexWriter(writer_engine, files)
    recover(files, make_sessionmaker(engine), writer)
    writer.close()
    writer_engine.dispose()
    engine.dispose()

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    command = [sys.executable, "-m", "dicom_node.cli", "serve", "--worker", "--config", str(config_path)]
    command += ["--verbose"] if verbose else []
    workers = [_start(command) for _ in range(config.node.worker_count)]
    logger.info("%s: %d worker processes on %s:%d", config.node.ae_title, len(workers), config.node.host, config.node.port)
    while not stopping.wait(0.5):
        for i, worker in enumerate(workers):
            if worker.poll() is not None:
                logger.error("worker %d exited with %s; restarting it in %.0f s", worker.pid, worker.returncode, RESTART_DELAY_S)
                time.sleep(RESTART_DELAY_S)
                workers[i] = _start(command)
    logger.info("shutting down %d workers", len(workers))
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
