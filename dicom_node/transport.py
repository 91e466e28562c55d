"""Tuning of pynetdicom's transport for bulk C-STORE traffic, found by profiling a 300-instance CT ingest.

Four behaviour-preserving replacements, all installed by :func:`install`:

- pynetdicom reads a PDU in 4 KiB ``recv`` calls (about 130 calls and GIL hand-offs for one 512x512 CT
  instance); :func:`_recv_whole` reads with ``recv_into`` into one buffer, grown as the bytes arrive (a
  PDU length is the peer's claim), and refuses a PDU longer than our maximum PDU length plus 1 MiB. It still
  blocks until the requested bytes are read and returns what it has if the peer closes the connection.
- Every DIMSE command set (implicit VR little endian, group 0000) was encoded through pydicom's
  ``write_dataset``, twice per response: 16 % of the node's CPU per instance. :func:`encode_command` writes
  the few VRs a command set uses directly and hands anything else back to pydicom.

- pynetdicom's DUL thread, when idle, sleeps 1 ms before it looks at the socket or at the responses
  queued for it: up to 1 ms added to every incoming request and to every outgoing response.
  :class:`_WakeableSleep` makes that idle wait a ``select`` on the socket and on a wake-up pipe that
  ``send_pdu`` writes to, so the DUL reacts at once to either, with the same 1 ms ceiling when nothing
  happens (no extra CPU while idle).

- The association thread likewise sleeps 1 ms between looks at its DIMSE message queue;
  :class:`_QueueWaitSleep` waits on that queue's condition instead, so a request is handled as soon as
  its last fragment is decoded (same 1 ms ceiling when idle).

Nagle is turned off per connection in the SCP's connection-open handler.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import pynetdicom.association
import pynetdicom.dul

import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pynetdicom import dsutils

from pynetdicom.transport import AssociationSocket

_MAX_CHUNK = 4 * 2**20
_PDU_MARGIN = 2**20
_installed = False


class PDUTooLargeError(OSError):
    """A peer announced a PDU longer than the node accepts (an OSError: pynetdicom then closes the connection)."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"peer announced a PDU of {length} bytes; the node accepts at most {limit}")


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    sock = self.socket
    assert sock is not None
    limit = _largest_pdu(self)
    if limit is not None and nr_bytes > limit:
        raise PDUTooLargeError(nr_bytes, limit)
    buffer = bytearray(min(nr_bytes, _MAX_CHUNK))  # grown as data arrives: a PDU length is only a claim
    nr_read = 0
    while nr_read < nr_bytes:
        if nr_read == len(buffer):
            buffer += bytes(min(len(buffer), nr_bytes - nr_read))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[nr_read:], min(nr_bytes - nr_read, _MAX_CHUNK))
        if not count:
            return buffer[:nr_read]
        nr_read += count
    return buffer


def _largest_pdu(sock: AssociationSocket) -> int | None:
    """Our maximum PDU length plus a margin (an A-ASSOCIATE-RQ is not bound by it); None when unlimited."""
    maximum = getattr(getattr(getattr(sock, "_assoc", None), "ae", None), "maximum_pdu_size", 0)
    return maximum + _PDU_MARGIN if maximum else None


_INT_VRS = {"US": "<H", "UL": "<I"}
_TEXT_VRS = {"AE", "CS", "LO", "SH"}


