"""Raw DICOM Upper Layer bytes for tests that must send what no toolkit would (PS3.8 9.3)."""
from __future__ import annotations

import socket
import struct
import time

VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = b"1.2.840.10008.1.2"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
ANSWERS = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def pdu(kind: int, data: bytes, length: int | None = None) -> bytes:
    """A PDU; ``length`` overrides the length field (a lying one)."""
    return struct.pack(">BBI", kind, 0, len(data) if length is None else length) + data


def context(cid: int, abstract: bytes, syntaxes: list[bytes]) -> bytes:
    return item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + item(0x30, abstract)
                + b"".join(item(0x40, ts) for ts in syntaxes))


def assoc_rq_body(calling: bytes = b"STORESCU", called: bytes = b"SRNODE", contexts: list[bytes] | None = None,
                  max_pdu: int = 16384, user_items: bytes | None = None,
                  app_context: bytes = APPLICATION_CONTEXT) -> bytes:
    if contexts is None:
        contexts = [context(1, VERIFICATION, [IMPLICIT_LE]), context(3, CT_IMAGE, [IMPLICIT_LE])]
    user = user_items if user_items is not None else item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4")
    return (struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + b"\0" * 32
            + item(0x10, app_context) + b"".join(contexts) + item(0x50, user))


def assoc_rq(**kwargs) -> bytes:
    return pdu(0x01, assoc_rq_body(**kwargs))


def p_data(cid: int, header: int, data: bytes) -> bytes:
    """One P-DATA-TF with one PDV (header: bit 0 command, bit 1 last fragment)."""
    return pdu(0x04, struct.pack(">IBB", len(data) + 2, cid, header) + data)


def c_store_rq_command(sop_instance: str, sop_class: bytes = CT_IMAGE, message_id: int = 1) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1), Implicit VR LE."""
    from pydicom import Dataset
    from pynetdicom.dsutils import encode

    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class.decode()
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance
    body = encode(cmd, True, True)
    group_length = struct.pack("<HHII", 0, 0, 4, len(body))
    return group_length + body


def connect(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect((host, port))
    return sock


def answer(sock: socket.socket, timeout: float) -> tuple[str, float]:
    """What the node answered within ``timeout``: a PDU name (its body read too), "closed" or
    "nothing"; and after how many seconds."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        head = _recv_exact(sock, 6)
        _recv_exact(sock, struct.unpack(">I", head[2:6])[0])
    except socket.timeout:
        return "nothing", time.monotonic() - start
    except (ConnectionError, OSError):
        return "closed", time.monotonic() - start
    return ANSWERS.get(head[0], f"PDU 0x{head[0]:02X}"), time.monotonic() - start


def drain(sock: socket.socket, timeout: float) -> str:
    """Read until the node closes: "closed", or "open" after ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return "open"
    except OSError:
        pass
    return "closed"


def associate(port: int, source: str = "127.0.0.1", **kwargs) -> socket.socket:
    """A raw association (Verification = context 1, CT Image = context 3), accepted."""
    sock = connect(port, source)
    sock.sendall(assoc_rq(**kwargs))
    got, _ = answer(sock, 5)
    assert got == "A-ASSOCIATE-AC", got
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 65536))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)
