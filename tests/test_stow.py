"""The STOW-RS receiver against real clients: Orthanc's DICOMweb plugin and requests."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import signal
import socket
import time

import pytest
import requests
import yaml
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, generate_uid

from node.assembly import Assembler
from node.config import load_config
from node.dispatch.dicomweb import _xml_reasons
from node.ingest import Ingest
from node.ledger import Ledger
from node.server import Node
from node.spool import Spool, make_dirs
from node.http.stow import MIN_RATE_BPS, MIN_RATE_GRACE_S, PeerSessions, _parts, read_budget, too_slow
from tests import series_factory as make
from tests.node_fixtures import node_config
from tests.peers import echoscu, free_port, wait_for

pytestmark = pytest.mark.integration

PASSWORD_ENV, TOKEN_ENV = "SRNODE_TEST_STOW_PASSWORD", "SRNODE_TEST_STOW_TOKEN"
BOUNDARY = "srnode-test-boundary"


def multipart(parts: list[bytes], boundary: str = BOUNDARY) -> bytes:
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p) for p in parts)
    return body + b"--%s--\r\n" % boundary.encode()


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture
def stow_env(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "pw-for-tests")
    monkeypatch.setenv(TOKEN_ENV, "token-for-tests")


def stow_node(make_node, **kwargs):
    port = free_port()
    peers = [{"ae_title": "WEBPACS", "stow_auth": {"type": "basic", "username": "webpacs", "password_env": PASSWORD_ENV}},
             {"ae_title": "RIS", "stow_auth": {"type": "bearer", "token_env": TOKEN_ENV}},
             {"ae_title": "FARAWAY", "host": "10.255.255.1",
              "stow_auth": {"type": "basic", "username": "faraway", "password_env": PASSWORD_ENV}},
             {"ae_title": "STORESCU"}]
    node = make_node(http_port=port, peers=kwargs.pop("peers", peers), **kwargs)
    return node, f"http://127.0.0.1:{port}/dicom-web"


def test_orthanc_sends_a_study_by_stow_rs_and_gets_the_results_back(make_node, orthanc, tmp_path, stow_env):
    """Orthanc's own STOW-RS client (``/dicom-web/servers/{name}/stow``) sends a CT study; the node
    routes it by the peer's AE title and sends the derived series back to it by C-STORE."""
    ct = make.ct_volume(tmp_path / "ct", "stow-orthanc", 6)
    node, url = stow_node(
        make_node, destinations={},
        peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                "stow_auth": {"type": "basic", "username": "orthanc", "password_env": PASSWORD_ENV}}],
        routes=[{"name": "ct", "match": {"Modality": "CT", "calling_ae": "ORTHANC"}, "pipeline": "interp",
                 "options": {"inplane_scale": 2, "method": "cubic"}, "send_to": ["sender"]}],
    )
    for path in ct:
        orthanc.http.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=30).raise_for_status()
    source = dcmread(ct[0], stop_before_pixels=True)
    [study] = [r["ID"] for r in orthanc.http.post(f"{orthanc.url}/tools/lookup", data=source.StudyInstanceUID,
                                                  timeout=30).json() if r["Type"] == "Study"]
    server = f"srnode-{node.port}"
    orthanc.http.put(f"{orthanc.dicomweb_url}/servers/{server}", timeout=30,
                     json={"Url": url, "Username": "orthanc", "Password": "pw-for-tests"}).raise_for_status()
    answer = orthanc.http.post(f"{orthanc.dicomweb_url}/servers/{server}/stow", json={"Resources": [study]}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert "STOW-RS from ORTHANC@127.0.0.1: 6 instance(s) stored, 0 refused (HTTP 200)" in node.log()
    node.wait_jobs(lambda jobs: len(jobs) == 1 and jobs[0]["state"] == "delivered", 120, what="delivered to sender")
    series = [s for s in orthanc.series_of_study(source.StudyInstanceUID)
              if s["0020000E"]["Value"][0] != source.SeriesInstanceUID]
    assert len(series) == 1 and series[0]["00201209"]["Value"][0] == 6


def _reasons(answer: requests.Response) -> dict[str, int]:
    """SOP Instance UID (or "?") -> Failure Reason, from a DICOM JSON STOW-RS answer."""
    failed = answer.json().get("00081198", {}).get("Value", [])
    return {item["00081155"].get("Value", ["?"])[0]: item["00081197"]["Value"][0] for item in failed}


def _stored(answer: requests.Response) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.json().get("00081199", {}).get("Value", [])]


