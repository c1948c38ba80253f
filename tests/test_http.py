"""The node's HTTP service over real HTTP(S): tokens and roles, back-off, /healthz and its reasons,
/metrics from a real Celery+Redis worker, and a full disk during STOW-RS (a real tmpfs)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from starlette.responses import JSONResponse
from starlette.routing import Route

from node.config import Queue, load_config
from node.http.auth import requires
from node.server import Node
from tests import series_factory as make
from tests.certs import CA
from tests.node_fixtures import NodeProcess, node_config
from tests.peers import free_port, storescu, wait_for

pytestmark = pytest.mark.integration

ADMIN_ENV, VIEWER_ENV, PEER_ENV = "SRNODE_TEST_ADMIN_TOKEN", "SRNODE_TEST_VIEWER_TOKEN", "SRNODE_TEST_PEER_TOKEN"
TOKENS = [{"name": "ops", "role": "admin", "token_env": ADMIN_ENV},
          {"name": "grafana", "role": "viewer", "token_env": VIEWER_ENV}]
BOUNDARY = "srnode-http-test"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture
def tokens(monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, "admin-token-for-tests")
    monkeypatch.setenv(VIEWER_ENV, "viewer-token-for-tests")
    monkeypatch.setenv(PEER_ENV, "peer-token-for-tests")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def multipart(parts: list[bytes]) -> bytes:
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (BOUNDARY.encode(), p) for p in parts)
    return body + b"--%s--\r\n" % BOUNDARY.encode()


def test_tokens_roles_back_off_and_health_reasons(tmp_path, tokens, redis_url, monkeypatch):
    """The node's HTTP service in this process (an admin endpoint added the way the app module
    says), against real Redis: each reason /healthz gives, 401/403, the back-off, and the deadline
    on request headers (1 s here)."""
    monkeypatch.setattr("node.http.app.HEADER_TIMEOUT_S", 1)
    port = free_port()
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[], destinations={},
                                               broker=redis_url, http_port=port, tokens=TOKENS)))
    node = Node(load_config(path))

    @requires("admin")
    async def admin_action(request):
        return JSONResponse({"done_by": request.state.token.name})

    node.http.app.router.routes.append(Route("/admin-action", admin_action, methods=["POST"]))
    node.scp.start()
    node.http.start()
    url = f"http://127.0.0.1:{port}"
    try:
        health = requests.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        for opening in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # nothing, or headers never ended
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(opening)
                started = time.monotonic()
                assert s.recv(100) == b"" and time.monotonic() - started < 3  # closed by the node

        none = requests.get(f"{url}/metrics", timeout=10)
        assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Bearer")
        assert requests.get(f"{url}/metrics", headers=bearer("viewer-token-for-tests"), timeout=10).status_code == 200
        assert requests.get(f"{url}/metrics", headers=bearer("admin-token-for-tests"), timeout=10).status_code == 200
        viewer = requests.post(f"{url}/admin-action", headers=bearer("viewer-token-for-tests"), timeout=10)
        assert viewer.status_code == 403 and "grafana is a viewer token" in viewer.json()["error"]
        admin = requests.post(f"{url}/admin-action", headers=bearer("admin-token-for-tests"), timeout=10)
        assert admin.status_code == 200 and admin.json() == {"done_by": "ops"}

        # Each reason, one at a time.
        def reasons() -> list[str]:
            answer = requests.get(f"{url}/healthz", timeout=10)
            assert answer.status_code == 503, answer.text
            return answer.json()["reasons"]

        node.ingest.min_free_bytes = 1 << 62
        assert reasons() == [node.ingest.short_of_space()] and "under retention.min_free_bytes" in reasons()[0]
        node.ingest.min_free_bytes = 0
        running = node.config
        node.config = running.model_copy(update={"queue": Queue(broker=f"redis://127.0.0.1:{free_port()}/0")})
        assert reasons() == ["queue unreachable: ConnectionError"]
        node.config = running
        spool_root = node.spool.root
        node.spool.root = tmp_path / "gone"  # the spool's file system went away
        assert reasons() == ["spool not writable: No such file or directory"]
        assert requests.get(f"{url}/metrics", headers=bearer("viewer-token-for-tests"), timeout=10).status_code == 200
        node.spool.root = spool_root
        node.http.app.state.stow.stopping = True
        assert reasons() == ["the node is stopping"]
        node.http.app.state.stow.stopping = False

        # A reload reaches STOW-RS's sessions too (how long a peer's series are held open).
        changed = yaml.safe_load(path.read_text())
        changed["completion"] = {"quiet_seconds": 1.5, "stow_hold_seconds": 90}
        path.write_text(yaml.safe_dump(changed))
        assert node.reload("test")[0]
        assert node.http.app.state.stow.sessions.timing() == (1.5, 90)
        node.scp.stop()
        assert reasons() == ["the DICOM listener is not running"]

        # Bad tokens: 401 each, then the address is backed off (429), even with a good token. A good
        # token sent between the guesses does not clear them (it would let its holder guess others).
        for guess in range(5):
            assert requests.get(f"{url}/metrics", headers=bearer(f"guess{guess}"), timeout=10).status_code == 401
            if guess < 4:
                assert requests.get(f"{url}/metrics", headers=bearer("viewer-token-for-tests"),
                                    timeout=10).status_code == 200
        blocked = requests.get(f"{url}/metrics", headers=bearer("viewer-token-for-tests"), timeout=10)
        assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    finally:
        node.http.stop()
        node.scp.stop()
        node.ledger.close()


def test_https_when_node_tls_is_set(tmp_path, tokens):
    """HTTPS on the HTTP port: STOW-RS (audited as over TLS, counted in /metrics), the admin API,
    the status page's Secure cookie; and an open DICOM association shown in /metrics."""
    ca = CA(tmp_path / "pki")
    server = ca.issue("node", server=True)
    port = free_port()
    tls = {"port": free_port(), "certificate": str(server.certificate), "private_key": str(server.private_key)}
    peers = [{"ae_title": "STORESCU"}, {"ae_title": "RIS", "stow_auth": {"type": "bearer", "token_env": PEER_ENV}}]
    node = NodeProcess(tmp_path / "node", node_config(free_port(), tmp_path / "spool", routes=[], destinations={},
                                                      peers=peers, http_port=port, tokens=TOKENS, tls=tls)).start()
    try:
        wait_for(lambda: "HTTP service on https://" in node.log(), 10, what="HTTPS service")
        url = f"https://127.0.0.1:{port}"
        assert requests.get(f"{url}/healthz", verify=str(ca.path), timeout=10).json()["status"] == "ok"
        ct = make.ct_small(tmp_path / "ct", "https-stow")[0]
        stow = {"Content-Type": STOW_TYPE}
        body = multipart([ct.read_bytes()])
        sent = requests.post(f"{url}/dicom-web/studies", data=body, verify=str(ca.path), timeout=30,
                             headers={**stow, **bearer("peer-token-for-tests")})
        assert sent.status_code == 200, sent.text
        assert requests.post(f"{url}/dicom-web/studies", data=body, verify=str(ca.path), timeout=30,
                             headers={**stow, **bearer("a-guess")}).status_code == 401
        events = [json.loads(line) for path in sorted((tmp_path / "spool" / "audit").glob("*.jsonl"))
                  for line in path.read_text().splitlines()]
        accepted = [e for e in events if e["event"] == "stow.accepted"]
        rejected = [e for e in events if e["event"] == "stow.rejected"]
        assert [(e["calling_ae"], e["tls"], e["code"], e["stored"], e["refused"]) for e in accepted] == \
            [("RIS", True, 200, 1, 0)]
        assert [(e["address"], e["tls"], e["code"]) for e in rejected] == [("127.0.0.1", True, 401)]
        ae = AE(ae_title="STORESCU")  # an association held open is counted while it lasts
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
        assert assoc.is_established
        try:
            scraped = requests.get(f"{url}/metrics", verify=str(ca.path), headers=bearer("viewer-token-for-tests"),
                                   timeout=10).text
        finally:
            assoc.release()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(scraped) for s in family.samples}
        assert samples[("srnode_associations_active", ())] == 1
        assert samples[("srnode_instances_received_total", (("source", "stow"),))] == 1
        assert requests.get(f"{url}/metrics", verify=str(ca.path), headers=bearer("viewer-token-for-tests"),
                            timeout=10).status_code == 200
        # The admin API and the status page's session cookie, over HTTPS (Secure there).
        assert requests.get(f"{url}/api/jobs", verify=str(ca.path), headers=bearer("viewer-token-for-tests"),
                            timeout=10).json() == {"jobs": []}
        signin = requests.post(f"{url}/signin", data={"token": "viewer-token-for-tests"}, verify=str(ca.path),
                               allow_redirects=False, timeout=10)
        assert signin.status_code == 303 and "secure" in signin.headers["set-cookie"].lower()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)  # no plain HTTP on that port
    finally:
        node.stop()


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", headers=bearer("viewer-token-for-tests"), timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_cover_the_node_and_a_redis_worker(make_node, tmp_path, tokens, redis_url):
    out = tmp_path / "archive"
    port = free_port()
    node = make_node(start=False, broker=redis_url, http_port=port, tokens=TOKENS,
                     peers=[{"ae_title": "STORESCU"}, {"ae_title": "RIS", "stow_auth": {"type": "bearer", "token_env": PEER_ENV}}],
                     destinations={"archive": {"type": "folder", "path": str(out)}},
                     routes=[{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp",
                              "options": {"inplane_scale": 2, "method": "linear"}, "send_to": ["archive"]}])
    node.start()
    ct = make.ct_volume(tmp_path / "ct", "metrics", 3)
    assert storescu(ct, node.port).returncode == 0
    url = f"http://127.0.0.1:{port}"
    # No worker yet: the job waits on the queue, and the gauge says so.
    wait_for(lambda: _metrics(url)[("srnode_queue_depth", ())] == 1, 30, what="the job on the queue")
    node.start_worker()
    refused = requests.post(f"{url}/dicom-web/studies", data=multipart([b"no DICOM here"]), timeout=30,
                            headers={"Content-Type": STOW_TYPE, **bearer("peer-token-for-tests")})
    assert refused.status_code == 409
    node.wait_jobs(lambda jobs: len(jobs) == 1 and jobs[0]["state"] == "delivered", 120, what="delivered")
    wait_for(lambda: _metrics(url)[("srnode_associations_active", ())] == 0, 30, what="association ended")
    m = _metrics(url)
    assert m[("srnode_instances_received_total", (("source", "dimse"),))] == 3
    assert m[("srnode_instances_received_total", (("source", "stow"),))] == 0
    assert m[("srnode_instances_refused_total", (("reason", "cannot_parse"),))] == 1
    assert m[("srnode_series_completed_total", ())] == 1
    for state in ("pending", "queued", "done", "delivered"):
        assert m[("srnode_jobs_total", (("pipeline", "interp"), ("state", state)))] == 1, state
    assert m[("srnode_job_duration_seconds_count", (("pipeline", "interp"),))] == 1  # from the worker's result
    assert 0 < m[("srnode_job_duration_seconds_sum", (("pipeline", "interp"),))] < 120
    assert m[("srnode_completion_latency_seconds_count", ())] == 1
    assert 0.5 <= m[("srnode_completion_latency_seconds_sum", ())] < 30  # at least the quiet period
    assert m[("srnode_deliveries_total", (("destination", "archive"), ("outcome", "sent")))] == 3
    assert m[("srnode_queue_depth", ())] == 0
    assert m[("srnode_spool_free_bytes", ())] > 0
    text = requests.get(f"{url}/metrics", headers=bearer("viewer-token-for-tests"), timeout=10).text
    source = dcmread(ct[0], stop_before_pixels=True)
    for private in (source.StudyInstanceUID, source.SeriesInstanceUID, str(source.PatientName), source.PatientID):
        assert private not in text
    assert "run_job" in node.log()  # the separate worker ran it


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


