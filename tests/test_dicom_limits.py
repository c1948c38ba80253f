"""The DICOM port under abuse (issue 21): bytes no toolkit would send, sent on raw sockets to a real
node (`srnode run`), from other loopback addresses (127.0.0.x) so that each abuser is its own host.

Every case must get A-ASSOCIATE-RJ, A-ABORT or a closed connection within the deadlines, leave no
traceback in the node's log, and leave the port serving a well-behaved peer at once.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
import yaml

from tests import dicom_wire as wire
from tests import series_factory as make
from tests.node_fixtures import NodeProcess, node_config
from tests.peers import echoscu, free_port, storescu, wait_for

REQUEST_TIMEOUT = 2.0  # node.limits.association_request_timeout_s in these tests
IDLE_TIMEOUT = 2.0
DEADLINE = REQUEST_TIMEOUT + 1.5  # what a case may take at most
MAX_DATASET = 1 << 20  # node.limits.max_dataset_bytes in these tests (the default is 2 GiB + 128 MiB)
SPILL = 65536  # node.limits.spill_dataset_bytes: past this a data set goes to spool/incoming (node.spill)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    config = node_config(free_port(), root / "spool", routes=[], destinations={}, bind="0.0.0.0",
                         limits={"association_request_timeout_s": REQUEST_TIMEOUT, "idle_timeout_s": IDLE_TIMEOUT,
                                 "max_dataset_bytes": MAX_DATASET, "spill_dataset_bytes": SPILL})
    proc = NodeProcess(root, config).start()
    time.sleep(0.5)
    baseline = threads(proc.proc.pid)
    yield proc
    # every connection's threads (request handler, association, DUL) have ended: none left blocked
    wait_for(lambda: threads(proc.proc.pid) <= baseline, REQUEST_TIMEOUT + IDLE_TIMEOUT + 5,
             what=lambda: f"the node's threads back to {baseline} (now {threads(proc.proc.pid)})")
    proc.stop()
    assert "Traceback" not in proc.log(), proc.log()[-5000:]
    assert "\nFORGED line" not in proc.log()  # the AE title's newline never starts a line of its own


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


_sources = iter(range(10, 250))


def source() -> str:
    """A fresh loopback address per abuser: back-off is per address."""
    return f"127.0.1.{next(_sources)}"


def serves(node: NodeProcess) -> bool:
    return echoscu(node.port, calling_ae="STORESCU", check=False).returncode == 0


# -- before the association: (bytes sent, expected answers) ---------------------------------------
rq = wire.assoc_rq_body()
BEFORE = {
    "unknown PDU type 0x08": (wire.pdu(0x08, b"\0" * 10), {"A-ABORT", "closed"}),
    "unknown PDU type 0xFF, huge length": (wire.pdu(0xFF, b"", length=0xFFFFFFFF), {"A-ABORT", "closed"}),
    "HTTP request on the DICOM port": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {"A-ABORT", "closed"}),
    "TLS ClientHello on the plain port": (bytes.fromhex("160301020001") + b"\x01" * 100, {"A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ claiming 1 GiB": (wire.pdu(0x01, rq, length=1 << 30), {"A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ claiming more than it sends": (wire.pdu(0x01, rq, length=len(rq) + 100), {"closed"}),
    "A-ASSOCIATE-RQ claiming less than it holds": (wire.pdu(0x01, rq, length=len(rq) - 40) + rq[-40:],
                                                   {"A-ABORT", "closed", "A-ASSOCIATE-RJ"}),
    "A-ASSOCIATE-RQ of length 0": (wire.pdu(0x01, b""), {"A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ, item length past the PDU": (
        wire.pdu(0x01, rq[:68] + struct.pack(">BBH", 0x10, 0, 5000) + rq[72:]), {"A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ of 70 KB (70 contexts with 1000-byte UIDs)": (
        wire.assoc_rq(contexts=[wire.context(i, b"1" * 1000, [wire.IMPLICIT_LE]) for i in range(1, 140, 2)]),
        {"A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ, 60 000-byte implementation UID": (
        wire.assoc_rq(user_items=wire.item(0x51, struct.pack(">I", 16384)) + wire.item(0x52, b"1" * 60000)),
        {"A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ, 300-byte abstract syntax UID": (
        wire.assoc_rq(contexts=[wire.context(1, b"1." * 150, [wire.IMPLICIT_LE])]),
        {"A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"}),
    # PS3.8 9.3.2.2: presentation context IDs are odd, 1-255, one per context: an invalid PDU (A-ABORT)
    "A-ASSOCIATE-RQ, even presentation context IDs": (
        wire.assoc_rq(contexts=[wire.context(2, wire.VERIFICATION, [wire.IMPLICIT_LE])]), {"A-ABORT"}),
    "A-ASSOCIATE-RQ, presentation context ID 0": (
        wire.assoc_rq(contexts=[wire.context(0, wire.VERIFICATION, [wire.IMPLICIT_LE])]), {"A-ABORT"}),
    "A-ASSOCIATE-RQ, a valid then an even presentation context ID": (
        wire.assoc_rq(contexts=[wire.context(1, wire.VERIFICATION, [wire.IMPLICIT_LE]),
                                wire.context(4, wire.CT_IMAGE, [wire.IMPLICIT_LE])]), {"A-ABORT"}),
    "A-ASSOCIATE-RQ, duplicate presentation context IDs": (
        wire.assoc_rq(contexts=[wire.context(1, wire.VERIFICATION, [wire.IMPLICIT_LE]),
                                wire.context(1, wire.CT_IMAGE, [wire.IMPLICIT_LE])]), {"A-ABORT"}),
    "A-ASSOCIATE-RQ, 300 presentation contexts (IDs past 255)": (
        wire.assoc_rq(contexts=[wire.context(i % 256, wire.VERIFICATION, [wire.IMPLICIT_LE]) for i in range(1, 600, 2)]),
        {"A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ, no presentation context": (wire.assoc_rq(contexts=[]),
                                                {"A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"}),
    "A-ASSOCIATE-RQ, wrong application context": (wire.assoc_rq(app_context=b"1.2.3"),
                                                  {"A-ASSOCIATE-RJ", "A-ABORT", "closed", "A-ASSOCIATE-AC"}),
    "A-ASSOCIATE-RQ, control characters in the calling AE": (wire.assoc_rq(calling=b"EVIL\nFORGED line"),
                                                             {"A-ASSOCIATE-RJ", "A-ABORT"}),
    "A-ASSOCIATE-RQ, max PDU length 0 (unlimited)": (wire.assoc_rq(max_pdu=0), {"A-ASSOCIATE-AC"}),
    "A-ASSOCIATE-AC sent to the acceptor": (wire.pdu(0x02, rq), {"A-ABORT", "closed"}),
    "P-DATA-TF before any association": (wire.p_data(1, 3, b"\0" * 20), {"A-ABORT", "closed"}),
    "A-RELEASE-RQ before any association": (wire.pdu(0x05, b"\0" * 4), {"A-ABORT", "closed"}),
    "A-ABORT before any association": (wire.pdu(0x07, b"\0" * 4), {"closed"}),
    "6 bytes of header, then silence": (wire.pdu(0x01, b"", length=len(rq)), {"closed"}),
    "nothing at all": (b"", {"closed"}),
}


@pytest.mark.parametrize("case", list(BEFORE))
def test_abuse_before_association(node, case):
    data, expected = BEFORE[case]
    sock = wire.connect(node.port, source())
    try:
        if data:
            sock.sendall(data)
        got, seconds = wire.answer(sock, DEADLINE)
        assert got in expected, f"{case}: answered {got}"
        if got == "A-ASSOCIATE-AC":
            sock.sendall(wire.pdu(0x07, b"\0" * 4))  # abort it ourselves
        assert wire.drain(sock, DEADLINE) == "closed", f"{case}: connection left open after {got}"
    finally:
        sock.close()
    assert serves(node)


# -- after the association is accepted ------------------------------------------------------------
AFTER = {
    "P-DATA-TF claiming 1 GiB": wire.pdu(0x04, b"\0" * 1000, length=1 << 30),
    "P-DATA-TF one byte over max_pdu_bytes": wire.pdu(0x04, b"", length=262145),
    "P-DATA-TF on a context ID never proposed": wire.p_data(99, 3, b"\0" * 20),
    "P-DATA-TF on an even context ID": wire.p_data(2, 3, b"\0" * 20),
    "P-DATA-TF, PDV length past the PDU": wire.pdu(0x04, struct.pack(">IBB", 5000, 1, 3) + b"\0" * 10),
    "P-DATA-TF, PDV length 0": wire.pdu(0x04, struct.pack(">I", 0)),
    "P-DATA-TF, command that is no DICOM": wire.p_data(1, 3, b"\xff" * 64),
    "P-DATA-TF, data set before any command": wire.p_data(3, 2, b"\0" * 64),
    "second A-ASSOCIATE-RQ": wire.assoc_rq(),
    "unknown PDU type 0x0A": wire.pdu(0x0A, b"\0" * 8),
    "A-ASSOCIATE-AC to the acceptor": wire.pdu(0x02, rq),
    "A-RELEASE-RP never asked for": wire.pdu(0x06, b"\0" * 4),
}


@pytest.mark.parametrize("case", list(AFTER))
def test_abuse_after_association(node, case):
    sock = wire.associate(node.port, source())
    try:
        sock.sendall(AFTER[case])
        got, seconds = wire.answer(sock, IDLE_TIMEOUT + 1.5)
        # A PDV on an unknown context, or an unparsable command, may be dropped: the peer then
        # waits in silence and the idle timeout aborts it.
        assert got in {"A-ABORT", "closed", "P-DATA-TF"}, f"{case}: answered {got}"
        assert wire.drain(sock, IDLE_TIMEOUT + 1.5) == "closed", f"{case}: connection left open after {got}"
    finally:
        sock.close()
    assert serves(node)


def test_oversized_pdu_aborted_at_its_header_and_logged_once(node):
    sock = wire.associate(node.port, "127.0.2.1")
    sent = 0
    try:
        sock.sendall(wire.pdu(0x04, b"", length=1 << 30))
        chunk = b"\0" * (1 << 20)
        sock.settimeout(3)
        try:
            while sent < 1 << 30:
                sent += sock.send(chunk)
        except OSError:
            pass
    finally:
        sock.close()
    assert sent < 64 << 20, f"the node kept reading: {sent} bytes sent"
    wait_for(lambda: "127.0.2.1: P-DATA-TF of 1073741824 bytes, over the maximum of 262144" in node.log(), 5,
             what="the PDU violation logged")
    assert node.log().count("PDU violation from STORESCU@127.0.2.1") == 1


def test_bad_presentation_context_ids_get_one_log_line_each(node):
    """Each refused request: one line naming the peer and the ID, none of pynetdicom's own errors."""
    for host, cid in (("127.0.2.11", 2), ("127.0.2.12", 0)):
        sock = wire.connect(node.port, host)
        try:
            sock.sendall(wire.assoc_rq(contexts=[wire.context(cid, wire.VERIFICATION, [wire.IMPLICIT_LE])]))
            assert wire.answer(sock, DEADLINE)[0] == "A-ABORT"
        finally:
            sock.close()
        line = f"(not associated)@{host}: A-ASSOCIATE-RQ with presentation context ID {cid} (must be odd, 1 to 255)"
        wait_for(lambda: line in node.log(), 5, what=line)
        assert node.log().count(f"@{host}") == 1, [ln for ln in node.log().splitlines() if host in ln]
    assert "must be an odd integer" not in node.log()  # pynetdicom's state machine never saw them
    assert serves(node)