def test_stow_rs_answers(make_node, tmp_path, stow_env):
    node, url = stow_node(make_node, routes=[], destinations={})
    ct = make.ct_volume(tmp_path / "ct", "stow-answers", 4)
    raw = [p.read_bytes() for p in ct]
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct]
    study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    basic = ("webpacs", "pw-for-tests")
    post = lambda body, **kw: requests.post(f"{url}/studies", data=body, timeout=30,  # noqa: E731
                                            **{"headers": {"Content-Type": STOW_TYPE}, "auth": basic, **kw})

    # Who may send.
    assert post(multipart(raw[:1]), auth=None).status_code == 401
    assert post(multipart(raw[:1]), auth=("webpacs", "wrong")).status_code == 401
    assert post(multipart(raw[:1]), auth=("faraway", "pw-for-tests")).status_code == 403  # host-restricted peer
    assert "peer FARAWAY is only allowed from 10.255.255.1" in node.log()
    # What is a STOW-RS request.
    assert post(raw[0], headers={"Content-Type": "application/dicom"}).status_code == 415
    assert requests.post(f"{url}/series", data=b"", auth=basic, timeout=30).status_code == 404
    assert requests.get(f"{url}/studies", auth=basic, timeout=30).status_code == 405
    assert post(multipart(raw[:2])[:-300]).status_code == 400  # the second part and the close cut off
    assert not list((node.spool / "series").glob("*/*/*.dcm"))  # nothing was stored, not even part one

    # Bearer token, chunked body (a generator): both instances stored, byte for byte.
    chunks = iter([multipart(raw[:2])[:1000], multipart(raw[:2])[1000:]])
    answer = post(chunks, auth=None, headers={"Content-Type": STOW_TYPE, "Authorization": "Bearer token-for-tests"})
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/dicom+json"
    assert sorted(_stored(answer)) == sorted(uids[:2])
    stored = {p.stem: p.read_bytes() for p in (node.spool / "series").glob("*/*/*.dcm")}
    assert stored == dict(zip(uids[:2], raw[:2]))

    # Some refused (202), each with its reason; the good one stored.
    cut = raw[2][:-500]
    not_storage = dcmread(io.BytesIO(raw[3]))
    not_storage.SOPClassUID = not_storage.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.1"
    odd_syntax = dcmread(io.BytesIO(raw[3]))  # a well-formed MPEG-2 file: a syntax the node does not take
    odd_syntax.SOPInstanceUID = odd_syntax.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    odd_syntax.PixelData = encapsulate([odd_syntax.PixelData])
    odd_syntax.file_meta.TransferSyntaxUID = MPEG2MPML
    buffers = []
    for ds in (not_storage, odd_syntax):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffers.append(buffer.getvalue())
    answer = post(multipart([raw[3], cut, b"no DICOM at all", *buffers]))
    assert answer.status_code == 202, answer.text
    assert _stored(answer) == [uids[3]]
    assert _reasons(answer) == {uids[2]: 0xC000, "?": 0xC000, uids[3]: 0x0122,
                                str(odd_syntax.SOPInstanceUID): 0xC122}
    # The same answer in DICOM XML for a client that takes only that; 406 for one that takes neither.
    body = multipart([raw[3], cut, b"no DICOM at all", *buffers])
    answer = post(body, headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+xml"})
    assert answer.status_code == 202 and answer.headers["Content-Type"] == "application/dicom+xml"
    failed, _ = _xml_reasons(answer.content)  # the node's own STOW-RS client reads it
    assert failed == {uids[2]: 0xC000, "": 0xC000, uids[3]: 0x0122, str(odd_syntax.SOPInstanceUID): 0xC122}
    assert post(body, headers={"Content-Type": STOW_TYPE, "Accept": "text/html"}).status_code == 406

    # None stored (409): the instances are not in the study the URL names.
    answer = requests.post(f"{url}/studies/1.2.3.4", data=multipart(raw[:1]), headers={"Content-Type": STOW_TYPE},
                           auth=basic, timeout=30)
    assert answer.status_code == 409 and _reasons(answer) == {uids[0]: 0xA900}
    assert requests.post(f"{url}/studies/{study}", data=multipart(raw[:1]), headers={"Content-Type": STOW_TYPE},
                         auth=basic, timeout=30).status_code == 200  # the right study: stored (again, kept once)

    log = node.log()
    for why in ("(7FE0,0010) PixelData is cut short", "cannot be parsed", "not a storage class the node takes",
                "which the node does not take", "not to the study 1.2.3.4 the request names",
                "credentials of no STOW-RS peer", "1 instance(s) stored, 4 refused (HTTP 202)",
                "406 STOW-RS answers in application/dicom+json or application/dicom+xml, not text/html"):
        assert why in log, why
    source = dcmread(ct[0], stop_before_pixels=True)
    assert str(source.PatientName) not in log and str(source.PatientID) not in log
    assert echoscu(node.port, calling_ae="STORESCU").returncode == 0  # the node is still up


def test_multipart_parts_are_found_as_rfc_2046_writes_them():
    body = (b"preamble\r\n--b  \r\nContent-Type: application/dicom\r\n\r\nfirst\r\n"
            b"--b\r\n\r\nsecond, no headers\r\n--b\r\nContent-Type: application/dicom\r\n\r\n\r\n--b--\r\nepilogue")
    assert [body[s:e] for s, e in _parts(body, b"b")] == [b"first", b"second, no headers", b""]
    assert list(_parts(b"no delimiter here", b"b")) == []
    mid_line = b"see --b below\r\n--b\r\n\r\nonly\r\n--b--"
    assert [mid_line[s:e] for s, e in _parts(mid_line, b"b")] == [b"only"]


def test_stow_rs_framing_and_the_concurrency_limit(make_node, tmp_path, stow_env):
    node, url = stow_node(make_node, routes=[], destinations={}, max_associations=1)
    raw = [p.read_bytes() for p in make.ct_volume(tmp_path / "ct", "stow-limits", 2)]
    port = int(url.split(":")[2].split("/")[0])
    headers = (f"Content-Type: {STOW_TYPE}\r\nAuthorization: Bearer token-for-tests\r\n").encode()

    # No Content-Length and not chunked: 411, and the connection is closed (its body was not read).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        answer = s.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 411") and b"connection: close" in answer.lower()

    # One sender at a time: a second request while a body is still coming gets 503 with Retry-After.
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n" + headers + b"Content-Length: 100000\r\n\r\n--")
    try:
        wait_for(lambda: _post(url, raw[:1]).status_code == 503, 5, what="503 while the slow request holds the slot")
        busy = _post(url, raw[:1])
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert "the node's limit of 1 concurrent senders is reached" in node.log()
    finally:
        slow.close()  # the client gives up: its request ends with 400 and frees the slot
    wait_for(lambda: _post(url, raw[:1]).status_code == 200, 5, what="the slot freed")
    assert "the client closed the connection before the end of the body" in node.log()

    # Keep-alive: two requests on one connection, each answered in full.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sockets = []
    for part in raw:
        connection.request("POST", "/dicom-web/studies", body=multipart([part]),
                           headers={"Content-Type": STOW_TYPE, "Authorization": "Bearer token-for-tests"})
        sockets.append(connection.sock)
        answer = connection.getresponse()
        assert answer.status == 200 and answer.read()
    assert sockets[0] is sockets[1] is not None  # the same connection served both
    connection.close()
    assert len(list((node.spool / "series").glob("*/*/*.dcm"))) == 2

    # Expect: 100-continue: an accepted client is told to go on, then answered.
    body = multipart(raw[:1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n" + headers
                  + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        reader = s.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 100") and reader.readline() == b"\r\n"
        s.sendall(body)
        assert reader.readline().startswith(b"HTTP/1.1 200")
    # ... a refused client is answered before it sends its body.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: " + STOW_TYPE.encode()
                  + b"\r\nAuthorization: Bearer wrong\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 401")
    # Another transfer coding than chunked alone: 501.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n" + headers
                  + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 501")


def test_a_study_sent_in_batches_is_one_series_however_slow_the_next_batch(make_node, tmp_path, stow_env):
    """A study sent in several requests (as the node's own STOW-RS client does, 50 instances a
    request): the gap before the next batch has finished uploading
    must not complete the series (quiet_seconds 0.5 here, the second upload takes 2 s)."""
    out = tmp_path / "archive"
    node, url = stow_node(make_node, quiet_seconds=0.5, destinations={"archive": {"type": "folder", "path": str(out)}},
                          routes=[{"name": "ct", "match": {"Modality": "CT"}, "pipeline": "interp",
                                   "options": {"inplane_scale": 2, "method": "linear"}, "send_to": ["archive"]}])
    raw = [p.read_bytes() for p in make.ct_volume(tmp_path / "ct", "stow-batches", 4)]
    assert _post(url, raw[:2]).status_code == 200
    body = multipart(raw[2:])
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                  f"Authorization: Bearer token-for-tests\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for k in range(4):  # a slow link: the batch takes 2 s to arrive
            s.sendall(body[k * len(body) // 4:(k + 1) * len(body) // 4])
            time.sleep(0.5)
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    node.wait_jobs(lambda jobs: len(jobs) >= 1 and jobs[0]["state"] == "delivered", 60, what="delivered")
    time.sleep(1.5)  # a split series would start a second job (version 2) by now
    assert len(node.jobs()) == 1
    [series] = list(out.glob("*/*"))
    assert len(list(series.glob("*.dcm"))) == 4


def _post(url: str, parts: list[bytes]) -> requests.Response:
    return requests.post(f"{url}/studies", data=multipart(parts), timeout=30,
                         headers={"Content-Type": STOW_TYPE, "Authorization": "Bearer token-for-tests"})


def test_a_peer_sending_study_after_study_does_not_hold_the_earlier_ones(make_node, tmp_path, stow_env):
    """A PACS forwarding every new study keeps a request in flight almost all the time: a series is
    let go ``stow_hold_seconds`` after its last instance (1 s here), not when the peer pauses."""
    node, url = stow_node(make_node, quiet_seconds=0.5, stow_hold_seconds=1, destinations={}, routes=[])
    first = [p.read_bytes() for p in make.ct_volume(tmp_path / "a", "stow-busy-a", 2)]
    first_series = str(dcmread(io.BytesIO(first[0]), stop_before_pixels=True).SeriesInstanceUID)
    assert _post(url, first).status_code == 200
    deadline = time.monotonic() + 4
    k = 0
    while time.monotonic() < deadline:  # study after study, 0.3 s apart (below the quiet period)
        assert _post(url, [make.ct_volume(tmp_path / f"b{k}", f"stow-busy-b{k}", 1)[0].read_bytes()]).status_code == 200
        k += 1
        time.sleep(0.3)
        if f"series {first_series} complete" in node.log():
            break
    assert f"series {first_series} complete: 2 instances" in node.log(), "held while the peer kept sending"


def test_stow_rs_credentials_in_either_encoding_and_escaped_header_text(make_node, tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "pässwörd")
    monkeypatch.setenv(TOKEN_ENV, "tökén")
    node, url = stow_node(make_node, routes=[], destinations={})
    part = make.ct_small(tmp_path / "ct", "stow-encodings")[0].read_bytes()
    utf8 = base64.b64encode("webpacs:pässwörd".encode()).decode().rstrip("=")  # unpadded, as some clients send
    for headers in ({}, {"Authorization": f"Basic {utf8}"}):
        answer = requests.post(f"{url}/studies", data=multipart([part]), timeout=30,
                               auth=None if headers else ("webpacs", "pässwörd"),  # requests: latin-1
                               headers={"Content-Type": STOW_TYPE, **headers})
        assert answer.status_code == 200, answer.text
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # UTF-8 bearer token, odd Accept
        s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: " + STOW_TYPE.encode()
                  + b"\r\nAuthorization: Bearer " + "tökén".encode() + b"\r\nAccept: t\xe9xt/html\\n FORGED\r\n"
                  b"Content-Length: 0\r\n\r\n")
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 406")
    assert "not t\\xe9xt/html\\\\n FORGED" in node.log()  # escaped
    # A folded header line (obs-fold, a way to put a line break in a header's text) is refused by
    # the HTTP parser itself (RFC 9112 5.2 allows 400): no forged log line either way.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: " + STOW_TYPE.encode()
                  + b"\r\nAuthorization: Bearer " + "tökén".encode() + b"\r\nAccept: text/html\r\n"
                  b" 2026-01-01 00:00:00,000 INFO node.stow: FORGED\r\nContent-Length: 0\r\n\r\n")
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 400")
    assert not any(line.lstrip().startswith("2026-01-01") for line in node.log().splitlines())


def test_a_graceful_stop_answers_the_request_being_uploaded(make_node, tmp_path, stow_env):
    node, url = stow_node(make_node, routes=[], destinations={})
    raw = [p.read_bytes() for p in make.ct_volume(tmp_path / "ct", "stow-stop", 3)]
    body = multipart(raw)
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                  f"Authorization: Bearer token-for-tests\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
        time.sleep(0.3)
        node.proc.send_signal(signal.SIGTERM)  # mid-upload
        time.sleep(1)
        s.sendall(body[1000:])
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    node.proc.wait(30)
    assert len(list((node.spool / "series").glob("*/*/*.dcm"))) == 3


def test_a_body_dribbled_below_the_minimum_rate_is_cut_off(tmp_path, monkeypatch, stow_env):
    assert not too_slow(10, MIN_RATE_GRACE_S)  # nothing is judged during the grace period
    assert too_slow(MIN_RATE_BPS * 40 - 1, 40) and not too_slow(MIN_RATE_BPS * 40, 40)
    assert read_budget(0, 0) == MIN_RATE_GRACE_S and read_budget(MIN_RATE_BPS * 40, 35) == 5
    # The node's HTTP service in this process, with a 1 s grace period: a sender dribbling one byte
    # every 0.2 s is answered 408 once the grace period is over, and its slot is free again.
    monkeypatch.setattr("node.http.stow.MIN_RATE_GRACE_S", 1)
    port = free_port()
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[], destinations={},
                                                      http_port=port, max_associations=1,
                                                      peers=[{"ae_title": "RIS", "stow_auth": {"type": "bearer", "token_env": TOKEN_ENV}}])))
    node = Node(load_config(config_path))
    node.http.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
                      "Authorization: Bearer token-for-tests\r\nContent-Length: 100000\r\n\r\n".encode())
            started = time.monotonic()
            s.settimeout(0.2)
            answer = b""
            while not answer and time.monotonic() - started < 8:
                with contextlib.suppress(OSError):
                    s.sendall(b"-")
                try:
                    answer = s.recv(1000)
                except TimeoutError:
                    pass
            s.settimeout(5)
            with contextlib.suppress(OSError):  # the rest of the answer, until the node closes (or resets)
                while chunk := s.recv(1000):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"under the node's minimum of 1024 B/s" in answer
        assert 0.8 <= time.monotonic() - started < 6  # (the node started its clock a moment before this one)
        ct = make.ct_small(tmp_path / "ct", "stow-dribble")[0].read_bytes()
        assert _post(f"http://127.0.0.1:{port}/dicom-web", [ct]).status_code == 200  # the slot is free
    finally:
        node.http.stop()
        node.ledger.close()


