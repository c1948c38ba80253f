"""STOW-RS ingest throughput of the node against Orthanc's STOW-RS, measured in the same run.

    python benchmarks/stow_ingest.py [--instances 300] [--batch 10] [--repeats 3]

N CT instances (pydicom's CT_small.dcm, re-identified, a new series each repeat) are POSTed to
``/dicom-web/studies`` in requests of ``--batch`` instances (Orthanc's own STOW-RS client sends 10),
one keep-alive connection, by ``requests``: into the node (each instance checked and fsync'd before
the answer) and into Orthanc 1.10 with the DICOMweb plugin (SQLite index). The node's C-STORE ingest
of the same instances (dcmtk storescu, one association) is printed beside them. Median of repeats.
Run from the repository root with the test requirements installed (it uses tests/peers.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import series_factory as make  # noqa: E402
from tests.node_fixtures import NodeProcess, node_config  # noqa: E402
from tests.peers import Orthanc, free_port, storescu  # noqa: E402

TOKEN_ENV = "SRNODE_BENCH_STOW_TOKEN"


def stow(session: requests.Session, url: str, files: list[Path], batch: int) -> float:
    """Seconds to POST ``files`` in requests of ``batch``; every request must answer 200."""
    start = time.perf_counter()
    for i in range(0, len(files), batch):
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p.read_bytes())
                        for p in files[i:i + batch]) + b"--%s--\r\n" % boundary.encode()
        answer = session.post(f"{url}/studies", data=body, timeout=120, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        if answer.status_code != 200:
            raise SystemExit(f"{url}: HTTP {answer.status_code}: {answer.text[:300]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ[TOKEN_ENV] = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="bench-stow-"))
    stow_port = free_port()
    orthanc = Orthanc(root / "orthanc").start()
    node = NodeProcess(root / "node", node_config(
        free_port(), root / "node" / "spool", routes=[], destinations={}, http_port=stow_port,
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "BENCH", "stow_auth": {"type": "bearer", "token_env": TOKEN_ENV}}]))
    node.start()
    rates: dict[str, list[float]] = {"node STOW-RS": [], "orthanc STOW-RS": [], "node C-STORE": []}
    n = args.instances
    try:
        with requests.Session() as to_node, requests.Session() as to_orthanc:
            to_node.headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
            for r in range(args.repeats):
                orthanc.clear()
                files = make.ct_volume(root / f"ct{r}", f"bench-stow-{r}", n)
                rates["node STOW-RS"].append(n / stow(to_node, f"http://127.0.0.1:{stow_port}/dicom-web", files, args.batch))
                rates["orthanc STOW-RS"].append(n / stow(to_orthanc, orthanc.dicomweb_url, files, args.batch))
                files = make.ct_volume(root / f"cs{r}", f"bench-cstore-{r}", n)
                start = time.perf_counter()
                storescu(files, node.port)
                rates["node C-STORE"].append(n / (time.perf_counter() - start))
    finally:
        node.stop()
        orthanc.kill()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"STOW-RS ingest: {n} instances ({os.path.getsize(files[0]) // 1024} KiB each) in requests of "
          f"{args.batch}, {args.repeats} repeats (instances/s, median)")
    for k, v in med.items():
        print(f"  {k:<16} {v:7.1f}   runs: {', '.join(f'{x:.0f}' for x in rates[k])}")
    print(f"  ratio node/orthanc (STOW-RS) = {med['node STOW-RS'] / med['orthanc STOW-RS']:.2f}")


if __name__ == "__main__":
    main()
