import re
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, Permission, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_documented_names():
    config = load_config(REPO / "config.toml")
    assert config.node.ae_title == "DICOM_NODE"
    assert config.node.port == 11112
    assert config.storage.path == REPO / "data"
    assert config.storage.database_url == f"sqlite:///{REPO / 'data' / 'index.sqlite'}"
    pacs = config.peer("PACS")
    assert pacs is not None and pacs.host == "127.0.0.1" and pacs.port == 4242
    assert pacs.may(Permission.DESTINATION)
    assert config.jobs.compile_encoder is True  # a node as shipped compiles an fp32 encoder (off by default)
    assert config.jobs.delivery_give_up_h == 168.0  # a week of PACS outage is waited out
    assert parse_config({}, base_dir=REPO).jobs.compile_encoder is False


def test_encoder_precision_is_auto_unless_set(tmp_path):
    from inference.model.precision import EncoderPrecision

    assert parse_config({}, base_dir=tmp_path).jobs.encoder_precision is EncoderPrecision.AUTO
    card = parse_config({"jobs": {"encoder_precision": "card"}}, base_dir=tmp_path)
    assert card.jobs.encoder_precision is EncoderPrecision.CARD


def test_relative_paths_follow_the_config_file(tmp_path):
    (tmp_path / "config.toml").write_text('[storage]\npath = "store"\ndatabase_url = "sqlite:///db/x.sqlite"\n')
    config = load_config(tmp_path / "config.toml")
    assert config.storage.path == tmp_path / "store"
    assert config.storage.database_url == f"sqlite:///{tmp_path / 'db' / 'x.sqlite'}"


@pytest.mark.parametrize("given", ["./models/site", "models/site"])
def test_a_training_start_folder_follows_the_config_file_and_names_stay_names(tmp_path, given):
    """The scheduled run starts in whatever folder the node was started from; a folder in [training]
    start_from must mean the one beside config.toml, as a route's model folder does."""
    (tmp_path / "config.toml").write_text(f'[training]\nstart_from = "{given}"\n')
    assert load_config(tmp_path / "config.toml").training.start_from == str(tmp_path / "models" / "site")
    for name in ("active", "shipped", "v-2026.1", ""):
        assert parse_config({"training": {"start_from": name}}, base_dir=tmp_path).training.start_from == name
    assert parse_config({"training": {"start_from": "/srv/models/x"}}, base_dir=tmp_path).training.start_from == "/srv/models/x"


