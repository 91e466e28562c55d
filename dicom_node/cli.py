"""The `dicom-node` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from dicom_node import __version__
from dicom_node.config import DEFAULT_CONFIG_PATH, ConfigError, NodeConfig, load_config
from dicom_node.privacy import keep_patient_data_out_of_logs
from storage.database import missing_database

logger = logging.getLogger("dicom_node")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # what `train` records in its card
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(config.node.log_level if not args.verbose else "DEBUG")
    missing = missing_database(config.storage.database_url) if _needs_node_database(args.func) else None
    if missing is not None:
        print(f"error: no database at {missing}: start the node first (dicom-node serve)", file=sys.stderr)
        return 1
    try:
        return int(args.func(config, args) or 0)
    except SQLAlchemyError as exc:  # a server that is down, a damaged file: one line, not a traceback
        logger.debug("database error", exc_info=True)
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"error: database {_hide_password(config.storage.database_url)}: {reason}", file=sys.stderr)
        return 1


def _needs_node_database(func: Callable[..., int]) -> bool:
    """Commands that read or re-queue what a running node recorded: on a node that never ran they must say so,
    not create an empty database (make_engine creates the schema) and report zeros."""
    return func in (_status, _resend, _retry)


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

    status = commands.add_parser("status", parents=[common], help="what the node holds, its jobs, recent results and deliveries")
    status.set_defaults(func=_status)

    resend = commands.add_parser("resend", parents=[common], help="send a delivery again now (see `status` for ids)")
    resend.add_argument("delivery", metavar="ID", type=int, help="the delivery id `dicom-node status` lists")
    resend.set_defaults(func=_resend)

    retry = commands.add_parser("retry", parents=[common], help="run a failed job again (see `status` for ids)")
    retry.add_argument("job", metavar="ID", type=int, help="the job id `dicom-node status` lists")
    retry.set_defaults(func=_retry)

    analyze = commands.add_parser("analyze", parents=[common],
                                  help="interpret a folder of DICOM files without the network; SEG, SR and summary.json into --out")
    analyze.add_argument("path", metavar="PATH", type=Path, help="folder (searched recursively) of DICOM files")
    analyze.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder for <series UID>/seg.dcm, sr.dcm and summary.json")
    analyze.add_argument("--model", metavar="CHECKPOINT", type=Path, help="model folder to use for every series (default: the routes in the config)")
    analyze.add_argument("--question", default="", help="question to ask (default: the route's, else UniBiomed's recognition question)")
    analyze.set_defaults(func=_analyze)

    from dicom_node import model_command, train_command

    train_command.add_commands(commands, common)
    model_command.add_commands(commands, common)

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
    keep_patient_data_out_of_logs(debug=level == "DEBUG")
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies at INFO
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every run of the 1 s check at INFO


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
    delivery = jobs = None
    if not args.worker:  # one delivery loop and job service per node: the supervisor's when there are workers
        from dicom_node.jobs import JobService
        from dicom_node.outbox import DeliveryLoop

        delivery = DeliveryLoop(config, node.sessions)
        delivery.start()
        jobs = JobService(config, on_results=delivery.wake)
        jobs.start()
    stopping.wait()
    logger.info("shutting down")
    if jobs is not None:
        jobs.stop()
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
    from dicom_node.report import summarize, summarize_jobs
    from storage.database import opened

    with opened(config.storage.database_url) as sessions, sessions() as session:
        summary = summarize(session, config.storage.path)
        outbox = summarize_outbox(session)
        jobs = summarize_jobs(session)
    print(f"patients   {summary.patients}")
    print(f"studies    {summary.studies}")
    print(f"series     {summary.series}")
    print(f"instances  {summary.instances}")
    print(f"stored     {summary.bytes_stored / 2**20:.1f} MiB in {config.storage.path}")
    if config.storage.path.is_dir():
        print(f"free       {summary.bytes_free / 2**30:.1f} GiB (refuses C-STORE below {config.storage.min_free_mb} MiB)")
    else:
        print(f"free       unknown: no storage folder at {config.storage.path} (the node creates it when it starts)")
    counts = ", ".join(f"{jobs.counts.get(s, 0)} {s}" for s in ("queued", "running", "done", "failed"))
    print(f"jobs       {counts}")
    for title, lines in (("queued", jobs.queued), ("running", jobs.running), ("failed", jobs.failed), ("result", jobs.recent)):
        for line in lines:
            when = line.at.strftime("%Y-%m-%d %H:%M:%S") if line.at else "-"
            hint = f" (dicom-node retry {line.id})" if title == "failed" else ""
            print(f"  {title:8} job {line.id} {when} {line.modality} \"{line.description}\" {line.series_instance_uid} "
                  f"run {line.run}, attempt {line.attempts}: {line.detail}{hint}")
    print(f"deliveries {outbox.pending} pending, {outbox.sent} sent, {len(outbox.failed)} failed")
    for delivery in outbox.failed:
        print(f"  failed   id {delivery.id}: {delivery.sop_instance_uid} to {delivery.destination}, "
              f"{delivery.attempts} attempts, last: {delivery.last_error} (dicom-node resend {delivery.id})")
    return 0


def _resend(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.outbox import resend

    return _requeue(config, resend, args.delivery, f"no delivery {args.delivery}",
                    f"delivery {args.delivery} queued to be sent again now")


def _retry(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.jobs import retry_failed

    return _requeue(config, retry_failed, args.job, f"no finished job {args.job} (queued and running jobs run anyway)",
                    f"job {args.job} queued; the running node starts it within {config.jobs.poll_s:g} s")


def _requeue(config: NodeConfig, requeue: Callable[[sessionmaker, int], bool], ident: int, missing: str, done: str) -> int:
    """Run an outbox or job re-queue against the node's database and report it."""
    from storage.database import opened

    with opened(config.storage.database_url, writer=True) as sessions:
        found = requeue(sessions, ident)
    if not found:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    print(done)
    return 0