def test_a_peers_series_stay_open_while_its_next_uploads_run_and_close_after_it_stops(tmp_path):
    """Interleaved batches (S1, S2, then more S1 uploading slowly), as one sender running two sends
    at once produces: S1 is not complete before its last batch; both complete once the peer stops."""
    spool = Spool(tmp_path / "spool").ensure()
    assembler = Assembler(spool, Ledger(spool.ledger_path), quiet_seconds=0.2)
    sessions = PeerSessions(Ingest(spool, assembler.ledger, assembler), lambda: (0.2, 5))

    def request(series: str, n: int, upload_s: float = 0.0) -> None:
        session = sessions.begin("PACS")
        time.sleep(upload_s)
        path = spool.instance_path("1.2", series, f"{series}.{n}")
        make_dirs(path.parent)
        path.write_bytes(b"x")
        assembler.instance_stored(session, "1.2", series, new=True, expected=None)
        sessions.end("PACS", {("1.2", series)})

    request("1.2.1", 1)
    request("1.2.2", 1)
    request("1.2.1", 2, upload_s=0.6)  # three quiet periods uploading
    assert assembler.due() == []
    wait_for(lambda: len(due := assembler.due()) == 2 and sorted((d.series_uid, d.count) for d in due)
             == [("1.2.1", 2), ("1.2.2", 1)], 5, what="both series complete after the peer stopped")
