"""Thin wrappers over the DCMTK clients (echoscu, storescu, findscu) as the tests call them."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.localpeers import PEER_ENV


def run(args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=PEER_ENV, timeout=timeout_s)


def echoscu(port: int, calling_ae: str = "ECHOSCU", called_ae: str = "DICOM_NODE", extra: list[str] | None = None) -> subprocess.CompletedProcess:
    return run(["echoscu", "-aet", calling_ae, "-aec", called_ae, *(extra or []), "127.0.0.1", str(port)])


@dataclass
class StoreOutcome:
    """Per file sent, the status storescu reported (``None`` when it never got a response)."""

    process: subprocess.CompletedProcess
    statuses: dict[str, str]

    def succeeded(self) -> list[str]:
        return [f for f, s in self.statuses.items() if s == "Success"]

    def failed(self) -> list[str]:
        """Files that got a response other than success (a warning counts as success: none are sent)."""
        return [f for f, s in self.statuses.items() if s not in ("Success", "none")]


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu_verbose(port: int, files: list[Path], calling_ae: str = "STORESCU", extra: list[str] | None = None,
                     timeout_s: float = 300) -> StoreOutcome:
    """Send ``files``; parse storescu's verbose log into the response status of each file."""
    process = run(
        ["storescu", "-v", "-aet", calling_ae, "-aec", "DICOM_NODE", *(extra or []), "127.0.0.1", str(port),
         *[str(f) for f in files]],
        timeout_s,
    )
    statuses: dict[str, str] = {}
    current = None
    for line in (process.stdout + process.stderr).splitlines():
        if (m := _SENDING.search(line)) is not None:
            current = m.group(1).strip()
            statuses[current] = "none"
        elif (m := _RESPONSE.search(line)) is not None and current is not None:
            statuses[current] = m.group(1).strip()  # "Success", "Unknown Status: 0x124", ...
    return StoreOutcome(process, statuses)


def findscu(port: int, level: str, keys: dict[str, str], calling_ae: str = "FINDSCU") -> list[Dataset]:
    """A Study Root C-FIND; returns the matches as data sets (findscu -X writes each to a file)."""
    with tempfile.TemporaryDirectory() as out:
        args = ["findscu", "-S", "-aet", calling_ae, "-aec", "DICOM_NODE", "-X", "-od", out, "-k", f"QueryRetrieveLevel={level}"]
        for key, value in keys.items():
            args += ["-k", f"{key}={value}" if value != "" else key]
        process = run([*args, "127.0.0.1", str(port)])
        if process.returncode != 0:
            raise RuntimeError(f"findscu failed ({process.returncode}): {process.stderr[-2000:]}")
        return [dcmread(p) for p in sorted(Path(out).glob("rsp*.dcm"))]
