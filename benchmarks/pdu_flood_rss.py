"""The node's memory while a peer tries to send one P-DATA-TF PDU that claims 1 GiB, or one
C-STORE data set of 2 GiB in PDUs within the cap (issue 21).

    python benchmarks/pdu_flood_rss.py [--claim-mib 1024] [--seconds 10]
    python benchmarks/pdu_flood_rss.py --dataset-mib 2048 [--max-dataset-mib N] [--seconds 120]

Starts `srnode run` (default limits: max_pdu_bytes 262144), associates as STORESCU, sends the PDU
header and then zeros as fast as the socket takes them, sampling the node process's RSS
(/proc/PID/status VmRSS) every 20 ms. Prints the RSS before, the peak, how many bytes the client
got out before the node cut it off, and how long that took. Before the PDU cap, the node buffered
the whole claimed length (two 1 GiB PDUs took it to 3.2 GB).

``--dataset-mib``: a C-STORE-RQ whose data set (a CT header, then Pixel Data of that size) is sent
in P-DATA-TF PDUs of the advertised maximum, each within the PDU cap; pynetdicom gathers the
fragments of a data set in memory until the last one. With ``--max-dataset-mib`` the node runs
with ``node.limits.max_dataset_bytes`` set to that (default: the node's default, 2 GiB + 128 MiB).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import struct  # noqa: E402

from tests import dicom_wire as wire  # noqa: E402
from tests.node_fixtures import NodeProcess, node_config  # noqa: E402
from tests.peers import free_port  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def dataset_header(pixel_bytes: int) -> bytes:
    """CT_small's header (Implicit VR LE, no pixel data) sized for ``pixel_bytes`` of 16-bit frames
    of 4096 x 4096, then the Pixel Data element's tag and length."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom.dsutils import encode

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = max(1, pixel_bytes // (4096 * 4096 * 2))
    return encode(ds, True, True) + struct.pack("<HHI", 0x7FE0, 0x0010, pixel_bytes)


def send_dataset(sock, total: int, max_pdu: int, deadline: float) -> tuple[int, str]:
    """C-STORE-RQ command, then a data set of ``total`` pixel bytes in PDUs of ``max_pdu``; returns
    (bytes of data set sent, how it ended)."""
    sock.sendall(wire.p_data(3, 3, wire.c_store_rq_command("1.2.826.0.1.3680043.8.498.1")))
    header = dataset_header(total)
    chunk = max_pdu - 6
    zeros = b"\0" * chunk
    size = len(header) + total
    sent = 0
    sock.settimeout(5)
    try:
        first = header + zeros[: chunk - len(header)]
        sock.sendall(wire.p_data(3, 0, first))
        sent = len(first)
        while sent < size and time.monotonic() < deadline:
            n = min(chunk, size - sent)
            sock.sendall(wire.p_data(3, 2 if sent + n >= size else 0, zeros[:n]))
            sent += n
    except OSError as exc:
        return sent, type(exc).__name__
    if sent < size:
        return sent, "deadline"
    sock.settimeout(120)
    try:
        got, _ = wire.answer(sock, 120)
    except OSError as exc:
        got = type(exc).__name__
    return sent, f"all sent; node answered {got}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim-mib", type=int, default=1024)
    parser.add_argument("--dataset-mib", type=int, default=0, help="send one data set of this size instead")
    parser.add_argument("--max-dataset-mib", type=int, default=0, help="node.limits.max_dataset_bytes (0: default)")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    limits = {"max_dataset_bytes": args.max_dataset_mib << 20} if args.max_dataset_mib else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = NodeProcess(root, node_config(free_port(), root / "spool", routes=[], destinations={},
                                             limits={"idle_timeout_s": 300, **limits})).start()
        try:
            time.sleep(1.0)
            before = rss_kib(node.proc.pid)
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_kib(node.proc.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            if args.dataset_mib:
                sock = wire.associate(node.port, max_pdu=262144)
                start = time.monotonic()
                sent, how = send_dataset(sock, args.dataset_mib << 20, 262144, start + args.seconds)
                took = time.monotonic() - start
                time.sleep(1.0)
                stop.set()
                sampler.join()
                sock.close()
                print(f"data set of {args.dataset_mib} MiB pixel data in 262144-byte PDUs; node max_dataset_bytes "
                      f"{(args.max_dataset_mib << 20) or 'default (2 GiB + 128 MiB)'}")
                print(f"client sent {sent / 2**20:.1f} MiB in {took:.1f} s: {how}")
                after_1s = rss_kib(node.proc.pid)
                time.sleep(4.0)
                print(f"node RSS: {before / 1024:.1f} MiB before, peak {peak[0] / 1024:.1f} MiB during "
                      f"(+{(peak[0] - before) / 1024:.1f} MiB); {after_1s / 1024:.1f} MiB 1 s after, "
                      f"{rss_kib(node.proc.pid) / 1024:.1f} MiB 5 s after")
                lines = [ln for ln in node.log().splitlines() if "violation" in ln or "C-STORE" in ln or "SOP" in ln]
                print("node log:", *lines[-5:], sep="\n  ")
                return
            sock = wire.associate(node.port)
            claim = args.claim_mib << 20
            sent, start, error = 0, time.monotonic(), "none (still open)"
            try:
                sock.sendall(wire.pdu(0x04, b"", length=claim))
                chunk = b"\0" * (1 << 20)
                sock.settimeout(2)
                while sent < claim and time.monotonic() - start < args.seconds:
                    sent += sock.send(chunk)
            except OSError as exc:
                error = type(exc).__name__
            cut = time.monotonic() - start
            time.sleep(1.0)
            stop.set()
            sampler.join()
            sock.close()
            print(f"claimed PDU length: {claim} bytes ({args.claim_mib} MiB); node max_pdu_bytes 262144")
            print(f"client sent {sent / 2**20:.1f} MiB before the node cut it off ({error}) after {cut:.2f} s")
            print(f"node RSS: {before / 1024:.1f} MiB before, peak {peak[0] / 1024:.1f} MiB during "
                  f"(+{(peak[0] - before) / 1024:.1f} MiB)")
            lines = [ln for ln in node.log().splitlines() if "PDU violation" in ln]
            print("node log:", *lines, sep="\n  ")
        finally:
            node.stop()


if __name__ == "__main__":
    main()
