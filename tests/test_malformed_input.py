"""The generated corpus of bad instances (tests/malformed_corpus.py) against one real node, over
C-STORE (one pynetdicom association, the data sets sent byte for byte) and over STOW-RS (one
instance a request): every case gets its status, one log line naming the element, no traceback;
every valid instance is stored; the node keeps serving."""
from __future__ import annotations

import io
import re
import socket
import struct
import time

import pytest
import requests
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from node.spool import valid_uid
from tests import malformed_corpus as corpus
from tests.peers import echoscu, free_port, wait_for

pytestmark = pytest.mark.integration

TOKEN_ENV = "SRNODE_TEST_MALFORMED_TOKEN"
PEERS = [{"ae_title": "STORESCU"}, {"ae_title": "WEBPACS", "stow_auth": {"type": "bearer", "token_env": TOKEN_ENV}}]


def node_with_stow(make_node, **kwargs):
    """The one place that knows how the node's STOW-RS is switched on; returns (node, STOW-RS base URL)."""
    port = free_port()
    node = make_node(http_port=port, **kwargs)
    return node, f"http://127.0.0.1:{port}/dicom-web"


def _association(port: int, contexts=((CTImageStorage, MRImageStorage))):
    ae = AE(ae_title="STORESCU")
    for sop_class in contexts:
        for syntax in (corpus.ExplicitVRLittleEndian, corpus.ImplicitVRLittleEndian):
            ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    return assoc


def c_store(assoc, case: corpus.Case, message_id: int, context_id: int | None = None) -> tuple[int, str]:
    """One C-STORE whose data set is the case's bytes as they are (pynetdicom would re-encode a Dataset)."""
    if context_id is None:
        context_id = next(cx.context_id for cx in assoc.accepted_contexts
                          if cx.abstract_syntax == case.sop_class and cx.transfer_syntax[0] == case.syntax)
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = case.sop_class
    request.AffectedSOPInstanceUID = case.sop
    request.Priority = 2
    request.DataSet = io.BytesIO(corpus.body_of(case.data))
    assoc._reactor_checkpoint.clear()  # as Association.send_c_store does: the reactor must not take the answer
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None, f"{case.name}: no answer (association aborted?)"
    return response.Status, str(response.ErrorComment or "")


def stow(session: requests.Session, url: str, case: corpus.Case) -> tuple[int, int]:
    boundary = "malformed-corpus"
    body = b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n--%s--\r\n" % (
        boundary.encode(), case.data, boundary.encode())
    answer = session.post(f"{url}/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    if answer.status_code == 200:
        return 200, 0
    failed = answer.json()["00081198"]["Value"][0]
    return answer.status_code, failed["00081197"]["Value"][0]


def test_every_malformed_instance_gets_its_answer_and_nothing_valid_is_lost(make_node, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "token-for-tests")
    node, url = node_with_stow(make_node, routes=[], destinations={}, peers=PEERS, quiet_seconds=0.3)
    cases = corpus.cases() + corpus.same_series_in_two_studies() + corpus.duplicates()
    assert len(cases) >= 200

    assoc = _association(node.port)
    try:
        got = {case.name: c_store(assoc, case, n + 1) for n, case in enumerate(cases)}
    finally:
        assoc.release()
    wrong = {c.name: (f"{got[c.name][0]:#06x}", got[c.name][1]) for c in cases
             if got[c.name][0] != c.status or c.element not in got[c.name][1] and c.element[:1] == "("}
    assert not wrong, wrong

    session = requests.Session()
    session.headers["Authorization"] = "Bearer token-for-tests"
    answers = {case.name: stow(session, url, case) for case in cases}
    wrong = {c.name: answers[c.name] for c in cases
             if answers[c.name] != ((200, 0) if c.status == 0 else (409, c.status))}
    assert not wrong, wrong

    log = node.log()
    assert "Traceback" not in log
    for case in cases:
        if case.status and valid_uid(case.sop) and case.name != "duplicate-other-content":
            lines = re.findall(rf"^.*C-STORE from STORESCU: SOP {re.escape(case.sop)} refused.*$", log, re.M)
            assert len(lines) == 1 and case.element in lines[0], (case.name, lines)
    for case in cases:  # every valid instance is in the spool
        if case.status == 0:
            assert list(node.spool.glob(f"series/*/*/{case.sop}.dcm")), case.name
    shared = corpus.same_series_in_two_studies()
    series = shared[0].extra["series"]
    for case in shared:  # the same Series UID in two studies: two series, both complete
        wait_for(lambda c=case: f"series {series} complete: 1 instances (quiet period), study {c.extra['study']}"
                 in node.log(), 10, what=f"{case.name} complete")
    assert echoscu(node.port, calling_ae="STORESCU").returncode == 0  # still serving


def test_a_c_store_on_the_verification_context_is_not_answered_as_an_echo(make_node):
    """pynetdicom chooses the service by the request's SOP class: a C-STORE naming the Verification
    class went to the C-ECHO handler and got 'success' with nothing stored. Now the association is
    aborted; a C-STORE naming a storage class on a context of another class gets 0x0122."""
    node = make_node(routes=[], destinations={}, peers=PEERS)
    [case] = [c for c in corpus.duplicates() if c.name == "duplicate-first"]
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, [corpus.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
    assert assoc.is_established
    mr_context = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == MRImageStorage)
    status, comment = c_store(assoc, case, 1, context_id=mr_context)  # a CT instance on the MR context
    assert status == 0x0122 and "presentation context" in comment
    verification = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == Verification)
    echo_store = corpus.Case("store-as-echo", case.data, 0, sop=case.sop, sop_class=Verification,
                             syntax=corpus.ImplicitVRLittleEndian)
    with pytest.raises(AssertionError, match="no answer"):
        c_store(assoc, echo_store, 2, context_id=verification)
    wait_for(lambda: "a C-STORE request on the Verification presentation context" in node.log(), 5, what="log")
    assert not list(node.spool.glob("series/*/*/*.dcm"))
    assert "Traceback" not in node.log()


def _associate_rq(calling: bytes, called: bytes = b"SRNODE") -> bytes:
    """A minimal A-ASSOCIATE-RQ (PS3.8 9.3.2) with Verification, AE titles as given (16 bytes)."""
    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(payload)) + payload
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    context = item(0x20, struct.pack(">Bxxx", 1) + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">Hxx", 1) + called.ljust(16) + calling.ljust(16) + bytes(32) + app + context + user
    return struct.pack(">BxI", 1, len(body)) + body


def test_a_newline_in_an_ae_title_cannot_forge_a_log_line(make_node):
    """Every line the node writes (its own, pynetdicom's at DEBUG) escapes control characters."""
    node = make_node(routes=[], destinations={}, peers=PEERS)
    node.stop()
    node.config["node"]["log_level"] = "DEBUG"  # pynetdicom's own lines too
    node.config_path.write_text(__import__("yaml").safe_dump(node.config))
    node.start()
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(_associate_rq(b"EVIL\nFORGED LINE"))
        assert sock.recv(1)[:1] in (b"\x03", b"\x07")  # A-ASSOCIATE-RJ or A-ABORT (pynetdicom refuses to decode it)
    wait_for(lambda: "EVIL\\nFORGED LINE" in node.log(), 5, what="the AE title logged, escaped")
    assert not re.search(r"^FORGED", node.log(), re.M)
