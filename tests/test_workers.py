"""Several worker processes on one port, under the supervisor (`dicom-node serve` with workers > 1)."""

import os
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import TEST_PEERS
from tests.dcmtk import echoscu, storescu_verbose
from tests.localpeers import free_port, start_node, write_node_config


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture
def supervised(tmp_path):
    port = free_port()
    config = write_node_config(tmp_path, port, TEST_PEERS, extra="")
    text = config.read_text().replace("[node]\n", "[node]\nworkers = 3\n", 1)
    config.write_text(text)
    node = start_node(config, port, tmp_path)
    deadline = time.monotonic() + 20
    while len(children(node.process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield node
    node.stop()


@pytest.mark.slow
def test_concurrent_associations_across_workers(supervised, ct_series, tmp_path):
    assert len(children(supervised.process.pid)) == 3
    outcomes = []
    threads = [threading.Thread(target=lambda c=ct_series[i::4]: outcomes.append(storescu_verbose(supervised.port, c)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(o.succeeded()) for o in outcomes) == len(ct_series)
    stored = list((tmp_path / "data").glob("*/*/*.dcm"))
    assert len(stored) == len(ct_series)


@pytest.mark.slow
def test_a_dead_worker_is_replaced(supervised):
    victim = children(supervised.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (victim in children(supervised.process.pid) or len(children(supervised.process.pid)) < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim not in children(supervised.process.pid) and len(children(supervised.process.pid)) == 3
    assert all(echoscu(supervised.port).returncode == 0 for _ in range(6))


@pytest.mark.slow
def test_workers_die_with_a_killed_supervisor(supervised):
    workers = children(supervised.process.pid)
    supervised.process.send_signal(signal.SIGKILL)
    supervised.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z" for w in workers) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert echoscu(supervised.port).returncode != 0
