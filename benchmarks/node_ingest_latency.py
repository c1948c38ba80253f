"""Ingest throughput and end-to-end latency, measured against references in the same run.

    python benchmarks/node_ingest_latency.py [--instances 300] [--repeats 3] [--latency-runs 10]

ingest:  N CT instances (pydicom's CT_small.dcm, re-identified) over ONE association with dcmtk
         storescu (TCP_NODELAY) into the node (durable: fsync'd spool + ledger; node.limits on, their
         defaults), into dcmtk storescp (plain files) and into Orthanc (SQLite index); then the same
         over DICOM TLS (storescu +tls with a client certificate, TLS 1.3) into the node's TLS port
         (client certificate required) and into a second Orthanc with DicomTlsEnabled. Median of
         repeats; ratios node/Orthanc and node/storescp, plain and TLS.
latency: association release of one CR (RG1_UNCR.dcm, pydicom-data) -> its derived series (interp
         x2 lanczos) found in Orthanc by QIDO-RS, median of runs; the reference is the same CR
         stored in Orthanc directly by storescu, and the node's configured quiet period is shown.
Run from the repository root with the test requirements installed (it uses tests/peers.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import series_factory as make  # noqa: E402
from tests.certs import CA  # noqa: E402
from tests.node_fixtures import NodeProcess, node_config  # noqa: E402
from tests.peers import Orthanc, StoreSCP, free_port, storescu  # noqa: E402


def timed_send(files, port, called_ae, extra=()) -> float:
    start = time.perf_counter()
    storescu(files, port, called_ae=called_ae, extra=extra)
    return time.perf_counter() - start


def ingest(root: Path, n: int, repeats: int) -> None:
    files = make.ct_volume(root / "ct", "bench-ingest", n)
    ca = CA(root / "pki")
    server, client = ca.issue("node", server=True), ca.issue("storescu")
    tls_args = ("+tls", str(client.private_key), str(client.certificate), "+cf", str(ca.path))
    orthanc = Orthanc(root / "orthanc").start()
    orthanc_tls = Orthanc(root / "orthanc-tls", tls={"certificate": server.certificate, "private_key": server.private_key,
                                                      "trusted": ca.path, "require_client_certificate": True}).start()
    scp = StoreSCP(root / "storescp").start()
    tls = {"port": free_port(), "certificate": str(server.certificate), "private_key": str(server.private_key),
           "ca_certificates": str(ca.path), "require_client_certificate": True}
    node = NodeProcess(root / "node", node_config(free_port(), root / "node" / "spool", routes=[], destinations={},
                                                  tls=tls))
    node.start()
    targets = (("node", node.port, "SRNODE", ()), ("storescp", scp.port, "STORESCP", ()),
               ("orthanc", orthanc.dicom_port, "ORTHANC", ()),
               ("node-tls", tls["port"], "SRNODE", tls_args), ("orthanc-tls", orthanc_tls.dicom_port, "ORTHANC", tls_args))
    rates = {name: [] for name, *_ in targets}
    try:
        for r in range(repeats):
            for name, port, aet, extra in targets:
                if name.startswith("orthanc"):
                    (orthanc if name == "orthanc" else orthanc_tls).clear()
                if name.startswith("node"):  # a fresh series each time so nothing is a duplicate
                    files = make.ct_volume(root / f"ct{r}{name}", f"bench-ingest-{r}-{name}", n)
                rates[name].append(n / timed_send(files, port, aet, extra))
    finally:
        node.stop()
        scp.stop()
        orthanc.kill()
        orthanc_tls.kill()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"ingest: {n} instances x {repeats} repeats, one association each (instances/s, median)")
    for k, v in med.items():
        print(f"  {k:<11} {v:7.1f}   runs: {', '.join(f'{x:.0f}' for x in rates[k])}")
    print(f"  ratio node/orthanc         = {med['node'] / med['orthanc']:.2f}")
    print(f"  ratio node/storescp        = {med['node'] / med['storescp']:.2f}")
    print(f"  ratio node-tls/orthanc-tls = {med['node-tls'] / med['orthanc-tls']:.2f}")
    print(f"  ratio node-tls/node        = {med['node-tls'] / med['node']:.2f}")


def latency(root: Path, runs: int) -> None:
    orthanc = Orthanc(root / "orthanc-lat").start()
    quiet = 0.5
    node = NodeProcess(root / "node-lat", node_config(
        free_port(), root / "node-lat" / "spool", quiet_seconds=quiet,
        routes=[{"name": "chest", "match": {"Modality": ["CR", "DX"]}, "pipeline": "interp",
                 "options": {"scale": 2, "method": "lanczos"}, "send_to": ["pacs"]}],
        destinations={"pacs": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}))
    node.start()
    through, direct = [], []
    try:
        for i in range(runs):
            [cr] = make.cr(root / f"cr{i}", f"bench-latency-{i}")
            from pydicom import dcmread

            src = dcmread(cr, stop_before_pixels=True)
            storescu([cr], node.port)
            released = time.perf_counter()
            while not [s for s in orthanc.series_of_study(src.StudyInstanceUID)
                       if s["0020000E"]["Value"][0] != src.SeriesInstanceUID]:
                if time.perf_counter() - released > 120:
                    raise SystemExit(f"no derived series after 120 s:\n{node.log()[-3000:]}")
                time.sleep(0.02)
            through.append(time.perf_counter() - released)
            [ref] = make.cr(root / f"ref{i}", f"bench-latency-ref-{i}")
            direct.append(timed_send([ref], orthanc.dicom_port, "ORTHANC"))
    finally:
        node.stop()
        orthanc.kill()
    print(f"latency: one CR, release -> derived series in Orthanc (s, median of {runs})")
    print(f"  through the node        {statistics.median(through):6.2f}  (quiet period {quiet} s included)")
    print(f"  storescu -> Orthanc     {statistics.median(direct):6.2f}  (reference: the source stored directly)")
    print(f"  node minus quiet period {statistics.median(through) - quiet:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--only", choices=["ingest", "latency"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="srnode-bench-") as tmp:
        root = Path(tmp)
        if args.only in (None, "ingest"):
            ingest(root, args.instances, args.repeats)
        if args.only in (None, "latency"):
            latency(root, args.latency_runs)


if __name__ == "__main__":
    main()
