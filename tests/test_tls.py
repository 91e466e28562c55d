"""DICOM TLS with mutual authentication, checked with DCMTK's echoscu."""

import subprocess

import pytest

from dicom_node.config import load_config
from dicom_node.scp import Node
from tests.conftest import TEST_PEERS
from tests.dcmtk import echoscu
from tests.localpeers import free_port, write_node_config


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=dicom-node test CA", cwd=tmp_path)
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1", cwd=tmp_path)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-copy_extensions", "copy", cwd=tmp_path)
    return tmp_path


@pytest.fixture
def tls_node(pki):
    port = free_port()
    tls = '\n[node.tls]\ncertificate = "server.crt"\nprivate_key = "server.key"\nca_file = "ca.crt"\n'
    config = load_config(write_node_config(pki, port, TEST_PEERS, extra=tls))
    assert config.node.tls is not None and config.node.tls.mutual
    node = Node(config)
    node.start()
    yield port
    node.stop()


def test_mutual_tls_echo(tls_node, pki):
    ok = echoscu(tls_node, extra=["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")])
    assert ok.returncode == 0, ok.stderr


def test_plain_tcp_is_refused_on_a_tls_port(tls_node):
    assert echoscu(tls_node).returncode != 0


def test_client_without_certificate_is_refused(tls_node, pki):
    anonymous = echoscu(tls_node, extra=["+tla", "+cf", str(pki / "ca.crt")])
    assert anonymous.returncode != 0
