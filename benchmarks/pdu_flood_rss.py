"""The node's memory while a peer tries to send one P-DATA-TF PDU that claims 1 GiB (issue 21).

    python benchmarks/pdu_flood_rss.py [--claim-mib 1024] [--seconds 10]

Starts `srnode run` (default limits: max_pdu_bytes 262144), associates as STORESCU, sends the PDU
header and then zeros as fast as the socket takes them, sampling the node process's RSS
(/proc/PID/status VmRSS) every 20 ms. Prints the RSS before, the peak, how many bytes the client
got out before the node cut it off, and how long that took. Before the PDU cap, the node buffered
the whole claimed length (two 1 GiB PDUs took it to 3.2 GB).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import dicom_wire as wire  # noqa: E402
from tests.node_fixtures import NodeProcess, node_config  # noqa: E402
from tests.peers import free_port  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = NodeProcess(root, node_config(free_port(), root / "spool", routes=[], destinations={})).start()
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
