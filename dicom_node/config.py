"""config.toml into frozen, validated dataclasses.

The file is read once at start-up. Every value is checked where it enters, and a bad one raises
:class:`ConfigError` naming the key (``peers[1].port``) and the value, so an administrator fixes the file
instead of discovering the mistake when the first study arrives. Relative paths (the storage folder, TLS
files, a relative SQLite URL) are resolved against the folder that holds the config file, so the node behaves
the same whatever directory it is started from.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import ssl
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dicom_node.config_values import (ConfigError, crontab_trigger, existing_file, get_flag, get_port, get_positive, get_strings,
                                      get_table, get_value, reject_unknown, validate_ae_title)
from inference.model.markers import MODEL_MARKERS
from inference.model.precision import EncoderPrecision

DEFAULT_CONFIG_PATH = Path("config.toml")


RESULT_KINDS = ("seg", "sr")
ACTIVE_MODEL = Path("active")  # a route's model = "active": the version `dicom-node model activate` chose


class Permission(str, Enum):
    """What a peer may ask of the node (and, for ``destination``, what the node may send it)."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    DESTINATION = "destination"


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS (PS3.15 B.1). Mutual TLS when ``ca_file`` is set: peers must present a certificate."""

    certificate: Path
    private_key: Path
    ca_file: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.ca_file is not None

    def server_context(self) -> ssl.SSLContext:
        """The SCP's context; built at load too, so files that are no PEM certificate or key fail `config check`."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile=self.certificate, keyfile=self.private_key)
        if self.ca_file is not None:
            context.load_verify_locations(cafile=self.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class NodeSection:
    """[node]. ``workers`` = 0 means one receiving process per CPU core."""

    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_pdu: int = 1_048_576
    max_associations: int = 25
    workers: int = 0
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    log_level: str = "INFO"
    tls: TLSConfig | None = None

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class StorageSection:
    path: Path = Path("data")
    database_url: str = "sqlite:///data/index.sqlite"
    min_free_mb: int = 1024


@dataclass(frozen=True)
class Peer:
    """A remote application entity the administrator trusts, identified by its AE title."""

    ae_title: str
    host: str = ""
    port: int = 104
    allow: frozenset[Permission] = frozenset({Permission.ECHO, Permission.STORE, Permission.FIND})
    results: frozenset[str] = frozenset(RESULT_KINDS)  # with "destination": which of the node's results it gets
    completion_wait_s: float | None = None  # overrides jobs.completion_wait_s for series this peer sends

    def may(self, permission: Permission) -> bool:
        return permission in self.allow

    def accepts_host(self, address: str) -> bool:
        """A peer configured without a host may connect from anywhere; otherwise only from that host (an
        address, or a name resolved when checked; IPv4-mapped IPv6 addresses compare as IPv4)."""
        if not self.host:
            return True
        address = address.removeprefix("::ffff:")
        return address == self.host or address in _resolve(self.host)


class LateArrival(str, Enum):
    """What an instance arriving after its series was judged complete does."""

    RERUN = "rerun"  # the series is interpreted again, as a new version of the results
    IGNORE = "ignore"  # stored only; the results already sent stand


@dataclass(frozen=True)
class JobsSection:
    """[jobs]: when a series counts as complete and how its interpretation is run and retried."""

    completion_wait_s: float = 30.0
    on_late_arrival: LateArrival = LateArrival.RERUN
    workers: int = 1
    max_attempts: int = 3
    retry_delay_s: float = 60.0
    # A result not yet delivered is retried (at most every 10 minutes) this long after its first attempt before
    # it is "failed" until `dicom-node resend`: long enough to wait out a PACS's maintenance or outage.
    delivery_give_up_h: float = 168.0
    poll_s: float = 1.0
    device: str = "auto"
    encoder_precision: EncoderPrecision = EncoderPrecision.AUTO
    # An fp32 encoder on the CPU through torch.compile, compiled when the model loads (about a minute, and a C++
    # compiler); off unless the config says so (the shipped config.toml does).
    compile_encoder: bool = False


@dataclass(frozen=True)
class Route:
    """Which series are interpreted, with which question and model; the first matching route wins."""

    name: str
    model: Path
    modalities: frozenset[str] = frozenset({"CT", "MR"})
    peers: frozenset[str] = frozenset()  # calling AE titles; empty: from any peer
    series_description: str = ""  # shell-style pattern, case-insensitive; empty: any
    question: str = ""  # empty: UniBiomed's grounded-recognition question for the modality
    target: str = ""  # the label of a bare [SEG] in answers to a targeted question

    def matches(self, modality: str, calling_ae_title: str, series_description: str) -> bool:
        if modality.upper() not in self.modalities:
            return False
        if self.peers and calling_ae_title.strip() not in self.peers:
            return False
        return not self.series_description or fnmatch.fnmatch(series_description.lower(), self.series_description.lower())


@dataclass(frozen=True)
class TrainingSection:
    """[training]: an optional scheduled run on what arrived (series with a ground-truth SEG in the store).
    It registers a new model version; an administrator activates it (`dicom-node model activate`)."""

    schedule: str = ""  # crontab line, e.g. "0 2 * * *"; empty: no scheduled training
    modality: str = ""
    label: str = ""
    steps: int = 1200
    # The model training starts from (`dicom-node train --start-from`): "active" refines the model the node
    # runs with what arrived; "" trains from fresh heads on what arrived alone.
    start_from: str = "active"


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    storage: StorageSection = field(default_factory=StorageSection)
    peers: tuple[Peer, ...] = ()
    source: Path | None = None
    jobs: JobsSection = field(default_factory=JobsSection)
    routes: tuple[Route, ...] = ()
    training: TrainingSection = field(default_factory=TrainingSection)

    def route_for(self, modality: str, calling_ae_title: str, series_description: str) -> Route | None:
        """The route that interprets such a series, or None: stored only."""
        return next((r for r in self.routes if r.matches(modality, calling_ae_title, series_description)), None)

    def completion_wait_s(self, calling_ae_title: str) -> float:
        peer = self.peer(calling_ae_title)
        if peer is not None and peer.completion_wait_s is not None:
            return peer.completion_wait_s
        return self.jobs.completion_wait_s

    def destinations(self, kind: str) -> list[Peer]:
        """Peers that receive results of this kind ("seg" or "sr")."""
        return [p for p in self.peers if p.may(Permission.DESTINATION) and kind in p.results]

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title (trailing spaces ignored), or None."""
        wanted = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == wanted), None)


def _resolve(host: str) -> frozenset[str]:
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


def load_config(path: Path | str = DEFAULT_CONFIG_PATH) -> NodeConfig:
    """Read and validate a config.toml; raise ConfigError naming the first bad key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("<file>", f"{path} does not exist (pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, base_dir=path.resolve().parent, source=path.resolve())


def parse_config(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> NodeConfig:
    """Validate an already-parsed TOML document (split out so tests need no file)."""
    reject_unknown(raw, {"node", "storage", "peers", "jobs", "routes", "training"}, "")
    node = _parse_node(get_table(raw, "node"), base_dir)
    storage = _parse_storage(get_table(raw, "storage"), base_dir)
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("peers", "must be an array of tables ([[peers]])")
    peers = tuple(_parse_peer(p, f"peers[{i}]") for i, p in enumerate(peers_raw))
    seen: set[str] = set()
    for i, peer in enumerate(peers):
        if peer.ae_title in seen:
            raise ConfigError(f"peers[{i}].ae_title", f"{peer.ae_title!r} is listed twice")
        if peer.ae_title == node.ae_title:  # completion takes what the node's own title sends for its results
            raise ConfigError(f"peers[{i}].ae_title", f"{peer.ae_title!r} is also node.ae_title: what this peer sends "
                                                      "would be stored only, never interpreted")
        seen.add(peer.ae_title)
    jobs = _parse_jobs(get_table(raw, "jobs"))
    routes_raw = raw.get("routes", [])
    if not isinstance(routes_raw, list):
        raise ConfigError("routes", "must be an array of tables ([[routes]])")
    routes = tuple(_parse_route(r, f"routes[{i}]", base_dir) for i, r in enumerate(routes_raw))
    names = [r.name for r in routes]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"routes[{i}].name", f"{name!r} is listed twice")
    for i, route in enumerate(routes):  # a misspelt AE title would leave the route matching nothing, silently
        unknown = sorted(route.peers - seen)
        if unknown:
            raise ConfigError(f"routes[{i}].peers", f"{unknown[0]!r} is not a configured peer (no [[peers]] has that ae_title)")
    training = _parse_training(get_table(raw, "training"), base_dir)
    return NodeConfig(node=node, storage=storage, peers=peers, source=source, jobs=jobs, routes=routes, training=training)


def _parse_training(raw: dict[str, Any], base_dir: Path) -> TrainingSection:
    reject_unknown(raw, set(TrainingSection.__dataclass_fields__), "training.")
    schedule = get_value(raw, "training.schedule", str, "")
    if schedule:
        try:
            crontab_trigger(schedule)
        except ValueError as exc:
            raise ConfigError("training.schedule", f"{schedule!r} is not a crontab line (\"0 2 * * *\" is 02:00 daily): {exc}") from None
    return TrainingSection(
        schedule=schedule,
        modality=get_value(raw, "training.modality", str, ""),
        label=get_value(raw, "training.label", str, ""),
        steps=get_positive(raw, "training.steps", int, TrainingSection.steps),
        start_from=_starting_model(get_value(raw, "training.start_from", str, TrainingSection.start_from), base_dir),
    )


def _starting_model(name: str, base_dir: Path) -> str:
    """A folder given as training.start_from follows the config file, as route models do; the scheduled run's
    working directory is wherever the node was started. Names without a path separator stay names ("active",
    "shipped", a registered version); a folder beside the config file is written "./folder"."""
    if "/" not in name and os.sep not in name and not name.startswith("~"):
        return name
    return str((base_dir / Path(name).expanduser()).resolve())


def _parse_jobs(raw: dict[str, Any]) -> JobsSection:
    defaults = JobsSection()
    reject_unknown(raw, set(JobsSection.__dataclass_fields__), "jobs.")
    late = get_value(raw, "jobs.on_late_arrival", str, defaults.on_late_arrival.value)
    try:
        on_late = LateArrival(late)
    except ValueError:
        raise ConfigError("jobs.on_late_arrival", f"{late!r} must be \"rerun\" or \"ignore\"") from None
    device = get_value(raw, "jobs.device", str, defaults.device)
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ConfigError("jobs.device", f"{device!r} must be auto, cpu, cuda or cuda:N")
    precision = get_value(raw, "jobs.encoder_precision", str, defaults.encoder_precision.value)
    try:
        encoder_precision = EncoderPrecision(precision)
    except ValueError:
        raise ConfigError("jobs.encoder_precision", f"{precision!r} must be auto, card, bf16 or fp32") from None
    return JobsSection(
        completion_wait_s=get_value(raw, "jobs.completion_wait_s", float, defaults.completion_wait_s, minimum=0.0),
        on_late_arrival=on_late,
        workers=get_positive(raw, "jobs.workers", int, defaults.workers),
        max_attempts=get_positive(raw, "jobs.max_attempts", int, defaults.max_attempts),
        retry_delay_s=get_value(raw, "jobs.retry_delay_s", float, defaults.retry_delay_s, minimum=0.0),
        delivery_give_up_h=get_positive(raw, "jobs.delivery_give_up_h", float, defaults.delivery_give_up_h),
        poll_s=get_positive(raw, "jobs.poll_s", float, defaults.poll_s),
        device=device,
        encoder_precision=encoder_precision,
        compile_encoder=get_flag(raw, "jobs.compile_encoder", defaults.compile_encoder),
    )


def _parse_route(raw: Any, key: str, base_dir: Path) -> Route:
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a table")
    reject_unknown(raw, set(Route.__dataclass_fields__), f"{key}.")
    for required in ("name", "model"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is required")
    name = get_value(raw, f"{key}.model", str, "")
    if not name:  # base_dir / "" is the config file's folder
        raise ConfigError(f"{key}.model", '"" must be "active" or a model folder')
    model = ACTIVE_MODEL if name == ACTIVE_MODEL.name else base_dir / name
    if model != ACTIVE_MODEL and not any((model / marker).is_file() for marker in MODEL_MARKERS):
        raise ConfigError(f"{key}.model", f"{model} is not a model folder (a checkpoint with model_card.json, or a "
                                          "UniBiomed folder with config.json)")
    return Route(
        name=get_value(raw, f"{key}.name", str, ""),
        model=model,
        modalities=frozenset(m.upper() for m in get_strings(raw, f"{key}.modalities", ["CT", "MR"], nonempty=True)),
        peers=frozenset(validate_ae_title(p, f"{key}.peers") for p in get_strings(raw, f"{key}.peers", [])),
        series_description=get_value(raw, f"{key}.series_description", str, ""),
        question=get_value(raw, f"{key}.question", str, ""),
        target=get_value(raw, f"{key}.target", str, ""),
    )


def _parse_node(raw: dict[str, Any], base_dir: Path) -> NodeSection:
    defaults = NodeSection()
    reject_unknown(raw, set(NodeSection.__dataclass_fields__), "node.")
    level = get_value(raw, "node.log_level", str, defaults.log_level).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("node.log_level", f"{level!r} must be DEBUG, INFO, WARNING or ERROR")
    max_pdu = get_value(raw, "node.max_pdu", int, defaults.max_pdu)
    if max_pdu != 0 and not 4096 <= max_pdu <= 0xFFFFFFFF:
        raise ConfigError("node.max_pdu", f"{max_pdu} must be 0 (unlimited) or 4096 to 4294967295 bytes")
    node = NodeSection(
        ae_title=validate_ae_title(raw.get("ae_title", defaults.ae_title), "node.ae_title"),
        host=get_value(raw, "node.host", str, defaults.host),
        port=get_port(raw.get("port", defaults.port), "node.port", allow_zero=True),
        max_pdu=max_pdu,
        max_associations=get_positive(raw, "node.max_associations", int, defaults.max_associations),
        workers=get_value(raw, "node.workers", int, defaults.workers, minimum=0),
        network_timeout_s=get_positive(raw, "node.network_timeout_s", float, defaults.network_timeout_s),
        acse_timeout_s=get_positive(raw, "node.acse_timeout_s", float, defaults.acse_timeout_s),
        dimse_timeout_s=get_positive(raw, "node.dimse_timeout_s", float, defaults.dimse_timeout_s),
        log_level=level,
        tls=_parse_tls(raw.get("tls"), base_dir),
    )
    if node.port == 0 and node.worker_count > 1:
        raise ConfigError("node.port", "0 (any free port) needs node.workers = 1: each worker would listen on a port "
                                       "of its own, and peers could reach none of them")
    return node


def _parse_tls(raw: Any, base_dir: Path) -> TLSConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("node.tls", "must be a table ([node.tls])")
    reject_unknown(raw, {"certificate", "private_key", "ca_file"}, "node.tls.")
    for key in ("certificate", "private_key"):
        if key not in raw:
            raise ConfigError(f"node.tls.{key}", "is required when [node.tls] is present")
    paths = {k: existing_file(raw[k], f"node.tls.{k}", base_dir) for k in raw}
    tls = TLSConfig(paths["certificate"], paths["private_key"], paths.get("ca_file"))
    _check_tls(tls)
    return tls


def _check_tls(tls: TLSConfig) -> None:
    """Build the workers' SSL context now: a file that is no PEM certificate or key (or a key of another
    certificate) would otherwise stop every worker at start, after `config check` said OK."""
    try:
        tls.server_context()
    except OSError as exc:  # ssl.SSLError is one
        files = ", ".join(str(p) for p in (tls.certificate, tls.private_key, tls.ca_file) if p is not None)
        raise ConfigError("node.tls", f"{files}: {exc} (certificate and private_key must be a PEM certificate and "
                                      "its unencrypted PEM key, ca_file a PEM CA bundle)") from None


def _parse_storage(raw: dict[str, Any], base_dir: Path) -> StorageSection:
    defaults = StorageSection()
    reject_unknown(raw, set(StorageSection.__dataclass_fields__), "storage.")
    path = base_dir / Path(get_value(raw, "storage.path", str, str(defaults.path)))
    url = get_value(raw, "storage.database_url", str, defaults.database_url)
    _check_database_url(url)
    return StorageSection(
        path=path,
        database_url=_resolve_sqlite_url(url, base_dir),
        min_free_mb=get_value(raw, "storage.min_free_mb", int, defaults.min_free_mb, minimum=0),
    )


def _check_database_url(url: str) -> None:
    """Parse the URL and find its driver now (no connection is made): a bad port raised ValueError from every
    command, and an unknown driver passed `config check`. A parsed URL is not echoed: it may hold a password."""
    key = "storage.database_url"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(key, f"{url!r} is not an SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...)") from None
    except ValueError:  # make_url's int() of the port
        raise ConfigError(key, "the port in the URL is not a number") from None
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(key, f"the port in the URL, {parsed.port}, must be 1 to 65535")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):  # the index's statements are written for these two
        raise ConfigError(key, f"{parsed.get_backend_name()!r} is not supported: use SQLite or PostgreSQL")
    try:
        parsed.get_dialect().import_dbapi()
    except ArgumentError:  # NoSuchModuleError is one
        raise ConfigError(key, f"{parsed.drivername!r} is not an SQLAlchemy driver (sqlite, postgresql, "
                               "postgresql+psycopg, ...)") from None
    except ImportError as exc:  # "postgresql" alone means psycopg2, which the node does not install
        raise ConfigError(key, f"the driver of {parsed.drivername!r} is not installed ({exc.name}): the node "
                               "installs psycopg, use postgresql+psycopg://...") from None


def _parse_peer(raw: Any, key: str) -> Peer:
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a table")
    reject_unknown(raw, {"ae_title", "host", "port", "allow", "results", "completion_wait_s"}, f"{key}.")
    results = raw.get("results", list(RESULT_KINDS))
    if not isinstance(results, list) or any(r not in RESULT_KINDS for r in results):
        raise ConfigError(f"{key}.results", f"{results!r} must be a list of {', '.join(RESULT_KINDS)}")
    if "ae_title" not in raw:
        raise ConfigError(f"{key}.ae_title", "is required")
    allow_raw = raw.get("allow", [p.value for p in Peer.allow])
    if not isinstance(allow_raw, list):
        raise ConfigError(f"{key}.allow", "must be a list such as [\"echo\", \"store\", \"find\"]")
    allow = set()
    for item in allow_raw:
        try:
            allow.add(Permission(item))
        except ValueError:
            choices = ", ".join(p.value for p in Permission)
            raise ConfigError(f"{key}.allow", f"{item!r} is not one of {choices}") from None
    host = get_value(raw, f"{key}.host", str, "")
    if Permission.DESTINATION in allow and not host:
        raise ConfigError(f"{key}.host", "is required for a destination: where the node sends its results")
    return Peer(
        ae_title=validate_ae_title(raw["ae_title"], f"{key}.ae_title"),
        host=host,
        port=get_port(raw.get("port", 104), f"{key}.port"),
        allow=frozenset(allow),
        results=frozenset(results),
        completion_wait_s=get_value(raw, f"{key}.completion_wait_s", float, None, minimum=0.0) if "completion_wait_s" in raw else None,
    )


def _resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """A relative SQLite path is relative to the config file's folder, like storage.path (any SQLite driver:
    ``sqlite+pysqlite:///./x`` was left relative to wherever the command ran)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") or Path(parsed.database).is_absolute():
        return url
    return parsed.set(database=str((base_dir / parsed.database).resolve())).render_as_string(hide_password=False)