def test_a_data_set_over_max_dataset_bytes_is_aborted_mid_message_and_logged_once(node):
    """A C-STORE whose data set keeps coming in PDUs each within max_pdu_bytes: pynetdicom would
    gather every fragment in memory; the node counts them and aborts past max_dataset_bytes (and
    removes the file the data set went to past spill_dataset_bytes)."""
    host = "127.0.2.21"
    sock = wire.associate(node.port, host, max_pdu=262144)
    fragment = wire.p_data(3, 0, b"\0" * 65536)  # data set, not the last fragment
    sent = 0
    try:
        sock.sendall(wire.p_data(3, 3, wire.c_store_rq_command("1.2.3.4.5")))
        sock.settimeout(2)
        try:
            while sent < 8 * MAX_DATASET:
                sock.sendall(fragment)
                sent += 65536
        except OSError:
            pass
        assert wire.drain(sock, DEADLINE) == "closed"
    finally:
        sock.close()
    assert MAX_DATASET < sent < 8 * MAX_DATASET, f"the node kept reading: {sent} bytes sent"
    line = f"PDU violation from STORESCU@{host}: a data set of more than {MAX_DATASET} bytes"
    wait_for(lambda: line in node.log(), 5, what=line)
    assert node.log().count(f"STORESCU@{host}") == 1
    # the part received went to a file (past SPILL), removed when the association ended
    wait_for(lambda: not list((node.spool / "incoming").iterdir()), 5, what="spool/incoming emptied")
    assert serves(node)


