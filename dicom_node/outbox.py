"""The outbox: results wait in the database until a destination has them, whatever restarts in between.

Delivery is at-least-once with stable SOP Instance UIDs, so a resend replaces rather than duplicates.
Each destination is sent to on its own thread and association, with its own timeouts (connecting included),
so an unreachable PACS delays only its own items. A failed attempt is retried after 30 s, doubling up to
10 min, then every 10 min; an item still not delivered ``[jobs] delivery_give_up_h`` (7 days) after its
first attempt, and after at least 10 attempts, is "failed" (the dead letter) until an administrator resends
it. No database transaction is open while the network is used: due items are read, sent, then each
destination's outcomes are recorded.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig, Permission
from dicom_node.scu import PeerUnreachableError, associate
from storage.models import Delivery, DeliveryAttempt, now_utc

logger = logging.getLogger(__name__)

PENDING, SENT, FAILED = "pending", "sent", "failed"


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed delivery is tried again, and when it is given up (dead-lettered).

    Giving up is time-based, so that a PACS outage of hours or days is waited out at ``max_delay_s``; the
    ``min_attempts`` floor keeps a node that was itself down that long from giving up on its first try back."""

    first_delay_s: float = 30.0
    max_delay_s: float = 600.0
    give_up_after_s: float = 7 * 24 * 3600.0  # counted from the first attempt (since the last resend)
    min_attempts: int = 10
    timeout_s: float = 30.0  # connecting, association negotiation, each DIMSE message, network idle

    @classmethod
    def of(cls, config: NodeConfig) -> RetryPolicy:
        """The node's policy: the defaults with ``[jobs] delivery_give_up_h``."""
        return cls(give_up_after_s=config.jobs.delivery_give_up_h * 3600.0)

    def delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.first_delay_s * 2 ** max(attempts - 1, 0), self.max_delay_s))

    def gives_up(self, attempts: int, trying_for: timedelta) -> bool:
        """Whether ``attempts`` failed attempts over ``trying_for`` since the first one make a dead letter."""
        return attempts >= self.min_attempts and trying_for.total_seconds() >= self.give_up_after_s


@dataclass(frozen=True)
class Due:
    id: int
    path: Path
    sop_class_uid: str
    destination: str


def enqueue(sessions: sessionmaker[Session], sop_instance_uid: str, sop_class_uid: str, path: str, destination: str) -> int:
    """Queue an object for a destination (again, if it was there: a re-run replaces it in the PACS)."""
    with sessions() as session, session.begin():
        return add_delivery(session, sop_instance_uid, sop_class_uid, path, destination)


def add_delivery(session: Session, sop_instance_uid: str, sop_class_uid: str, path: str, destination: str) -> int:
    """enqueue() inside the caller's transaction (a job commits its results and their deliveries together)."""
    delivery = session.scalar(select(Delivery).where(Delivery.sop_instance_uid == sop_instance_uid,
                                                     Delivery.destination == destination))
    if delivery is None:
        delivery = Delivery(sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid, path=path,
                            destination=destination, created_at=now_utc(), next_attempt_at=now_utc())
        session.add(delivery)
    else:
        # Fresh attempts, as resend() gives: a job's retry must not re-queue a dead letter one attempt from failing.
        delivery.path, delivery.status, delivery.next_attempt_at, delivery.attempts = path, PENDING, now_utc(), 0
    session.flush()
    return delivery.id


@dataclass(frozen=True)
class OutboxSummary:
    pending: int
    sent: int
    failed: list[Delivery]


def summarize_outbox(session: Session) -> OutboxSummary:
    """Counts for `dicom-node status`, with the failed deliveries themselves (the dead letters)."""
    from sqlalchemy import func

    counts = dict(session.execute(select(Delivery.status, func.count(Delivery.id)).group_by(Delivery.status)).all())
    failed = list(session.scalars(select(Delivery).where(Delivery.status == FAILED).order_by(Delivery.id)))
    return OutboxSummary(counts.get(PENDING, 0), counts.get(SENT, 0), failed)


def resend(sessions: sessionmaker[Session], delivery_id: int) -> bool:
    """Send this delivery again now (a failed one leaves the dead letter); False if there is none."""
    with sessions() as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return False
        delivery.status, delivery.next_attempt_at, delivery.attempts = PENDING, now_utc(), 0
        return True