def test_postgresql_url_is_kept_as_given(tmp_path):
    url = "postgresql+psycopg://node:secret@db.example/dicomnode"
    config = parse_config({"storage": {"database_url": url}}, base_dir=tmp_path)
    assert config.storage.database_url == url


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": "11112"}}, "node.port"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title"),
        ({"node": {"max_pdu": 100}}, "node.max_pdu"),
        ({"node": {"max_associations": 0}}, "node.max_associations"),
        ({"node": {"log_level": "chatty"}}, "node.log_level"),
        ({"node": {"prot": 104}}, "node.prot"),
        ({"storage": {"database_url": "index.sqlite"}}, "storage.database_url"),
        ({"storage": {"database_url": "mysql://node@db/index"}}, "storage.database_url"),
        ({"storage": {"min_free_mb": -1}}, "storage.min_free_mb"),
        ({"peers": [{"host": "pacs"}]}, "peers[0].ae_title"),
        ({"peers": [{"ae_title": "PACS", "allow": ["store", "delete"]}]}, "peers[0].allow"),
        ({"peers": [{"ae_title": "PACS"}, {"ae_title": "PACS"}]}, "peers[1].ae_title"),
        ({"peers": [{"ae_title": "PACS", "port": 0}]}, "peers[0].port"),
        ({"node": {"tls": {"certificate": "missing.crt", "private_key": "missing.key"}}}, "node.tls.certificate"),
        ({"node": {"tls": {"certificate": "x.crt"}}}, "node.tls.private_key"),
        ({"jobs": {"on_late_arrival": "sometimes"}}, "jobs.on_late_arrival"),
        ({"jobs": {"workers": 0}}, "jobs.workers"),
        ({"jobs": {"device": "tpu"}}, "jobs.device"),
        ({"jobs": {"encoder_precision": "fp16"}}, "jobs.encoder_precision"),
        ({"jobs": {"compile_encoder": "yes"}}, "jobs.compile_encoder"),
        ({"jobs": {"completion_wait_s": -1}}, "jobs.completion_wait_s"),
        ({"jobs": {"delivery_give_up_h": 0}}, "jobs.delivery_give_up_h"),
        ({"peers": [{"ae_title": "PACS", "completion_wait_s": "soon"}]}, "peers[0].completion_wait_s"),
        ({"routes": [{"name": "ct", "model": "no/such/folder"}]}, "routes[0].model"),
        ({"routes": [{"model": "active"}]}, "routes[0].name"),
        ({"routes": [{"name": "ct", "model": "active", "modalities": []}]}, "routes[0].modalities"),
        ({"routes": [{"name": "a", "model": "active"}, {"name": "a", "model": "active"}]}, "routes[1].name"),
        ({"training": {"schedule": "every night"}}, "training.schedule"),
        ({"jobs": {"completion_wait_s": float("nan")}}, "jobs.completion_wait_s"),
        ({"node": {"network_timeout_s": float("inf")}}, "node.network_timeout_s"),
        ({"peers": [{"ae_title": "PACS", "allow": ["destination"]}]}, "peers[0].host"),
        ({"peers": [{"ae_title": "CT1"}], "routes": [{"name": "ct", "model": "active", "peers": ["CT_1"]}]}, "routes[0].peers"),
        ({"node": {"port": 0, "workers": 2}}, "node.port"),
    ],
)
def test_bad_values_name_their_key(tmp_path, raw, key):
    with pytest.raises(ConfigError, match="^config: " + re.escape(key) + ": "):
        parse_config(raw, base_dir=tmp_path)


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_peer_host_restriction():
    config = parse_config({"peers": [{"ae_title": "A", "host": "10.0.0.5"}, {"ae_title": "B"}]}, base_dir=Path("."))
    assert config.peer("A ").accepts_host("10.0.0.5")
    assert not config.peer("A").accepts_host("10.0.0.6")
    assert config.peer("B").accepts_host("192.0.2.1")
    assert config.peer("C") is None


def test_peer_host_may_be_a_name_and_ipv4_mapped_addresses_match():
    config = parse_config({"peers": [{"ae_title": "A", "host": "localhost"}, {"ae_title": "B", "host": "127.0.0.1"}]}, base_dir=Path("."))
    assert config.peer("A").accepts_host("127.0.0.1")
    assert config.peer("B").accepts_host("::ffff:127.0.0.1")
    assert not config.peer("A").accepts_host("192.0.2.7")


def test_routes_pick_the_first_match_and_everything_else_is_stored_only(tmp_path):
    from dicom_node.config import ACTIVE_MODEL

    (tmp_path / "brain").mkdir()
    (tmp_path / "brain" / "config.json").write_text("{}")
    config = parse_config({
        "peers": [{"ae_title": "PACS", "completion_wait_s": 5}, {"ae_title": "CT1"}],
        "jobs": {"completion_wait_s": 20},
        "routes": [{"name": "neuro", "modalities": ["mr"], "series_description": "*t1*", "model": "brain"},
                   {"name": "ct", "modalities": ["CT"], "peers": ["CT1"], "model": "active"}],
    }, base_dir=tmp_path)
    assert config.route_for("MR", "PACS", "AX T1 post").name == "neuro"
    assert config.route_for("MR", "PACS", "AX FLAIR") is None
    assert config.route_for("CT", "CT1", "").model == ACTIVE_MODEL
    assert config.route_for("CT", "PACS", "") is None  # only from CT1
    assert config.routes[0].model == tmp_path / "brain"
    assert config.completion_wait_s("PACS") == 5 and config.completion_wait_s("CT1") == 20
