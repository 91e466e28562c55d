"""Configuration mistakes that passed `dicom-node config check` and failed later, or silently misbehaved."""

import dataclasses
import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy.engine import make_url

from dicom_node.config import ACTIVE_MODEL, ConfigError, load_config, parse_config
from dicom_node.jobs import JobService
from tests.localpeers import write_node_config
from tests.test_tls import pki  # noqa: F401 - fixture


def bad(raw, key, tmp_path, message=""):
    with pytest.raises(ConfigError, match="^config: " + re.escape(key) + ": " + message):
        parse_config(raw, base_dir=tmp_path)


# -- the node's own AE title ---------------------------------------------------------------------------------

def test_the_node_ae_title_may_not_be_a_peers(tmp_path):
    """Completion takes what the node's own AE title sends for the node's results (stored only): a peer with
    that title would never have a series interpreted."""
    bad({"node": {"ae_title": "PACS"}, "peers": [{"ae_title": "CT1"}, {"ae_title": "PACS "}]}, "peers[1].ae_title",
        tmp_path, ".*node.ae_title")
    assert parse_config({"node": {"ae_title": "NODE"}, "peers": [{"ae_title": "PACS"}]}, base_dir=tmp_path).peer("PACS")


# -- a route's model -----------------------------------------------------------------------------------------

def test_a_route_model_must_name_something(tmp_path):
    """model = "" was the config file's own folder, which passed the check as a "model folder"."""
    bad({"routes": [{"name": "ct", "model": ""}]}, "routes[0].model", tmp_path)


def test_a_route_model_folder_holds_a_checkpoint_or_a_unibiomed_model(tmp_path):
    (tmp_path / "builtin").mkdir()
    (tmp_path / "builtin" / "model_card.json").write_text("{}")
    (tmp_path / "unibiomed").mkdir()
    (tmp_path / "unibiomed" / "config.json").write_text("{}")
    config = parse_config({"routes": [{"name": "a", "model": "builtin"}, {"name": "b", "model": "unibiomed"},
                                      {"name": "c", "model": "active"}]}, base_dir=tmp_path)
    assert [r.model for r in config.routes] == [tmp_path / "builtin", tmp_path / "unibiomed", ACTIVE_MODEL]


def test_a_route_naming_a_folder_without_a_model_is_refused_at_load(tmp_path):
    """A folder that exists but holds no model (a typo'd version, the models folder itself) passed the check;
    the node then failed every job of the route "holds no model"."""
    (tmp_path / "models" / "v1").mkdir(parents=True)
    (tmp_path / "models" / "v1" / "weights.safetensors").write_bytes(b"")
    for name in ("models", "models/v1"):
        bad({"routes": [{"name": "ct", "model": name}]}, "routes[0].model", tmp_path, ".*is not a model folder")


# -- the training schedule -----------------------------------------------------------------------------------

SUNDAY_NOON = (2026, 3, 1, 12, 0)  # 1 March 2026 was a Sunday


def fire_days(trigger, count=7):
    """The weekdays of the trigger's next ``count`` fire times after Sunday noon, in the trigger's time zone."""
    now, days = datetime(*SUNDAY_NOON, tzinfo=trigger.timezone), []
    for _ in range(count):
        now = trigger.get_next_fire_time(None, now)
        days.append(now.strftime("%a"))
        now += timedelta(minutes=1)
    return days


@pytest.mark.parametrize(("line", "days"), [
    ("0 2 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon", "Tue"]),
    ("0 2 * * mon-fri", ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon", "Tue"]),
    ("0 2 * * MON-FRI", ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon", "Tue"]),
    ("* * * * 0", ["Sun"] * 7),
    ("* * * * 7", ["Sun"] * 7),
    ("* * * * sun", ["Sun"] * 7),
    ("0 3 * * 6,0", ["Sat", "Sun", "Sat", "Sun", "Sat", "Sun", "Sat"]),
    ("0 3 * * 5-7", ["Fri", "Sat", "Sun", "Fri", "Sat", "Sun", "Fri"]),
    ("0 3 * * sat-sun", ["Sat", "Sun", "Sat", "Sun", "Sat", "Sun", "Sat"]),
    ("0 3 * * 1-5/2", ["Mon", "Wed", "Fri", "Mon", "Wed", "Fri", "Mon"]),
    ("0 3 * * */3", ["Wed", "Sat", "Sun", "Wed", "Sat", "Sun", "Wed"]),
    ("0 3 * * 4/2", ["Thu", "Sat", "Thu", "Sat", "Thu", "Sat", "Thu"]),
    ("30 2 * * *", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]),
])
def test_crontab_weekdays_mean_what_they_mean_in_crontab(line, days):
    """APScheduler's from_crontab counts 0 as Monday: "1-5" ran Tuesday to Saturday and 7 was refused."""
    from dicom_node.config_values import crontab_trigger

    assert fire_days(crontab_trigger(line)) == days