def test_data_sets_under_max_dataset_bytes_are_stored(node, tmp_path):
    """The count restarts with each data set: several instances on one association, together over
    the limit, each under it."""
    files = make.ct_volume(tmp_path / "ct", "dataset-cap", 40)  # 40 x 39 KB: 1.5 MiB on one association
    assert storescu(files, node.port).returncode == 0


def test_random_mutations_of_an_association_request(node):
    """A bounded fuzz loop: bit flips, cuts and length changes of a valid A-ASSOCIATE-RQ; each
    answered (or the connection closed) within the deadline. The sender shuts its side after
    sending, as a crashing modality would."""
    rng = random.Random(21)
    valid = wire.assoc_rq()
    answers: dict[str, int] = {}
    for i in range(120):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            if len(data) < 2:
                break
            kind = rng.random()
            pos = rng.randrange(len(data))
            if kind < 0.6:
                data[pos] ^= 1 << rng.randrange(8)
            elif kind < 0.8:
                data = data[:pos]
            else:
                data[pos:pos + 2] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, rng.randrange(65536)]))
        sock = wire.connect(node.port, f"127.0.3.{i + 1}")
        try:
            sock.sendall(bytes(data))
            sock.shutdown(socket.SHUT_WR)
            got, seconds = wire.answer(sock, DEADLINE)
            assert got in {"A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"}, f"mutation {i}: {got}"
            answers[got] = answers.get(got, 0) + 1
        finally:
            sock.close()
    assert serves(node), answers