class DeliveryLoop:
    """Runs deliver_due every ``interval_s`` on a background thread until stopped (one per node)."""

    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session], interval_s: float = 5.0,
                 policy: RetryPolicy | None = None) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        policy = policy or RetryPolicy.of(config)
        self._thread = threading.Thread(target=self._run, args=(config, sessions, interval_s, policy),
                                        name="delivery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Deliver now rather than at the next interval (new results are waiting)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)

    def _run(self, config: NodeConfig, sessions: sessionmaker[Session], interval_s: float, policy: RetryPolicy) -> None:
        while True:
            self._wake.wait(interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                deliver_due(config, sessions, config.storage.path, policy)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round; the next one retries
                logger.exception("delivery round failed")


def deliver_due(config: NodeConfig, sessions: sessionmaker[Session], storage: Path,
                policy: RetryPolicy = RetryPolicy()) -> dict[str, int]:
    """Send everything due, each destination on its own thread (one that hangs delays only its own items);
    each destination's outcomes are recorded as soon as it is done. Returns counts of sent and failed attempts."""
    with sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.status == PENDING, Delivery.next_attempt_at <= now_utc())
                               .order_by(Delivery.id)).all()
        due = [Due(r.id, storage / r.path, r.sop_class_uid, r.destination) for r in rows]
    by_destination: dict[str, list[Due]] = defaultdict(list)
    for item in due:
        by_destination[item.destination].append(item)
    counts = {"sent": 0, "failed": 0}
    if not by_destination:
        return counts
    with ThreadPoolExecutor(len(by_destination), thread_name_prefix="delivery") as pool:
        sending = [pool.submit(_send, config, destination, items, policy) for destination, items in by_destination.items()]
        for done in as_completed(sending):
            outcomes = done.result()
            _record(sessions, outcomes, policy)
            counts["sent"] += sum(1 for ok, _ in outcomes.values() if ok)
            counts["failed"] += sum(1 for ok, _ in outcomes.values() if not ok)
    return counts


def _send(config: NodeConfig, destination: str, items: list[Due], policy: RetryPolicy) -> dict[int, tuple[bool, str]]:
    peer = config.peer(destination)
    if peer is None or not peer.may(Permission.DESTINATION) or not peer.host:
        return {i.id: (False, f"{destination} is not a configured destination") for i in items}
    ae = AE(ae_title=config.node.ae_title)
    # connection_timeout too: pynetdicom's default (None) blocks on a destination that drops packets.
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = policy.timeout_s
    for sop_class in {i.sop_class_uid for i in items}:
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    try:
        assoc = associate(ae, peer)
    except PeerUnreachableError as exc:  # a host that does not resolve too: a failed attempt like any other
        return {i.id: (False, exc.reason) for i in items}
    outcomes: dict[int, tuple[bool, str]] = {}
    try:
        for item in items:
            try:
                status = assoc.send_c_store(dcmread(item.path))
            except Exception as exc:  # noqa: BLE001 - one bad item (a damaged file) is its own failed attempt
                outcomes[item.id] = (False, f"{type(exc).__name__}: {exc}"[:255])
                continue
            code = int(status.Status) if "Status" in status else -1
            ok = code == 0x0000 or 0xB000 <= code <= 0xBFFF
            outcomes[item.id] = (ok, "" if ok else f"status 0x{code:04X}" if code >= 0 else "no response")
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for item in items:
        outcomes.setdefault(item.id, (False, "association ended before it was sent"))
    return outcomes


def _record(sessions: sessionmaker[Session], outcomes: dict[int, tuple[bool, str]], policy: RetryPolicy) -> None:
    at = now_utc()
    with sessions() as session, session.begin():
        for delivery_id, (ok, detail) in outcomes.items():
            delivery = session.get(Delivery, delivery_id)
            first = at if ok else _first_attempt(session, delivery, at)  # asked only where it decides a give-up
            delivery.attempts += 1
            session.add(DeliveryAttempt(delivery_fk=delivery_id, at=at, succeeded=ok, detail=detail))
            if ok:
                delivery.status, delivery.sent_at, delivery.last_error = SENT, at, ""
                continue
            delivery.last_error = detail
            if policy.gives_up(delivery.attempts, at - first):
                delivery.status = FAILED
                logger.error("delivery %d of %s to %s failed %d times since %s: %s", delivery_id, delivery.sop_instance_uid,
                             delivery.destination, delivery.attempts, first, detail)
            else:
                delivery.next_attempt_at = at + policy.delay(delivery.attempts)
                logger.warning("delivery %d to %s: %s; retry %d in %s", delivery_id, delivery.destination, detail,
                               delivery.attempts + 1, policy.delay(delivery.attempts))


def _first_attempt(session: Session, delivery: Delivery, at: datetime) -> datetime:
    """When the current run of attempts began: the oldest of the latest ``attempts`` recorded (a resend or a
    job's retry resets ``attempts``, so older history does not count); ``at`` for a first attempt."""
    if delivery.attempts == 0:
        return at
    latest = (select(DeliveryAttempt.at).where(DeliveryAttempt.delivery_fk == delivery.id)
              .order_by(DeliveryAttempt.id.desc()).limit(delivery.attempts))
    return min(session.scalars(latest), default=at)
