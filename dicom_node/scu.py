"""Outgoing DICOM: associations with configured peers (the outbox's C-STORE) and C-ECHO."""

from __future__ import annotations

import logging
import socket

from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.config import NodeConfig, Peer
from dicom_node.sop_classes import VERIFICATION_SOP_CLASS

logger = logging.getLogger(__name__)


class PeerUnreachableError(ConnectionError):
    def __init__(self, peer: Peer, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{peer.ae_title} at {peer.host or '?'}:{peer.port}: {reason}")


def associate(ae: AE, peer: Peer) -> Association:
    """An established association with ``peer``; PeerUnreachableError (saying why) where there is none.

    pynetdicom reports a refused or timed-out connection as an association that is not established, but
    raises from the name lookup itself: a host that does not resolve is caught here, for echo and the outbox."""
    if not peer.host:
        raise PeerUnreachableError(peer, "no host configured for this peer")
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except socket.gaierror as exc:
        raise PeerUnreachableError(peer, f"cannot resolve host {peer.host!r} ({exc.strerror})") from None
    except OSError as exc:
        raise PeerUnreachableError(peer, f"cannot connect ({exc})") from None
    if not assoc.is_established:
        raise PeerUnreachableError(peer, "association rejected" if assoc.is_rejected else "no association (is the peer up?)")
    return assoc


def echo(config: NodeConfig, peer: Peer, timeout_s: float = 10.0) -> int:
    """Send a C-ECHO to ``peer``; returns its status, raises PeerUnreachableError if no association."""
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = associate(ae, peer)
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        raise PeerUnreachableError(peer, "no C-ECHO response")
    return int(rsp.Status)
