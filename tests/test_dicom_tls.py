"""DICOM TLS (issue 21): the node's TLS listener against real dcmtk clients (echoscu/storescu +tls),
mutual TLS, TLS 1.2 minimum, peers that must use TLS, a TLS `dicom` destination against Orthanc's
DICOM TLS, and `srnode config check` on the certificate files."""
from __future__ import annotations

import ssl
import subprocess
import sys

import pytest
import yaml
from pydicom import dcmread

from node.config import load_config
from node.dispatch import dicom as dicom_dest
from tests import dicom_wire as wire
from tests import series_factory as make
from tests.certs import CA
from tests.node_fixtures import NodeProcess, node_config
from tests.peers import Orthanc, echoscu, free_port, storescu, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CA(folder)
    return {"folder": folder, "ca": ca, "server": ca.issue("node", server=True), "client": ca.issue("ct1"),
            "stranger": CA(folder, "stranger CA").issue("intruder")}


def _node(root, pki, require: bool, plain: bool = True) -> NodeProcess:
    tls = {"port": free_port(), "certificate": str(pki["server"].certificate),
           "private_key": str(pki["server"].private_key), "ca_certificates": str(pki["ca"].path),
           "require_client_certificate": require}
    peers = [{"ae_title": "STORESCU"}, {"ae_title": "CT1", "tls": True}]
    config = node_config(free_port(), root / "spool", routes=[], destinations={}, peers=peers, tls=tls)
    if not plain:
        config["node"]["port"] = None
    return NodeProcess(root, config).start()


@pytest.fixture(scope="module")
def mutual_node(tmp_path_factory, pki):
    node = _node(tmp_path_factory.mktemp("tls-mutual"), pki, require=True)
    yield node
    node.stop()
    assert "Traceback" not in node.log(), node.log()[-5000:]


def tls_args(pki, pair="client") -> list[str]:
    args = ["+tls", str(pki[pair].private_key), str(pki[pair].certificate)] if pair else ["+tla"]
    return [*args, "+cf", str(pki["ca"].path)]


def test_echoscu_and_storescu_over_mutual_tls(mutual_node, pki, tmp_path):
    assert echoscu(mutual_node.tls_port, calling_ae="CT1", extra=tls_args(pki)).returncode == 0
    files = make.ct_volume(tmp_path / "ct", "tls-store", 10)
    assert storescu(files, mutual_node.tls_port, calling_ae="CT1", extra=tls_args(pki)).returncode == 0
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        wait_for(lambda: any(mutual_node.spool.joinpath("series").rglob(f"*{ds.SOPInstanceUID}*")), 5,
                 what="instance spooled")
    assert "association from CT1@127.0.0.1 over TLSv1." in mutual_node.log()
    assert "client certificate O=srnode tests,CN=ct1" in mutual_node.log()


def test_no_client_certificate_is_refused_when_required(mutual_node, pki):
    out = echoscu(mutual_node.tls_port, calling_ae="CT1", extra=tls_args(pki, pair=None), check=False)
    assert out.returncode != 0
    wait_for(lambda: "refused a connection from 127.0.0.1: TLS handshake failed" in mutual_node.log(), 5,
             what="handshake refusal logged")
    assert echoscu(mutual_node.tls_port, calling_ae="CT1", extra=tls_args(pki)).returncode == 0  # no back-off yet


def test_client_certificate_of_another_ca_is_refused(mutual_node, pki):
    sock = wire.connect(mutual_node.tls_port, "127.0.7.1")
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    ctx.load_cert_chain(str(pki["stranger"].certificate), str(pki["stranger"].private_key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(wire.assoc_rq(calling=b"CT1"))
            assert tls.recv(6) == b""  # TLS 1.3: the refusal arrives after the client's Finished


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_at_the_handshake(mutual_node, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki["ca"].path))
    ctx.load_cert_chain(str(pki["client"].certificate), str(pki["client"].private_key))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    sock = wire.connect(mutual_node.tls_port, "127.0.7.2")
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(sock, server_hostname="localhost")
    wait_for(lambda: "refused a connection from 127.0.7.2: TLS handshake failed" in mutual_node.log(), 5,
             what="TLS 1.1 refusal logged")


def test_silent_tls_client_does_not_block_the_port(mutual_node, pki):
    """pynetdicom does the handshake in the accepting thread: one silent client stopped the port."""
    silent = [wire.connect(mutual_node.tls_port, "127.0.7.3") for _ in range(3)]
    try:
        assert echoscu(mutual_node.tls_port, calling_ae="CT1", extra=tls_args(pki), timeout=5).returncode == 0
    finally:
        for sock in silent:
            sock.close()


def test_plain_association_of_a_tls_peer_is_rejected(mutual_node):
    out = echoscu(mutual_node.port, calling_ae="CT1", check=False)
    assert out.returncode != 0 and "Association Rejected" in out.stdout + out.stderr
    wait_for(lambda: "rejected association from CT1@127.0.0.1: peer CT1 must use DICOM TLS" in mutual_node.log(), 5,
             what="TLS-only rejection logged")
    assert echoscu(mutual_node.port, calling_ae="STORESCU").returncode == 0  # others may stay plain


def test_tls_only_node_without_plain_port(tmp_path, pki):
    root = tmp_path / "tls-only"
    node = _node(root, pki, require=False, plain=False)
    try:
        assert node.config["node"]["port"] is None
        # optional client certificate: anonymous TLS is fine for a peer without one
        assert echoscu(node.tls_port, calling_ae="STORESCU", extra=tls_args(pki, pair=None)).returncode == 0
    finally:
        node.stop()


# -- the destination side: Orthanc as a TLS PACS --------------------------------------------------
@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory, pki):
    server = Orthanc(tmp_path_factory.mktemp("orthanc-tls"), aet="TLSPACS",
                     tls={"certificate": pki["server"].certificate, "private_key": pki["server"].private_key,
                          "trusted": pki["ca"].path, "require_client_certificate": True}).start()
    yield server
    server.kill()


