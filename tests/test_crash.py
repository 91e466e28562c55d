"""Durability: what the sender was told is stored must survive a SIGKILL of the node."""

import re
import signal
import subprocess

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, select

from dicom_node.config import load_config
from dicom_node.scp import Node
from storage.files import TEMP_PREFIX
from storage.models import Instance
from tests.conftest import TEST_PEERS
from tests.localpeers import PEER_ENV, free_port, start_node, wait_until_closed, write_node_config


def indexed_uids(config) -> dict[str, str]:
    engine = create_engine(config.storage.database_url)
    with engine.connect() as connection:
        rows = dict(connection.execute(select(Instance.sop_instance_uid, Instance.path)).all())
    engine.dispose()
    return rows


@pytest.mark.slow
def test_sigkill_during_storescu_loses_no_acknowledged_instance(tmp_path):
    from benchmarks.ct_series import write_ct_series

    series = write_ct_series(tmp_path / "series", slices=150, seed=7)
    port = free_port()
    config_path = write_node_config(tmp_path / "node", port, TEST_PEERS)
    node = start_node(config_path, port, tmp_path / "node")
    sender = subprocess.Popen(
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port), *map(str, series)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=PEER_ENV,
    )
    acknowledged, current, killed = [], None, False
    for line in sender.stdout:
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line:
            acknowledged.append(current)
            if len(acknowledged) == 40 and not killed:
                node.process.send_signal(signal.SIGKILL)
                killed = True
    sender.wait(timeout=60)
    node.process.wait(timeout=10)
    assert killed and sender.returncode != 0
    assert 40 <= len(acknowledged) < len(series)
    # The workers die with their supervisor: until they have, a probe of the port could reach a dying one
    # and the restarted node would be taken for listening before it does (seen under load).
    wait_until_closed(port)

    restarted = start_node(config_path, port, tmp_path / "node")
    try:
        config = load_config(config_path)
        rows = indexed_uids(config)
        for path in acknowledged:
            sop_uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert sop_uid in rows, f"acknowledged {path} is not in the index"
            stored = config.storage.path / rows[sop_uid]
            assert dcmread(stored).PixelData == dcmread(path).PixelData
        on_disk = {p.relative_to(config.storage.path).as_posix() for p in config.storage.path.glob("*/*/*.dcm")}
        assert on_disk == set(rows.values())
        assert not list(config.storage.path.rglob(f"{TEMP_PREFIX}*"))
        # The sender retries the whole series: everything lands once.
        retry = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port), *map(str, series)],
                               capture_output=True, env=PEER_ENV, timeout=120)
        assert retry.returncode == 0
        assert len(indexed_uids(config)) == len(series)
    finally:
        restarted.stop()


def test_recovery_indexes_renamed_but_uncommitted_files_and_drops_temporaries(tmp_path, ct_series):
    """The two states a crash mid-C-STORE can leave, recreated by hand."""
    port = free_port()
    config = load_config(write_node_config(tmp_path, port, TEST_PEERS))
    node = Node(config)
    node.start()
    try:
        from tests.dcmtk import storescu_verbose

        assert len(storescu_verbose(port, ct_series[:2]).succeeded()) == 2
    finally:
        node.stop()
    rows = indexed_uids(config)
    stored = config.storage.path / next(iter(rows.values()))
    orphan = stored.parent / "1.2.3.4.5.6.dcm"
    ds = dcmread(stored)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    ds.save_as(orphan)
    (stored.parent / f"{TEMP_PREFIX}crash.tmp").write_bytes(b"half")
    node = Node(config)
    node.start()
    try:
        rows = indexed_uids(config)
        assert "1.2.3.4.5.6" in rows and len(rows) == 3
        assert not list(stored.parent.glob(f"{TEMP_PREFIX}*"))
    finally:
        node.stop()