def _analyze(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.analyze import SUMMARY_FILE, NoSeriesError, analyze_folder

    usage = _analyze_usage_error(config, args)
    if usage:
        print(f"error: {usage}", file=sys.stderr)
        return 2
    try:
        summaries = analyze_folder(args.path, args.out, config, args.model, args.question, config.jobs.device)
    except NoSeriesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in summaries:
        lesions = entry.get("lesions", [])
        outcome = entry.get("error") or (f"{len(lesions)} finding(s): " + ", ".join(
            f"{l['label']} {l['volume_ml']:.1f} mL ({l['reliability']})" for l in lesions) if lesions else
            entry.get("reason") and f"{entry['assessment']}: {entry['reason']}" or "no findings")
        print(f"{entry.get('modality', '?'):3} {entry['series_instance_uid']}: {outcome}")
    print(f"{len(summaries)} series; results and {SUMMARY_FILE} in {args.out}")
    return 1 if any("error" in entry for entry in summaries) else 0


def _analyze_usage_error(config: NodeConfig, args: argparse.Namespace) -> str:
    """What makes `analyze`'s arguments unusable ("" if nothing), found before any file is read or model loaded."""
    if not args.path.is_dir():
        return f"{args.path} is not a folder"
    blocker = next((p for p in (args.out, *args.out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--out {args.out}: {blocker} is a file, not a folder"
    if args.model is None and not config.routes:
        return f"{config.source} has no [[routes]]; pass --model CHECKPOINT"
    if args.model is not None and not args.model.is_dir():
        return f"{args.model} is not a model folder"
    return ""


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
    jobs = config.jobs
    print(f"jobs       complete after {jobs.completion_wait_s:g} s quiet; late arrivals: {jobs.on_late_arrival.value}; "
          f"{jobs.workers} worker(s), {jobs.max_attempts} attempts, device {jobs.device}, "
          f"encoder precision {jobs.encoder_precision.value}{', fp32 CPU encoder compiled' if jobs.compile_encoder else ''}")
    for route in config.routes:
        where = f" from {', '.join(sorted(route.peers))}" if route.peers else ""
        described = f" described {route.series_description!r}" if route.series_description else ""
        print(f"route      {route.name}: {', '.join(sorted(route.modalities))}{where}{described} -> {route.model}")
    if not config.routes:
        print("route      none: every series is stored only")
    return 0


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
