"""Outgoing DICOM: C-ECHO to a configured peer (C-STORE delivery comes with the outbox)."""

from __future__ import annotations

import logging

from pynetdicom import AE

from dicom_node.config import NodeConfig, Peer
from dicom_node.sop_classes import VERIFICATION_SOP_CLASS

logger = logging.getLogger(__name__)


class PeerUnreachableError(ConnectionError):
    def __init__(self, peer: Peer, reason: str) -> None:
        super().__init__(f"{peer.ae_title} at {peer.host or '?'}:{peer.port}: {reason}")


def echo(config: NodeConfig, peer: Peer, timeout_s: float = 10.0) -> int:
    """Send a C-ECHO to ``peer``; returns its status, raises PeerUnreachableError if no association."""
    if not peer.host:
        raise PeerUnreachableError(peer, "no host configured for this peer")
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (is the peer up?)"
        raise PeerUnreachableError(peer, reason)
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        raise PeerUnreachableError(peer, "no C-ECHO response")
    return int(rsp.Status)
