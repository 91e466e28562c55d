"""The `dicom-node` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_node import __version__
from dicom_node.config import DEFAULT_CONFIG_PATH, ConfigError, NodeConfig, load_config

logger = logging.getLogger("dicom_node")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(config.node.log_level if not args.verbose else "DEBUG")
    return int(args.func(config, args) or 0)


def _parser() -> argparse.ArgumentParser:
    # Sub-commands take the same options with SUPPRESS defaults, so that "--config X serve" and
    # "serve --config X" both work and neither overwrites the other. (Separate parser objects: argparse
    # shares Action objects between a parent and its children, and so their defaults.)
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="A DICOM node that receives CT and MR series from a PACS, interprets them and sends results back.",
        parents=[_options(DEFAULT_CONFIG_PATH, False)],
    )
    common = _options(argparse.SUPPRESS, argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the node (C-ECHO, C-STORE, C-FIND) until stopped")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    serve.set_defaults(func=_serve)

    echo = commands.add_parser("echo", parents=[common], help="send a C-ECHO to a configured peer")
    echo.add_argument("peer", metavar="PEER", help="AE title of a [[peers]] entry in the config")
    echo.set_defaults(func=_echo)

    status = commands.add_parser("status", parents=[common], help="counts of patients, studies, series, instances; storage used")
    status.set_defaults(func=_status)

    resend = commands.add_parser("resend", parents=[common], help="send a delivery again now (see `status` for ids)")
    resend.add_argument("delivery", metavar="ID", type=int, help="the delivery id `dicom-node status` lists")
    resend.set_defaults(func=_resend)

    config = commands.add_parser("config", parents=[common], help="configuration commands")
    config_commands = config.add_subparsers(title="config commands", metavar="ACTION")
    check = config_commands.add_parser("check", parents=[common], help="validate the config file and print the settings in force")
    check.set_defaults(func=_config_check)
    return parser


def _options(config_default: object, verbose_default: object) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", type=Path, default=config_default, help=f"path of config.toml (default: {DEFAULT_CONFIG_PATH})")
    options.add_argument("-v", "--verbose", action="store_true", default=verbose_default, help="log at DEBUG level")
    return options


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _serve(config: NodeConfig, args: argparse.Namespace) -> int:
    if config.node.worker_count > 1 and not args.worker:
        from dicom_node.supervisor import run_supervisor

        return run_supervisor(config, args.config, args.verbose)
    from dicom_node.scp import Node

    node = Node(config)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        node.start(worker=args.worker)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.node.host, config.node.port, exc)
        node.stop()
        return 1
    delivery = None
    if not args.worker:  # one delivery loop per node: the supervisor's when there are workers
        from dicom_node.outbox import DeliveryLoop

        delivery = DeliveryLoop(config, node.sessions)
        delivery.start()
    stopping.wait()
    logger.info("shutting down")
    if delivery is not None:
        delivery.stop()
    node.stop()
    return 0


def _echo(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.scu import PeerUnreachableError, echo

    peer = config.peer(args.peer)
    if peer is None:
        known = ", ".join(p.ae_title for p in config.peers) or "none"
        print(f"error: no peer {args.peer!r} in {config.source} (configured: {known})", file=sys.stderr)
        return 2
    try:
        result = echo(config, peer)
    except PeerUnreachableError as exc:
        print(f"C-ECHO failed: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO to {peer.ae_title} at {peer.host}:{peer.port}: status 0x{result:04X}")
    return 0 if result == 0 else 1


def _status(config: NodeConfig, _args: argparse.Namespace) -> int:
    from dicom_node.outbox import summarize_outbox
    from dicom_node.report import summarize
    from storage.database import make_engine, make_sessionmaker

    engine = make_engine(config.storage.database_url)
    with make_sessionmaker(engine)() as session:
        summary = summarize(session, config.storage.path)
        outbox = summarize_outbox(session)
    engine.dispose()
    print(f"patients   {summary.patients}")
    print(f"studies    {summary.studies}")
    print(f"series     {summary.series}")
    print(f"instances  {summary.instances}")
    print(f"stored     {summary.bytes_stored / 2**20:.1f} MiB in {config.storage.path}")
    print(f"free       {summary.bytes_free / 2**30:.1f} GiB (refuses C-STORE below {config.storage.min_free_mb} MiB)")
    print(f"deliveries {outbox.pending} pending, {outbox.sent} sent, {len(outbox.failed)} failed")
    for delivery in outbox.failed:
        print(f"  failed   id {delivery.id}: {delivery.sop_instance_uid} to {delivery.destination}, "
              f"{delivery.attempts} attempts, last: {delivery.last_error} (dicom-node resend {delivery.id})")
    return 0


def _resend(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.outbox import resend
    from storage.database import make_engine, make_sessionmaker

    engine = make_engine(config.storage.database_url)
    found = resend(make_sessionmaker(engine), args.delivery)
    engine.dispose()
    if not found:
        print(f"error: no delivery {args.delivery}", file=sys.stderr)
        return 2
    print(f"delivery {args.delivery} queued to be sent again now")
    return 0


def _config_check(config: NodeConfig, _args: argparse.Namespace) -> int:
    node = config.node
    print(f"{config.source}: OK")
    print(f"node       {node.ae_title} on {node.host}:{node.port}, max PDU {node.max_pdu}, {node.worker_count} workers, "
          f"{node.max_associations} associations each, TLS {'mutual' if node.tls and node.tls.mutual else 'on' if node.tls else 'off'}")
    print(f"storage    {config.storage.path}")
    print(f"database   {_hide_password(config.storage.database_url)}")
    for peer in config.peers:
        allowed = ", ".join(sorted(p.value for p in peer.allow))
        print(f"peer       {peer.ae_title} at {peer.host or 'any host'}:{peer.port} may {allowed}")
    return 0


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