def encode_command(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """pynetdicom's ``dsutils.encode`` with a fast path for command sets (implicit VR little endian)."""
    if not (is_implicit_vr and is_little_endian and not deflated):
        return dsutils.encode(ds, is_implicit_vr, is_little_endian, deflated)
    parts = []
    for element in ds:
        value = element.value
        if element.tag >> 16 != 0 or element.VM > 1:
            return dsutils.encode(ds, is_implicit_vr, is_little_endian, deflated)
        if value is None or value == "":
            raw = b""
        elif element.VR in _INT_VRS:
            raw = struct.pack(_INT_VRS[element.VR], value)
        elif element.VR == "UI":
            raw = str(value).encode("latin-1")  # as pydicom writes it: a sender's bad UID is echoed, not fatal
            raw += b"\x00" * (len(raw) % 2)
        elif element.VR in _TEXT_VRS:
            raw = str(value).encode("latin-1")
            raw += b" " * (len(raw) % 2)
        else:
            return dsutils.encode(ds, is_implicit_vr, is_little_endian, deflated)
        parts.append(struct.pack("<HHI", 0, element.tag & 0xFFFF, len(raw)) + raw)
    return b"".join(parts)


class _TimeModule:
    """Stands in for the ``time`` module inside one pynetdicom module; subclasses replace only ``sleep``."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


class _WakeableSleep(_TimeModule):
    """pynetdicom.dul's idle wait: wake on socket data or on a queued outgoing PDU."""

    @staticmethod
    def sleep(seconds: float) -> None:
        dul = threading.current_thread()
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if not isinstance(dul, pynetdicom.dul.DULServiceProvider) or sock is None:
            time.sleep(seconds)
            return
        wake_read, _ = _wake_pipe(dul)
        try:
            ready, _, _ = select.select([sock, wake_read], [], [], seconds)
        except (OSError, ValueError):  # the socket was closed under us: let the reactor find out
            time.sleep(seconds)
            return
        if wake_read in ready:
            os.read(wake_read, 4096)


class _QueueWaitSleep(_TimeModule):
    """pynetdicom.association's idle wait: wake when a DIMSE message is queued."""

    @staticmethod
    def sleep(seconds: float) -> None:
        assoc = threading.current_thread()
        dimse = getattr(assoc, "dimse", None)
        messages = getattr(dimse, "msg_queue", None)
        if not isinstance(assoc, pynetdicom.association.Association) or messages is None:
            time.sleep(seconds)
            return
        with messages.not_empty:
            if not messages.queue:  # the deque itself: qsize() would take the lock we hold
                messages.not_empty.wait(seconds)


def _wake_pipe(dul: pynetdicom.dul.DULServiceProvider) -> tuple[int, int]:
    pipe = getattr(dul, "_dicom_node_wake", None)
    if pipe is None:
        pipe = os.pipe()
        os.set_blocking(pipe[0], False)
        os.set_blocking(pipe[1], False)
        dul._dicom_node_wake = pipe  # type: ignore[attr-defined]
    return pipe


_original_send_pdu = pynetdicom.dul.DULServiceProvider.send_pdu
_original_run_reactor = pynetdicom.dul.DULServiceProvider.run_reactor


_PIPE_LOCK = threading.Lock()  # a pipe is never written after it is closed (its fd number may be reused)


def _send_pdu_and_wake(self: pynetdicom.dul.DULServiceProvider, primitive: object) -> None:
    _original_send_pdu(self, primitive)
    with _PIPE_LOCK:
        pipe = getattr(self, "_dicom_node_wake", None)
        if pipe is not None:
            try:
                os.write(pipe[1], b"!")
            except (BlockingIOError, OSError):
                pass  # a full pipe already means "wake up"


def _run_reactor_and_close_pipe(self: pynetdicom.dul.DULServiceProvider) -> None:
    try:
        _original_run_reactor(self)
    finally:
        with _PIPE_LOCK:
            pipe = getattr(self, "_dicom_node_wake", None)
            self._dicom_node_wake = None  # type: ignore[attr-defined]
            if pipe is not None:
                for fd in pipe:
                    os.close(fd)


def install() -> None:
    """Install both replacements once per process (idempotent)."""
    global _installed
    if not _installed:
        AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]
        pynetdicom.dimse_messages.encode = encode_command  # type: ignore[assignment]
        pynetdicom.dul.time = _WakeableSleep()  # type: ignore[assignment]
        pynetdicom.association.time = _QueueWaitSleep()  # type: ignore[assignment]
        pynetdicom.dul.DULServiceProvider.send_pdu = _send_pdu_and_wake  # type: ignore[method-assign]
        pynetdicom.dul.DULServiceProvider.run_reactor = _run_reactor_and_close_pipe  # type: ignore[method-assign]
        _installed = True


def disable_nagle(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