def _destination(pki, orthanc, client: bool = True, ca=None) -> dict:
    tls = {"ca_certificates": str(ca or pki["ca"].path)}
    if client:
        tls.update(certificate=str(pki["client"].certificate), private_key=str(pki["client"].private_key))
    return {"type": "dicom", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": orthanc.dicom_port, "tls": tls}


def test_dicom_destination_stores_over_tls_to_orthanc(tmp_path, pki, tls_orthanc):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[],
                                               destinations={"pacs": _destination(pki, tls_orthanc)})))
    config = load_config(path, check_pipelines=False)
    files = make.ct_volume(tmp_path / "ct", "tls-dest", 5)
    outcomes = dicom_dest.store(config.destinations["pacs"], "SRNODE", files)
    assert [o.kind for o in outcomes] == ["sent"] * 5, outcomes
    for f in files:
        assert tls_orthanc.find_instance(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
    out = subprocess.run([sys.executable, "-m", "node.cli", "echo", "pacs", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "success" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("client, other_ca", [(False, False), (True, True)])
def test_dicom_destination_tls_failures_are_retried_not_sent_plain(tmp_path, pki, tls_orthanc, client, other_ca):
    """No client certificate when Orthanc requires one; a PACS certificate our CA did not sign."""
    ca = CA(tmp_path / "other").path if other_ca else None
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[],
                                               destinations={"pacs": _destination(pki, tls_orthanc, client, ca)})))
    config = load_config(path, check_pipelines=False)
    ok, text = dicom_dest.echo(config.destinations["pacs"], "SRNODE")
    assert not ok and "TLS handshake failed" in text, text


# -- srnode config check ---------------------------------------------------------------------------
def _check(tmp_path, pki, server) -> subprocess.CompletedProcess:
    path = tmp_path / "check.yaml"
    tls = {"port": 2762, "certificate": str(server.certificate), "private_key": str(server.private_key),
           "ca_certificates": str(pki["ca"].path)}
    path.write_text(yaml.safe_dump(node_config(11112, tmp_path / "spool", routes=[], destinations={}, tls=tls)))
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_config_check_accepts_good_tls_files(tmp_path, pki):
    out = _check(tmp_path, pki, pki["server"])
    assert out.returncode == 0, out.stderr
    assert "DICOM TLS on 127.0.0.1:2762 (client certificate optional)" in out.stdout and "warning" not in out.stdout


def test_config_check_warns_within_30_days_of_expiry(tmp_path, pki):
    out = _check(tmp_path, pki, pki["ca"].issue("soon", server=True, days=10))
    assert out.returncode == 0, out.stderr
    assert "warning: node.tls.certificate" in out.stdout and "in less than 30 days" in out.stdout


@pytest.mark.parametrize("problem", ["expired", "mismatch", "missing", "not yet valid"])
def test_config_check_refuses_bad_tls_files(tmp_path, pki, problem):
    server = pki["ca"].issue(f"bad-{problem.replace(' ', '-')}", server=True,
                             days=-1 if problem == "expired" else 365, start_days=5 if problem == "not yet valid" else -2)
    if problem == "mismatch":
        server.private_key = pki["client"].private_key
    if problem == "missing":
        server.certificate = tmp_path / "nowhere.pem"
    out = _check(tmp_path, pki, server)
    assert out.returncode != 0
    expected = {"expired": "expired on", "mismatch": "does not match", "missing": "cannot read",
                "not yet valid": "is not valid before"}[problem]
    assert expected in out.stderr, out.stderr
