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
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 15.0, 60.0)  # after 1, 2, ... consecutive quick deaths; reset by a long run
HEALTHY_AFTER_S = 60.0
STALE_TEMPORARY_S = 300.0  # a temporary this old is no live worker's: each is written and renamed in milliseconds


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
    writer_engine.dispose()
    from dicom_node.outbox import DeliveryLoop

    from dicom_node.jobs import JobService

    delivery = DeliveryLoop(config, make_sessionmaker(engine))
    delivery.start()
    jobs = JobService(config, on_results=delivery.wake)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    command = [sys.executable, "-m", "dicom_node.cli", "serve", "--worker", "--config", str(config_path)]
    command += ["--verbose"] if verbose else []
    workers = [_start(command) for _ in range(config.node.worker_count)]
    started = [time.monotonic()] * len(workers)
    # The completion clock starts once the node can receive: a sender cut off by a restart gets the whole
    # wait to resume, however long the workers took to start.
    _wait_until_listening(config, stopping)
    jobs.start()
    failures = [0] * len(workers)
    due: dict[int, float] = {}  # worker slot -> when to restart it
    logger.info("%s: %d worker processes on %s:%d", config.node.ae_title, len(workers), config.node.host, config.node.port)
    while not stopping.wait(0.5):
        now = time.monotonic()
        for i, worker in enumerate(workers):
            if i in due:
                if now >= due[i]:
                    # what the dead worker was writing was never acknowledged; the live workers' are in flight
                    files.remove_stale_temporaries(older_than_s=STALE_TEMPORARY_S)
                    workers[i], started[i] = _start(command), now
                    del due[i]
            elif worker.poll() is not None:
                failures[i] = 0 if now - started[i] > HEALTHY_AFTER_S else failures[i] + 1
                delay = RESTART_DELAYS_S[min(failures[i], len(RESTART_DELAYS_S) - 1)]
                logger.error("worker %d exited with %s; restarting it in %.0f s", worker.pid, worker.returncode, delay)
                due[i] = now + delay
    jobs.stop()
    delivery.stop()
    engine.dispose()
    logger.info("shutting down %d workers", len(workers))
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def _wait_until_listening(config: NodeConfig, stopping: threading.Event, timeout_s: float = 60.0) -> None:
    """Until a worker listens on the node's port (read from /proc, so no stray connection reaches a worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stopping.is_set():
        if _listening(config.node.port):
            return
        time.sleep(0.1)
    logger.warning("no worker listening after %.0f s; starting the job service anyway", timeout_s)


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # state LISTEN
                return True
    return False


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
