"""Real peers on loopback for tests and benchmarks: the node itself, DCMTK storescp and Orthanc.

Each starts on free ports with its own temporary configuration and ``TCP_NODELAY=1`` in its environment
(DCMTK and Orthanc read it; without it Nagle and delayed ACKs make a series take 30x longer).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


class OrthancError(RuntimeError):
    """Orthanc's REST API answered an error; the message carries Orthanc's own explanation."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    """Whether something listens on the loopback port. A connection whose own (ephemeral) port is that very
    port is TCP's self-connect, which succeeds with no listener at all: it does not count."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as probe:
            return probe.getsockname()[1] != port
    except OSError:
        return False


def wait_for_port(port: int, timeout_s: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        if _accepts(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s} s")


def wait_until_closed(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _accepts(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"something still listens on port {port} after {timeout_s} s")


@dataclass
class RunningPeer:
    ae_title: str
    port: int
    process: subprocess.Popen
    folder: Path
    http_port: int = 0
    command: list[str] | None = None

    def restart(self) -> None:
        """Start the same program again on the same ports (after stop())."""
        assert self.command is not None
        # A killed node's workers die after their supervisor (PR_SET_PDEATHSIG), a moment later: until the old
        # ones are gone, a port check would find them and not the new node.
        wait_until_closed(self.port)
        log = open(self.folder / "restart.log", "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
        wait_for_port(self.port, timeout_s=60, process=self.process)
        if self.http_port:
            wait_for_port(self.http_port, timeout_s=60, process=self.process)

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_node_config(folder: Path, port: int, peers: list[dict], ae_title: str = "DICOM_NODE", extra: str = "") -> Path:
    """A config.toml for a node storing under ``folder`` (durability as in production)."""
    lines = [
        "[node]", f'ae_title = "{ae_title}"', 'host = "127.0.0.1"', f"port = {port}", 'log_level = "INFO"', "",
        "[storage]", 'path = "./data"', 'database_url = "sqlite:///./data/index.sqlite"', "min_free_mb = 16", "",
    ]
    for peer in peers:
        lines.append("[[peers]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in peer.items())
        lines.append("")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + extra)
    return path


@contextmanager
def node_process(folder: Path, peers: list[dict], port: int | None = None) -> Iterator[RunningPeer]:
    """``dicom-node serve`` as a separate process (what an admin runs), stopped on exit."""
    port = port or free_port()
    config = write_node_config(folder, port, peers)
    peer = start_node(config, port, folder)
    try:
        yield peer
    finally:
        peer.stop()


def start_node(config: Path, port: int, folder: Path) -> RunningPeer:
    log = open(folder / "node.log", "ab")
    command = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
    wait_for_port(port, process=process)
    return RunningPeer("DICOM_NODE", port, process, folder, command=command)


@contextmanager
def storescp(folder: Path) -> Iterator[RunningPeer]:
    """DCMTK storescp writing every instance under ``folder`` (no fsync: DCMTK's default)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV,
    )
    wait_for_port(port, process=process)
    peer = RunningPeer("STORESCP", port, process, folder)
    try:
        yield peer
    finally:
        peer.stop()


@contextmanager
def orthanc(folder: Path, modalities: dict[str, list] | None = None, ae_title: str = "ORTHANC") -> Iterator[RunningPeer]:
    """A private Orthanc on free ports with its own storage; its defaults (fsync'd storage) otherwise."""
    if shutil.which("Orthanc") is None:
        raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config = {
        "Name": "dicom-node-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "DicomAet": ae_title,
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomModalities": modalities or {},
        "Plugins": [],
        "ConcurrentJobs": 2,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "ab")
    command = ["Orthanc", str(folder / "orthanc.json")]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
    peer = RunningPeer(ae_title, port, process, folder, http_port, command)
    try:
        wait_for_port(port, timeout_s=60, process=process)
        wait_for_port(http_port, timeout_s=60, process=process)
        yield peer
    finally:
        peer.stop()


def orthanc_get(peer: RunningPeer, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}{path}", timeout=30) as response:
        return json.loads(response.read())


def orthanc_post(peer: RunningPeer, path: str, body: bytes | dict, timeout_s: float = 120) -> object:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{peer.http_port}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # Orthanc says why in the body: keep it in the test's failure
        raise OrthancError(f"POST {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:2000]}") from None


def orthanc_file(peer: RunningPeer, instance_id: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}/instances/{instance_id}/file", timeout=30) as response:
        return response.read()


def orthanc_find(peer: RunningPeer, level: str, query: dict[str, str]) -> list[dict]:
    """Orthanc's /tools/find with expanded answers."""
    body = json.dumps({"Level": level, "Query": query, "Expand": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{peer.http_port}/tools/find", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def storescu(port: int, files: list[Path] | Path, called_ae: str, calling_ae: str = "STORESCU",
             extra: list[str] | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Send files (or a folder) with DCMTK storescu; returns the finished process (stderr holds its log)."""
    targets = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    scan = ["+sd"] if isinstance(files, Path) else []
    return subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", called_ae, *(extra or []), *scan, "127.0.0.1", str(port), *targets],
        capture_output=True, text=True, env=PEER_ENV, timeout=timeout_s,
    )