def test_a_full_disk_gets_503_at_stow_rs_and_0xa700_at_c_store(make_node, tmp_path, tokens):
    """The spool on a 12 MiB tmpfs: a STOW-RS body that fills it is answered 503 (the client reads the
    answer: no reset connection), and below retention.min_free_bytes STOW-RS gets 503 (at once when
    it waits for 100-continue), C-STORE 0xA700 and /healthz says why."""
    spool = tmp_path / "tmpfs"
    _mount_tmpfs(spool, "12m")
    port = free_port()
    node = None
    try:
        node = make_node(start=False, http_port=port, routes=[], destinations={}, retention={"min_free_bytes": 2 << 20},
                         peers=[{"ae_title": "STORESCU"}, {"ae_title": "RIS", "stow_auth": {"type": "bearer", "token_env": PEER_ENV}}])
        node.config["node"]["spool"] = str(spool)
        node.spool = spool
        node.config_path.write_text(yaml.safe_dump(node.config))
        node.start()
        wait_for(lambda: any(spool.glob("*.pid")), 10, what="the node's pid file (written after the start)")
        url = f"http://127.0.0.1:{port}"
        headers = {"Content-Type": STOW_TYPE, **bearer("peer-token-for-tests")}
        part = make.ct_small(tmp_path / "ct", "disk-full")[0].read_bytes()
        filler = spool / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(spool).free - (5 << 20)))  # 5 MiB left
        body = multipart([part] * (8 * (1 << 20) // len(part)))  # 8 MiB: passes the free-space check, then fills
        answer = requests.post(f"{url}/dicom-web/studies", data=body, headers=headers, timeout=60)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "60", answer.text
        assert "node disk full" in answer.text
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # the buffer is gone again

        filler.write_bytes(b"\0" * (shutil.disk_usage(spool).free + filler.stat().st_size - (1 << 20)))  # 1 MiB left
        answer = requests.post(f"{url}/dicom-web/studies", data=multipart([part]), headers=headers, timeout=60)
        assert answer.status_code == 503 and "under retention.min_free_bytes" in answer.text
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # waits for 100-continue
            s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                      "Authorization: Bearer peer-token-for-tests\r\nContent-Length: 1000000\r\n"
                      "Expect: 100-continue\r\n\r\n".encode())
            assert s.makefile("rb").readline().startswith(b"HTTP/1.1 503")
        assert storescu([tmp_path / "ct"], node.port, check=False).returncode != 0
        assert "C-STORE from STORESCU: SOP " in node.log() and "refused: node disk nearly full" in node.log()
        health = requests.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 503 and any("under retention.min_free_bytes" in r for r in health.json()["reasons"])
        assert not list((spool / "series").rglob("*.dcm"))  # nothing half-stored
        assert node.proc.poll() is None
    finally:
        if node is not None:
            node.stop()
        time.sleep(0.2)
        subprocess.run(["umount", "-l", str(spool)], check=False)
