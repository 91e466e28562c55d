"""The DICOM service: association policy and the C-ECHO, C-STORE and C-FIND handlers.

Handlers only validate, delegate and answer with a status; each association runs on its own thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import status, transport
from dicom_node.config import NodeConfig, Permission
from dicom_node.find import answer_find
from dicom_node.receive import InstanceReceiver, StoreRequest
from dicom_node.recovery import recover
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, STUDY_ROOT_FIND, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from storage.database import make_engine, make_sessionmaker
from storage.files import FileStore
from storage.index import IndexWriter

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised (PS3.8 9.3.4).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


class SharedPortServer(ThreadedAssociationServer):
    """Lets the node's worker processes listen on one port (SO_REUSEPORT); the kernel spreads associations."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Node:
    """The running node: storage, index writer and the pynetdicom server."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.engine = make_engine(config.storage.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.files = FileStore(config.storage.path, config.storage.min_free_mb * 2**20)
        self.writer_engine = make_engine(config.storage.database_url, writer=True)
        self.writer = IndexWriter(self.writer_engine, self.files)
        self.receiver = InstanceReceiver(self.files, self.sessions, self.writer)
        transport.install()
        self.ae = self._make_ae()
        self.server: ThreadedAssociationServer | None = None

    def start(self, worker: bool = False) -> tuple[str, int]:
        """Start listening in the background; returns the bound (host, port).

        A ``worker`` shares the port with its sibling processes and leaves recovery to the supervisor,
        which ran it before starting them.
        """
        if not worker:
            recover(self.files, self.sessions, self.writer)
        node = self.config.node
        self.server = self.ae.make_server(
            (node.host, node.port),
            evt_handlers=self._handlers(),
            ssl_context=node.tls.server_context() if node.tls else None,
            server_class=SharedPortServer if worker else ThreadedAssociationServer,
        )
        self.ae._servers.append(self.server)  # as AE.start_server does: the server's shutdown() expects it
        threading.Thread(target=self.server.serve_forever, name="dicom-acceptor", daemon=True).start()
        host, port = self.server.server_address[:2]
        logger.info("%s listening on %s:%d%s", node.ae_title, host, port, " (TLS)" if node.tls else "")
        return host, port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.writer_engine.dispose()
        self.engine.dispose()

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        ae.add_supported_context(STUDY_ROOT_FIND)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    def _handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, _disable_nagle),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
        ]

    def _on_requested(self, event: evt.Event) -> None:
        """Only configured peers may associate, and only from their configured host."""
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        address = event.assoc.requestor.address
        peer = self.config.peer(calling)
        if peer is not None and peer.accepts_host(address):
            return
        reason = "unknown AE title" if peer is None else f"not allowed from {address}"
        logger.warning("rejected association from %r at %s: %s", calling, address, reason)
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is on the wire before the server
        # closes the socket, or the peer sees an abort instead of the reason.
        event.assoc.kill()

    def _allowed(self, event: evt.Event, permission: Permission) -> bool:
        peer = self.config.peer(event.assoc.requestor.ae_title)
        if peer is not None and peer.may(permission):
            return True
        logger.warning("%s refused to %r: not in its allowed services", permission.value, event.assoc.requestor.ae_title)
        return False

    def _on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS if self._allowed(event, Permission.ECHO) else status.NOT_AUTHORIZED

    def _on_store(self, event: evt.Event) -> int:
        if not self._allowed(event, Permission.STORE):
            return status.NOT_AUTHORIZED
        request = event.request
        return self.receiver.receive(
            StoreRequest(
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae_title=event.assoc.requestor.ae_title.strip(),
                dataset=event.encoded_dataset(include_meta=False),
            )
        )

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        if not self._allowed(event, Permission.FIND):
            yield status.NOT_AUTHORIZED, None
            return
        for answer in answer_find(self.sessions, event.identifier):
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield answer


def _disable_nagle(event: evt.Event) -> None:
    """Small DIMSE responses must not wait for delayed ACKs (13-18 s instead of 0.4 s for a CT series)."""
    transport.disable_nagle(event.assoc.dul.socket.socket)