# -- slots, deadlines and back-off ------------------------------------------------------------------
def test_silent_and_dripping_host_leaves_another_host_served(node, tmp_path):
    """127.0.0.2 keeps 40 silent and 40 dripping connections coming (a new wave every second, none
    closed); 127.0.0.1 echoes and stores a series at once, before and during 127.0.0.2's back-off."""
    stop = threading.Event()
    silent: list[socket.socket] = []
    dripping: list[tuple[socket.socket, bytes]] = []
    request = wire.assoc_rq()

    def attack() -> None:
        while not stop.is_set():
            for i in range(80):
                try:
                    sock = wire.connect(node.port, "127.0.0.2")
                except OSError:
                    continue
                (dripping.append((sock, request)) if i % 2 else silent.append(sock))
            for _ in range(4):  # one byte per dripping connection every 0.25 s
                for j, (sock, rest) in enumerate(dripping):
                    if rest:
                        try:
                            sock.send(rest[:1])
                        except OSError:
                            rest = b""
                        dripping[j] = (sock, rest[1:])
                if stop.wait(0.25):
                    return

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        for when, name in ((1.0, "first"), (REQUEST_TIMEOUT + 2.5, "second")):
            time.sleep(max(0.0, when - 0.0))
            files = make.ct_volume(tmp_path / name, f"limits-other-host-{name}", 20)
            start = time.monotonic()
            assert echoscu(node.port, calling_ae="STORESCU").returncode == 0
            assert storescu(files, node.port).returncode == 0
            assert time.monotonic() - start < 5, f"{name} echo + store took {time.monotonic() - start:.1f} s"
        wait_for(lambda: "DICOM associations: 127.0.0.2 refused for" in node.log(), 5,
                 what="back-off of the host whose connections timed out")
    finally:
        stop.set()
        attacker.join(5)
        for sock in silent + [sock for sock, _ in dripping]:
            sock.close()
    log = node.log()
    assert len(silent) + len(dripping) >= 400  # the attack went on all along
    assert log.count("refused a connection from 127.0.0.2") <= 2  # once per window, with a count
    assert log.count("closed a connection from 127.0.0.2") <= 2
    assert log.count("DICOM associations: 127.0.0.2 refused for") <= 3