@pytest.mark.parametrize("line", ["* * * * 8", "* * * * 1-9", "* * * * funday", "* * * * 5-1", "* * * * */0",
                                  "every night", "* * * *", "0 2 1 * mon"])
def test_a_bad_crontab_line_is_refused_at_load(tmp_path, line):
    bad({"training": {"schedule": line}}, "training.schedule", tmp_path)


def test_the_scheduled_training_runs_on_the_configured_weekdays(tmp_path):
    """What jobs.py schedules, not only what config.py accepts: "1-5" and "7" load, and run Mon-Fri and Sunday."""
    config = load_config(write_node_config(tmp_path, 11112, [], extra='\n[training]\nschedule = "0 2 * * 1-5"\n'))
    for schedule, days in (("0 2 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon", "Tue"]), ("0 2 * * 7", ["Sun"] * 7)):
        service = JobService(dataclasses.replace(config, training=dataclasses.replace(config.training, schedule=schedule),
                                                 jobs=dataclasses.replace(config.jobs, poll_s=60.0)))
        service.start()
        try:
            assert fire_days(service.scheduler.get_job("scheduled-training").trigger) == days
        finally:
            service.stop()
    assert parse_config({"training": {"schedule": "0 2 * * 7"}}, base_dir=tmp_path).training.schedule == "0 2 * * 7"


# -- the database URL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "message"), [
    ("postgresql+psycopg://u:secret@db:54x2/x", "the port"),
    ("postgresql+psycopg://u@db:70000/x", "the port"),
    ("postgresql+nosuchdriver://u@db/x", "'postgresql\\+nosuchdriver'"),
    ("sqlite+nosuchdriver:///x.sqlite", "'sqlite\\+nosuchdriver'"),
    ("postgresql://u:secret@db/x", r"the driver of 'postgresql' is not installed \(psycopg2\): .*postgresql\+psycopg://"),
])
def test_a_bad_database_url_is_refused_at_load_without_a_traceback(tmp_path, url, message):
    bad({"storage": {"database_url": url}}, "storage.database_url", tmp_path, message)
    with pytest.raises(ConfigError) as error:
        parse_config({"storage": {"database_url": url}}, base_dir=tmp_path)
    assert "secret" not in str(error.value)


def test_the_usual_database_urls_still_load(tmp_path):
    for url in ("postgresql+psycopg://u@db:5432/x", "sqlite:///x.sqlite", "sqlite+pysqlite:///x.sqlite"):
        loaded = parse_config({"storage": {"database_url": url}}, base_dir=tmp_path).storage.database_url
        assert loaded.split(":")[0] == url.split(":")[0]


@pytest.mark.parametrize("url", ["sqlite:///./data/x.sqlite", "sqlite+pysqlite:///./data/x.sqlite", "sqlite:///data/x.sqlite"])
def test_a_relative_sqlite_path_is_relative_to_the_config_file_with_any_driver(tmp_path, url):
    loaded = make_url(parse_config({"storage": {"database_url": url}}, base_dir=tmp_path).storage.database_url)
    assert loaded.drivername == make_url(url).drivername and loaded.database == str(tmp_path / "data" / "x.sqlite")


# -- TLS -----------------------------------------------------------------------------------------------------

def tls(**files):
    return {"node": {"tls": {"certificate": "server.crt", "private_key": "server.key", **files}}}


def test_tls_files_that_do_not_load_are_refused_at_load(pki, tmp_path):  # noqa: F811
    """Workers failed with "[SSL] PEM lib" and nothing listened, after config check had said OK."""
    assert parse_config(tls(ca_file="ca.crt"), base_dir=pki).node.tls.mutual
    (pki / "notes.txt").write_text("not a certificate\n")
    bad(tls(certificate="notes.txt"), "node.tls", pki, ".*notes.txt")
    bad(tls(private_key="notes.txt"), "node.tls", pki)
    bad(tls(private_key="ca.key"), "node.tls", pki)  # a key of another certificate
    bad(tls(ca_file="notes.txt"), "node.tls", pki, ".*notes.txt")
