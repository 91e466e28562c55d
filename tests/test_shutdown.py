"""Stopping the node: SIGTERM (systemd's stop, Ctrl-C) ends it cleanly whatever it is doing."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_PEERS
from tests.localpeers import PEER_ENV, free_port, wait_for_port, write_node_config

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
COMPILERS = {"g++", "c++", "gcc", "cc1plus"}


def descendant_commands(pid: int) -> set[str]:
    """The command names of every process below ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while listed
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        child = int(stat.parent.name)
        names[child] = name
        parents.setdefault(int(rest[1]), []).append(child)
    found, todo = set(), list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.add(names[child])
        todo.extend(parents.get(child, []))
    return found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile needs a C++ compiler (make install brings g++)")
def test_sigterm_while_the_encoder_compiles_stops_the_node_cleanly(tmp_path):
    """The shipped config compiles the fp32 encoder while the model loads (about a minute). A stop signal to
    the node's process group in that minute (as systemd and a terminal send it) kills the compiler and must
    still end the node with status 0: the job service waits for its model loader instead of letting the
    interpreter exit under a thread that is inside torch (which aborted: "terminate called without an active
    exception", status -6)."""
    port = free_port()
    extra = ('\n[jobs]\ndevice = "cpu"\nencoder_precision = "fp32"\ncompile_encoder = true\n\n'
             f'[[routes]]\nname = "all"\nmodalities = ["CT", "MR"]\nmodel = "{SHIPPED_MODEL}"\n')
    config = write_node_config(tmp_path, port, TEST_PEERS, extra=extra)
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV, start_new_session=True)
    try:
        wait_for_port(port, timeout_s=60, process=node)
        deadline = time.monotonic() + 60
        while "loading model from" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and node.poll() is None, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        while not COMPILERS & descendant_commands(node.pid):  # the compile is under way
            text = log_path.read_text(errors="replace")
            if " loaded in " in text:
                pytest.skip("the model loaded without a C++ compiler running (compiling failed at once?)")
            assert time.monotonic() < deadline + 120 and node.poll() is None, text[-3000:]
            time.sleep(0.1)
        os.killpg(node.pid, signal.SIGTERM)
        status = node.wait(timeout=180)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    text = log_path.read_text(errors="replace")
    assert "terminate called" not in text
    assert status == 0, text[-3000:]
    assert "waiting for the model load to finish" in text