def test_per_host_association_cap_rejects_transient(node):
    opened = [wire.associate(node.port, "127.0.4.1") for _ in range(4)]
    try:
        sock = wire.connect(node.port, "127.0.4.1")
        sock.sendall(wire.assoc_rq())
        sock.settimeout(5)
        head = sock.recv(10)
        assert head[0] == 0x03 and head[7:10] == bytes([0x02, 0x03, 0x02]), head  # transient, local limit
        sock.close()
        assert serves(node)  # another host (127.0.0.1) is not affected
    finally:
        for sock in opened:
            sock.close()
    wait_for(lambda: "4 associations from 127.0.4.1 are open" in node.log(), 5, what="cap logged")


def test_repeated_rejections_back_off_with_one_log_line(node):
    host = "127.0.5.1"
    for _ in range(5):
        sock = wire.connect(node.port, host)
        sock.sendall(wire.assoc_rq(calling=b"INTRUDER"))
        assert wire.answer(sock, 5)[0] == "A-ASSOCIATE-RJ"
        sock.close()
    refused = 0
    for _ in range(30):
        sock = wire.connect(node.port, host)
        sock.sendall(wire.assoc_rq())  # even a good one: the address is in back-off
        got, _ = wire.answer(sock, 2)
        refused += got == "closed"
        sock.close()
    assert refused == 30
    log = node.log()
    assert log.count(f"DICOM associations: {host} refused for") == 1
    assert log.count(f"rejected association from INTRUDER@{host}") == 5
    assert serves(node)


def test_idle_association_is_aborted(node):
    sock = wire.associate(node.port, "127.0.6.1")
    try:
        sock.sendall(wire.p_data(3, 0, b"\0" * 10)[:8])  # a drip of an unfinished PDU does not count
        got, seconds = wire.answer(sock, IDLE_TIMEOUT + 2)
        assert got in {"A-ABORT", "closed"} and seconds < IDLE_TIMEOUT + 1.5, (got, seconds)
    finally:
        sock.close()


def test_reloaded_limits_apply_to_new_connections(tmp_path):
    """node.limits is reloadable (node.reload): the listener takes the new config's limits."""
    from node.config import load_config
    from node.scp import StorageSCP

    def config(**limits):
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[], destinations={},
                                                   limits=limits, max_associations=3)))
        return load_config(path, check_pipelines=False)

    scp = StorageSCP(config(), ingest=None)
    assert scp.ae.maximum_pdu_size == 262144 and scp.guard.max_associations == 3
    scp.config = config(max_pdu_bytes=65536, idle_timeout_s=5, max_pending_per_host=1)
    assert scp.guard.limits.max_pending_per_host == 1
    assert scp.ae.maximum_pdu_size == 65536 and scp.ae.network_timeout == 5
